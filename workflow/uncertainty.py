"""Uncertainty of the fitted merging laws (issue #5).

* ``bootstrap_per_size`` / ``bootstrap_draws``: resample merged subsets with replacement
  *within each k cell*, recompute the view means and refit the per-size law
  L(k) = L_inf + A/(k+b); percentile intervals per parameter.
* ``holdout_errors``: (a) fit on k <= 4 and predict k = 5..M; (b) with >= 4 sizes, fit the
  unified law on the smaller sizes and predict the largest.
* ``finite_pool_fit``: the per-size law with the finite-pool correction of PAPER.md
  ("Finite-pool caveat"): L(k) = L_inf + A (M-k) / ((M-1)(k+b)), compared with the plain law.

The bootstrap refits use ``fit_per_size_batch``, a vectorised copy of
``fit.fit_per_size`` (same b grid, same projection, a golden-section refinement in the
same bracket instead of scipy's bounded Brent); ``tests/test_uncertainty.py`` checks that
the two agree.  Everything is deterministic for a given ``seed``: each (size, method, view)
cell draws from its own ``numpy.random.Generator`` seeded by (seed, hash of the cell), so a
cell's intervals do not depend on which other cells are in the table.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd

from mergelaws import fit as F

__all__ = [
    "PARAMS",
    "per_subset_values",
    "fit_per_size_batch",
    "bootstrap_draws",
    "bootstrap_per_size",
    "summarise_draws",
    "holdout_errors",
    "finite_pool_fit",
]

PARAMS = ("L_inf", "A", "b")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def per_subset_values(losses: pd.DataFrame, view: str = "cross_domain") -> pd.DataFrame:
    """One value per (size, params, method, subset, k) for ``view`` (columns
    ``size, params, method, subset, k, value``), as ``fit.view_table`` aggregates them."""
    df = F._normalise_losses(losses)
    return F._per_subset(df, view)


def _cell_rng(seed: int, *key: str) -> np.random.Generator:
    h = zlib.crc32("|".join(str(k) for k in key).encode())
    return np.random.default_rng([int(seed), h])


# --------------------------------------------------------------------------------------
# Vectorised per-size fit (many y vectors, one k grid, one weight vector)
# --------------------------------------------------------------------------------------


def _proj_ss(x: np.ndarray, yc: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted simple regression of centred ``yc`` (R, n) on ``x`` (R, n) or (n,).

    Returns (slope, intercept-in-centred-units, residual sum of squares), each (R,)."""
    sw = w.sum()
    xbar = (x * w).sum(-1) / sw
    xc = x - xbar[..., None]
    sxx = (xc * xc * w).sum(-1)
    sxy = (xc * yc * w).sum(-1)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    resid = yc - slope[..., None] * xc
    ss = (resid * resid * w).sum(-1)
    return slope, -slope * xbar, ss


def fit_per_size_batch(k, Y, weights: Any = "k", b_bounds=F.DEFAULT_B_BOUNDS) -> pd.DataFrame:
    """Fit L_inf + A/(k+b) to every row of ``Y`` (R, n) at once, as ``fit.fit_per_size``.

    ``k``: (n,) with every k >= 1 (k = 0 must be removed by the caller); ``weights``:
    ``"k"``, ``"none"`` or an (n,) array (weights on squared residuals).  Returns a frame
    with columns L_inf, A, b, rmse, converged, b_at_bound (one row per replicate).
    """
    k = np.asarray(k, dtype=float).ravel()
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    if Y.shape[1] != k.size:
        raise ValueError("Y must have one column per k")
    if np.any(k < 1):
        raise ValueError("fit_per_size_batch needs k >= 1 only")
    w, _ = F._weights(k, weights, None)
    R = Y.shape[0]
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    out = pd.DataFrame({"L_inf": np.nan, "A": np.nan, "b": np.nan, "rmse": np.nan,
                        "converged": False, "b_at_bound": False}, index=range(R))
    finite = np.all(np.isfinite(Y), axis=1)
    if np.unique(k).size < 3 or np.count_nonzero(w > 0) < 3 or not finite.any():
        return out
    ybar = (Y * w).sum(1) / w.sum()
    Yc = Y - ybar[:, None]

    grid = F._b_grid(lo, hi)
    X = 1.0 / (k[None, :] + grid[:, None])                          # (G, n)
    # SS for every (replicate, grid b): centred projections
    xbar = (X * w).sum(1) / w.sum()
    Xc = X - xbar[:, None]
    sxx = (Xc * Xc * w).sum(1)                                       # (G,)
    sxy = (Yc * w) @ Xc.T                                            # (R, G)
    syy = (Yc * Yc * w).sum(1)                                       # (R,)
    ss_grid = syy[:, None] - sxy**2 / sxx[None, :]
    i = np.argmin(ss_grid, axis=1)
    b_grid = grid[i]
    ss_at_grid = ss_grid[np.arange(R), i]
    # exact SS at the grid point (the closed form above can lose digits near zero)
    ss_at_grid = _proj_ss(1.0 / (k[None, :] + b_grid[:, None]), Yc, w)[2]

    a = grid[np.maximum(i - 1, 0)]
    c = grid[np.minimum(i + 1, grid.size - 1)]
    # vectorised golden-section search on [a, c]
    g = (np.sqrt(5.0) - 1.0) / 2.0

    def ss_at(b):
        return _proj_ss(1.0 / (k[None, :] + b[:, None]), Yc, w)[2]

    x1 = c - g * (c - a)
    x2 = a + g * (c - a)
    f1, f2 = ss_at(x1), ss_at(x2)
    for _ in range(90):
        left = f1 <= f2
        # left: [a, x2] keeps x1 as its upper interior point; right: [x1, c] keeps x2
        a, c = np.where(left, a, x1), np.where(left, x2, c)
        keep_x, keep_f = np.where(left, x1, x2), np.where(left, f1, f2)
        new_x = np.where(left, c - g * (c - a), a + g * (c - a))
        new_f = ss_at(new_x)
        x1, f1 = np.where(left, new_x, keep_x), np.where(left, new_f, keep_f)
        x2, f2 = np.where(left, keep_x, new_x), np.where(left, keep_f, new_f)
        if np.all(c - a < 1e-13):
            break
    b_ref = 0.5 * (a + c)
    ss_ref = ss_at(b_ref)
    better = ss_ref < ss_at_grid
    b = np.where(better, b_ref, b_grid)
    x = 1.0 / (k[None, :] + b[:, None])
    A, c0, ss = _proj_ss(x, Yc, w)
    L_inf = ybar + c0
    pred = L_inf[:, None] + A[:, None] / (k[None, :] + b[:, None])
    rmse = np.sqrt(np.mean((Y - pred) ** 2, axis=1))
    tol = 1e-6 * max(1.0, hi - lo)
    out["L_inf"], out["A"], out["b"], out["rmse"] = L_inf, A, b, rmse
    out["converged"] = finite & np.isfinite(L_inf) & np.isfinite(A) & np.isfinite(b)
    out["b_at_bound"] = (b <= lo + tol) | (b >= hi - tol)
    out.loc[~out["converged"], ["L_inf", "A", "b", "rmse"]] = np.nan
    return out


# --------------------------------------------------------------------------------------
# Bootstrap over subsets
# --------------------------------------------------------------------------------------


def _cells(values: pd.DataFrame):
    """(size, params, method) groups of per-subset values, sorted by params, size, method."""
    for (params, size, method), g in values.groupby(["params", "size", "method"], sort=True):
        yield str(size), int(params), str(method), g


def _resampled_means(g: pd.DataFrame, n_boot: int, rng: np.random.Generator):
    """k (K,), point means (K,), sem (K,) and bootstrap means (n_boot, K) for k >= 1."""
    g = g[g["k"] >= 1].sort_values(["k", "subset"], kind="mergesort")
    ks, means, sems, boot = [], [], [], []
    for k, h in g.groupby("k", sort=True):
        v = h["value"].to_numpy(dtype=float)
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        ks.append(float(k))
        means.append(v.mean())
        sems.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
        boot.append(v[idx].mean(axis=1))
    if not ks:
        return np.array([]), np.array([]), np.array([]), np.empty((n_boot, 0))
    return np.array(ks), np.array(means), np.array(sems), np.column_stack(boot)


def bootstrap_draws(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                    seed: int = 0, weights: Any = "k",
                    b_bounds=F.DEFAULT_B_BOUNDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bootstrap replicates of the per-size fit for every (size, method).

    Returns ``(points, draws)``: ``points`` has one row per (size, method) with the fit of
    ``fit.fit_per_size`` on the observed means (as ``fit.fit_all``); ``draws`` has one row per
    (size, method, replicate) with columns L_inf, A, b, rmse, converged, b_at_bound.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    values = per_subset_values(losses, view)
    points, draws = [], []
    for size, params, method, g in _cells(values):
        rng = _cell_rng(seed, size, method, view)
        k, m, s, boot = _resampled_means(g, n_boot, rng)
        f = F.fit_per_size(k, m, weights=weights, b_bounds=b_bounds, sem=s)
        points.append({"size": size, "params": params, "method": method, "view": view,
                       **{p: f[p] for p in PARAMS}, "r2": f["r2"], "rmse": f["rmse"],
                       "converged": f["converged"], "n_k": f["n_k"],
                       "n_subsets": int(len(g[g["k"] >= 1]))})
        if isinstance(weights, str) and weights == "sem":
            # the weights change with every replicate: refit one by one
            rows = []
            for r in range(n_boot):
                fr = F.fit_per_size(k, boot[r], weights="sem", b_bounds=b_bounds, sem=s)
                rows.append({p: fr[p] for p in PARAMS} | {"rmse": fr["rmse"],
                            "converged": fr["converged"], "b_at_bound": "b" in fr["at_bound"]})
            d = pd.DataFrame(rows)
        elif k.size:
            d = fit_per_size_batch(k, boot, weights=weights, b_bounds=b_bounds)
        else:
            d = fit_per_size_batch(np.arange(1.0, 4.0), np.full((n_boot, 3), np.nan))
        d.insert(0, "rep", np.arange(n_boot))
        d.insert(0, "view", view)
        d.insert(0, "method", method)
        d.insert(0, "params", params)
        d.insert(0, "size", size)
        draws.append(d)
    pcols = ["size", "params", "method", "view", *PARAMS, "r2", "rmse", "converged", "n_k", "n_subsets"]
    pts = pd.DataFrame(points, columns=pcols)
    dr = (pd.concat(draws, ignore_index=True) if draws else
          pd.DataFrame(columns=["size", "params", "method", "view", "rep", *PARAMS, "rmse",
                                "converged", "b_at_bound"]))
    return pts, dr


def summarise_draws(points: pd.DataFrame, draws: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (size, method, parameter) with the point estimate, the
    percentile interval of the converged replicates, and the converged fraction."""
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    rows = []
    for _, p in points.iterrows():
        d = draws[(draws["size"] == p["size"]) & (draws["method"] == p["method"])]
        ok = d[d["converged"].astype(bool)]
        frac = float(len(ok) / len(d)) if len(d) else float("nan")
        for name in PARAMS:
            v = ok[name].to_numpy(dtype=float)
            rows.append({
                "size": p["size"], "params": p["params"], "method": p["method"], "view": p["view"],
                "parameter": name, "estimate": p[name],
                "lo": float(np.percentile(v, lo_q)) if v.size else float("nan"),
                "hi": float(np.percentile(v, hi_q)) if v.size else float("nan"),
                "boot_median": float(np.median(v)) if v.size else float("nan"),
                "boot_sd": float(np.std(v, ddof=1)) if v.size > 1 else float("nan"),
                "n_boot": int(len(d)), "frac_converged": frac,
                "frac_b_at_bound": float(ok["b_at_bound"].astype(bool).mean()) if len(ok) else float("nan"),
            })
    return pd.DataFrame(rows)


def bootstrap_per_size(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                       seed: int = 0, weights: Any = "k", level: float = 0.95,
                       b_bounds=F.DEFAULT_B_BOUNDS) -> pd.DataFrame:
    """Percentile-bootstrap intervals of the per-size law's parameters.

    For each (size, method): resample the merged subsets with replacement within each k cell
    (k >= 1), recompute the view means, refit L_inf + A/(k+b) (``fit_per_size_batch``, the
    vectorised ``fit.fit_per_size``).  Returns one row per (size, method, parameter) with
    columns size, params, method, view, parameter (L_inf, A, b), estimate (the fit on the
    observed means), lo / hi (2.5 / 97.5 percentiles for ``level=0.95``), boot_median,
    boot_sd, n_boot, frac_converged, frac_b_at_bound.  A k cell with one subset (k = M) is
    the same in every replicate.  Deterministic for a seed.
    """
    points, draws = bootstrap_draws(losses, view, n_boot, seed, weights, b_bounds)
    return summarise_draws(points, draws, level)


# --------------------------------------------------------------------------------------
# Hold-out errors
# --------------------------------------------------------------------------------------


def holdout_errors(losses: pd.DataFrame, view: str = "cross_domain", k_fit_max: int = 4,
                   weights: Any = "k") -> pd.DataFrame:
    """Out-of-sample errors of the laws.

    (a) ``kind="k_extrapolation"``, one row per (size, method): fit the per-size law on
    1 <= k <= ``k_fit_max``, predict k = k_fit_max+1..M (M = the largest k measured) and
    compare with the measured means: ``mae`` (mean absolute error), ``max_rel_err``
    (max |pred - meas| / meas), ``err_at_M`` (signed, pred - meas at k = M).
    (b) ``kind="size_extrapolation"``, one row per method: with >= 4 sizes, fit the unified
    law on all but the largest size and predict the largest at every k >= 1; with fewer,
    a row with ``reason`` (the unified law needs >= 3 sizes to fit, so >= 4 to hold one out).
    """
    table = F.view_table(losses, [view])
    rows = []
    cols = ["kind", "size", "method", "view", "fit_k", "predict_k", "mae", "max_rel_err",
            "err_at_M", "n_predicted", "converged", "reason"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    for (params, size, method), h in table.groupby(["params", "size", "method"], sort=True):
        h = h[h["k"] >= 1].sort_values("k")
        M = int(h["k"].max())
        fitp = h[h["k"] <= k_fit_max]
        test = h[h["k"] > k_fit_max]
        f = F.fit_per_size(fitp["k"].to_numpy(), fitp["mean"].to_numpy(), weights=weights,
                           sem=fitp["sem"].to_numpy())
        row = {"kind": "k_extrapolation", "size": size, "method": method, "view": view,
               "fit_k": f"1..{k_fit_max}", "predict_k": f"{k_fit_max + 1}..{M}",
               "converged": f["converged"], "reason": f["reason"], "n_predicted": int(len(test))}
        if f["converged"] and len(test):
            pred = F.predict_per_size(f, test["k"].to_numpy())
            meas = test["mean"].to_numpy()
            row.update(mae=float(np.mean(np.abs(pred - meas))),
                       max_rel_err=float(np.max(np.abs(pred - meas) / np.abs(meas))),
                       err_at_M=float(pred[-1] - meas[-1]))
        elif f["converged"]:
            row["reason"] = f"no k > {k_fit_max} measured"
        rows.append(row)
    sizes = table[["params", "size"]].drop_duplicates().sort_values("params")
    for method, g in table[table["k"] >= 1].groupby("method", sort=True):
        row = {"kind": "size_extrapolation", "method": method, "view": view, "fit_k": "all"}
        if len(sizes) < 4:
            row.update(size=str(sizes["size"].iloc[-1]) if len(sizes) else None, converged=False,
                       reason=f"needs >= 4 sizes (the unified law needs >= 3 to fit, plus 1 "
                              f"held out); this table has {len(sizes)}")
            rows.append(row)
            continue
        big_params, big = int(sizes["params"].iloc[-1]), str(sizes["size"].iloc[-1])
        tr, te = g[g["params"] != big_params], g[g["params"] == big_params].sort_values("k")
        f = F.fit_unified(tr["params"].to_numpy() / 1e9, tr["k"].to_numpy(), tr["mean"].to_numpy(),
                          weights=weights, sem=tr["sem"].to_numpy())
        row.update(size=big, predict_k=f"1..{int(te['k'].max())}", converged=f["converged"],
                   reason=f["reason"], n_predicted=int(len(te)))
        if f["converged"] and len(te):
            pred = F.predict_unified(f, te["params"].to_numpy() / 1e9, te["k"].to_numpy())
            meas = te["mean"].to_numpy()
            row.update(mae=float(np.mean(np.abs(pred - meas))),
                       max_rel_err=float(np.max(np.abs(pred - meas) / np.abs(meas))),
                       err_at_M=float(pred[-1] - meas[-1]))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------
# Finite-pool correction
# --------------------------------------------------------------------------------------


def finite_pool_fit(k, y, M: int, weights: Any = "k", b_bounds=F.DEFAULT_B_BOUNDS) -> dict:
    """Fit the finite-pool law L(k) = L_inf + A (M-k) / ((M-1)(k+b)) and compare it with
    the plain law L_inf + A/(k+b) on the same points (k >= 1, k <= M).

    Exact averaging over the k-subsets of a fixed pool of M experts multiplies the quadratic
    (dispersion) term by (M-k)/(M-1) (PAPER.md, "Finite-pool caveat"), so the curve reaches
    its floor L_inf at k = M: here L_inf is the loss of the full-pool merge, not an
    infinite-pool limit.  Returns ``{"finite_pool": {...}, "plain": {...}, "M": M,
    "better": "finite_pool" | "plain", "delta_r2": r2_fp - r2_plain,
    "delta_rmse": rmse_fp - rmse_plain}``; both fits carry L_inf, A, b, r2 (unweighted),
    r2_weighted, rmse, converged, at_bound.
    """
    kk, yy, w_in, _, _ = F._clean_xy(k, y, weights, None)
    if int(M) < 2:
        raise ValueError("M must be >= 2")
    M = int(M)
    keep = kk <= M
    kk, yy = kk[keep], yy[keep]
    if w_in is not None and not isinstance(w_in, str):
        w_in = np.asarray(w_in, dtype=float)[keep]
    plain = F.fit_per_size(kk, yy, weights=w_in, b_bounds=b_bounds)
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    fp: dict[str, Any] = {"L_inf": float("nan"), "A": float("nan"), "b": float("nan"),
                          "r2": float("nan"), "r2_weighted": float("nan"), "rmse": float("nan"),
                          "converged": False, "at_bound": [], "reason": None}
    if np.unique(kk).size < 3:
        fp["reason"] = "need >= 3 distinct k in 1..M"
    else:
        w, _ = F._weights(kk, w_in, None)
        sw = np.sqrt(w)
        shrink = (M - kk) / (M - 1.0)

        def solve(b):
            X = np.column_stack([np.ones_like(kk), shrink / (kk + b)])
            return F._wlstsq(X, yy, sw)

        b = F.profile_b(lambda b: float(np.sum(solve(b)[1] ** 2)), lo, hi)
        coef, _ = solve(b)
        pred = coef[0] + coef[1] * shrink / (kk + b)
        fp.update(L_inf=float(coef[0]), A=float(coef[1]), b=float(b), r2=F._r2(yy, pred),
                  r2_weighted=F._r2(yy, pred, w), rmse=float(np.sqrt(np.mean((yy - pred) ** 2))),
                  converged=bool(np.all(np.isfinite(coef))),
                  at_bound=F._at_bound(["b"], [b], [(lo, hi)]))
    keys = ["L_inf", "A", "b", "r2", "r2_weighted", "rmse", "converged", "at_bound", "reason"]
    out = {"M": M, "finite_pool": fp, "plain": {key: plain.get(key) for key in keys}}
    if fp["converged"] and plain["converged"]:
        out["delta_r2"] = fp["r2"] - plain["r2"]
        out["delta_rmse"] = fp["rmse"] - plain["rmse"]
        out["better"] = "finite_pool" if fp["rmse"] < plain["rmse"] else "plain"
    else:
        out.update(delta_r2=float("nan"), delta_rmse=float("nan"), better=None)
    return out
