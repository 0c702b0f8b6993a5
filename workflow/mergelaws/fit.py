"""Fit the merging scaling laws of arXiv 2509.24244 to a losses table.

Two laws (PAPER.md section 1):

* per-size law (Eq. 3):  E[L | k] = L_inf + A / (k + b)
* unified law (Eqs. 1, 4): E[L | N, k] = L* + B * N**-beta + A0 * N**-gamma / (k + b),
  with N the base-model size in **billions** of parameters (``params / 1e9``).

Both are fitted by *variable projection*: for fixed nonlinear parameters
(``b``; or ``beta, gamma, b``) the model is linear in the remaining ones, which
are obtained by weighted linear least squares.  The nonlinear parameters are
searched over a deterministic grid and then refined with a bounded optimiser.
Linear coefficients (``A``, ``B``, ``A0``) are *not* sign-constrained: a curve
that rises with k is reported with ``A < 0``.

Fits use k >= 1 only (k = 0 is the base model, outside the law).  The default
weights on squared residuals are proportional to k, as in the paper ("weights
proportional to k, because variability shrinks roughly as 1/k"; PAPER.md
section 1, read as a weight on the squared residual).  Alternatives:
``"sem"`` (1 / sem**2 of the subset mean) and ``"none"``.

Every fit of a law of the mean loss takes ``loss="linear"`` (least squares) or
``loss="huber"``: the Huber loss on the weighted residuals, minimised by iteratively
reweighted least squares around the variable-projection fit (threshold ``f_scale``, default
1.345 x a robust sd of the residuals), so that one bad (size, k) cell cannot drag a fit.

Beyond the two laws of the mean: ``holdout_largest_size`` fits the unified law on all sizes
but the largest and predicts the largest; ``fit_variance`` fits the across-subset variance
laws Var(k) = C/k (Cor. 3.2) and C (M-k)/(k (M-1)) (finite pool of M experts).
``fit_all`` runs everything per (method, view), with bootstrap intervals for the unified
law (``uncertainty.unified_draws``); ``unified_frame`` / ``variance_frame`` tabulate it.

Views (``VIEWS``) turn the long losses table (one row per base size, method,
merged subset and eval domain) into one number per (size, method, subset);
``view_table`` then aggregates across subsets per k.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize

__all__ = [
    "VIEWS",
    "DEFAULT_B_BOUNDS",
    "DEFAULT_UNIFIED_BOUNDS",
    "LOSSES",
    "HUBER_TUNING",
    "UNIFIED_PARAMS",
    "VARIANCE_LAWS",
    "MIN_SIZES_HOLDOUT",
    "view_names",
    "view_table",
    "fit_views",
    "check_loss",
    "huber_rho",
    "huber_weights",
    "robust_scale",
    "fit_per_size",
    "fit_unified",
    "holdout_largest_size",
    "fit_variance",
    "predict_variance",
    "pool_sizes",
    "fit_all",
    "summary_frame",
    "unified_frame",
    "variance_frame",
    "predict_per_size",
    "predict_unified",
]

# --------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------

VIEWS: dict[str, str] = {
    "in_domain": (
        "Mean loss over the eval domains that are among the subset's members "
        "(rows with in_domain True), one number per merged subset. Defined for k >= 1."
    ),
    "cross_domain": (
        "Macro mean of the loss over ALL eval domains (each domain weighs the same), "
        "one number per merged subset: the paper's cross-domain CE (Fig 1). "
        "Defined for k >= 0 (k = 0 is the base model)."
    ),
    "held_out": (
        "Macro mean of the loss over the eval domains NOT among the subset's members. "
        "Defined for k < M (M = number of eval domains / pool size)."
    ),
    "domain:<name>": (
        "The loss on the single eval domain <name>, for every subset (whether or not "
        "the domain's expert is a member): the paper's per-domain curves (Table 3). "
        "Defined for k >= 0."
    ),
}

#: default bounds for b in the per-size law
DEFAULT_B_BOUNDS: tuple[float, float] = (0.0, 20.0)
#: default bounds (lo, hi) for beta, gamma and b in the unified law
DEFAULT_UNIFIED_BOUNDS: dict[str, tuple[float, float]] = {
    "beta": (0.0, 3.0),
    "gamma": (0.0, 3.0),
    "b": (0.0, 20.0),
}

_GROUP_KEYS = ["size", "params", "method"]
_VIEW_COLUMNS = ["size", "params", "method", "view", "k", "mean", "std", "var", "sem", "n_subsets"]
_REQUIRED = ["size", "params", "method", "k", "subset", "eval_domain", "loss"]


def view_names(losses: pd.DataFrame) -> list[str]:
    """All views that apply to ``losses``: the three aggregate views, then one
    ``domain:<name>`` per eval domain (sorted)."""
    doms = sorted(str(d) for d in pd.unique(losses["eval_domain"]))
    return ["in_domain", "cross_domain", "held_out"] + [f"domain:{d}" for d in doms]


def _normalise_losses(losses: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _REQUIRED if c not in losses.columns]
    if missing:
        raise ValueError(f"losses table lacks columns {missing}")
    df = losses.copy()
    if "members" not in df.columns:
        df["members"] = ""
    df["members"] = df["members"].fillna("").astype(str)
    df["size"] = df["size"].astype(str)
    df["method"] = df["method"].astype(str)
    df["subset"] = df["subset"].astype(str)
    df["eval_domain"] = df["eval_domain"].astype(str)
    df["params"] = df["params"].astype("int64")
    df["k"] = df["k"].astype("int64")
    df["loss"] = df["loss"].astype(float)
    # A failed merge (non-finite weights or loss) is dropped whole, so that it poisons neither
    # the macro means of its subset nor the means across subsets.
    bad = ~np.isfinite(df["loss"].to_numpy())
    if bad.any():
        keys = ["size", "method", "subset"]
        failed = df.loc[bad, keys].drop_duplicates()
        warnings.warn(f"dropping {len(failed)} failed merge(s) with non-finite loss: "
                      + ", ".join(f"{r.size}/{r.method}/{r.subset}" for r in failed.itertuples()), stacklevel=3)
        df = df.merge(failed.assign(_failed=True), on=keys, how="left")
        df = df[df["_failed"].isna()].drop(columns="_failed")
    if "in_domain" in df.columns:
        col = df["in_domain"]
        if col.dtype == object:  # e.g. CSV strings
            col = col.astype(str).str.strip().str.lower().map({"true": True, "1": True, "false": False, "0": False})
        df["in_domain"] = col.fillna(False).astype(bool)
    else:
        df["in_domain"] = [
            d in set(m.split("+")) if m else False for d, m in zip(df["eval_domain"], df["members"])
        ]
    # A method whose rows are all k = 0 (e.g. "base") is the shared base model: copy it
    # onto every method that has merged rows, unless that method already has k = 0 rows.
    methods = sorted(df["method"].unique())
    base_only = [m for m in methods if (df.loc[df["method"] == m, "k"] == 0).all()]
    merged = [m for m in methods if m not in base_only]
    if base_only and merged:
        base = df[df["method"].isin(base_only)]
        parts = [df[df["method"].isin(merged)]]
        for m in merged:
            for size in base["size"].unique():
                have = df[(df["method"] == m) & (df["size"] == size) & (df["k"] == 0)]
                if have.empty:
                    b = base[base["size"] == size].copy()
                    # one base model per size even if several base-only labels exist
                    b = b[b["method"] == sorted(b["method"].unique())[0]]
                    b["method"] = m
                    parts.append(b)
        df = pd.concat(parts, ignore_index=True)
    # Repeated evaluations of the same (size, method, subset, domain) (e.g. seeds) are
    # averaged first so that every domain weighs the same in the macro means.
    keys = ["size", "params", "method", "subset", "k", "members", "eval_domain", "in_domain"]
    df = df.groupby(keys, sort=True, dropna=False, as_index=False)["loss"].mean()
    return df


def _per_subset(df: pd.DataFrame, view: str) -> pd.DataFrame:
    """One value per (size, params, method, subset, k) for ``view``."""
    keys = _GROUP_KEYS + ["subset", "k"]
    if view == "in_domain":
        sub = df[df["in_domain"] & (df["k"] >= 1)]
    elif view == "cross_domain":
        sub = df
    elif view == "held_out":
        sub = df[~df["in_domain"]]
    elif view.startswith("domain:"):
        name = view.split(":", 1)[1]
        sub = df[df["eval_domain"] == name]
    else:
        raise ValueError(f"unknown view {view!r}; known: {sorted(VIEWS)}")
    if sub.empty:
        return pd.DataFrame(columns=keys + ["value"])
    out = sub.groupby(keys, sort=True, as_index=False)["loss"].mean()
    return out.rename(columns={"loss": "value"})


def view_table(losses: pd.DataFrame, views: Iterable[str] | None = None) -> pd.DataFrame:
    """Aggregate a losses table into per-k statistics across subsets, per view.

    Returns columns ``size, params, method, view, k, mean, std, var, sem, n_subsets``:
    mean / sample std (ddof=1; 0 when one subset) / sample variance / standard error
    of the mean of the per-subset view values.  ``views=None`` means every view in
    ``view_names(losses)``.  Rows are sorted by params, size, method, view, k.
    """
    return _view_table_df(_normalise_losses(losses), views)


def _view_table_df(df: pd.DataFrame, views: Iterable[str] | None = None) -> pd.DataFrame:
    """``view_table`` on an already normalised losses frame."""
    views = view_names(df) if views is None else list(views)
    frames = []
    for view in views:
        ps = _per_subset(df, view)
        if ps.empty:
            continue
        g = ps.groupby(_GROUP_KEYS + ["k"], sort=True)["value"]
        agg = g.agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    n_subsets="count").reset_index()
        agg["var"] = agg["std"] ** 2
        agg["sem"] = agg["std"] / np.sqrt(agg["n_subsets"])
        agg["view"] = view
        frames.append(agg)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in _VIEW_COLUMNS})
    out = pd.concat(frames, ignore_index=True)[_VIEW_COLUMNS]
    out["n_subsets"] = out["n_subsets"].astype("int64")
    out["k"] = out["k"].astype("int64")
    out = out.sort_values(["params", "size", "method", "view", "k"], kind="mergesort")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Small numerical helpers
# --------------------------------------------------------------------------------------


def _weights(k: np.ndarray, weights: Any, sem: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Resolve a weight specification into an array (weights on squared residuals)."""
    if weights is None or (isinstance(weights, str) and weights == "k"):
        return k.astype(float).copy(), "k"
    if isinstance(weights, str):
        if weights == "none":
            return np.ones_like(k, dtype=float), "none"
        if weights == "sem":
            if sem is None:
                raise ValueError('weights="sem" needs the sem of every point')
            s = np.asarray(sem, dtype=float)
            pos = np.isfinite(s) & (s > 0)
            if not pos.any():  # no spread anywhere: fall back to the paper's weights
                return k.astype(float).copy(), "k (sem fallback: all sem == 0)"
            # a point with sem == 0 (one subset, e.g. k = M) gets the smallest positive sem
            s = np.where(pos, s, s[pos].min())
            return 1.0 / s**2, "sem" if pos.all() else "sem (zero sem -> min positive sem)"
        raise ValueError(f"unknown weights {weights!r}; use 'k', 'sem', 'none' or an array")
    w = np.asarray(weights, dtype=float)
    if w.shape != k.shape:
        raise ValueError("weights array must match k in shape")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    return w, "custom"


def _weights_into(out: dict, k: np.ndarray, weights: Any, sem: np.ndarray | None) -> np.ndarray | None:
    """The fit weights, recording the scheme in ``out``; None (reason in ``out``) if invalid."""
    try:
        w, scheme = _weights(k, weights, sem)
    except ValueError as e:
        out["reason"] = str(e)
        return None
    out["weights"] = scheme
    return w


def _wlstsq(X: np.ndarray, y: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares with column normalisation; returns (coef, weighted residual)."""
    Xw = X * sw[:, None]
    scale = np.max(np.abs(Xw), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    coef_s, *_ = np.linalg.lstsq(Xw / scale, y * sw, rcond=None)
    coef = coef_s / scale
    return coef, sw * (y - X @ coef)


def _wlstsq_nonneg(X: np.ndarray, y: np.ndarray, sw: np.ndarray,
                   nonneg: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares with the coefficients in ``nonneg`` constrained to be >= 0.

    Exact by enumerating the active sets (there are at most 2**len(nonneg) of them): the
    best feasible solution among "unconstrained with these coefficients fixed at 0".
    """
    coef, r = _wlstsq(X, y, sw)
    if all(coef[j] >= 0 for j in nonneg):  # the unconstrained optimum is feasible: it is the answer
        return coef, r
    best = None
    n = X.shape[1]
    for mask in range(1, 2 ** len(nonneg)):
        fixed = [nonneg[i] for i in range(len(nonneg)) if mask >> i & 1]
        free = [j for j in range(n) if j not in fixed]
        coef = np.zeros(n)
        if free:
            coef[free], _ = _wlstsq(X[:, free], y, sw)
        if any(coef[j] < 0 for j in nonneg):
            continue
        r = sw * (y - X @ coef)
        ss = float(r @ r)
        if best is None or ss < best[0]:
            best = (ss, coef, r)
    return best[1], best[2]


def _r2(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> float:
    if w is None:
        w = np.ones_like(y)
    ybar = np.sum(w * y) / np.sum(w)
    ss_tot = float(np.sum(w * (y - ybar) ** 2))
    ss_res = float(np.sum(w * (y - pred) ** 2))
    if ss_tot <= 0:
        return 1.0 if ss_res <= 1e-30 else float("nan")
    return 1.0 - ss_res / ss_tot


def _at_bound(names: Sequence[str], values: Sequence[float], bounds: Sequence[tuple[float, float]]) -> list[str]:
    out = []
    for n, v, (lo, hi) in zip(names, values, bounds):
        tol = 1e-6 * max(1.0, hi - lo)
        if v <= lo + tol or v >= hi - tol:
            out.append(n)
    return out


def _clean_xy(k, y, weights, sem, extra=None):
    k = np.asarray(k, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if k.shape != y.shape:
        raise ValueError("k and y must have the same length")
    keep = np.isfinite(k) & np.isfinite(y) & (k >= 1)
    w_arr = None
    if weights is not None and not isinstance(weights, str):
        w_arr = np.asarray(weights, dtype=float).ravel()
        if w_arr.shape != k.shape:
            raise ValueError("weights array must match k in shape")
        keep &= np.isfinite(w_arr)
        w_arr = w_arr[keep]
    s = None if sem is None else np.asarray(sem, dtype=float).ravel()[keep]
    ex = None if extra is None else np.asarray(extra, dtype=float).ravel()[keep]
    return k[keep], y[keep], (weights if w_arr is None else w_arr), s, ex


# --------------------------------------------------------------------------------------
# Robust fitting: the Huber loss by iteratively reweighted least squares
# --------------------------------------------------------------------------------------

#: loss functions a fit accepts (``fit.loss`` in config, ``mergelaws fit --loss``)
LOSSES: tuple[str, ...] = ("linear", "huber")
#: automatic Huber threshold = HUBER_TUNING x a robust sd of the residuals (95% efficiency
#: at the normal distribution)
HUBER_TUNING = 1.345
_MAD_TO_SD = 1.0 / 0.6744897501960817
_IRLS_MAX_ITER = 200
_IRLS_TOL = 1e-6


def check_loss(loss: str, f_scale: float | None) -> None:
    """Raise ValueError unless ``loss`` is in ``LOSSES`` and ``f_scale`` is None or > 0."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if f_scale is not None:
        if isinstance(f_scale, bool) or not isinstance(f_scale, (int, float, np.floating)) \
                or not math.isfinite(float(f_scale)) or float(f_scale) <= 0:
            raise ValueError(f"f_scale must be a positive number or None (automatic), got {f_scale!r}")


def huber_rho(r, s: float) -> np.ndarray:
    """The Huber function: r**2/2 for |r| <= s, s|r| - s**2/2 beyond."""
    a = np.abs(np.asarray(r, dtype=float))
    return np.where(a <= s, 0.5 * a * a, s * a - 0.5 * s * s)


def huber_weights(r, s: float) -> np.ndarray:
    """IRLS weights of the Huber loss: 1 for |r| <= s, s/|r| beyond."""
    a = np.abs(np.asarray(r, dtype=float))
    return np.where(a <= s, 1.0, s / np.where(a > 0, a, 1.0))


def robust_scale(r) -> float:
    """A robust sd of residuals: median(|r|) / 0.6745 (the MAD about zero)."""
    r = np.asarray(r, dtype=float)
    return float(np.median(np.abs(r)) * _MAD_TO_SD) if r.size else float("nan")


def _huber_irls(solve, predict, y: np.ndarray, w: np.ndarray, f_scale: float | None, sol,
                max_iter: int = _IRLS_MAX_ITER, tol: float = _IRLS_TOL):
    """Iteratively reweighted least squares for the Huber loss.

    Minimises sum_i rho_s(r_i) with r_i = sqrt(w_i / mean(w)) (y_i - pred_i): the weighted
    residual, rescaled so that a point of average weight has its residual in loss units.
    ``solve(w_eff, sol)`` is the weighted least-squares fit with weights ``w_eff`` on squared
    residuals (``sol``: the previous solution, a warm start); ``predict(sol)`` its fitted values;
    ``sol`` the least-squares solution to start from.  ``f_scale`` is the threshold s; None:
    s = ``HUBER_TUNING`` x ``robust_scale`` of the current residuals, re-estimated every
    iteration.  A fixed point of the iteration is a stationary point of the Huber objective.
    Returns ``(sol, h, s, info)``: h the Huber weights of the last fit (1 = not downweighted).
    """
    pos = w > 0
    rw = np.sqrt(w / np.mean(w[pos]))
    h = np.ones_like(y)
    s = None if f_scale is None else float(f_scale)
    info = {"iterations": 0, "converged": False}
    tiny = 1e-13 * max(1.0, float(np.max(np.abs(y))))
    for it in range(1, max_iter + 1):
        r = rw * (y - predict(sol))
        if f_scale is None:
            s = HUBER_TUNING * robust_scale(r[pos])
        if not np.isfinite(s) or s <= tiny:
            # at least half the points are fitted exactly: nothing left to reweight
            info["converged"] = bool(np.isfinite(s))
            break
        h_new = huber_weights(r, s)
        if np.max(np.abs(h_new - h)) <= tol:
            info["converged"] = True
            break
        h = h_new
        info["iterations"] = it
        sol = solve(w * h, sol)
    return sol, h, s, info


def _robust_fields(loss: str, s, h: np.ndarray | None, info: dict | None, labels: list) -> dict:
    if loss == "linear":
        return {"loss": "linear", "f_scale": None, "irls": None, "downweighted": []}
    down = [lab for lab, hh in zip(labels, h) if hh < 1.0 - 1e-9]
    return {"loss": loss, "f_scale": None if s is None else float(s),
            "irls": {"iterations": int(info["iterations"]), "converged": bool(info["converged"]),
                     "min_weight": float(np.min(h)) if h.size else None},
            "downweighted": down}


# --------------------------------------------------------------------------------------
# Per-size law  L(k) = L_inf + A / (k + b)
# --------------------------------------------------------------------------------------


def _b_grid(lo: float, hi: float, n: int = 241) -> np.ndarray:
    # quadratic spacing: dense near the lower bound, where b usually lies
    return lo + (hi - lo) * np.linspace(0.0, 1.0, n) ** 2


def profile_b(ss, lo: float, hi: float) -> float:
    """The b in [lo, hi] minimising ``ss(b)`` (the projected residual sum of squares):
    a grid, then a bounded scalar refinement around the best grid point."""
    grid = _b_grid(lo, hi)
    vals = np.array([ss(b) for b in grid])
    i = int(np.argmin(vals))
    cands = [(vals[i], grid[i])]
    a, c = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if c > a:
        res = optimize.minimize_scalar(ss, bounds=(a, c), method="bounded",
                                       options={"xatol": 1e-12, "maxiter": 500})
        if np.isfinite(res.fun):
            cands.append((float(res.fun), float(res.x)))
    # ties go to the grid point (deterministic); strictly better refinements win
    return float(min(cands, key=lambda t: t[0])[1])


def _per_size_solve(kk: np.ndarray, yy: np.ndarray, w: np.ndarray, lo: float, hi: float,
                    shrink: np.ndarray | None = None) -> tuple[float, float, float]:
    """(L_inf, A, b) of the weighted least-squares fit of L_inf + A*shrink/(k+b), b profiled
    (``profile_b``'s grid and bracketed refinement; the projection for fixed b is a weighted
    simple regression, evaluated for the whole grid at once from explicit residuals)."""
    num = np.ones_like(kk) if shrink is None else shrink
    wsum = float(w.sum())
    ybar = float(w @ yy) / wsum
    yc = yy - ybar

    def project(bs: np.ndarray):
        X = num[None, :] / (kk[None, :] + bs[:, None])              # (G, n)
        xbar = (X @ w) / wsum
        Xc = X - xbar[:, None]
        sxx = (Xc * Xc) @ w
        slope = np.where(sxx > 0, ((Xc * yc) @ w) / np.where(sxx > 0, sxx, 1.0), 0.0)
        r = yc[None, :] - slope[:, None] * Xc
        return slope, xbar, (r * r) @ w

    grid = _b_grid(lo, hi)
    vals = project(grid)[2]
    i = int(np.argmin(vals))
    cands = [(float(vals[i]), float(grid[i]))]
    a, c = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if c > a:
        res = optimize.minimize_scalar(lambda b: float(project(np.array([b]))[2][0]), bounds=(a, c),
                                       method="bounded", options={"xatol": 1e-12, "maxiter": 500})
        if np.isfinite(res.fun):
            cands.append((float(res.fun), float(res.x)))
    # ties go to the grid point (deterministic); strictly better refinements win
    b = min(cands, key=lambda t: t[0])[1]
    slope, xbar, _ = project(np.array([b]))
    return ybar - float(slope[0] * xbar[0]), float(slope[0]), float(b)


def fit_per_size(
    k,
    y,
    weights: Any = None,
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    sem=None,
    loss: str = "linear",
    f_scale: float | None = None,
) -> dict:
    """Fit L(k) = L_inf + A/(k+b) by variable projection over b.

    ``k``, ``y``: points (means per k, or one point per subset); only k >= 1 is used.
    ``weights``: None or ``"k"`` (default, weight on squared residual proportional to k),
    ``"sem"`` (1/sem**2, needs ``sem``; zero sem falls back, see ``_weights``),
    ``"none"``, or an array.  ``b_bounds``: search interval for b.
    ``loss``: ``"linear"`` (least squares) or ``"huber"`` (Huber loss on the weighted
    residuals, by IRLS around the variable-projection fit; see ``_huber_irls``) with threshold
    ``f_scale`` (None: 1.345 x a robust sd of the residuals, re-estimated each iteration).

    Returns a dict with L_inf, A, b, r2 (unweighted, on the fitted points), r2_weighted,
    rmse, n_points, n_k, converged, at_bound (names of parameters at a bound), weights
    (scheme used), reason (None if the fit ran), loss, f_scale (the threshold used; None
    for linear), irls (iterations, converged, min_weight; None for linear) and downweighted
    (the k whose points the Huber loss downweighted).  Never raises on degenerate data:
    with fewer than 3 distinct k it returns ``converged=False`` with a reason.
    """
    check_loss(loss, f_scale)
    kk, yy, weights, s, _ = _clean_xy(k, y, weights, sem)
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    out: dict[str, Any] = {
        "L_inf": float("nan"), "A": float("nan"), "b": float("nan"),
        "r2": float("nan"), "r2_weighted": float("nan"), "rmse": float("nan"),
        "n_points": int(kk.size), "n_k": int(np.unique(kk).size),
        "converged": False, "at_bound": [], "weights": None, "reason": None,
        **_robust_fields(loss, None, np.ones(0), {"iterations": 0, "converged": False}, []),
    }
    if not (lo < hi) or lo <= -1.0:
        out["reason"] = f"invalid b_bounds {b_bounds!r} (need -1 < lo < hi)"
        return out
    if out["n_k"] < 3:
        out["reason"] = f"need >= 3 distinct k >= 1 to fit 3 parameters, got {out['n_k']}"
        return out
    w = _weights_into(out, kk, weights, s)
    if w is None:
        return out
    if np.count_nonzero(w > 0) < 3:
        out["reason"] = "fewer than 3 points with positive weight"
        return out
    L_inf, A, b = _per_size_solve(kk, yy, w, lo, hi)
    if loss == "huber":
        (L_inf, A, b), h, sc, info = _huber_irls(
            lambda we, _prev: _per_size_solve(kk, yy, we, lo, hi),
            lambda sol: sol[0] + sol[1] / (kk + sol[2]), yy, w, f_scale, (L_inf, A, b))
        out.update(_robust_fields(loss, sc, h, info, [int(v) if float(v).is_integer() else float(v)
                                                       for v in kk]))
    pred = L_inf + A / (kk + b)
    resid = yy - pred
    out.update(
        L_inf=L_inf, A=A, b=float(b),
        r2=_r2(yy, pred), r2_weighted=_r2(yy, pred, w),
        rmse=float(np.sqrt(np.mean(resid**2))),
        converged=bool(np.isfinite(L_inf) and np.isfinite(A) and np.isfinite(b)),
        at_bound=_at_bound(["b"], [b], [(lo, hi)]),
    )
    if not out["converged"]:
        out["reason"] = "non-finite solution"
    return out


def predict_per_size(fit_dict: dict, k) -> np.ndarray:
    """Evaluate L_inf + A/(k+b) for a per-size fit (NaN for a fit that did not converge)."""
    k = np.asarray(k, dtype=float)
    if not fit_dict.get("converged"):
        return np.full_like(k, np.nan, dtype=float)
    return fit_dict["L_inf"] + fit_dict["A"] / (k + fit_dict["b"])


# --------------------------------------------------------------------------------------
# Unified law  L(N, k) = L* + B N^-beta + A0 N^-gamma / (k + b)
# --------------------------------------------------------------------------------------

#: the unified law's parameters, in the order of the paper's tables
UNIFIED_PARAMS: tuple[str, ...] = ("L_star", "B", "beta", "A0", "gamma", "b")

_UNIFIED_B_GRID = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                            4.0, 6.0, 8.0, 11.0, 15.0, 20.0])


def _unified_design(logN: np.ndarray, k: np.ndarray, beta: float, gamma: float, b: float) -> np.ndarray:
    return np.column_stack([
        np.ones_like(k),
        np.exp(-beta * logN),
        np.exp(-gamma * logN) / (k + b),
    ])


def _grid_ss_batched(logN, k, y, sw, betas, gammas, bs) -> np.ndarray:
    """Weighted residual sum of squares of the projected linear fit on a 3-D grid.

    Uses a batched SVD with column normalisation; rank-deficient designs (e.g.
    beta = 0, where N^-beta duplicates the intercept) are handled by dropping
    singular values below a relative cutoff.
    """
    n = k.size
    yw = y * sw
    yy = float(yw @ yw)
    out = np.empty((betas.size, gammas.size, bs.size))
    col_beta = np.exp(-betas[:, None] * logN[None, :])          # (nb, n)
    col_gamma = np.exp(-gammas[:, None] * logN[None, :])        # (ng, n)
    inv = 1.0 / (k[None, :] + bs[:, None])                       # (nbb, n)
    for ib in range(betas.size):
        c2 = col_beta[ib] * sw
        c3 = (col_gamma[:, None, :] * inv[None, :, :]) * sw      # (ng, nbb, n)
        X = np.empty((gammas.size, bs.size, n, 3))
        X[..., 0] = sw
        X[..., 1] = c2
        X[..., 2] = c3
        X /= np.max(np.abs(X), axis=2, keepdims=True)
        U, S, _ = np.linalg.svd(X, full_matrices=False)          # U: (..., n, 3)
        keep = S > S[..., :1] * 1e-10
        proj = np.einsum("...ni,n->...i", U, yw) * keep
        out[ib] = yy - np.sum(proj**2, axis=-1)
    return np.maximum(out, 0.0)


def _unified_solve(logN: np.ndarray, kk: np.ndarray, yy: np.ndarray, w: np.ndarray,
                   lo: np.ndarray, hi: np.ndarray, n_starts: int,
                   starts: list[np.ndarray] | None = None) -> dict:
    """Weighted least squares for the unified law by variable projection.

    ``starts=None``: the best ``n_starts`` (diverse) points of a (beta, gamma, b) grid plus
    fixed interior starts, each refined; otherwise only the given starts are refined (a warm
    start, as the bootstrap and the Huber iterations use).  Returns theta = (beta, gamma, b),
    coef = (L*, B, A0), cost, status, nfev, n_starts.  Warm starts use a 2-point Jacobian
    (half the evaluations; they refine a nearby solution), the global search a 3-point one.
    """
    sw = np.sqrt(w)
    jac = "3-point" if starts is None else "2-point"

    # L* >= 0 and B >= 0: a loss floor is not negative, and a floor that falls with N has
    # B >= 0. Without this, a floor that is nearly linear in log N drives beta -> 0 with
    # L* = -B -> -inf (the degenerate limit B N^-beta ~ B - B beta log N).
    def resid(theta: np.ndarray) -> np.ndarray:
        X = _unified_design(logN, kk, *theta)
        return _wlstsq_nonneg(X, yy, sw, (0, 1))[1]

    if starts is None:
        betas = np.linspace(lo[0], hi[0], 31)
        gammas = np.linspace(lo[1], hi[1], 31)
        bs = _UNIFIED_B_GRID[(_UNIFIED_B_GRID >= lo[2]) & (_UNIFIED_B_GRID <= hi[2])]
        bs = np.unique(np.concatenate([bs, [lo[2], hi[2]]]))
        grid = _grid_ss_batched(logN, kk, yy, sw, betas, gammas, bs)
        flat = np.argsort(grid, axis=None, kind="stable")
        starts = []
        for idx in flat:
            ib, ig, ibb = np.unravel_index(idx, grid.shape)
            th = np.array([betas[ib], gammas[ig], bs[ibb]])
            # skip near-duplicates of an existing start (keeps the starts diverse)
            if any(np.all(np.abs(th - t) <= (hi - lo) * 0.05) for t in starts):
                continue
            starts.append(th)
            if len(starts) >= n_starts:
                break
        # the grid ranks by the unconstrained fit; add fixed interior starts so the constrained
        # refinement is not only started from degenerate corners
        for beta0 in (0.1, 0.3, 0.6, 1.0):
            for gamma0 in (0.05, 0.3):
                starts.append(np.clip(np.array([beta0, gamma0, 0.5]), lo, hi))

    best = None
    for th0 in starts:
        cost0 = 0.5 * float(np.sum(resid(th0) ** 2))
        try:
            res = optimize.least_squares(
                resid, th0, bounds=(lo, hi), method="trf", jac=jac,
                x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=3000,
            )
            th, cost, status, nfev = res.x, float(res.cost), int(res.status), int(res.nfev)
        except (ValueError, np.linalg.LinAlgError):
            th, cost, status, nfev = th0, cost0, -1, 0
        if not np.isfinite(cost) or cost > cost0:
            th, cost = th0, cost0
        if best is None or cost < best[1] - 1e-18:
            best = (np.clip(th, lo, hi), cost, status, nfev)
    theta, cost, status, nfev = best
    coef, _ = _wlstsq_nonneg(_unified_design(logN, kk, *theta), yy, sw, (0, 1))
    return {"theta": theta, "coef": coef, "cost": cost, "status": status, "nfev": nfev,
            "n_starts": len(starts)}


def _unified_huber(logN: np.ndarray, kk: np.ndarray, yy: np.ndarray, w: np.ndarray,
                   lo: np.ndarray, hi: np.ndarray, sol: dict, f_scale: float | None,
                   max_rounds: int = 30):
    """The Huber fit of the unified law from a least-squares solution ``sol``.

    ``scipy.optimize.least_squares(loss="huber", f_scale=s)`` over all six parameters
    (analytic Jacobian; L*, B >= 0 and the bounds of beta, gamma, b) on the residuals
    sqrt(w/mean w)(y - fit).  With ``f_scale=None``, s = ``HUBER_TUNING`` x ``robust_scale``
    of the current residuals, refitted until s settles (relative change < 1e-6).  Returns
    ``(sol, h, s, info)`` as ``_huber_irls`` (``sol`` also carries ``objective``: the Huber
    objective at s)."""
    pos = w > 0
    rw = np.sqrt(w / np.mean(w[pos]))
    x = np.array([sol["coef"][0], sol["coef"][1], sol["theta"][0], sol["coef"][2],
                  sol["theta"][1], sol["theta"][2]], dtype=float)
    lb = np.array([0.0, 0.0, lo[0], -np.inf, lo[1], lo[2]])
    ub = np.array([np.inf, np.inf, hi[0], np.inf, hi[1], hi[2]])
    x = np.clip(x, lb, ub)

    def parts(x):
        nb = np.exp(-x[2] * logN)
        ng = np.exp(-x[4] * logN)
        inv = 1.0 / (kk + x[5])
        return nb, ng, inv

    def fun(x):
        nb, ng, inv = parts(x)
        return rw * (yy - (x[0] + x[1] * nb + x[3] * ng * inv))

    def jac(x):
        nb, ng, inv = parts(x)
        J = np.column_stack([np.ones_like(kk), nb, -x[1] * logN * nb, ng * inv,
                             -x[3] * logN * ng * inv, -x[3] * ng * inv * inv])
        return -rw[:, None] * J

    s = None if f_scale is None else float(f_scale)
    tiny = 1e-13 * max(1.0, float(np.max(np.abs(yy))))
    info = {"iterations": 0, "converged": False}
    status, nfev = sol["status"], 0
    for rnd in range(1, max_rounds + 1):
        if f_scale is None:
            s_new = HUBER_TUNING * robust_scale(fun(x)[pos])
            if not np.isfinite(s_new) or s_new <= tiny:  # half the points fitted exactly
                s = s if s is not None else float(s_new)
                info["converged"] = bool(np.isfinite(s_new))
                break
            if s is not None and abs(s_new - s) <= 1e-6 * s:
                info["converged"] = True
                break
            s = float(s_new)
        try:
            res = optimize.least_squares(fun, x, jac=jac, bounds=(lb, ub), method="trf",
                                         loss="huber", f_scale=s, x_scale="jac", ftol=1e-14,
                                         xtol=1e-14, gtol=1e-14, max_nfev=5000)
            x, status, nfev = np.clip(res.x, lb, ub), int(res.status), nfev + int(res.nfev)
        except (ValueError, np.linalg.LinAlgError):
            status = -1
            break
        info["iterations"] = rnd
        if f_scale is not None:
            info["converged"] = status > 0
            break
    r = fun(x)
    h = huber_weights(r, s) if s and s > 0 else np.ones_like(r)
    out = {"theta": x[[2, 4, 5]], "coef": x[[0, 1, 3]], "status": status, "nfev": nfev,
           "n_starts": sol["n_starts"], "cost": float(np.sum(huber_rho(r, s))) if s else 0.0}
    out["objective"] = out["cost"]
    return out, h, s, info


def fit_unified(
    N,
    k,
    y,
    weights: Any = None,
    bounds: dict[str, tuple[float, float]] | None = None,
    sem=None,
    n_starts: int = 6,
    loss: str = "linear",
    f_scale: float | None = None,
    start=None,
) -> dict:
    """Fit L(N,k) = L* + B N^-beta + A0 N^-gamma/(k+b) by variable projection.

    ``N`` in billions of parameters (``params/1e9``).  Only k >= 1 is used.  Linear in
    (L*, B, A0) for fixed (beta, gamma, b); those are grid-searched over ``bounds``
    (default beta, gamma in [0, 3], b in [0, 20]) and the best ``n_starts`` grid points
    are refined with ``scipy.optimize.least_squares`` (bounded, trf).  ``start``: a
    (beta, gamma, b) to refine from instead of the grid search (a warm start; the bootstrap
    uses the point estimate).  ``weights`` as in ``fit_per_size``; ``loss`` / ``f_scale``
    as there (Huber: ``scipy.optimize.least_squares(loss="huber")`` over all six parameters
    from the least-squares fit, see ``_unified_huber``; then one more global search with the
    final Huber weights guards against a better basin).  Needs >= 3 distinct sizes
    and >= 3 distinct k; otherwise returns ``converged=False`` with a reason.  Never raises
    on degenerate data.  ``downweighted`` lists the [N, k] points the Huber loss downweighted.
    """
    check_loss(loss, f_scale)
    bnds = dict(DEFAULT_UNIFIED_BOUNDS)
    if bounds:
        bnds.update(bounds)
    kk, yy, weights, s, NN = _clean_xy(k, y, weights, sem, extra=N)
    out: dict[str, Any] = {
        "L_star": float("nan"), "B": float("nan"), "beta": float("nan"),
        "A0": float("nan"), "gamma": float("nan"), "b": float("nan"),
        "r2": float("nan"), "r2_weighted": float("nan"), "rmse": float("nan"),
        "n_points": int(kk.size), "n_sizes": 0, "n_k": int(np.unique(kk).size),
        "converged": False, "at_bound": [], "weights": None, "reason": None,
        "optimizer": None,
        **_robust_fields(loss, None, np.ones(0), {"iterations": 0, "converged": False}, []),
    }
    if NN is None or NN.size != kk.size:
        out["reason"] = "N must have the same length as k and y"
        return out
    ok = np.isfinite(NN) & (NN > 0)
    kk, yy, NN = kk[ok], yy[ok], NN[ok]
    if s is not None:
        s = s[ok]
    if weights is not None and not isinstance(weights, str):
        weights = np.asarray(weights, dtype=float)[ok]
    out["n_points"] = int(kk.size)
    out["n_sizes"] = int(np.unique(NN).size)
    out["n_k"] = int(np.unique(kk).size)
    if out["n_sizes"] < 3:
        out["reason"] = f"need >= 3 distinct sizes for the unified law, got {out['n_sizes']}"
        return out
    if out["n_k"] < 3:
        out["reason"] = f"need >= 3 distinct k >= 1, got {out['n_k']}"
        return out
    if kk.size < 6:
        out["reason"] = f"need >= 6 points for 6 parameters, got {kk.size}"
        return out
    w = _weights_into(out, kk, weights, s)
    if w is None:
        return out
    logN = np.log(NN)
    names = ["beta", "gamma", "b"]
    lo = np.array([bnds[n][0] for n in names], dtype=float)
    hi = np.array([bnds[n][1] for n in names], dtype=float)
    if np.any(lo >= hi) or lo[2] <= -1.0:
        out["reason"] = f"invalid bounds {bnds!r}"
        return out
    starts = None
    if start is not None:
        th0 = np.asarray(start, dtype=float).ravel()
        if th0.size != 3 or not np.all(np.isfinite(th0)):
            raise ValueError("start must be a finite (beta, gamma, b)")
        starts = [np.clip(th0, lo, hi)]

    sol = _unified_solve(logN, kk, yy, w, lo, hi, n_starts, starts)
    if loss == "huber":
        sol, h, sc, info = _unified_huber(logN, kk, yy, w, lo, hi, sol, f_scale)
        if starts is None and np.any(h < 1.0):
            # the robust fit refines the least-squares one locally: search globally once more
            # with the final Huber weights and keep whichever has the lower Huber objective
            g = _unified_solve(logN, kk, yy, w * h, lo, hi, n_starts)
            g, hg, sg, info_g = _unified_huber(logN, kk, yy, w, lo, hi, g, f_scale)
            if g["objective"] < sol["objective"] * (1.0 - 1e-9):
                sol, h, sc = g, hg, sg
                info = {"iterations": info["iterations"] + info_g["iterations"],
                        "converged": info_g["converged"]}
        out.update(_robust_fields(loss, sc, h, info, [[float(n), int(v)] for n, v in zip(NN, kk)]))
    theta, coef, status = sol["theta"], sol["coef"], sol["status"]
    X = _unified_design(logN, kk, *theta)
    pred = X @ coef
    r = yy - pred
    vals = [float(v) for v in theta]
    out.update(
        L_star=float(coef[0]), B=float(coef[1]), A0=float(coef[2]),
        beta=vals[0], gamma=vals[1], b=vals[2],
        r2=_r2(yy, pred), r2_weighted=_r2(yy, pred, w),
        rmse=float(np.sqrt(np.mean(r**2))),
        converged=bool(np.all(np.isfinite(coef)) and np.all(np.isfinite(theta)) and status != -1),
        at_bound=_at_bound(names, vals, [tuple(bnds[n]) for n in names])
        + [n for n, c in (("L_star", coef[0]), ("B", coef[1])) if c == 0.0],
        optimizer={"status": status, "nfev": sol["nfev"], "cost": float(sol["cost"]),
                   "n_starts": sol["n_starts"]},
    )
    if not out["converged"]:
        out["reason"] = "optimizer failed or non-finite solution"
    return out


def predict_unified(fit_dict: dict, N, k) -> np.ndarray:
    """Evaluate the unified law (N in billions) for a fit; NaN if it did not converge."""
    N = np.asarray(N, dtype=float)
    k = np.asarray(k, dtype=float)
    N, k = np.broadcast_arrays(N, k)
    if not fit_dict.get("converged"):
        return np.full(N.shape, np.nan)
    f = fit_dict
    return f["L_star"] + f["B"] * N ** (-f["beta"]) + f["A0"] * N ** (-f["gamma"]) / (k + f["b"])


#: fewest sizes for the held-out-size check: the unified law needs 3 to fit, plus 1 held out
MIN_SIZES_HOLDOUT = 4


def holdout_largest_size(cells: pd.DataFrame, weights: Any = "k",
                         bounds: dict[str, tuple[float, float]] | None = None,
                         loss: str = "linear", f_scale: float | None = None,
                         full_fit: dict | None = None) -> dict:
    """Held-out size validation of the unified law: fit it on every size but the largest and
    predict the largest size's curve (k >= 1).

    ``cells``: the per-k means of one (method, view), columns ``params, size, k, mean, sem``
    (a slice of ``view_table``).  Returns ``status`` ("ok", "skipped: needs >= 4 sizes ..."
    or "failed: <reason>"), ``size`` (the held-out size), ``fit_sizes``, ``predict_k``,
    ``n_predicted``, ``mae``, ``rmse``, ``max_rel_err`` (max |pred - meas| / meas) and
    ``err_at_M`` (pred - meas at the largest k), ``converged``, ``reason``; and, with
    ``full_fit`` (the unified fit on every size), ``insample_mae`` / ``insample_rmse``: that
    fit's errors on the same points, to read next to the out-of-sample ones.
    """
    c = cells[cells["k"] >= 1].sort_values(["params", "k"])
    sizes = c[["params", "size"]].drop_duplicates().sort_values("params")
    out: dict[str, Any] = {
        "status": None, "size": str(sizes["size"].iloc[-1]) if len(sizes) else None,
        "fit_sizes": [str(v) for v in sizes["size"].iloc[:-1]], "predict_k": None,
        "n_predicted": 0, "mae": float("nan"), "rmse": float("nan"),
        "max_rel_err": float("nan"), "err_at_M": float("nan"),
        "insample_mae": float("nan"), "insample_rmse": float("nan"),
        "converged": False, "reason": None,
    }
    if len(sizes) < MIN_SIZES_HOLDOUT:
        out["status"] = out["reason"] = (
            f"skipped: needs >= {MIN_SIZES_HOLDOUT} sizes (the unified law needs >= 3 to fit, "
            f"plus 1 held out); this table has {len(sizes)}")
        return out
    big = int(sizes["params"].iloc[-1])
    tr, te = c[c["params"] != big], c[c["params"] == big]
    f = fit_unified(tr["params"].to_numpy() / 1e9, tr["k"].to_numpy(), tr["mean"].to_numpy(),
                    weights=weights, bounds=bounds, sem=tr["sem"].to_numpy(), loss=loss,
                    f_scale=f_scale)
    out.update(converged=f["converged"], n_predicted=int(len(te)),
               predict_k=f"{int(te['k'].min())}..{int(te['k'].max())}")
    if not f["converged"]:
        out["status"] = out["reason"] = f"failed: {f['reason']}"
        return out
    meas = te["mean"].to_numpy()
    pred = predict_unified(f, te["params"].to_numpy() / 1e9, te["k"].to_numpy())
    e = pred - meas
    out.update(status="ok", mae=float(np.mean(np.abs(e))), rmse=float(np.sqrt(np.mean(e**2))),
               max_rel_err=float(np.max(np.abs(e) / np.abs(meas))), err_at_M=float(e[-1]))
    if full_fit and full_fit.get("converged"):
        e_in = predict_unified(full_fit, te["params"].to_numpy() / 1e9, te["k"].to_numpy()) - meas
        out.update(insample_mae=float(np.mean(np.abs(e_in))),
                   insample_rmse=float(np.sqrt(np.mean(e_in**2))))
    return out


# --------------------------------------------------------------------------------------
# Variance across subsets  Var(k) = C/k  and  C (M-k) / (k (M-1))
# --------------------------------------------------------------------------------------

VARIANCE_LAWS: dict[str, str] = {
    "inv_k": "Var(k) = C/k (Cor. 3.2 / App. H.2 with V*, B ~ 0, b0 ~ 0)",
    "finite_pool": "Var(k) = C (M-k) / (k (M-1)) (k-subsets without replacement from M experts)",
}


def _variance_shape(k, law: str, M: int | None) -> np.ndarray:
    k = np.asarray(k, dtype=float)
    if law == "inv_k":
        return 1.0 / k
    if law == "finite_pool":
        if not M or M < 2:
            raise ValueError("the finite-pool variance law needs a pool size M >= 2")
        return (M - k) / (k * (M - 1.0))
    raise ValueError(f"unknown variance law {law!r}; known: {sorted(VARIANCE_LAWS)}")


def fit_variance(k, var, M: int | None = None, n_subsets=None) -> dict:
    """Fit the across-subset variance laws to the variances at each k.

    * ``inv_k``: Var(k) = C/k (Corollary 3.2: Var = Theta(1/k); App. H.2's joint variance
      law at one size, with V* ~ 0 and b0 ~ 0 as the paper finds);
    * ``finite_pool``: Var(k) = C (M-k)/(k (M-1)), the variance of a mean of k experts
      drawn without replacement from a pool of M (PAPER.md, finite-pool caveat): 0 at k = M.

    Each by unweighted least squares (as the paper fits its variance model), C >= 0 by
    construction (closed form C = <x, v>/<x, x> clipped at 0).  Points: k >= 1 with a finite
    variance and, when ``n_subsets`` is given, >= 2 subsets (a single subset, e.g. k = M,
    has no variance).  Returns ``C_inv_k, r2_inv_k, rmse_inv_k, C_finite_pool,
    r2_finite_pool, rmse_finite_pool`` (NaN without M), ``loglog_slope`` (least-squares
    slope of log Var on log k: -1 for Var ~ 1/k; NaN with < 2 positive variances),
    ``better`` (the law with the lower rmse), ``M``, ``k_fitted``, ``n_points``,
    ``converged`` and ``reason``.
    """
    k = np.asarray(k, dtype=float).ravel()
    v = np.asarray(var, dtype=float).ravel()
    if k.shape != v.shape:
        raise ValueError("k and var must have the same length")
    keep = np.isfinite(k) & np.isfinite(v) & (k >= 1)
    if n_subsets is not None:
        keep &= np.asarray(n_subsets, dtype=float).ravel() >= 2
    if M is not None:
        M = int(M)
        if M < 2:
            raise ValueError("M must be >= 2")
        keep &= k <= M
    k, v = k[keep], v[keep]
    nan = float("nan")
    out: dict[str, Any] = {
        "M": M, "k_fitted": [int(x) for x in k], "n_points": int(k.size),
        "C_inv_k": nan, "r2_inv_k": nan, "rmse_inv_k": nan,
        "C_finite_pool": nan, "r2_finite_pool": nan, "rmse_finite_pool": nan,
        "loglog_slope": nan, "better": None, "converged": False, "reason": None,
    }
    if np.unique(k).size < 2:
        out["reason"] = f"need >= 2 distinct k with >= 2 subsets, got {np.unique(k).size}"
        return out
    for law in ("inv_k", "finite_pool"):
        if law == "finite_pool" and M is None:
            continue
        x = _variance_shape(k, law, M)
        xx = float(x @ x)
        C = max(float(x @ v) / xx, 0.0) if xx > 0 else nan
        pred = C * x
        out[f"C_{law}"] = C
        out[f"r2_{law}"] = _r2(v, pred)
        out[f"rmse_{law}"] = float(np.sqrt(np.mean((v - pred) ** 2)))
    pos = v > 0
    if np.unique(k[pos]).size >= 2:
        out["loglog_slope"] = float(np.polyfit(np.log(k[pos]), np.log(v[pos]), 1)[0])
    out["converged"] = bool(np.isfinite(out["C_inv_k"]))
    if M is not None and np.isfinite(out["rmse_finite_pool"]):
        out["better"] = "finite_pool" if out["rmse_finite_pool"] < out["rmse_inv_k"] else "inv_k"
    else:
        out["better"] = "inv_k"
    return out


def predict_variance(fit_dict: dict, k, law: str = "inv_k") -> np.ndarray:
    """Evaluate a variance law of a ``fit_variance`` result at k (NaN if not fitted)."""
    if law not in VARIANCE_LAWS:
        raise ValueError(f"unknown variance law {law!r}; known: {sorted(VARIANCE_LAWS)}")
    C = fit_dict.get(f"C_{law}")
    k = np.asarray(k, dtype=float)
    if C is None or not np.isfinite(C) or (law == "finite_pool" and not fit_dict.get("M")):
        return np.full(k.shape, np.nan)
    return C * _variance_shape(k, law, fit_dict.get("M"))


def _pool_sizes(df: pd.DataFrame) -> dict[tuple[str, str], int]:
    out = {}
    for (size, method), g in df[df["k"] >= 1].groupby(["size", "method"], sort=True):
        experts = {m for s in g["members"].unique() for m in str(s).split("+") if m}
        out[(str(size), str(method))] = max(len(experts), int(g["k"].max()))
    return out


def pool_sizes(losses: pd.DataFrame) -> dict[tuple[str, str], int]:
    """Expert pool size M per (size, method): the number of distinct experts among the
    merged subsets' members (at least the largest k, which is all when members are not
    recorded)."""
    return _pool_sizes(_normalise_losses(losses))


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------


def _jsonable(x):
    """Recursively turn numpy scalars into Python ones and non-finite floats into None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def fit_views(losses: pd.DataFrame) -> list[str]:
    """The views the fit step fits: the in-domain and cross-domain macro views, then one
    ``domain:<d>`` view per eval domain (sorted)."""
    return ["in_domain", "cross_domain"] + [v for v in view_names(losses) if v.startswith("domain:")]


def fit_all(
    losses: pd.DataFrame,
    views: Sequence[str] | str = ("in_domain", "cross_domain"),
    weights: str = "k",
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    unified_bounds: dict[str, tuple[float, float]] | None = None,
    loss: str = "linear",
    f_scale: float | None = None,
    n_boot: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Fit, per (method, view), the per-size law for every size, the unified law (with
    bootstrap intervals when ``n_boot`` > 0, and the held-out-size check), and the variance
    laws for every size, on the per-k statistics of ``view_table(losses, views)``.

    ``views``: a list of views, one view name, or ``"all"`` for ``fit_views(losses)``
    (in-domain, cross-domain and every ``domain:<d>``).  ``weights``: ``"k"`` (the paper's),
    ``"sem"`` or ``"none"``; ``loss``: ``"linear"`` or ``"huber"`` with threshold
    ``f_scale`` (None: automatic), for every fit of a law of the mean loss (the variance
    laws are plain least squares, as the paper's).  ``n_boot`` replicates resample the merged subsets within each (size, k) cell
    (``uncertainty.unified_draws``; seeded by ``seed``); intervals are percentile intervals at
    ``level``.

    Returns a JSON-serialisable dict ``{"per_size": [...], "unified": [...], "variance":
    [...], "settings": {...}}`` (non-finite numbers become None).  Each unified entry carries
    ``holdout`` (``holdout_largest_size``) and ``ci`` ({parameter: {lo, hi, sd, median,
    frac_at_bound}}, None without bootstrap).  Deterministic: same input, same output.
    """
    if weights not in ("k", "sem", "none"):
        raise ValueError("weights must be 'k', 'sem' or 'none'")
    check_loss(loss, f_scale)
    if int(n_boot) < 0:
        raise ValueError("n_boot must be >= 0")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    df = _normalise_losses(losses)
    if isinstance(views, str):
        views = fit_views(df) if views == "all" else [views]
    views = list(views)
    table = _view_table_df(df, views)
    pools = _pool_sizes(df)
    ub = dict(DEFAULT_UNIFIED_BOUNDS)
    if unified_bounds:
        ub.update(unified_bounds)
    per_size: list[dict] = []
    unified: list[dict] = []
    variance: list[dict] = []
    per_subset: dict[str, pd.DataFrame] = {}
    if not table.empty:
        for (method, view), g in table.groupby(["method", "view"], sort=True):
            for (params, size), h in g.groupby(["params", "size"], sort=True):
                h = h.sort_values("k")
                f = fit_per_size(h["k"].to_numpy(), h["mean"].to_numpy(), weights=weights,
                                 b_bounds=b_bounds, sem=h["sem"].to_numpy(), loss=loss,
                                 f_scale=f_scale)
                f["k_fitted"] = sorted(int(v) for v in h.loc[h["k"] >= 1, "k"])
                per_size.append({"size": size, "params": int(params), "N": params / 1e9,
                                 "method": method, "view": view, **f})
                fv = fit_variance(h["k"].to_numpy(), h["var"].to_numpy(),
                                  M=pools.get((str(size), str(method))),
                                  n_subsets=h["n_subsets"].to_numpy())
                variance.append({"size": size, "params": int(params), "N": params / 1e9,
                                 "method": method, "view": view, **fv})
            g = g.sort_values(["params", "k"])
            sizes = g[["params", "size"]].drop_duplicates().sort_values("params")
            f = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                            weights=weights, bounds=ub, sem=g["sem"].to_numpy(), loss=loss,
                            f_scale=f_scale)
            entry = {"method": method, "view": view, "sizes": [str(s) for s in sizes["size"]],
                     "params": [int(p) for p in sizes["params"]], **f,
                     "holdout": holdout_largest_size(g, weights=weights, bounds=ub, loss=loss,
                                                     f_scale=f_scale, full_fit=f),
                     "ci": None, "n_boot": 0, "boot_frac_converged": None}
            if n_boot and f["converged"]:
                from mergelaws import uncertainty as U  # uncertainty imports this module

                if view not in per_subset:
                    per_subset[view] = _per_subset(df, view)
                vals = per_subset[view]
                draws = U.unified_draws(vals[vals["method"] == method], f, n_boot=n_boot,
                                        seed=seed, weights=weights, loss=loss, f_scale=f_scale,
                                        bounds=ub, key=(str(method), str(view)))
                entry.update(U.summarise_unified(f, draws, level))
            unified.append(entry)
    settings = {
        "law_per_size": "L(k) = L_inf + A/(k+b)",
        "law_unified": "L(N,k) = L_star + B*N^-beta + A0*N^-gamma/(k+b), N = params/1e9",
        "law_variance": dict(VARIANCE_LAWS),
        "views": list(views),
        "weights": weights,
        "weights_meaning": "weights on squared residuals; 'k': w = k, 'sem': w = 1/sem^2, 'none': w = 1",
        "loss": loss,
        "f_scale": None if f_scale is None else float(f_scale),
        "loss_meaning": ("linear: least squares; huber: Huber loss on the weighted residuals "
                         "sqrt(w/mean w)*(y - fit), threshold f_scale in loss units (None: 1.345 x "
                         "the MAD-based sd of the residuals, re-estimated each IRLS iteration)"),
        "k_min_fitted": 1,
        "b_bounds": [float(b_bounds[0]), float(b_bounds[1])],
        "unified_bounds": {n: [float(v[0]), float(v[1])] for n, v in sorted(ub.items())},
        "fitted_on": "per-k means across subsets (view_table)",
        "r2": "unweighted, on the fitted points (r2_weighted also reported)",
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                      "resampling": "merged subsets with replacement within each (size, k) cell; "
                                    "each replicate refitted from the point estimate"},
        "variance_fit": "unweighted least squares on the across-subset variance at each k "
                        "with >= 2 subsets; M = the expert pool (distinct members)",
        "holdout": f"unified law fitted on all sizes but the largest, largest predicted "
                   f"(needs >= {MIN_SIZES_HOLDOUT} sizes)",
    }
    return _jsonable({"per_size": per_size, "unified": unified, "variance": variance,
                      "settings": settings})


_SUMMARY_COLUMNS = ["size", "params", "method", "view", "L_inf", "A", "b", "L_star", "B", "beta",
                    "A0", "gamma", "r2", "r2_weighted", "rmse", "n_points", "converged",
                    "at_bound", "weights", "loss", "reason"]


def summary_frame(fits: dict) -> pd.DataFrame:
    """One row per per-size fit, plus one row per unified fit with ``size="all"``."""
    rows = []
    for f in fits.get("per_size", []):
        rows.append({c: f.get(c) for c in _SUMMARY_COLUMNS})
    for f in fits.get("unified", []):
        r = {c: f.get(c) for c in _SUMMARY_COLUMNS}
        r["size"] = "all"
        r["params"] = None
        rows.append(r)
    df = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    df["at_bound"] = [",".join(v) if isinstance(v, list) else (v or "") for v in df["at_bound"]]
    for c in ["L_inf", "A", "b", "L_star", "B", "beta", "A0", "gamma", "r2", "r2_weighted", "rmse"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["params"] = pd.to_numeric(df["params"], errors="coerce").astype("Int64")
    df["n_points"] = pd.to_numeric(df["n_points"], errors="coerce").astype("Int64")
    df["converged"] = df["converged"].astype(bool)
    return df


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def unified_frame(fits: dict) -> pd.DataFrame:
    """The unified-law table: one row per (method, view) with every parameter, its interval
    (``<p>_lo``, ``<p>_hi``; NaN without bootstrap) and the fraction of bootstrap refits
    with it at a bound (``<p>_frac_at_bound``), then R², RMSE, convergence, the parameters
    at a bound, the weights and loss, the bootstrap size and converged fraction, and the
    held-out-size check (``holdout_*``; ``holdout_status`` says why it was skipped)."""
    rows = []
    for f in fits.get("unified", []):
        ci = f.get("ci") or {}
        r: dict[str, Any] = {"method": f["method"], "view": f["view"],
                             "sizes": ",".join(f.get("sizes", [])), "n_sizes": f.get("n_sizes"),
                             "n_points": f.get("n_points")}
        for p in UNIFIED_PARAMS:
            c = ci.get(p) or {}
            r[p] = _num(f.get(p))
            r[f"{p}_lo"] = _num(c.get("lo"))
            r[f"{p}_hi"] = _num(c.get("hi"))
            r[f"{p}_frac_at_bound"] = _num(c.get("frac_at_bound"))
        ho = f.get("holdout") or {}
        r.update({
            "r2": _num(f.get("r2")), "r2_weighted": _num(f.get("r2_weighted")),
            "rmse": _num(f.get("rmse")), "converged": bool(f.get("converged")),
            "at_bound": ",".join(f.get("at_bound") or []), "weights": f.get("weights"),
            "loss": f.get("loss"), "f_scale": _num(f.get("f_scale")),
            "n_boot": int(f.get("n_boot") or 0),
            "boot_frac_converged": _num(f.get("boot_frac_converged")),
            "level": _num(f.get("level")),
            "holdout_status": ho.get("status"), "holdout_size": ho.get("size"),
            "holdout_mae": _num(ho.get("mae")), "holdout_rmse": _num(ho.get("rmse")),
            "holdout_max_rel_err": _num(ho.get("max_rel_err")),
            "holdout_insample_rmse": _num(ho.get("insample_rmse")),
            "reason": f.get("reason"),
        })
        rows.append(r)
    cols = (["method", "view", "sizes", "n_sizes", "n_points"]
            + [c for p in UNIFIED_PARAMS for c in (p, f"{p}_lo", f"{p}_hi", f"{p}_frac_at_bound")]
            + ["r2", "r2_weighted", "rmse", "converged", "at_bound", "weights", "loss", "f_scale",
               "n_boot", "boot_frac_converged", "level", "holdout_status", "holdout_size",
               "holdout_mae", "holdout_rmse", "holdout_max_rel_err", "holdout_insample_rmse",
               "reason"])
    return pd.DataFrame(rows, columns=cols)


_VARIANCE_COLUMNS = ["size", "params", "method", "view", "M", "n_points", "C_inv_k", "r2_inv_k",
                     "rmse_inv_k", "C_finite_pool", "r2_finite_pool", "rmse_finite_pool",
                     "loglog_slope", "better", "converged", "reason"]


def variance_frame(fits: dict) -> pd.DataFrame:
    """The variance-law table: one row per (size, method, view) of ``fits["variance"]``."""
    df = pd.DataFrame([{c: f.get(c) for c in _VARIANCE_COLUMNS} for f in fits.get("variance", [])],
                      columns=_VARIANCE_COLUMNS)
    for c in ["C_inv_k", "r2_inv_k", "rmse_inv_k", "C_finite_pool", "r2_finite_pool",
              "rmse_finite_pool", "loglog_slope"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ["params", "M", "n_points"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["converged"] = df["converged"].astype(bool)
    return df
