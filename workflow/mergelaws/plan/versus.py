"""Merging vs the multitask model: at which k a merge matches the multitask reference's loss,
measured and on the fitted law (with its bootstrap interval), and at what fraction of the
multitask model's measured compute (the paper's Fig 2 and Table 13)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from mergelaws.plan.answers import experts_needed

__all__ = ["multitask_value", "versus_rows"]


def multitask_value(rows: pd.DataFrame, view: str) -> float | None:
    """The multitask model's value in a view: the macro mean over every eval domain for
    ``cross_domain`` and ``in_domain`` (all domains are its own), one domain's loss for
    ``domain:<name>``; None for ``held_out`` (no domain is held out of its training)."""
    ok = rows[np.isfinite(rows["loss"].astype(float))]
    if ok.empty or view == "held_out":
        return None
    if view.startswith("domain:"):
        d = ok[ok["eval_domain"] == view.split(":", 1)[1]]
        return float(d["loss"].mean()) if len(d) else None
    return float(ok.groupby("eval_domain")["loss"].mean().mean())


def _pct(v: np.ndarray, q: float) -> int | None:
    if v.size == 0:
        return None
    x = float(np.percentile(v, q, method="inverted_cdf"))
    return int(x) if np.isfinite(x) else None


def versus_rows(multitask: pd.DataFrame, tables: Mapping[str, pd.DataFrame],
                laws: Mapping[str, Mapping], draws: Mapping[str, pd.DataFrame],
                measured_costs: Mapping[str, Mapping] | None, M: int, pool: int) -> list[dict]:
    """One row per (view, size, method): the multitask loss, the first measured k whose mean is at
    or below it, the law's k with its interval over the bootstrap refits, and the compute
    fraction (k experts + one merge and its evaluation, over the multitask model's training and
    evaluation) where the ledger measured all three. ``tables``/``laws``/``draws``: per view,
    the per-k means, the per-size laws ``{(size, method): law}`` and the bootstrap draws."""
    out = []
    costs = measured_costs or {}
    for view, table in tables.items():
        for size, mt in multitask.groupby("size", sort=False):
            target = multitask_value(mt, view)
            if target is None:
                continue
            size = str(size)
            for method, h in table[(table["size"] == size) & (table["k"] >= 1)].groupby("method", sort=True):
                h = h.sort_values("k")
                hit = h[h["mean"] <= target]
                k_meas = int(hit["k"].iloc[0]) if len(hit) else None
                law = laws.get(view, {}).get((size, str(method)))
                k_law = experts_needed(law, target) if law else None
                d = draws.get(view)
                arr = np.array([])
                if d is not None and len(d):
                    d = d[(d["size"] == size) & (d["method"] == method) & d["converged"].astype(bool)]
                    ks = [experts_needed(r, target) for r in d[["L_inf", "A", "b"]].to_dict("records")]
                    arr = np.array([np.inf if v is None else v for v in ks], dtype=float)
                c = costs.get(size, {})
                k_cost = k_meas if k_meas is not None else k_law
                have = all(x in c for x in ("expert", "merge", "multitask")) and k_cost is not None
                merging = k_cost * c["expert"] + c["merge"] if have else None
                out.append({
                    "view": view, "size": size, "method": str(method), "multitask_loss": target,
                    "best_merge_loss": float(h["mean"].min()), "best_merge_k": int(h.loc[h["mean"].idxmin(), "k"]),
                    "k_measured": k_meas, "k_law": k_law, "k_lo": _pct(arr, 2.5), "k_hi": _pct(arr, 97.5),
                    "frac_unreachable": float(np.mean(~np.isfinite(arr))) if arr.size else None,
                    "reach": None if k_law is None else
                    "measured" if k_law <= M else "extrapolated" if k_law <= pool else "beyond_pool",
                    "cost_merging_s": merging, "cost_multitask_s": c.get("multitask"),
                    "fraction": merging / c["multitask"] if have else None,
                    "fraction_merge_only": (c["merge"] / c["multitask"]
                                            if "merge" in c and "multitask" in c else None),
                })
    return out
