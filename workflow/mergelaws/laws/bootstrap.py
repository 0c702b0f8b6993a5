"""Bootstrap intervals of the fitted laws, two ways (``interval``; config ``fit.interval``):

* ``"parametric"`` (the default): every replicate draws each (size, k) cell's mean from the
  fitted law plus normal noise of the cell's sampling variance, from the variance law
  Var = C_N / k and the cell's own variance (``intervals.cell_noise_sd``), and refits.  It
  sees the noise of cells that hold one subset or a few, which resampling cannot.
* ``"subsets"``: resample the merged subsets with replacement within each k cell (per-size
  law) or each (size, k) cell (unified law), recompute the view means and refit.  A cell of
  one subset is the same in every replicate, so in designs with such cells (the paper's: every
  subset up to 7B, so k = M holds one) its intervals are too narrow
  (benchmarks/interval_coverage.py).

Either way the intervals are percentile intervals of the refits.

* ``bootstrap_draws`` / ``bootstrap_per_size``: the per-size law L(k) = L_inf + A/(k+b).
  The replicates are refitted by ``fit_per_size_batch``: ``per_size.fit_per_size`` in its
  vectorised form (``solvers.per_size_solve_batch`` / ``solvers.huber_irls_batch``: the same
  weights, b grid, projection and Huber scale for many curves at once);
  ``test_batch_fit_matches_fit_per_size`` (tests/) checks that the two agree.
* ``unified_draws`` / ``bootstrap_unified``: the unified law, each replicate refitted from
  the point estimate (a warm start): ``intervals.fit_unified_batch`` (all replicates at
  once) for least squares, ``unified.fit_unified`` one by one for the Huber loss;
  ``summarise_unified`` gives the ``ci`` of a ``UnifiedFit`` in ``fits.json``.

Everything is deterministic for a given ``seed``: each (size, method, view) cell draws from
its own ``numpy.random.Generator`` seeded by (seed, hash of the cell), so a cell's intervals
do not depend on which other cells are in the table.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import numpy as np
import pandas as pd

from mergelaws.laws.intervals import (
    BOUNDARY_FRAC_PER_SIZE,
    BOUNDARY_PARAMS,
    DEFAULT_INTERVAL,
    batch_rows,
    boundary_intervals,
    cell_moments,
    check_interval,
    fit_unified_batch,
    main_centre,
    parametric_noise,
    percentile_interval,
    unified_cell_moments,
    union_interval,
)
from mergelaws.laws.per_size import DEFAULT_B_BOUNDS, fit_per_size, predict_per_size
from mergelaws.laws.records import Interval
from mergelaws.laws.solvers import (
    check_loss,
    huber_irls_batch,
    per_size_solve_batch,
    resolve_weights,
)
from mergelaws.laws.unified import (
    DEFAULT_UNIFIED_BOUNDS,
    UNIFIED_PARAMS,
    UnifiedFit,
    fit_unified,
    predict_unified,
)
from mergelaws.laws.views import (
    aggregate_views,
    normalise_losses,
    per_subset_values,
    subset_values,
)

__all__ = [
    "PARAMS",
    "fit_per_size_batch",
    "bootstrap_draws",
    "bootstrap_per_size",
    "summarise_draws",
    "unified_draws",
    "summarise_unified",
    "bootstrap_unified",
]

#: the per-size law's parameters
PARAMS = ("L_inf", "A", "b")


def _cell_rng(seed: int, *key: str) -> np.random.Generator:
    h = zlib.crc32("|".join(str(k) for k in key).encode())
    return np.random.default_rng([int(seed), h])


def fit_per_size_batch(k, Y, weights: Any = "k", b_bounds=DEFAULT_B_BOUNDS,
                       loss: str = "linear", f_scale: float | None = None) -> pd.DataFrame:
    """Fit L_inf + A/(k+b) to every row of ``Y`` (R, n) at once: ``per_size.fit_per_size`` in
    its vectorised form (``solvers.per_size_solve_batch``, ``solvers.huber_irls_batch``).

    ``k``: (n,) with every k >= 1 (k = 0 must be removed by the caller); ``weights``:
    ``"k"``, ``"none"`` or an (n,) array (weights on squared residuals); ``loss`` /
    ``f_scale`` as in ``fit_per_size`` (the Huber IRLS runs on every row at once, each
    row stopping when its weights settle).  Returns a frame with columns L_inf, A, b, rmse,
    converged, b_at_bound (one row per replicate).
    """
    check_loss(loss, f_scale)
    k = np.asarray(k, dtype=float).ravel()
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    if Y.shape[1] != k.size:
        raise ValueError("Y must have one column per k")
    if np.any(k < 1):
        raise ValueError("fit_per_size_batch needs k >= 1 only")
    w, _ = resolve_weights(k, weights, None)
    R = Y.shape[0]
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    out = pd.DataFrame({"L_inf": np.nan, "A": np.nan, "b": np.nan, "rmse": np.nan,
                        "converged": False, "b_at_bound": False}, index=range(R))
    finite = np.all(np.isfinite(Y), axis=1)
    if np.unique(k).size < 3 or np.count_nonzero(w > 0) < 3 or not finite.any():
        return out
    Yf = np.where(finite[:, None], Y, 0.0)
    L_inf, A, b = per_size_solve_batch(k, Yf, np.broadcast_to(w, Yf.shape), lo, hi)
    if loss == "huber":
        L_inf, A, b = huber_irls_batch(k, Yf, w, lo, hi, f_scale, (L_inf, A, b))
    pred = L_inf[:, None] + A[:, None] / (k[None, :] + b[:, None])
    rmse = np.sqrt(np.mean((Yf - pred) ** 2, axis=1))
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


def _per_size_parametric(k, m, s, var, n, f, n_boot, rng, weights, b_bounds, loss, f_scale):
    """The parametric draws of one per-size curve: replicates around the fit and, when its
    b is off the lower bound but >= ``BOUNDARY_FRAC_PER_SIZE`` of those replicates reach it, around
    the fit with b at the bound too (``centre``; the intervals are their union)."""
    w, _ = resolve_weights(k, weights, s)
    E = parametric_noise(k, m, var, n, predict_per_size(f, k), w, n_boot, rng)
    d = fit_per_size_batch(k, predict_per_size(f, k)[None, :] + E, weights=w,
                           b_bounds=b_bounds, loss=loss, f_scale=f_scale)
    d["centre"] = "fit"
    lo = float(b_bounds[0])
    tol = 1e-6 * max(1.0, float(b_bounds[1]) - lo)
    if f.b > lo + tol and np.mean(d["b"].to_numpy() <= lo + tol) >= BOUNDARY_FRAC_PER_SIZE:
        X = np.column_stack([np.ones_like(k), 1.0 / (k + lo)])
        sw = np.sqrt(w)
        coef = np.linalg.lstsq(X * sw[:, None], m * sw, rcond=None)[0]
        d2 = fit_per_size_batch(k, (X @ coef)[None, :] + E, weights=w, b_bounds=b_bounds,
                                loss=loss, f_scale=f_scale)
        d2["centre"] = "b=bound"
        d = pd.concat([d, d2], ignore_index=True)
    return d


def bootstrap_draws(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                    seed: int = 0, weights: Any = "k", b_bounds=DEFAULT_B_BOUNDS,
                    loss: str = "linear", f_scale: float | None = None,
                    interval: str = DEFAULT_INTERVAL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bootstrap replicates of the per-size fit for every (size, method).

    Returns ``(points, draws)``: ``points`` has one row per (size, method) with the fit of
    ``fit_per_size`` on the observed means (as ``runner.fit_all``); ``draws`` has one row per
    (size, method, replicate) with columns L_inf, A, b, rmse, converged, b_at_bound and
    centre.  ``loss`` / ``f_scale``: as in ``fit_per_size`` (every replicate is fitted the
    same way).  ``interval``: ``"parametric"`` (cell means drawn from the fit and the size's
    variance law; centre "fit", plus "b=bound" replicates drawn around the fit with b at its
    lower bound when >= ``BOUNDARY_FRAC_PER_SIZE`` of the others reach it; the intervals of
    ``summarise_draws`` join the two) or ``"subsets"`` (subsets resampled within each k;
    centre "subsets"); see the module docstring.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    check_loss(loss, f_scale)
    check_interval(interval)
    values = per_subset_values(losses, view)
    points, draws = [], []
    for size, params, method, g in _cells(values):
        rng = _cell_rng(seed, size, method, view)
        if interval == "subsets":
            k, m, s, boot = _resampled_means(g, n_boot, rng)
        else:
            k, m, s, var, n = cell_moments(g)
        f = fit_per_size(k, m, weights=weights, b_bounds=b_bounds, sem=s, loss=loss,
                           f_scale=f_scale)
        points.append({"size": size, "params": params, "method": method, "view": view,
                       **{p: getattr(f, p) for p in PARAMS}, "r2": f.r2, "rmse": f.rmse,
                       "converged": f.converged, "n_k": f.n_k,
                       "n_subsets": int(len(g[g["k"] >= 1]))})
        if interval == "parametric":
            if f.converged:
                d = _per_size_parametric(k, m, s, var, n, f, n_boot, rng, weights, b_bounds,
                                         loss, f_scale)
            else:
                d = fit_per_size_batch(np.arange(1.0, 4.0), np.full((n_boot, 3), np.nan))
        elif isinstance(weights, str) and weights == "sem":
            # refit one by one, as fit_per_size does with the observed sems
            rows = []
            for r in range(n_boot):
                fr = fit_per_size(k, boot[r], weights="sem", b_bounds=b_bounds, sem=s,
                                    loss=loss, f_scale=f_scale)
                rows.append({p: getattr(fr, p) for p in PARAMS} | {"rmse": fr.rmse,
                            "converged": fr.converged, "b_at_bound": "b" in fr.at_bound})
            d = pd.DataFrame(rows)
        elif k.size:
            d = fit_per_size_batch(k, boot, weights=weights, b_bounds=b_bounds, loss=loss,
                                   f_scale=f_scale)
        else:
            d = fit_per_size_batch(np.arange(1.0, 4.0), np.full((n_boot, 3), np.nan))
        if "centre" not in d:
            d["centre"] = "fit" if interval == "parametric" else "subsets"
        d.insert(0, "rep", np.arange(len(d)) % n_boot)
        d.insert(0, "view", view)
        d.insert(0, "method", method)
        d.insert(0, "params", params)
        d.insert(0, "size", size)
        draws.append(d)
    pcols = ["size", "params", "method", "view", *PARAMS, "r2", "rmse", "converged", "n_k", "n_subsets"]
    pts = pd.DataFrame(points, columns=pcols)
    dr = (pd.concat(draws, ignore_index=True) if draws else
          pd.DataFrame(columns=["size", "params", "method", "view", "rep", *PARAMS, "rmse",
                                "converged", "b_at_bound", "centre"]))
    return pts, dr


def summarise_draws(points: pd.DataFrame, draws: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (size, method, parameter) with the point estimate, the
    percentile interval of the converged replicates (the union over the bootstrap centres,
    see ``bootstrap_draws``), their median and sd and the converged fraction (replicates
    around the fit)."""
    rows = []
    for _, p in points.iterrows():
        dall = draws[(draws["size"] == p["size"]) & (draws["method"] == p["method"])]
        okall = dall[dall["converged"].astype(bool)]
        d = main_centre(dall)
        ok = d[d["converged"].astype(bool)]
        frac = float(len(ok) / len(d)) if len(d) else float("nan")
        for name in PARAMS:
            v = ok[name].to_numpy(dtype=float)
            lo, hi = union_interval(okall, name, level)
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
                       b_bounds=DEFAULT_B_BOUNDS, loss: str = "linear",
                       f_scale: float | None = None,
                       interval: str = DEFAULT_INTERVAL) -> pd.DataFrame:
    """Percentile-bootstrap intervals of the per-size law's parameters.

    For each (size, method): draw the k >= 1 cell means (``interval="parametric"``: from the
    fit plus each cell's sampling noise under the size's variance law; ``"subsets"``:
    resample the merged subsets with replacement within each k cell), refit L_inf + A/(k+b)
    (``fit_per_size_batch``, the vectorised ``fit_per_size``).  Returns one row per (size, method, parameter) with
    columns size, params, method, view, parameter (L_inf, A, b), estimate (the fit on the
    observed means), lo / hi (2.5 / 97.5 percentiles for ``level=0.95``), boot_median,
    boot_sd, n_boot, frac_converged, frac_b_at_bound.  With ``"subsets"`` a k cell with one
    subset (k = M) is the same in every replicate.  Deterministic for a seed.
    """
    points, draws = bootstrap_draws(losses, view, n_boot, seed, weights, b_bounds, loss, f_scale,
                                    interval)
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


def unified_draws(values: pd.DataFrame, point: UnifiedFit, n_boot: int = 200, seed: int = 0,
                  weights: Any = "k", loss: str = "linear", f_scale: float | None = None,
                  bounds: dict | None = None, key: tuple[str, ...] = (),
                  interval: str = DEFAULT_INTERVAL) -> pd.DataFrame:
    """Bootstrap replicates of the unified law for one (method, view).

    ``values``: that (method, view)'s per-subset values (``per_subset_values``, one method);
    ``point``: its ``fit_unified`` result.  Each replicate draws the (size, k) cell means
    (``interval="parametric"``: the point fit plus each cell's sampling noise, see
    ``intervals``; ``"subsets"``: resample the merged subsets with replacement within every
    cell and recompute the means) and refits the law from the point estimate (a warm start:
    the replicates are perturbations of the same data), with the same weights (``"sem"``: the
    observed sems), loss and bounds (Huber with an automatic threshold: the point fit's
    threshold, fixed).  Least-squares replicates are refitted all at once
    (``intervals.fit_unified_batch``), Huber ones one by one (``fit_unified``).
    Parametric: the same noise is also added to the fit with gamma, b
    (``intervals.BOUNDARY_PARAMS``) and both held at their lower bounds and refitted
    (``centre`` "gamma=bound", "b=bound", "gamma=bound,b=bound"; none that the fit is
    itself, with those parameters on the bound already), because the replicates of an
    estimate off a bound do not show the estimate's own sampling distribution when the truth
    sits on it (A0 and b trade off, so an estimate with b > 0 also overstates A0): each
    centre is the null of the test of its parameter at the bound, and, where that test does
    not reject, joins the intervals (``summarise_unified``, ``intervals.boundary_intervals``).
    The random stream is seeded by (``seed``, ``key``), so a (method, view)'s draws do not
    depend on the other fits.  Returns one row per replicate: rep, the six parameters, rmse,
    converged, ``at_bound_<p>`` flags and ``centre`` ("fit": around the point estimate).
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    check_interval(interval)
    cols = (["rep", *UNIFIED_PARAMS, "rmse", "converged"]
            + [f"at_bound_{p}" for p in UNIFIED_PARAMS])
    if not point.converged:
        return pd.DataFrame(columns=[*cols, "centre"])
    rng = _cell_rng(seed, "unified", *key)
    bnds = dict(DEFAULT_UNIFIED_BOUNDS)
    bnds.update(bounds or {})
    if interval == "subsets":
        N, k, _m, s, boot = _resampled_cells(values, n_boot, rng)
        w, _ = resolve_weights(k, weights, s)  # fixed: "sem" means the observed sems
        d = _unified_refits(N, k, boot, w, point, s, loss, f_scale, bnds, cols)
        d["centre"] = "subsets"
        return d
    N, k, m, s, var, n = unified_cell_moments(values)
    w, _ = resolve_weights(k, weights, s)
    pred = predict_unified(point, N, k)
    E = parametric_noise(k, m, var, n, pred, w, n_boot, rng, N=N)
    d = _unified_refits(N, k, pred[None, :] + E, w, point, s, loss, f_scale, bnds, cols)
    d["centre"] = "fit"
    parts = [d]
    x0 = np.array([getattr(point, p) for p in UNIFIED_PARAMS], dtype=float)
    lo = {q: bnds[q][0] for q in BOUNDARY_PARAMS}
    tol = {q: 1e-6 * max(1.0, bnds[q][1] - bnds[q][0]) for q in BOUNDARY_PARAMS}
    # the parameters the fit has at their lower bound already
    on = {q for q in BOUNDARY_PARAMS if x0[UNIFIED_PARAMS.index(q)] <= lo[q] + tol[q]}
    for r in range(1, len(BOUNDARY_PARAMS) + 1):
        for S in itertools.combinations(BOUNDARY_PARAMS, r):
            if set(S) <= on:
                continue  # the fit itself is this centre
            # bootstrap from the fit with the parameters of S at their bounds, too
            start = x0.copy()
            fixed = np.zeros(6, dtype=bool)
            for q in S:
                start[UNIFIED_PARAMS.index(q)] = lo[q]
                fixed[UNIFIED_PARAMS.index(q)] = True
            X, _c, ok = fit_unified_batch(N, k, m[None, :], w, start, bnds, fixed=fixed)
            if not ok[0]:
                continue
            centre = UnifiedFit(converged=True, **dict(zip(UNIFIED_PARAMS, X[0])))
            dq = _unified_refits(N, k, predict_unified(centre, N, k)[None, :] + E, w, centre,
                                 s, loss, f_scale, bnds, cols)
            dq["centre"] = ",".join(f"{q}=bound" for q in S)
            parts.append(dq)
    return pd.concat(parts, ignore_index=True)


def _unified_refits(N, k, boot, w, point: UnifiedFit, s, loss, f_scale, bnds, cols):
    """Refit the unified law to every row of ``boot`` from ``point``: all at once for least
    squares, one by one (``fit_unified``) for the Huber loss."""
    if loss == "linear":
        X, _cost, conv = fit_unified_batch(N, k, boot, w,
                                           [getattr(point, p) for p in UNIFIED_PARAMS], bnds)
        return batch_rows(N, k, boot, X, conv, bnds)[cols]
    start = (point.beta, point.gamma, point.b)
    if f_scale is None and point.f_scale:
        f_scale = float(point.f_scale)  # the point fit's automatic threshold, held fixed
    rows = []
    for r in range(len(boot)):
        f = fit_unified(N, k, boot[r], weights=w, bounds=bnds, sem=s, loss=loss,
                          f_scale=f_scale, start=start)
        row = {"rep": r, **{p: getattr(f, p) for p in UNIFIED_PARAMS}, "rmse": f.rmse,
               "converged": bool(f.converged)}
        row.update({f"at_bound_{p}": p in f.at_bound for p in UNIFIED_PARAMS})
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def summarise_unified(point: UnifiedFit, draws: pd.DataFrame, level: float = 0.95) -> dict:
    """Percentile intervals of the unified law from ``unified_draws``: the bootstrap fields
    of a ``UnifiedFit``, ``{"ci": {p: Interval}, "n_boot", "boot_frac_converged", "level"}``.
    L*, B and beta: the percentile intervals of the replicates around the fit (or of the
    resampled subsets).  A0, gamma and b (``intervals.BOUNDARY_JOINED``), parametric: the
    union of the percentile and bias-corrected percentile intervals of the replicates
    around the fit and the percentile intervals around the boundary centres (see
    ``unified_draws``) that the test of gamma / b at the bound keeps, gamma and b each only
    its own, their lower end off the bound where the test rejects it
    (``intervals.boundary_intervals``).  sd, median, the share at a bound, ``n_boot`` and the
    converged share are those of the replicates around the fit."""
    okall = draws[draws["converged"].astype(bool)] if len(draws) else draws
    main = main_centre(draws)
    ok = main[main["converged"].astype(bool)] if len(main) else main
    tail = (boundary_intervals(okall, {p: getattr(point, p) for p in UNIFIED_PARAMS}, level)
            if len(okall) else {})
    ci = {}
    for p in UNIFIED_PARAMS:
        v = ok[p].to_numpy(dtype=float) if len(ok) else np.array([])
        v = v[np.isfinite(v)]
        if p in tail:
            lo, hi = tail[p]
        else:
            lo, hi = percentile_interval(v, level)
        ci[p] = Interval(lo=lo, hi=hi,
                         sd=float(np.std(v, ddof=1)) if v.size > 1 else float("nan"),
                         median=float(np.median(v)) if v.size else float("nan"),
                         frac_at_bound=(float(ok[f"at_bound_{p}"].astype(bool).mean()) if len(ok)
                                        else float("nan")))
    return {"ci": ci, "n_boot": int(len(main)),
            "boot_frac_converged": float(len(ok) / len(main)) if len(main) else float("nan"),
            "level": float(level)}


def bootstrap_unified(losses: pd.DataFrame, view: str = "cross_domain", n_boot: int = 200,
                      seed: int = 0, weights: Any = "k", level: float = 0.95,
                      loss: str = "linear", f_scale: float | None = None,
                      bounds: dict | None = None,
                      interval: str = DEFAULT_INTERVAL) -> pd.DataFrame:
    """Percentile-bootstrap intervals of the unified law's parameters, per method, for one
    view: the fit of ``runner.fit_all`` on the observed means, then ``unified_draws``.

    Returns one row per (method, parameter): method, view, parameter (``UNIFIED_PARAMS``),
    estimate, lo, hi, boot_median, boot_sd, frac_at_bound, n_boot, frac_converged, r2, rmse,
    converged (of the point fit) and at_bound (the point estimate sits at a bound).
    Deterministic for a seed (the same intervals as ``runner.fit_all(..., n_boot, seed)``).
    """
    df = normalise_losses(losses)
    table = aggregate_views(df, [view])
    values = subset_values(df, view)
    rows = []
    for method, g in table.groupby("method", sort=True):
        g = g.sort_values(["params", "k"])
        f = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                        weights=weights, bounds=bounds, sem=g["sem"].to_numpy(), loss=loss,
                        f_scale=f_scale)
        draws = unified_draws(values[values["method"] == method], f, n_boot=n_boot, seed=seed,
                              weights=weights, loss=loss, f_scale=f_scale, bounds=bounds,
                              key=(str(method), str(view)), interval=interval)
        s = summarise_unified(f, draws, level)
        for p in UNIFIED_PARAMS:
            c = s["ci"][p]
            rows.append({"method": method, "view": view, "parameter": p, "estimate": getattr(f, p),
                         "lo": c.lo, "hi": c.hi, "boot_median": c.median,
                         "boot_sd": c.sd, "frac_at_bound": c.frac_at_bound,
                         "n_boot": s["n_boot"], "frac_converged": s["boot_frac_converged"],
                         "r2": f.r2, "rmse": f.rmse, "converged": f.converged,
                         "at_bound": p in f.at_bound})
    return pd.DataFrame(rows, columns=["method", "view", "parameter", "estimate", "lo", "hi",
                                       "boot_median", "boot_sd", "frac_at_bound", "n_boot",
                                       "frac_converged", "r2", "rmse", "converged", "at_bound"])


# --------------------------------------------------------------------------------------
