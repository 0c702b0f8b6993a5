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
    "view_names",
    "view_table",
    "fit_per_size",
    "fit_unified",
    "fit_all",
    "summary_frame",
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
    df = _normalise_losses(losses)
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
    best = None
    n = X.shape[1]
    for mask in range(2 ** len(nonneg)):
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


def fit_per_size(
    k,
    y,
    weights: Any = None,
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    sem=None,
) -> dict:
    """Fit L(k) = L_inf + A/(k+b) by variable projection over b.

    ``k``, ``y``: points (means per k, or one point per subset); only k >= 1 is used.
    ``weights``: None or ``"k"`` (default, weight on squared residual proportional to k),
    ``"sem"`` (1/sem**2, needs ``sem``; zero sem falls back, see ``_weights``),
    ``"none"``, or an array.  ``b_bounds``: search interval for b.

    Returns a dict with L_inf, A, b, r2 (unweighted, on the fitted points), r2_weighted,
    rmse, n_points, n_k, converged, at_bound (names of parameters at a bound), weights
    (scheme used) and reason (None if the fit ran).  Never raises on degenerate data:
    with fewer than 3 distinct k it returns ``converged=False`` with a reason.
    """
    kk, yy, weights, s, _ = _clean_xy(k, y, weights, sem)
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    out: dict[str, Any] = {
        "L_inf": float("nan"), "A": float("nan"), "b": float("nan"),
        "r2": float("nan"), "r2_weighted": float("nan"), "rmse": float("nan"),
        "n_points": int(kk.size), "n_k": int(np.unique(kk).size),
        "converged": False, "at_bound": [], "weights": None, "reason": None,
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
    sw = np.sqrt(w)
    ones = np.ones_like(kk)

    def solve(b: float):
        X = np.column_stack([ones, 1.0 / (kk + b)])
        return _wlstsq(X, yy, sw)

    b = profile_b(lambda b: float(np.sum(solve(b)[1] ** 2)), lo, hi)
    coef, _ = solve(b)
    L_inf, A = float(coef[0]), float(coef[1])
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


def fit_unified(
    N,
    k,
    y,
    weights: Any = None,
    bounds: dict[str, tuple[float, float]] | None = None,
    sem=None,
    n_starts: int = 6,
) -> dict:
    """Fit L(N,k) = L* + B N^-beta + A0 N^-gamma/(k+b) by variable projection.

    ``N`` in billions of parameters (``params/1e9``).  Only k >= 1 is used.  Linear in
    (L*, B, A0) for fixed (beta, gamma, b); those are grid-searched over ``bounds``
    (default beta, gamma in [0, 3], b in [0, 20]) and the best ``n_starts`` grid points
    are refined with ``scipy.optimize.least_squares`` (bounded, trf).  ``weights`` as in
    ``fit_per_size``.  Needs >= 3 distinct sizes and >= 3 distinct k; otherwise returns
    ``converged=False`` with a reason.  Never raises on degenerate data.
    """
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
    sw = np.sqrt(w)
    logN = np.log(NN)
    names = ["beta", "gamma", "b"]
    lo = np.array([bnds[n][0] for n in names], dtype=float)
    hi = np.array([bnds[n][1] for n in names], dtype=float)
    if np.any(lo >= hi) or lo[2] <= -1.0:
        out["reason"] = f"invalid bounds {bnds!r}"
        return out

    betas = np.linspace(lo[0], hi[0], 31)
    gammas = np.linspace(lo[1], hi[1], 31)
    bs = _UNIFIED_B_GRID[(_UNIFIED_B_GRID >= lo[2]) & (_UNIFIED_B_GRID <= hi[2])]
    bs = np.unique(np.concatenate([bs, [lo[2], hi[2]]]))
    grid = _grid_ss_batched(logN, kk, yy, sw, betas, gammas, bs)

    # L* >= 0 and B >= 0: a loss floor is not negative, and a floor that falls with N has
    # B >= 0. Without this, a floor that is nearly linear in log N drives beta -> 0 with
    # L* = -B -> -inf (the degenerate limit B N^-beta ~ B - B beta log N).
    def resid(theta: np.ndarray) -> np.ndarray:
        X = _unified_design(logN, kk, *theta)
        return _wlstsq_nonneg(X, yy, sw, (0, 1))[1]

    flat = np.argsort(grid, axis=None, kind="stable")
    starts: list[np.ndarray] = []
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
                resid, th0, bounds=(lo, hi), method="trf", jac="3-point",
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
    X = _unified_design(logN, kk, *theta)
    coef, _ = _wlstsq_nonneg(X, yy, sw, (0, 1))
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
        optimizer={"status": status, "nfev": nfev, "cost": float(cost), "n_starts": len(starts)},
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


def fit_all(
    losses: pd.DataFrame,
    views: Sequence[str] = ("in_domain", "cross_domain"),
    weights: str = "k",
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    unified_bounds: dict[str, tuple[float, float]] | None = None,
) -> dict:
    """Fit the per-size law for every (size, method, view) and the unified law for every
    (method, view), on the per-k means of ``view_table(losses, views)``.

    Returns a JSON-serialisable dict ``{"per_size": [...], "unified": [...], "settings": {...}}``
    (non-finite numbers become None).  Deterministic: same input, same output.
    """
    if weights not in ("k", "sem", "none"):
        raise ValueError("weights must be 'k', 'sem' or 'none'")
    table = view_table(losses, views)
    ub = dict(DEFAULT_UNIFIED_BOUNDS)
    if unified_bounds:
        ub.update(unified_bounds)
    per_size: list[dict] = []
    unified: list[dict] = []
    if not table.empty:
        for (method, view), g in table.groupby(["method", "view"], sort=True):
            for (params, size), h in g.groupby(["params", "size"], sort=True):
                h = h.sort_values("k")
                f = fit_per_size(h["k"].to_numpy(), h["mean"].to_numpy(), weights=weights,
                                 b_bounds=b_bounds, sem=h["sem"].to_numpy())
                f["k_fitted"] = sorted(int(v) for v in h.loc[h["k"] >= 1, "k"])
                per_size.append({"size": size, "params": int(params), "N": params / 1e9,
                                 "method": method, "view": view, **f})
            g = g.sort_values(["params", "k"])
            sizes = g[["params", "size"]].drop_duplicates().sort_values("params")
            f = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                            weights=weights, bounds=ub, sem=g["sem"].to_numpy())
            unified.append({"method": method, "view": view,
                            "sizes": [str(s) for s in sizes["size"]],
                            "params": [int(p) for p in sizes["params"]], **f})
    settings = {
        "law_per_size": "L(k) = L_inf + A/(k+b)",
        "law_unified": "L(N,k) = L_star + B*N^-beta + A0*N^-gamma/(k+b), N = params/1e9",
        "views": list(views),
        "weights": weights,
        "weights_meaning": "weights on squared residuals; 'k': w = k, 'sem': w = 1/sem^2, 'none': w = 1",
        "k_min_fitted": 1,
        "b_bounds": [float(b_bounds[0]), float(b_bounds[1])],
        "unified_bounds": {n: [float(v[0]), float(v[1])] for n, v in sorted(ub.items())},
        "fitted_on": "per-k means across subsets (view_table)",
        "r2": "unweighted, on the fitted points (r2_weighted also reported)",
    }
    return _jsonable({"per_size": per_size, "unified": unified, "settings": settings})


_SUMMARY_COLUMNS = ["size", "params", "method", "view", "L_inf", "A", "b", "L_star", "B", "beta",
                    "A0", "gamma", "r2", "r2_weighted", "rmse", "n_points", "converged",
                    "at_bound", "weights", "reason"]


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
