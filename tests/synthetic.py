"""Synthetic losses tables.

* ``synthetic_losses``, for the figure tests (tests/test_plots*.py): 3 sizes x 2 methods drawn
  from L = 2 + 0.05 N^-0.3 + A/(k + 0.3), A = 0.10 (average) or 0.07 (ties), with an in-domain
  bonus and noise across subsets; k = 0 is the base model.
* ``synth_losses``, for the recovery and coverage checks (tests/test_uncertainty.py,
  tests/test_intervals.py, benchmarks/interval_coverage.py): the paper's laws of the mean
  (Tables 3/4/5) and of the variance across subsets (Tables 6/8/10) at its 7 sizes and
  k = 1..9, with a design (subsets per (size, k)): ``sampled_design`` (15 everywhere) or
  ``enumerated_design`` (the paper's: every C(9, k) subset up to 7B, at most 15 above)."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pandas as pd

SIZES = (("xs", 2_000_000), ("s", 8_000_000), ("m", 30_000_000))


def synthetic_losses(domains: list[str], *, seed: int = 0, per_k: int | None = None,
                     in_domain_bonus: float = 0.05) -> pd.DataFrame:
    """Every subset of `domains` for each k (the first `per_k` of them, if given)."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, amp in (("average", 0.10), ("ties", 0.07)):
        for size, params in SIZES:
            N = params / 1e9
            for k in range(len(domains) + 1):
                subsets = list(itertools.combinations(domains, k))[:per_k]
                for S in subsets:
                    for e in domains:
                        if k == 0:
                            loss = 2.0 + 0.05 * N ** -0.3 + 0.2 + 0.01 * domains.index(e)
                        else:
                            loss = (2.0 + 0.05 * N ** -0.3 + amp / (k + 0.3)
                                    - in_domain_bonus * (e in S) + rng.normal(0, 0.01))
                        rows.append({"size": size, "params": params, "method": method, "k": k,
                                     "subset": "base" if k == 0 else "+".join(S),
                                     "members": "+".join(S), "eval_domain": e,
                                     "in_domain": e in S, "loss": loss, "tokens": 100})
    return pd.DataFrame(rows)


# The paper's Table 3 (Average) and Table 4 (TA): L*, B, beta, A0, gamma, b0
TABLE3 = {
    "algebra": (0.18092, 0.11453, 0.42335, 0.052334, 0.0086009, 0.096378),
    "analysis": (0.18784, 0.11445, 0.46899, 0.054877, 0.02738, 0.1375),
    "biology": (0.63884, 0.6201, 0.37247, 0.1588, 1.4702e-11, 0.022561),
    "chemistry": (0.50824, 0.54954, 0.34262, 0.12219, 2.15e-08, 1.668e-14),
    "code": (0.28292, 0.20851, 0.41186, 0.082102, 0.13678, 0.43453),
    "discrete": (0.2052, 0.3295, 0.26766, 0.066181, 4.7525e-12, 9.8614e-05),
    "geometry": (0.20278, 0.16029, 0.35431, 0.052369, 1.3982e-12, 0.0087202),
    "number_theory": (0.21726, 0.16818, 0.38339, 0.055823, 6.8172e-09, 0.0070628),
    "physics": (0.54195, 0.52847, 0.33756, 0.1111, 0.0038941, 9.3222e-17),
}
TABLE4 = {
    "algebra": (0.1912, 0.10481, 0.48613, 0.031756, 2.0539e-12, 3.0949e-12),
    "analysis": (0.19859, 0.10452, 0.53812, 0.032072, 0.020433, 8.3408e-12),
    "biology": (0.67453, 0.6048, 0.39438, 0.10437, 2.0948e-10, 6.7298e-13),
    "chemistry": (0.5471, 0.52754, 0.3698, 0.079144, 1.4331e-15, 5.2296e-13),
    "code": (0.29195, 0.19378, 0.4604, 0.061683, 0.11845, 0.41132),
    "discrete": (0.26439, 0.26479, 0.36064, 0.045787, 5.5863e-10, 1.153e-15),
    "geometry": (0.21888, 0.14605, 0.40757, 0.034849, 3.6096e-12, 6.4127e-08),
    "number_theory": (0.23532, 0.15, 0.45207, 0.037155, 2.7958e-12, 4.9617e-11),
    "physics": (0.57646, 0.50399, 0.36559, 0.073691, 1.0052e-07, 5.0247e-15),
}
# App. H.2: variance across subsets, Var = a0 N^-gamma / (k + b0) (V*, B^var ~ 0):
# Table 6 (Average) and Table 8 (TA): a0, gamma, b0
TABLE6 = {
    "algebra": (0.00159, 0.0178, 1.89e-11), "discrete": (0.00254, 0.00496, 2.29e-19),
    "analysis": (0.00146, 0.0283, 1.57e-12), "geometry": (0.00192, 0.032, 1.82e-16),
    "code": (0.0085, 0.254, 0.912), "number_theory": (0.00248, 0.0273, 5.79e-13),
    "chemistry": (0.0393, 0.127, 0.205), "physics": (0.0229, 0.119, 0.125),
    "biology": (0.0556, 0.151, 0.272),
}
TABLE8 = {
    "algebra": (0.00109, 1.62e-06, 3.41e-16), "discrete": (0.0017, 1.14e-10, 9.33e-23),
    "analysis": (9.98e-04, 2.01e-06, 7.55e-23), "geometry": (0.00133, 0.00682, 5.56e-16),
    "code": (0.00525, 0.206, 0.514), "number_theory": (0.00171, 5.25e-07, 8.13e-21),
    "chemistry": (0.0266, 0.112, 1.88e-11), "physics": (0.0169, 0.0995, 1.70e-28),
    "biology": (0.0372, 0.137, 4.71e-12),
}
# The paper's Table 5 (TIES; lambda not stated) and App. H.2 Table 10 (TIES variance: a0, gamma, b0)
TABLE5 = {
    "algebra": (0.18929, 0.10752, 0.46554, 0.035371, 0.011425, 0.19757),
    "analysis": (0.19237, 0.10912, 0.50434, 0.050902, 0.016536, 0.58856),
    "biology": (0.6077, 0.60414, 0.38384, 0.37301, 0.0080666, 1.1634),
    "chemistry": (0.48423, 0.53452, 0.35563, 0.30644, 0.0069314, 1.2221),
    "code": (0.26877, 0.21391, 0.38297, 0.079839, 0.11961, 1.1999),
    "discrete": (0.22555, 0.30917, 0.28993, 0.037062, 2.9507e-10, 1.2161e-08),
    "geometry": (0.21017, 0.15222, 0.38672, 0.051128, 5.5086e-10, 0.39637),
    "number_theory": (0.22585, 0.15954, 0.41453, 0.046348, 1.0173e-09, 0.27291),
    "physics": (0.53415, 0.51524, 0.34897, 0.15923, 0.00073252, 0.50358),
}
TABLE10 = {
    "algebra": (7.48e-04, 7.09e-11, 1.94e-09), "discrete": (0.00117, 6.34e-13, 8.13e-11),
    "analysis": (6.83e-04, 1.33e-08, 3.31e-09), "geometry": (8.99e-04, 1.43e-11, 2.86e-08),
    "code": (0.00424, 0.12, 1.09), "number_theory": (0.00114, 8.10e-12, 6.51e-11),
    "chemistry": (0.0241, 0.00132, 0.446), "physics": (0.0137, 0.00363, 0.164),
    "biology": (0.0344, 0.0366, 0.397),
}
# the variance fits' B^var N^-beta^var term, where it is not ~0 (App. H.2: TA and TIES code)
VAR_FLOOR = {("task_arithmetic", "code"): (2.30e-05, 3.0), ("ties", "code"): (1.76e-05, 3.0)}
#: method -> (mean-law table, variance-law table)
METHOD_TABLES = {"average": (TABLE3, TABLE6), "task_arithmetic": (TABLE4, TABLE8),
                 "ties": (TABLE5, TABLE10)}
SIZES_B = {"0.5B": 0.5, "1.5B": 1.5, "3B": 3.0, "7B": 7.0, "14B": 14.0, "32B": 32.0, "72B": 72.0}
KS = np.arange(1, 10)
N_SUBSETS = 126  # subsets per k: max C(9, k), the most the paper could draw per k


def paper_noise_sd(method: str, domain: str, N: float, k) -> np.ndarray:
    """sd across subsets from the paper's variance law (Tables 6/8/10):
    Var = B^var N^-beta^var + a0 N^-gamma / (k + b0) (V* ~ 0)."""
    a0, g, bv = METHOD_TABLES[method][1][domain]
    Bv, betav = VAR_FLOOR.get((method, domain), (0.0, 0.0))
    return np.sqrt(Bv * N ** -betav + a0 * N ** -g / (np.asarray(k, dtype=float) + bv))


def synth_losses(n_subsets=N_SUBSETS, seed: int = 0, methods=tuple(METHOD_TABLES)) -> pd.DataFrame:
    """A losses table: per (method, size, k) ``n_subsets`` i.i.d. subsets (a number, or a
    function (N, k) -> number), each scored on every domain as truth + N(0, Var(N, k)) with
    the paper's law of the mean (Tables 3/4/5) and of the variance (Tables 6/8/10)."""
    rng = np.random.default_rng(seed)
    parts = []
    for method in methods:
        tab = METHOD_TABLES[method][0]
        for size, N in SIZES_B.items():
            n_k = [int(n_subsets(N, kk)) if callable(n_subsets) else int(n_subsets) for kk in KS]
            k = np.repeat(KS, n_k)
            subsets = [f"k{kk}-{j}" for kk, n in zip(KS, n_k) for j in range(n)]
            for d, (Ls, B, beta, A0, gamma, b0) in tab.items():
                mu = Ls + B * N ** -beta + A0 * N ** -gamma / (k + b0)
                sd = paper_noise_sd(method, d, N, k)
                parts.append(pd.DataFrame({
                    "size": size, "params": int(round(N * 1e9)), "method": method, "k": k,
                    "subset": subsets, "members": "", "eval_domain": d, "in_domain": False,
                    "loss": mu + sd * rng.standard_normal(k.size)}))
    return pd.concat(parts, ignore_index=True)


def sampled_design(N, k):
    """15 subsets per (size, k): Algorithm 1's 15 orders at the sampled sizes (Fig 12)."""
    return 15


def enumerated_design(N, k):
    """The paper's design: every C(9, k) subset up to 7B, at most 15 above (so 1 at k = 9)."""
    return comb(9, int(k)) if N <= 7 else min(comb(9, int(k)), 15)
