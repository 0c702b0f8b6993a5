"""The pieces of the parametric bootstrap (``fit.interval: parametric``, the default).

The within-cell bootstrap (``fit.interval: subsets``) resamples the merged subsets of each
(size, k) cell.  A cell that holds one subset (k = M when every subset is enumerated; every
cell of a one-subset-per-k design) is then the same in every replicate, and a cell of a few
subsets barely moves, so its noise is missing from the intervals: in the paper's design
(every subset up to 7B, 15 above) they covered the true parameters 57-76% of the time for a
nominal 95% (benchmarks/interval_coverage.py).  The parametric bootstrap draws each cell's
mean instead from the fitted law plus normal noise of the cell's own sampling variance:

    y*_c = fit_c + sd_c z,   sd_c^2 = s_c^2 / n_c,

with s_c^2 the across-subset variance of the cell (``cell_noise_sd``): the variance law of
the size, Var = C_N / k (Cor. 3.2, C_N pooled over the size's cells with >= 2 subsets,
weighted by their degrees of freedom), shrunk towards each cell's own sample variance with
``PRIOR_DOF`` pseudo degrees of freedom; a cell with one subset takes the law.  A size with
no cell of >= 2 subsets takes the median C of the other sizes; a table with none at all takes
the residual variance of the fit (weights as inverse variances).  Every replicate is refitted
from the point estimate (``fit_unified_batch``: all replicates at once; the per-size law by
``bootstrap.fit_per_size_batch``), and the intervals are percentiles of the refits.

Where a parameter of the tail sits at (or near) its lower bound 0 -- the paper's Tables 3-5
put gamma and b there for most domains -- an estimate off the bound is biased (A0 trades off
against gamma and b), and replicates drawn around it miss the truth: the replicates are also
drawn around the fit with gamma and/or b held at 0 (a "centre" per non-empty subset of
``BOUNDARY_PARAMS``).  Whether the bound belongs in an interval is decided by a test, not by
the replicates around the fit merely reaching it (they reach it for almost every table whose
gamma is 0 and for many whose gamma is merely small, which made gamma's intervals cover
100%): for q in gamma, b, the parametric-bootstrap test of "q = 0" takes the centre with q
held at 0 (the other parameters refitted) as the null and the estimate as the statistic,
p = (1 + #{q* >= q_hat}) / (1 + n) over that centre's refits (``bound_pvalue``; p = 1 when
the estimate is on the bound or the centre could not be fitted), and rejects when
p < 1 - level.  A centre is kept when none of the parameters it holds is rejected.  The
interval of q joins the percentile and bias-corrected percentile intervals of the
replicates around the fit with the percentile interval of its own centre, if kept (so an
estimate on the bound, or one the test cannot tell from it, gets [0, upper end]); when the
test rejects, the bound is left out: the lower end is at least the (1 - level)/2 percentile
of the fit's replicates off the bound.  The interval of A0, which the test does not cover,
joins those of every kept centre, the joint one included (``boundary_intervals``).  The
interval of q thus inverts q's own test, so a q at its bound is covered about
level of the time (the joint centre's projection onto q would cover it more often).  The
per-size law keeps a simpler rule for its b: when >= ``BOUNDARY_FRAC_PER_SIZE`` of the
replicates reach the bound, they are also drawn around the fit with b there, and the
intervals join (``union_interval``).  The coverage this gives, per parameter and design, is
measured by benchmarks/interval_coverage.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from mergelaws.laws.unified import UNIFIED_PARAMS

__all__ = ["INTERVALS", "DEFAULT_INTERVAL", "PRIOR_DOF", "BOUNDARY_FRAC_PER_SIZE",
           "BOUNDARY_PARAMS", "BOUNDARY_JOINED", "cell_moments", "unified_cell_moments",
           "parametric_noise", "percentile_interval", "bc_interval", "union_interval",
           "bound_pvalue", "held_params", "boundary_intervals",
           "main_centre", "batch_rows", "check_interval", "cell_stats",
           "cell_noise_sd", "residual_noise_sd", "fit_unified_batch"]

#: interval methods: ``parametric`` (cell noise from the variance law; default) and
#: ``subsets`` (resample the merged subsets within each cell)
INTERVALS: tuple[str, ...] = ("parametric", "subsets")
DEFAULT_INTERVAL = "parametric"
#: pseudo degrees of freedom of the variance law when it is combined with a cell's own variance
PRIOR_DOF = 10.0
#: the per-size law: b, when this share of the replicates around the fit reach its lower
#: bound (the bound inside a 95% interval), is also bootstrapped from the fit with it held there
BOUNDARY_FRAC_PER_SIZE = 0.025
#: the unified law's parameters tested at their lower bound and bootstrapped from the fit
#: with them held there (the paper's Tables 3-5 put gamma and b at 0; module docstring)
BOUNDARY_PARAMS: tuple[str, ...] = ("gamma", "b")
#: the parameters of the tail A0 N^-gamma / (k + b), whose intervals join a bias-corrected
#: percentile interval and the kept boundary centres' (``boundary_intervals``; A0 trades off
#: against gamma and b, so its estimate is biased upwards when they sit at 0); L*, B, beta
#: keep the percentile one
BOUNDARY_JOINED: tuple[str, ...] = ("A0", "gamma", "b")


def check_interval(interval: str) -> None:
    """Raise ValueError unless ``interval`` is one of ``INTERVALS``."""
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {list(INTERVALS)}, got {interval!r}")


def cell_stats(values, by: tuple[str, ...] = ("params", "k")):
    """Per cell of per-subset ``values`` (k >= 1; cells sorted by ``by``): the keys, the mean,
    the across-subset variance (ddof 1; NaN for a single subset) and the count."""
    g = values[values["k"] >= 1].groupby(list(by), sort=True)["value"]
    st = g.agg(["mean", "var", "size"]).reset_index()
    return st


def cell_noise_sd(N, k, var, n, prior_dof: float = PRIOR_DOF) -> np.ndarray | None:
    """The sd of each cell's mean under the variance law Var = C_N / k (module docstring).

    ``N``, ``k``, ``var`` (across-subset variance, NaN where n < 2), ``n`` (subsets): one
    entry per cell.  Returns None when no cell has two subsets (no variance to go on)."""
    N, k, var, n = (np.asarray(a, dtype=float).ravel() for a in (N, k, var, n))
    dof = np.where((n >= 2) & np.isfinite(var), n - 1.0, 0.0)
    v = np.where(dof > 0, var, 0.0)
    sizes = np.unique(N)
    C = np.full(sizes.size, np.nan)
    for i, s in enumerate(sizes):
        m = (N == s) & (dof > 0)
        if m.any():
            C[i] = float(np.sum(dof[m] * k[m] * v[m]) / np.sum(dof[m]))
    if not np.isfinite(C).any():
        return None
    C = np.where(np.isfinite(C), C, float(np.median(C[np.isfinite(C)])))
    law = C[np.searchsorted(sizes, N)] / k
    s2 = (dof * v + prior_dof * law) / (dof + prior_dof)
    return np.sqrt(np.maximum(s2, 0.0) / np.maximum(n, 1.0))


def residual_noise_sd(resid, w, n_params: int) -> np.ndarray:
    """The fallback noise: the weighted residual variance of a fit, weights as inverse
    variances (sd_c = sqrt(sum w r^2 / (n - p) / w_c))."""
    resid, w = np.asarray(resid, dtype=float), np.asarray(w, dtype=float)
    dof = max(resid.size - n_params, 1)
    s2 = float(np.sum(w * resid**2) / dof)
    return np.sqrt(s2 / np.where(w > 0, w, np.inf))


# --------------------------------------------------------------------------------------
# The unified law for many replicates at once
# --------------------------------------------------------------------------------------


def _model(x, logN, k):
    nb = np.exp(-x[:, 2:3] * logN)
    ng = np.exp(-x[:, 4:5] * logN)
    inv = 1.0 / (k + x[:, 5:6])
    f = x[:, 0:1] + x[:, 1:2] * nb + x[:, 3:4] * ng * inv
    return f, nb, ng, inv


def fit_unified_batch(N, k, Y, w, start, bounds: dict, max_iter: int = 3000,
                      tol: float = 1e-12, fixed=None):
    """Weighted least squares of the unified law for every row of ``Y`` (R, n) at once.

    A bounded Levenberg-Marquardt over the six parameters (``UNIFIED_PARAMS`` order; L*, B
    >= 0, beta / gamma / b within ``bounds``; a parameter at a bound whose gradient points
    out is held there for the step), started from ``start`` (6,) or (R, 6): the point
    estimate, as the replicates are perturbations of the same data.  ``w``: (n,) weights on
    squared residuals.  ``fixed``: (6,) or (R, 6) booleans, parameters held at their start
    value (a restricted fit).  Returns ``(X, cost, converged)``: X (R, 6), cost = half the weighted
    residual sum of squares (R,), converged (R,) (the cost, or the parameters, settled within
    ``max_iter``; or no step lowers the cost)."""
    logN = np.log(np.asarray(N, dtype=float).ravel())[None, :]
    k = np.asarray(k, dtype=float).ravel()[None, :]
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    sw = np.sqrt(np.asarray(w, dtype=float).ravel())[None, :]
    R = Y.shape[0]
    lb = np.array([0.0, 0.0, bounds["beta"][0], -np.inf, bounds["gamma"][0], bounds["b"][0]])
    ub = np.array([np.inf, np.inf, bounds["beta"][1], np.inf, bounds["gamma"][1], bounds["b"][1]])
    x = np.clip(np.broadcast_to(np.asarray(start, dtype=float), (R, 6)).copy(), lb, ub)
    lam = np.full(R, 1e-3)
    f = _model(x, logN, k)[0]
    r = sw * (Y - f)
    cost = 0.5 * np.sum(r * r, axis=1)
    done = ~np.isfinite(cost)
    conv = np.zeros(R, dtype=bool)
    eye = np.eye(6)
    fixed = (np.zeros((R, 6), dtype=bool) if fixed is None
             else np.broadcast_to(np.asarray(fixed, dtype=bool), (R, 6)))
    for _ in range(max_iter):
        a = np.flatnonzero(~done)
        if not a.size:
            break
        xa, ra = x[a], r[a]
        _f, nb, ng, inv = _model(xa, logN, k)
        B, A0 = xa[:, 1:2], xa[:, 3:4]
        J = np.stack([np.ones_like(nb), nb, -B * logN * nb, ng * inv, -A0 * logN * ng * inv,
                      -A0 * ng * inv * inv], axis=2) * sw[:, :, None]       # (a, n, 6)
        Jt = J.transpose(0, 2, 1)
        g = (Jt @ ra[:, :, None])[:, :, 0]                                  # descent direction
        H = Jt @ J
        # hold a parameter at its bound when the step would push it out
        held = ((xa <= lb + 1e-14) & (g < 0)) | ((xa >= ub - 1e-14) & (g > 0)) | fixed[a]
        d = np.diagonal(H, axis1=1, axis2=2)
        scale = np.where(d > 0, d, 1.0)
        Hd = H + lam[a, None, None] * eye * scale[:, None, :]
        free = ~held
        Hd = Hd * (free[:, :, None] & free[:, None, :]) + eye * held[:, :, None]
        g = np.where(free, g, 0.0)
        try:
            step = np.linalg.solve(Hd, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a singular system: the pseudo-inverse
            step = (np.linalg.pinv(Hd) @ g[:, :, None])[:, :, 0]
        xn = np.clip(xa + step, lb, ub)
        fn = _model(xn, logN, k)[0]
        rn = sw * (Y[a] - fn)
        cn = 0.5 * np.sum(rn * rn, axis=1)
        better = np.isfinite(cn) & (cn <= cost[a])
        moved = np.max(np.abs(xn - xa) / (np.abs(xa) + 1e-6), axis=1)
        small = better & ((cost[a] - cn <= tol * np.maximum(cost[a], 1e-300)) | (moved < 1e-9))
        ia = a[better]
        x[ia], r[ia], cost[ia] = xn[better], rn[better], cn[better]
        lam[a] = np.where(better, np.maximum(lam[a] / 3.0, 1e-12), lam[a] * 4.0)
        stuck = lam[a] > 1e12
        conv[a[small | stuck]] = True
        done[a[small | stuck]] = True
    conv &= np.all(np.isfinite(x), axis=1)
    return x, cost, conv


# --------------------------------------------------------------------------------------
# Cells, noise, intervals (used by ``bootstrap``)
# --------------------------------------------------------------------------------------


def cell_moments(g: pd.DataFrame):
    """k, mean, sem, across-subset variance (NaN for one subset) and count of each k >= 1
    cell of one curve's per-subset values (the means and sems exactly as
    ``bootstrap._resampled_means``'s, so both intervals share the point fit)."""
    g = g[g["k"] >= 1].sort_values(["k", "subset"], kind="mergesort")
    ks, means, sems, var, n = [], [], [], [], []
    for k, h in g.groupby("k", sort=True):
        v = h["value"].to_numpy(dtype=float)
        ks.append(float(k))
        means.append(v.mean())
        sems.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
        var.append(v.var(ddof=1) if v.size > 1 else np.nan)
        n.append(float(v.size))
    return tuple(np.array(a, dtype=float) for a in (ks, means, sems, var, n))


def parametric_noise(k, m, var, n, pred, w, n_boot: int, rng: np.random.Generator,
                     N=None) -> np.ndarray:
    """(n_boot, K) normal noise of each cell mean's sampling sd (``cell_noise_sd``;
    without any replicated cell, the fit's weighted residual variance), to add to fitted
    values."""
    N = np.ones_like(k) if N is None else N
    sd = cell_noise_sd(N, k, var, n)
    if sd is None:
        sd = residual_noise_sd(m - pred, w, 3 if np.unique(N).size == 1 else 6)
    return sd[None, :] * rng.standard_normal((n_boot, k.size))


def percentile_interval(v: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 percentiles of ``v`` (NaN for none)."""
    if not v.size:
        return float("nan"), float("nan")
    return (float(np.percentile(v, 50 * (1 - level))), float(np.percentile(v, 50 * (1 + level))))


def bc_interval(v: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """The bias-corrected percentile interval (Efron): percentiles at
    Phi(2 z0 -+ z), z0 = Phi^-1(share of replicates below the estimate)."""
    if not v.size or not np.isfinite(estimate):
        return float("nan"), float("nan")
    share = (np.sum(v < estimate) + 0.5 * np.sum(v == estimate)) / v.size
    z0 = stats.norm.ppf(np.clip(share, 0.5 / v.size, 1.0 - 0.5 / v.size))
    z = stats.norm.ppf(0.5 + level / 2)
    a = stats.norm.cdf([2 * z0 - z, 2 * z0 + z])
    return float(np.percentile(v, 100 * a[0])), float(np.percentile(v, 100 * a[1]))


def union_interval(ok: pd.DataFrame, name: str, level: float,
                   estimate: float | None = None) -> tuple[float, float]:
    """The percentile interval of ``name`` over the converged replicates ``ok`` of each
    bootstrap centre (``centre`` column; one without it), joined: (min lo, max hi); with
    ``estimate``, joined with the bias-corrected percentile interval of the replicates
    around the fit as well."""
    los, his = [], []
    groups = ok.groupby("centre", sort=True) if "centre" in ok else [("fit", ok)]
    for c, g in groups:
        v = g[name].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        lo, hi = percentile_interval(v, level)
        los.append(lo)
        his.append(hi)
        if estimate is not None and c == "fit":
            lo, hi = bc_interval(v, estimate, level)
            los.append(lo)
            his.append(hi)
    if not los or np.all(np.isnan(los)):
        return float("nan"), float("nan")
    return float(np.nanmin(los)), float(np.nanmax(his))


def bound_pvalue(null_values, estimate: float) -> float:
    """The parametric-bootstrap p-value of "the parameter sits at its lower bound":
    (1 + #{v >= estimate}) / (1 + n) over ``null_values``, the parameter's refits of the
    replicates drawn around the fit with it held at the bound; 1.0 when there are none."""
    v = np.asarray(null_values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size or not np.isfinite(estimate):
        return 1.0
    return float((1 + np.count_nonzero(v >= estimate)) / (1 + v.size))


def held_params(centre: str) -> tuple[str, ...]:
    """The parameters a bootstrap centre holds at their bound ("gamma=bound,b=bound" ->
    ("gamma", "b"); "fit" / "subsets" -> ())."""
    return tuple(c[: -len("=bound")] for c in str(centre).split(",") if c.endswith("=bound"))


def boundary_intervals(ok: pd.DataFrame, estimates: dict, level: float,
                       params: tuple[str, ...] = BOUNDARY_JOINED,
                       tested: tuple[str, ...] = BOUNDARY_PARAMS) -> dict[str, tuple[float, float]]:
    """The intervals of the tail's parameters ``params`` from the converged replicates ``ok``
    of every centre (module docstring).

    For q in ``tested``: p = ``bound_pvalue`` of the estimate against the centre "q=bound"
    (1 without it), rejected when p < 1 - level; a centre is kept when none of the
    parameters it holds is rejected.  q's interval: ``union_interval`` of the main
    replicates ("fit" / "subsets") and, if kept, its own centre; when rejected, its lower
    end is at least the (1 - level)/2 percentile of the main replicates off the bound
    (``at_bound_q`` false).  Any other parameter (A0): the main replicates and every kept
    centre.  Returns {p: (lo, hi)}."""
    centre = ok["centre"].astype(str) if "centre" in ok else pd.Series("fit", index=ok.index)
    main_rows = centre.isin(["fit", "subsets"])
    rejected = {}
    for q in tested:
        null = ok.loc[centre == f"{q}=bound", q] if q in ok else pd.Series(dtype=float)
        rejected[q] = bound_pvalue(null.to_numpy(dtype=float), estimates[q]) < 1.0 - level
    kept = {c for c in centre.unique()
            if held_params(c) and not any(rejected.get(q, False) for q in held_params(c))}
    out = {}
    for p in params:
        own = ({f"{p}=bound"} & kept) if p in tested else kept
        sel = ok[main_rows | centre.isin(own)]
        lo, hi = union_interval(sel, p, level, estimates[p])
        if rejected.get(p, False) and f"at_bound_{p}" in ok:
            m = ok[main_rows]
            v = m.loc[~m[f"at_bound_{p}"].astype(bool), p].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                lo = max(lo, percentile_interval(v, level)[0])
        out[p] = (lo, hi)
    return out


def main_centre(d: pd.DataFrame) -> pd.DataFrame:
    """The replicates around the fit (parametric) or of the resampled subsets."""
    return d[d["centre"].isin(["fit", "subsets"])] if "centre" in d else d


def unified_cell_moments(values: pd.DataFrame):
    """N (billions), k, mean, sem, across-subset variance (NaN for one subset) and count of
    the (size, k >= 1) cells of one (method, view)'s per-subset values, sorted by params, k."""
    st = values[values["k"] >= 1].groupby(["params", "k"], sort=True)["value"].agg(
        ["mean", "var", "size"]).reset_index()
    n = st["size"].to_numpy(dtype=float)
    var = st["var"].to_numpy(dtype=float)
    sem = np.where(n > 1, np.sqrt(np.where(n > 1, var, 0.0) / n), 0.0)
    return (st["params"].to_numpy(dtype=float) / 1e9, st["k"].to_numpy(dtype=float),
            st["mean"].to_numpy(dtype=float), sem, var, n)


def batch_rows(N, k, Y, X, conv, bounds: dict) -> pd.DataFrame:
    """The rows of ``unified_draws`` for the refits ``X`` (R, 6) of the means ``Y``."""
    p = dict(zip(UNIFIED_PARAMS, X.T))
    pred = (p["L_star"][:, None] + p["B"][:, None] * N[None, :] ** -p["beta"][:, None]
            + p["A0"][:, None] * N[None, :] ** -p["gamma"][:, None] / (k[None, :] + p["b"][:, None]))
    d = pd.DataFrame({"rep": np.arange(len(X)), **p,
                      "rmse": np.sqrt(np.mean((Y - pred) ** 2, axis=1)), "converged": conv})
    for q in UNIFIED_PARAMS:
        if q in bounds:
            lo, hi = bounds[q]
            tol = 1e-6 * max(1.0, hi - lo)
            d[f"at_bound_{q}"] = (p[q] <= lo + tol) | (p[q] >= hi - tol)
        else:
            d[f"at_bound_{q}"] = p[q] == 0.0 if q in ("L_star", "B") else False
    return d
