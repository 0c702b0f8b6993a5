"""Out-of-sample checks of the laws.

* ``holdout_largest_size``: fit the unified law on every size but the largest and predict
  the largest size's curve (run for every unified fit of ``fit_all``);
* ``holdout_errors``: that check per method, and the per-size law fitted on k <= 4 and
  extrapolated to the larger k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mergelaws.laws.per_size import fit_per_size, predict_per_size
from mergelaws.laws.unified import HoldoutCheck, UnifiedFit, fit_unified, predict_unified
from mergelaws.laws.views import view_table

__all__ = ["MIN_SIZES_HOLDOUT", "holdout_largest_size", "holdout_errors"]

#: fewest sizes for the held-out-size check: the unified law needs 3 to fit, plus 1 held out
MIN_SIZES_HOLDOUT = 4


def holdout_largest_size(cells: pd.DataFrame, weights: Any = "k",
                         bounds: dict[str, tuple[float, float]] | None = None,
                         loss: str = "linear", f_scale: float | None = None,
                         full_fit: UnifiedFit | None = None) -> HoldoutCheck:
    """Held-out size validation of the unified law: fit it on every size but the largest and
    predict the largest size's curve (k >= 1).

    ``cells``: the per-k means of one (method, view), columns ``params, size, k, mean, sem``
    (a slice of ``view_table``).  Returns a ``HoldoutCheck``: ``status`` ("ok", "skipped:
    needs >= 4 sizes ..." or "failed: <reason>"), ``size`` (the held-out size),
    ``fit_sizes``, ``predict_k``, ``n_predicted``, ``mae``, ``rmse``, ``max_rel_err`` (max
    |pred - meas| / meas) and ``err_at_M`` (pred - meas at the largest k), ``converged``,
    ``reason``; and, with ``full_fit`` (the unified fit on every size), ``insample_mae`` /
    ``insample_rmse``: that fit's errors on the same points, to read next to the
    out-of-sample ones.
    """
    c = cells[cells["k"] >= 1].sort_values(["params", "k"])
    sizes = c[["params", "size"]].drop_duplicates().sort_values("params")
    out = HoldoutCheck(size=str(sizes["size"].iloc[-1]) if len(sizes) else None,
                       fit_sizes=[str(v) for v in sizes["size"].iloc[:-1]])
    if len(sizes) < MIN_SIZES_HOLDOUT:
        out.status = out.reason = (
            f"skipped: needs >= {MIN_SIZES_HOLDOUT} sizes (the unified law needs >= 3 to fit, "
            f"plus 1 held out); this table has {len(sizes)}")
        return out
    big = int(sizes["params"].iloc[-1])
    tr, te = c[c["params"] != big], c[c["params"] == big]
    f = fit_unified(tr["params"].to_numpy() / 1e9, tr["k"].to_numpy(), tr["mean"].to_numpy(),
                    weights=weights, bounds=bounds, sem=tr["sem"].to_numpy(), loss=loss,
                    f_scale=f_scale)
    out.update(converged=f.converged, n_predicted=int(len(te)),
               predict_k=f"{int(te['k'].min())}..{int(te['k'].max())}")
    if not f.converged:
        out.status = out.reason = f"failed: {f.reason}"
        return out
    meas = te["mean"].to_numpy()
    pred = predict_unified(f, te["params"].to_numpy() / 1e9, te["k"].to_numpy())
    e = pred - meas
    out.update(status="ok", mae=float(np.mean(np.abs(e))), rmse=float(np.sqrt(np.mean(e**2))),
               max_rel_err=float(np.max(np.abs(e) / np.abs(meas))), err_at_M=float(e[-1]))
    if full_fit is not None and full_fit.converged:
        e_in = predict_unified(full_fit, te["params"].to_numpy() / 1e9, te["k"].to_numpy()) - meas
        out.update(insample_mae=float(np.mean(np.abs(e_in))),
                   insample_rmse=float(np.sqrt(np.mean(e_in**2))))
    return out


def holdout_errors(losses: pd.DataFrame, view: str = "cross_domain", k_fit_max: int = 4,
                   weights: Any = "k", loss: str = "linear",
                   f_scale: float | None = None) -> pd.DataFrame:
    """Out-of-sample errors of the laws.

    (a) ``kind="k_extrapolation"``, one row per (size, method): fit the per-size law on
    1 <= k <= ``k_fit_max``, predict k = k_fit_max+1..M (M = the largest k measured) and
    compare with the measured means: ``mae`` (mean absolute error), ``max_rel_err``
    (max |pred - meas| / meas), ``err_at_M`` (signed, pred - meas at k = M).
    (b) ``kind="size_extrapolation"``, one row per method (``holdout_largest_size``):
    with >= 4 sizes, fit the unified law on all but the largest size and predict the largest
    at every k >= 1 (``rmse`` and ``insample_rmse``, the all-size fit's error on the same
    points, too); with fewer, ``reason`` says "skipped: needs >= 4 sizes ...".
    """
    table = view_table(losses, [view])
    rows = []
    cols = ["kind", "size", "method", "view", "fit_k", "predict_k", "mae", "rmse", "max_rel_err",
            "err_at_M", "insample_rmse", "n_predicted", "converged", "reason"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    for (params, size, method), h in table.groupby(["params", "size", "method"], sort=True):
        h = h[h["k"] >= 1].sort_values("k")
        M = int(h["k"].max())
        fitp = h[h["k"] <= k_fit_max]
        test = h[h["k"] > k_fit_max]
        f = fit_per_size(fitp["k"].to_numpy(), fitp["mean"].to_numpy(), weights=weights,
                         sem=fitp["sem"].to_numpy(), loss=loss, f_scale=f_scale)
        row = {"kind": "k_extrapolation", "size": size, "method": method, "view": view,
               "fit_k": f"1..{k_fit_max}", "predict_k": f"{k_fit_max + 1}..{M}",
               "converged": f.converged, "reason": f.reason, "n_predicted": int(len(test))}
        if f.converged and len(test):
            pred = predict_per_size(f, test["k"].to_numpy())
            meas = test["mean"].to_numpy()
            row.update(mae=float(np.mean(np.abs(pred - meas))),
                       rmse=float(np.sqrt(np.mean((pred - meas) ** 2))),
                       max_rel_err=float(np.max(np.abs(pred - meas) / np.abs(meas))),
                       err_at_M=float(pred[-1] - meas[-1]))
        elif f.converged:
            row["reason"] = f"no k > {k_fit_max} measured"
        rows.append(row)
    for method, g in table[table["k"] >= 1].groupby("method", sort=True):
        g = g.sort_values(["params", "k"])
        full = None
        if g["params"].nunique() >= MIN_SIZES_HOLDOUT:
            full = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(),
                               g["mean"].to_numpy(), weights=weights, sem=g["sem"].to_numpy(),
                               loss=loss, f_scale=f_scale)
        ho = holdout_largest_size(g, weights=weights, loss=loss, f_scale=f_scale, full_fit=full)
        rows.append({"kind": "size_extrapolation", "size": ho.size, "method": method,
                     "view": view, "fit_k": "all", "predict_k": ho.predict_k,
                     "mae": ho.mae, "rmse": ho.rmse, "max_rel_err": ho.max_rel_err,
                     "err_at_M": ho.err_at_M, "insample_rmse": ho.insample_rmse,
                     "n_predicted": ho.n_predicted, "converged": ho.converged,
                     "reason": None if ho.status == "ok" else ho.status})
    return pd.DataFrame(rows, columns=cols)


