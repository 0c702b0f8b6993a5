"""Synthetic losses tables for the figure tests (tests/test_plots*.py): 3 sizes x 2 methods drawn
from L = 2 + 0.05 N^-0.3 + A/(k + 0.3), A = 0.10 (average) or 0.07 (ties), with an in-domain
bonus and noise across subsets; k = 0 is the base model."""

from __future__ import annotations

import itertools

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
