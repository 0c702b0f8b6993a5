"""Tests for mergelaws.uncertainty: bootstrap intervals (recovery of the paper's laws),
the vectorised refit, hold-out errors and the finite-pool law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mergelaws import fit as F
from mergelaws import uncertainty as U

# PAPER.md 3.1: Table 3 (Average) and Table 4 (TA): L*, B, beta, A0, gamma, b0
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
# PAPER.md 3.3: variance across subsets, Var = a0 N^-gamma / (k + b0) (V*, B^var ~ 0):
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
SIZES_B = {"0.5B": 0.5, "1.5B": 1.5, "3B": 3.0, "7B": 7.0, "14B": 14.0, "32B": 32.0, "72B": 72.0}
KS = np.arange(1, 10)
N_SUBSETS = 126  # subsets per k: max C(9, k), the most the paper could draw per k


def synth_losses(n_subsets: int = N_SUBSETS, seed: int = 0) -> pd.DataFrame:
    """A losses table: per (method, size, k) n_subsets i.i.d. subsets, each scored on every
    domain as truth + N(0, Var(N, k)) with the paper's variance law."""
    rng = np.random.default_rng(seed)
    parts = []
    for method, tab, var in (("average", TABLE3, TABLE6), ("task_arithmetic", TABLE4, TABLE8)):
        for size, N in SIZES_B.items():
            for d, (Ls, B, beta, A0, gamma, b0) in tab.items():
                a0, g, bv = var[d]
                k = np.repeat(KS, n_subsets)
                mu = Ls + B * N ** -beta + A0 * N ** -gamma / (k + b0)
                sd = np.sqrt(a0 * N ** -g / (k + bv))
                parts.append(pd.DataFrame({
                    "size": size, "params": int(round(N * 1e9)), "method": method, "k": k,
                    "subset": [f"k{kk}-{j}" for kk in KS for j in range(n_subsets)],
                    "members": "", "eval_domain": d, "in_domain": False,
                    "loss": mu + sd * rng.standard_normal(k.size)}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def synth():
    return synth_losses()


def recovery(synth, n_boot=200):
    rows = []
    for d in TABLE3:
        b = U.bootstrap_per_size(synth, view=f"domain:{d}", n_boot=n_boot, seed=1)
        for _, r in b[b["parameter"].isin(["L_inf", "A"])].iterrows():
            Ls, B, beta, A0, gamma, _b0 = (TABLE3 if r["method"] == "average" else TABLE4)[d]
            N = r["params"] / 1e9
            true = Ls + B * N ** -beta if r["parameter"] == "L_inf" else A0 * N ** -gamma
            rows.append({"domain": d, "method": r["method"], "size": r["size"],
                         "parameter": r["parameter"], "true": true, "estimate": r["estimate"],
                         "lo": r["lo"], "hi": r["hi"], "frac_converged": r["frac_converged"]})
    out = pd.DataFrame(rows)
    out["covered"] = (out["lo"] <= out["true"]) & (out["true"] <= out["hi"])
    out["rel_err"] = (out["estimate"] - out["true"]).abs() / out["true"].abs()
    return out


def test_bootstrap_recovers_paper_laws(synth):
    rec = recovery(synth)
    assert len(rec) == 2 * 9 * 7 * 2  # methods x domains x sizes x (L_inf, A)
    assert (rec["frac_converged"] == 1.0).all()
    cov = rec.groupby("parameter")["covered"].mean()
    worst = rec.groupby("parameter")["rel_err"].max()
    # nominal 95%; percentile intervals of a 3-parameter nonlinear fit under-cover a little
    assert cov["L_inf"] >= 0.85, cov
    assert cov["A"] >= 0.85, cov
    # measured (seed 0/1): coverage L_inf 0.91, A 0.90; worst rel. error L_inf 1.6%, A 177%
    assert worst["L_inf"] < 0.03, worst     # the floor to a few percent at worst
    assert worst["A"] < 3.0, worst          # A trades off against a free b: loosely pinned
    assert rec.loc[rec["parameter"] == "A", "rel_err"].median() < 0.2


def test_batch_fit_matches_fit_per_size():
    rng = np.random.default_rng(3)
    k = np.arange(1, 10, dtype=float)
    Y = 3.4 + 0.3 / (k + 0.7) + rng.normal(0, 0.01, (40, 9)) / np.sqrt(k)
    for w in ("k", "none"):
        batch = U.fit_per_size_batch(k, Y, weights=w)
        for r in range(0, 40, 3):
            f = F.fit_per_size(k, Y[r], weights=w)
            assert batch.loc[r, "L_inf"] == pytest.approx(f["L_inf"], abs=1e-6)
            assert batch.loc[r, "A"] == pytest.approx(f["A"], rel=1e-5, abs=1e-7)
            assert batch.loc[r, "b"] == pytest.approx(f["b"], abs=1e-5)
    exact = U.fit_per_size_batch(k, (0.5 + 0.2 / (k + 0.3))[None, :])
    assert exact.loc[0, "b"] == pytest.approx(0.3, abs=1e-7)


def small_table(seed=0):
    # a small realistic table: 2 sizes x 2 methods, 3 domains, 5 subsets per k, k = 0..6
    rng = np.random.default_rng(seed)
    rows = []
    for size, params, L in (("a", 100_000, 4.0), ("b", 400_000, 3.6)):
        for method, A in (("average", 0.3), ("task_arithmetic", 0.2)):
            for k in range(0, 7):
                for j in range(1 if k in (0, 6) else 5):
                    for d in ("x", "y", "z"):
                        mu = L + 0.1 if k == 0 else L + A / (k + 0.2)
                        sd = 0 if k == 0 else 0.02 / np.sqrt(k)
                        rows.append((size, params, method, k, f"s{k}-{j}", "", d, False,
                                     mu + sd * rng.standard_normal(), 100))
    return pd.DataFrame(rows, columns=["size", "params", "method", "k", "subset", "members",
                                       "eval_domain", "in_domain", "loss", "tokens"])


def test_bootstrap_deterministic_and_shaped():
    t = small_table()
    a = U.bootstrap_per_size(t, n_boot=50, seed=7)
    b = U.bootstrap_per_size(t, n_boot=50, seed=7)
    c = U.bootstrap_per_size(t, n_boot=50, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["lo"].equals(c["lo"])
    assert len(a) == 2 * 2 * 3 and set(a["parameter"]) == {"L_inf", "A", "b"}
    assert ((a["lo"] <= a["estimate"] + 1e-9) | (a["parameter"] == "b")).all()
    # the point estimate is the fit_all per-size fit
    fits = F.fit_all(t, views=["cross_domain"])
    f = next(x for x in fits["per_size"] if x["size"] == "a" and x["method"] == "average")
    est = a[(a["size"] == "a") & (a["method"] == "average")].set_index("parameter")["estimate"]
    assert est["L_inf"] == pytest.approx(f["L_inf"], abs=1e-7)
    # one cell's draws do not depend on the other cells
    one = U.bootstrap_per_size(t[t["size"] == "a"], n_boot=50, seed=7)
    pd.testing.assert_frame_equal(one.reset_index(drop=True),
                                  a[a["size"] == "a"].reset_index(drop=True))


def test_holdout_errors():
    t = small_table()
    h = U.holdout_errors(t)
    ke = h[h["kind"] == "k_extrapolation"]
    assert len(ke) == 4 and ke["converged"].all()
    assert (ke["predict_k"] == "5..6").all() and (ke["mae"] < 0.05).all()
    se = h[h["kind"] == "size_extrapolation"]
    assert len(se) == 2 and not se["converged"].any() and se["reason"].str.contains(">= 4 sizes").all()


def test_holdout_size_extrapolation_with_four_sizes():
    rows = []
    p = TABLE3["code"]
    for N in (0.5, 1.5, 3.0, 7.0):
        for k in range(1, 10):
            y = p[0] + p[1] * N ** -p[2] + p[3] * N ** -p[4] / (k + p[5])
            rows.append((f"{N}B", int(N * 1e9), "average", k, f"s{k}", "", "code", False, y, 1))
    t = pd.DataFrame(rows, columns=["size", "params", "method", "k", "subset", "members",
                                    "eval_domain", "in_domain", "loss", "tokens"])
    h = U.holdout_errors(t)
    se = h[h["kind"] == "size_extrapolation"].iloc[0]
    assert se["converged"] and se["size"] == "7.0B"
    assert se["max_rel_err"] < 0.01


def test_finite_pool_fit():
    M = 9
    k = np.arange(1, M + 1, dtype=float)
    y = 2.0 + 0.4 * (M - k) / ((M - 1) * (k + 0.5))
    r = U.finite_pool_fit(k, y, M)
    fp = r["finite_pool"]
    assert fp["converged"] and fp["L_inf"] == pytest.approx(2.0, abs=1e-7)
    assert fp["A"] == pytest.approx(0.4, rel=1e-5) and fp["b"] == pytest.approx(0.5, abs=1e-4)
    assert fp["rmse"] < 1e-8 and r["better"] == "finite_pool"
    assert r["plain"]["L_inf"] < 2.0  # the plain law's "floor" sits below the full-pool merge
    # with b = 0 the two laws are the same family: A(M-k)/((M-1)k) = A M/(M-1)/k - A/(M-1)
    y0 = 2.0 + 0.4 * (M - k) / ((M - 1) * k)
    r0 = U.finite_pool_fit(k, y0, M)
    assert r0["plain"]["L_inf"] == pytest.approx(2.0 - 0.4 / (M - 1), abs=1e-6)
    assert r0["plain"]["A"] == pytest.approx(0.4 * M / (M - 1), rel=1e-5)
    assert abs(r0["delta_r2"]) < 1e-9
