"""Uncertainty of the fitted merging laws (issue #5).

* ``bootstrap_per_size`` / ``bootstrap_draws``: resample merged subsets with replacement
  *within each k cell*, recompute the view means and refit the per-size law
  L(k) = L_inf + A/(k+b); percentile intervals per parameter.
* ``unified_draws`` / ``bootstrap_unified``: the same resampling within each (size, k)
  cell for the unified law L* + B N^-beta + A0 N^-gamma/(k+b), each replicate refitted from
  the point estimate; percentile intervals per parameter and the fraction at a bound.
* ``holdout_errors``: (a) fit on k <= 4 and predict k = 5..M; (b) with >= 4 sizes, fit the
  unified law on the smaller sizes and predict the largest (``fit.holdout_largest_size``).
* ``finite_pool_fit``: the per-size law with the finite-pool correction of PAPER.md
  ("Finite-pool caveat"): L(k) = L_inf + A (M-k) / ((M-1)(k+b)), compared with the plain law.

Every fit takes the ``loss`` ("linear" or "huber") and ``f_scale`` of ``fit.fit_per_size``.

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
    "unified_draws",
    "summarise_unified",
    "bootstrap_unified",
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
    """Weighted simple regression of centred ``yc`` (R, n) on ``x`` (R, n) or (n,), with
    weights ``w`` (n,) shared by every row or (R, n) per row (``yc`` centred with them).

    Returns (slope, intercept-in-centred-units, residual sum of squares), each (R,)."""
    sw = w.sum(-1)
    xbar = (x * w).sum(-1) / sw
    xc = x - xbar[..., None]
    sxx = (xc * xc * w).sum(-1)
    sxy = (xc * yc * w).sum(-1)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    resid = yc - slope[..., None] * xc
    ss = (resid * resid * w).sum(-1)
    return slope, -slope * xbar, ss


def _batch_ls(k: np.ndarray, Y: np.ndarray, W: np.ndarray, lo: float, hi: float):
    """Weighted least squares of L_inf + A/(k+b) for every row of ``Y`` (R, n) with the
    row's weights ``W`` (R, n): the b grid of ``fit.fit_per_size``, then a golden-section
    refinement in the bracket around the best grid point.  Returns L_inf, A, b (each (R,))."""
    R = Y.shape[0]
    wsum = W.sum(1)
    ybar = (Y * W).sum(1) / wsum
    Yc = Y - ybar[:, None]

    grid = F._b_grid(lo, hi)
    X = 1.0 / (k[None, :] + grid[:, None])                          # (G, n)
    # SS for every (replicate, grid b) with the replicate's weights: sum_w yc = 0, so
    # sxy = sum_w x yc and sxx = sum_w x^2 - (sum_w x)^2 / sum_w
    Sx = W @ X.T                                                     # (R, G)
    sxx = W @ (X * X).T - Sx**2 / wsum[:, None]
    sxy = (W * Yc) @ X.T
    syy = (W * Yc * Yc).sum(1)
    ss_grid = syy[:, None] - sxy**2 / np.where(sxx > 0, sxx, np.inf)
    i = np.argmin(ss_grid, axis=1)
    b_grid = grid[i]
    # exact SS at the grid point (the closed form above can lose digits near zero)
    ss_at_grid = _proj_ss(1.0 / (k[None, :] + b_grid[:, None]), Yc, W)[2]

    a = grid[np.maximum(i - 1, 0)]
    c = grid[np.minimum(i + 1, grid.size - 1)]
    # vectorised golden-section search on [a, c]
    g = (np.sqrt(5.0) - 1.0) / 2.0

    def ss_at(b):
        return _proj_ss(1.0 / (k[None, :] + b[:, None]), Yc, W)[2]

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
    A, c0, _ = _proj_ss(1.0 / (k[None, :] + b[:, None]), Yc, W)
    return ybar + c0, A, b


def fit_per_size_batch(k, Y, weights: Any = "k", b_bounds=F.DEFAULT_B_BOUNDS,
                       loss: str = "linear", f_scale: float | None = None) -> pd.DataFrame:
    """Fit L_inf + A/(k+b) to every row of ``Y`` (R, n) at once, as ``fit.fit_per_size``.

    ``k``: (n,) with every k >= 1 (k = 0 must be removed by the caller); ``weights``:
    ``"k"``, ``"none"`` or an (n,) array (weights on squared residuals); ``loss`` /
    ``f_scale`` as in ``fit.fit_per_size`` (the Huber IRLS runs on every row at once, each
    row stopping when its weights settle).  Returns a frame with columns L_inf, A, b, rmse,
    converged, b_at_bound (one row per replicate).
    """
    F.check_loss(loss, f_scale)
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
    Yf = np.where(finite[:, None], Y, 0.0)
    L_inf, A, b = _batch_ls(k, Yf, np.broadcast_to(w, Yf.shape), lo, hi)
    if loss == "huber":
        L_inf, A, b = _batch_huber(k, Yf, w, lo, hi, f_scale, (L_inf, A, b))
    pred = L_inf[:, None] + A[:, None] / (k[None, :] + b[:, None])
    rmse = np.sqrt(np.mean((Yf - pred) ** 2, axis=1))
    tol = 1e-6 * max(1.0, hi - lo)
    out["L_inf"], out["A"], out["b"], out["rmse"] = L_inf, A, b, rmse
    out["converged"] = finite & np.isfinite(L_inf) & np.isfinite(A) & np.isfinite(b)
    out["b_at_bound"] = (b <= lo + tol) | (b >= hi - tol)
    out.loc[~out["converged"], ["L_inf", "A", "b", "rmse"]] = np.nan
    return out


def _batch_huber(k, Y, w, lo, hi, f_scale, sol, max_iter=F._IRLS_MAX_ITER, tol=F._IRLS_TOL):
    """``fit._huber_irls`` on every row at once (same scale, weights and stopping rule)."""
    L_inf, A, b = (np.array(v, dtype=float) for v in sol)
    pos = w > 0
    rw = np.sqrt(w / np.mean(w[pos]))
    H = np.ones_like(Y)
    done = np.zeros(Y.shape[0], dtype=bool)
    tiny = 1e-13 * np.maximum(1.0, np.max(np.abs(Y), axis=1))
    for _ in range(max_iter):
        r = rw * (Y - (L_inf[:, None] + A[:, None] / (k[None, :] + b[:, None])))
        if f_scale is None:
            s = F.HUBER_TUNING * np.median(np.abs(r[:, pos]), axis=1) * F._MAD_TO_SD
        else:
            s = np.full(Y.shape[0], float(f_scale))
        exact = ~np.isfinite(s) | (s <= tiny)
        Hn = np.where(exact[:, None], H, F.huber_weights(r, np.where(exact, 1.0, s)[:, None]))
        done |= exact | (np.max(np.abs(Hn - H), axis=1) <= tol)
        if done.all():
            break
        todo = ~done
        H[todo] = Hn[todo]
        L_inf[todo], A[todo], b[todo] = _batch_ls(k, Y[todo], w * H[todo], lo, hi)
    return L_inf, A, b


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
                    seed: int = 0, weights: Any = "k", b_bounds=F.DEFAULT_B_BOUNDS,
                    loss: str = "linear", f_scale: float | None = None,
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bootstrap replicates of the per-size fit for every (size, method).

    Returns ``(points, draws)``: ``points`` has one row per (size, method) with the fit of
    ``fit.fit_per_size`` on the observed means (as ``fit.fit_all``); ``draws`` has one row per
    (size, method, replicate) with columns L_inf, A, b, rmse, converged, b_at_bound.
    ``loss`` / ``f_scale``: as in ``fit.fit_per_size`` (every replicate is fitted the same way).
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    F.check_loss(loss, f_scale)
    values = per_subset_values(losses, view)
    points, draws = [], []
    for size, params, method, g in _cells(values):
        rng = _cell_rng(seed, size, method, view)
        k, m, s, boot = _resampled_means(g, n_boot, rng)
        f = F.fit_per_size(k, m, weights=weights, b_bounds=b_bounds, sem=s, loss=loss,
                           f_scale=f_scale)
        points.append({"size": size, "params": params, "method": method, "view": view,
                       **{p: f[p] for p in PARAMS}, "r2": f["r2"], "rmse": f["rmse"],
                       "converged": f["converged"], "n_k": f["n_k"],
                       "n_subsets": int(len(g[g["k"] >= 1]))})
        if isinstance(weights, str) and weights == "sem":
            # the weights change with every replicate: refit one by one
            rows = []
            for r in range(n_boot):
                fr = F.fit_per_size(k, boot[r], weights="sem", b_bounds=b_bounds, sem=s,
                                    loss=loss, f_scale=f_scale)
                rows.append({p: fr[p] for p in PARAMS} | {"rmse": fr["rmse"],
                            "converged": fr["converged"], "b_at_bound": "b" in fr["at_bound"]})
            d = pd.DataFrame(rows)
        elif k.size:
            d = fit_per_size_batch(k, boot, weights=weights, b_bounds=b_bounds, loss=loss,
                                   f_scale=f_scale)
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


def _interval(v: np.ndarray, level: float) -> tuple[float, float]:
    if not v.size:
        return float("nan"), float("nan")
    return (float(np.percentile(v, 50 * (1 - level))), float(np.percentile(v, 50 * (1 + level))))


def summarise_draws(points: pd.DataFrame, draws: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (size, method, parameter) with the point estimate, the
    percentile interval of the converged replicates, and the converged fraction."""
    rows = []
    for _, p in points.iterrows():
        d = draws[(draws["size"] == p["size"]) & (draws["method"] == p["method"])]
        ok = d[d["converged"].astype(bool)]
        frac = float(len(ok) / len(d)) if len(d) else float("nan")
        for name in PARAMS:
            v = ok[name].to_numpy(dtype=float)
            lo, hi = _interval(v, level)
            rows.append({
                "size": p["size"], "params": p["params"], "method": p["method"], "view": p["view"],
                "parameter": name, "estimate": p[name], "lo": lo, "hi": hi,
                "boot_median": float(np.median(v)) if v.size else float("nan"),
                "boot_sd": float(np.std(v, ddof=1)) if v.size > 1 else float("nan"),
                "n_boot": int(len(d)), "frac_converged": frac,
                "frac_b_at_bound": float(ok["b_at_bound"].astype(bool).mean()) if len(ok) else float("nan"),
            })
    return pd.DataFrame(rows)


def bootstrap_per_size(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                       seed: int = 0, weights: Any = "k", level: float = 0.95,
                       b_bounds=F.DEFAULT_B_BOUNDS, loss: str = "linear",
                       f_scale: float | None = None) -> pd.DataFrame:
    """Percentile-bootstrap intervals of the per-size law's parameters.

    For each (size, method): resample the merged subsets with replacement within each k cell
    (k >= 1), recompute the view means, refit L_inf + A/(k+b) (``fit_per_size_batch``, the
    vectorised ``fit.fit_per_size``).  Returns one row per (size, method, parameter) with
    columns size, params, method, view, parameter (L_inf, A, b), estimate (the fit on the
    observed means), lo / hi (2.5 / 97.5 percentiles for ``level=0.95``), boot_median,
    boot_sd, n_boot, frac_converged, frac_b_at_bound.  A k cell with one subset (k = M) is
    the same in every replicate.  Deterministic for a seed.
    """
    points, draws = bootstrap_draws(losses, view, n_boot, seed, weights, b_bounds, loss, f_scale)
    return summarise_draws(points, draws, level)


# --------------------------------------------------------------------------------------
# Bootstrap of the unified law
# --------------------------------------------------------------------------------------


def _resampled_cells(values: pd.DataFrame, n_boot: int, rng: np.random.Generator):
    """N (billions), k, means, sems (each (C,)) and bootstrap means (n_boot, C) over the
    (size, k >= 1) cells of one (method, view)'s per-subset values, sorted by params, k."""
    g = values[values["k"] >= 1].sort_values(["params", "k", "subset"], kind="mergesort")
    Ns, ks, means, sems, boot = [], [], [], [], []
    for (params, k), h in g.groupby(["params", "k"], sort=True):
        v = h["value"].to_numpy(dtype=float)
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        Ns.append(params / 1e9)
        ks.append(float(k))
        means.append(v.mean())
        sems.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
        boot.append(v[idx].mean(axis=1))
    if not ks:
        e = np.array([])
        return e, e, e, e, np.empty((n_boot, 0))
    return np.array(Ns), np.array(ks), np.array(means), np.array(sems), np.column_stack(boot)


def unified_draws(values: pd.DataFrame, point: dict, n_boot: int = 200, seed: int = 0,
                  weights: Any = "k", loss: str = "linear", f_scale: float | None = None,
                  bounds: dict | None = None, key: tuple[str, ...] = ()) -> pd.DataFrame:
    """Bootstrap replicates of the unified law for one (method, view).

    ``values``: that (method, view)'s per-subset values (``per_subset_values``, one method);
    ``point``: its ``fit.fit_unified`` result.  Each replicate resamples the merged subsets
    with replacement within every (size, k) cell, recomputes the means and refits the law
    from the point estimate's (beta, gamma, b) (a warm start: the replicates are
    perturbations of the same data), with the same weights (``"sem"``: the observed sems),
    loss and bounds (Huber with an automatic threshold: the point fit's threshold, fixed).
    The random stream is seeded by (``seed``, ``key``), so a (method, view)'s draws do not
    depend on the other fits.  Returns one row per replicate: rep, the six parameters, rmse,
    converged, and ``at_bound_<p>`` flags.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    cols = (["rep", *F.UNIFIED_PARAMS, "rmse", "converged"]
            + [f"at_bound_{p}" for p in F.UNIFIED_PARAMS])
    if not point.get("converged"):
        return pd.DataFrame(columns=cols)
    rng = _cell_rng(seed, "unified", *key)
    N, k, _m, s, boot = _resampled_cells(values, n_boot, rng)
    start = (point["beta"], point["gamma"], point["b"])
    if loss == "huber" and f_scale is None and point.get("f_scale"):
        f_scale = float(point["f_scale"])  # the point fit's automatic threshold, held fixed
    rows = []
    for r in range(n_boot):
        f = F.fit_unified(N, k, boot[r], weights=weights, bounds=bounds, sem=s, loss=loss,
                          f_scale=f_scale, start=start)
        row = {"rep": r, **{p: f[p] for p in F.UNIFIED_PARAMS}, "rmse": f["rmse"],
               "converged": bool(f["converged"])}
        row.update({f"at_bound_{p}": p in f["at_bound"] for p in F.UNIFIED_PARAMS})
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def summarise_unified(point: dict, draws: pd.DataFrame, level: float = 0.95) -> dict:
    """Percentile intervals of the unified law from ``unified_draws``: ``{"ci": {p: {lo, hi,
    sd, median, frac_at_bound}}, "n_boot", "boot_frac_converged", "level"}``."""
    ok = draws[draws["converged"].astype(bool)] if len(draws) else draws
    ci = {}
    for p in F.UNIFIED_PARAMS:
        v = ok[p].to_numpy(dtype=float) if len(ok) else np.array([])
        v = v[np.isfinite(v)]
        lo, hi = _interval(v, level)
        ci[p] = {"lo": lo, "hi": hi,
                 "sd": float(np.std(v, ddof=1)) if v.size > 1 else float("nan"),
                 "median": float(np.median(v)) if v.size else float("nan"),
                 "frac_at_bound": float(ok[f"at_bound_{p}"].astype(bool).mean()) if len(ok) else float("nan")}
    return {"ci": ci, "n_boot": int(len(draws)),
            "boot_frac_converged": float(len(ok) / len(draws)) if len(draws) else float("nan"),
            "level": float(level)}


def bootstrap_unified(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                      seed: int = 0, weights: Any = "k", level: float = 0.95,
                      loss: str = "linear", f_scale: float | None = None,
                      bounds: dict | None = None) -> pd.DataFrame:
    """Percentile-bootstrap intervals of the unified law's parameters, per method, for one
    view: the fit of ``fit.fit_all`` on the observed means, then ``unified_draws``.

    Returns one row per (method, parameter): method, view, parameter (``fit.UNIFIED_PARAMS``),
    estimate, lo, hi, boot_median, boot_sd, frac_at_bound, n_boot, frac_converged, r2, rmse,
    converged (of the point fit) and at_bound (the point estimate sits at a bound).
    Deterministic for a seed (the same intervals as ``fit.fit_all(..., n_boot, seed)``).
    """
    df = F._normalise_losses(losses)
    table = F._view_table_df(df, [view])
    values = F._per_subset(df, view)
    rows = []
    for method, g in table.groupby("method", sort=True):
        g = g.sort_values(["params", "k"])
        f = F.fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                          weights=weights, bounds=bounds, sem=g["sem"].to_numpy(), loss=loss,
                          f_scale=f_scale)
        draws = unified_draws(values[values["method"] == method], f, n_boot=n_boot, seed=seed,
                              weights=weights, loss=loss, f_scale=f_scale, bounds=bounds,
                              key=(str(method), str(view)))
        s = summarise_unified(f, draws, level)
        for p in F.UNIFIED_PARAMS:
            c = s["ci"][p]
            rows.append({"method": method, "view": view, "parameter": p, "estimate": f[p],
                         "lo": c["lo"], "hi": c["hi"], "boot_median": c["median"],
                         "boot_sd": c["sd"], "frac_at_bound": c["frac_at_bound"],
                         "n_boot": s["n_boot"], "frac_converged": s["boot_frac_converged"],
                         "r2": f["r2"], "rmse": f["rmse"], "converged": f["converged"],
                         "at_bound": p in f["at_bound"]})
    return pd.DataFrame(rows, columns=["method", "view", "parameter", "estimate", "lo", "hi",
                                       "boot_median", "boot_sd", "frac_at_bound", "n_boot",
                                       "frac_converged", "r2", "rmse", "converged", "at_bound"])


# --------------------------------------------------------------------------------------
# Hold-out errors
# --------------------------------------------------------------------------------------


def holdout_errors(losses: pd.DataFrame, view: str = "cross_domain", k_fit_max: int = 4,
                   weights: Any = "k", loss: str = "linear",
                   f_scale: float | None = None) -> pd.DataFrame:
    """Out-of-sample errors of the laws.

    (a) ``kind="k_extrapolation"``, one row per (size, method): fit the per-size law on
    1 <= k <= ``k_fit_max``, predict k = k_fit_max+1..M (M = the largest k measured) and
    compare with the measured means: ``mae`` (mean absolute error), ``max_rel_err``
    (max |pred - meas| / meas), ``err_at_M`` (signed, pred - meas at k = M).
    (b) ``kind="size_extrapolation"``, one row per method (``fit.holdout_largest_size``):
    with >= 4 sizes, fit the unified law on all but the largest size and predict the largest
    at every k >= 1 (``rmse`` and ``insample_rmse``, the all-size fit's error on the same
    points, too); with fewer, ``reason`` says "skipped: needs >= 4 sizes ...".
    """
    table = F.view_table(losses, [view])
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
        f = F.fit_per_size(fitp["k"].to_numpy(), fitp["mean"].to_numpy(), weights=weights,
                           sem=fitp["sem"].to_numpy(), loss=loss, f_scale=f_scale)
        row = {"kind": "k_extrapolation", "size": size, "method": method, "view": view,
               "fit_k": f"1..{k_fit_max}", "predict_k": f"{k_fit_max + 1}..{M}",
               "converged": f["converged"], "reason": f["reason"], "n_predicted": int(len(test))}
        if f["converged"] and len(test):
            pred = F.predict_per_size(f, test["k"].to_numpy())
            meas = test["mean"].to_numpy()
            row.update(mae=float(np.mean(np.abs(pred - meas))),
                       rmse=float(np.sqrt(np.mean((pred - meas) ** 2))),
                       max_rel_err=float(np.max(np.abs(pred - meas) / np.abs(meas))),
                       err_at_M=float(pred[-1] - meas[-1]))
        elif f["converged"]:
            row["reason"] = f"no k > {k_fit_max} measured"
        rows.append(row)
    for method, g in table[table["k"] >= 1].groupby("method", sort=True):
        g = g.sort_values(["params", "k"])
        full = None
        if g["params"].nunique() >= F.MIN_SIZES_HOLDOUT:
            full = F.fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(),
                                 g["mean"].to_numpy(), weights=weights, sem=g["sem"].to_numpy(),
                                 loss=loss, f_scale=f_scale)
        ho = F.holdout_largest_size(g, weights=weights, loss=loss, f_scale=f_scale, full_fit=full)
        rows.append({"kind": "size_extrapolation", "size": ho["size"], "method": method,
                     "view": view, "fit_k": "all", "predict_k": ho["predict_k"],
                     "mae": ho["mae"], "rmse": ho["rmse"], "max_rel_err": ho["max_rel_err"],
                     "err_at_M": ho["err_at_M"], "insample_rmse": ho["insample_rmse"],
                     "n_predicted": ho["n_predicted"], "converged": ho["converged"],
                     "reason": None if ho["status"] == "ok" else ho["status"]})
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
    infinite-pool limit.  Since A (M-k)/((M-1)(k+b)) = [A (M+b)/(M-1)]/(k+b) - A/(M-1),
    the two laws span the same curves for the same b: they differ in what L_inf and A mean,
    not in fit, and ``better`` is ``"tie"`` unless their rmse differ by more than 1e-9 x the
    spread of y (numerical noise).  Returns ``{"finite_pool": {...}, "plain": {...}, "M": M,
    "better": "finite_pool" | "plain" | "tie", "delta_r2": r2_fp - r2_plain,
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
        tol = 1e-9 * max(float(np.std(yy)), 1e-300)
        out["better"] = ("tie" if abs(out["delta_rmse"]) <= tol else
                         "finite_pool" if fp["rmse"] < plain["rmse"] else "plain")
    else:
        out.update(delta_r2=float("nan"), delta_rmse=float("nan"), better=None)
    return out
