"""The numerical core shared by every fit of a merging law.

* weights on squared residuals (``resolve_weights``: ``"k"``, the paper's; ``"sem"``;
  ``"none"``; an array), weighted linear least squares (``wlstsq``, ``wlstsq_nonneg``),
  goodness of fit (``r2``, ``at_bound``) and input cleaning (``clean_xy``);
* the Huber loss (``check_loss``, ``huber_rho``, ``huber_weights``, ``robust_scale``) and
  its iteratively reweighted least squares (``huber_irls``; ``robust_fields`` records it);
* variable projection over b for L_inf + A s(k)/(k+b): for fixed b the law is a weighted
  simple regression, and b is searched on ``b_grid`` then refined in the bracket around the
  best grid point -- ``per_size_solve`` for one curve (scipy's bounded Brent) and
  ``per_size_solve_batch`` / ``huber_irls_batch``, the vectorised form of the same solver
  for many curves that share k and (per row) weights (the same grid, projection and Huber
  scale; a golden-section refinement in the same bracket), which the bootstrap uses.
  ``test_batch_fit_matches_fit_per_size`` (tests/) checks that the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize

__all__ = [
    "LOSSES",
    "HUBER_TUNING",
    "MAD_TO_SD",
    "IRLS_MAX_ITER",
    "IRLS_TOL",
    "resolve_weights",
    "wlstsq",
    "wlstsq_nonneg",
    "r2",
    "at_bound",
    "clean_xy",
    "check_loss",
    "huber_rho",
    "huber_weights",
    "robust_scale",
    "huber_irls",
    "robust_fields",
    "b_grid",
    "profile_b",
    "per_size_solve",
    "per_size_solve_batch",
    "huber_irls_batch",
]

# --------------------------------------------------------------------------------------
# Weights, least squares, goodness of fit
# --------------------------------------------------------------------------------------


def resolve_weights(k: np.ndarray, weights: Any, sem: np.ndarray | None) -> tuple[np.ndarray, str]:
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


def wlstsq(X: np.ndarray, y: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares with column normalisation; returns (coef, weighted residual)."""
    Xw = X * sw[:, None]
    scale = np.max(np.abs(Xw), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    coef_s, *_ = np.linalg.lstsq(Xw / scale, y * sw, rcond=None)
    coef = coef_s / scale
    return coef, sw * (y - X @ coef)


def wlstsq_nonneg(X: np.ndarray, y: np.ndarray, sw: np.ndarray,
                   nonneg: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares with the coefficients in ``nonneg`` constrained to be >= 0.

    Exact by enumerating the active sets (there are at most 2**len(nonneg) of them): the
    best feasible solution among "unconstrained with these coefficients fixed at 0".
    """
    coef, r = wlstsq(X, y, sw)
    if all(coef[j] >= 0 for j in nonneg):  # the unconstrained optimum is feasible: it is the answer
        return coef, r
    best = None
    n = X.shape[1]
    for mask in range(1, 2 ** len(nonneg)):
        fixed = [nonneg[i] for i in range(len(nonneg)) if mask >> i & 1]
        free = [j for j in range(n) if j not in fixed]
        coef = np.zeros(n)
        if free:
            coef[free], _ = wlstsq(X[:, free], y, sw)
        if any(coef[j] < 0 for j in nonneg):
            continue
        r = sw * (y - X @ coef)
        ss = float(r @ r)
        if best is None or ss < best[0]:
            best = (ss, coef, r)
    return best[1], best[2]


def r2(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> float:
    if w is None:
        w = np.ones_like(y)
    ybar = np.sum(w * y) / np.sum(w)
    ss_tot = float(np.sum(w * (y - ybar) ** 2))
    ss_res = float(np.sum(w * (y - pred) ** 2))
    if ss_tot <= 0:
        return 1.0 if ss_res <= 1e-30 else float("nan")
    return 1.0 - ss_res / ss_tot


def at_bound(names: Sequence[str], values: Sequence[float], bounds: Sequence[tuple[float, float]]) -> list[str]:
    out = []
    for n, v, (lo, hi) in zip(names, values, bounds):
        tol = 1e-6 * max(1.0, hi - lo)
        if v <= lo + tol or v >= hi - tol:
            out.append(n)
    return out


def clean_xy(k, y, weights, sem, extra=None):
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

#: loss functions a fit accepts (``fit.loss`` in config, ``--loss`` of the fit command)
LOSSES: tuple[str, ...] = ("linear", "huber")
#: automatic Huber threshold = HUBER_TUNING x a robust sd of the residuals (95% efficiency
#: at the normal distribution)
HUBER_TUNING = 1.345
#: median |r| x MAD_TO_SD = the sd of normal residuals r
MAD_TO_SD = 1.0 / 0.6744897501960817
#: the IRLS stops after IRLS_MAX_ITER iterations or when no Huber weight moves by > IRLS_TOL
IRLS_MAX_ITER = 200
IRLS_TOL = 1e-6


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
    return float(np.median(np.abs(r)) * MAD_TO_SD) if r.size else float("nan")


def huber_irls(solve, predict, y: np.ndarray, w: np.ndarray, f_scale: float | None, sol,
               max_iter: int = IRLS_MAX_ITER, tol: float = IRLS_TOL):
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


def robust_fields(loss: str, s, h: np.ndarray | None, info: dict | None, labels: list) -> dict:
    """The fields a fit reports about its loss: ``loss``, ``f_scale`` (the threshold used),
    ``irls`` (iterations, converged, min_weight; None for least squares) and
    ``downweighted`` (the ``labels`` of the points with a Huber weight below 1)."""
    if loss == "linear":
        return {"loss": "linear", "f_scale": None, "irls": None, "downweighted": []}
    down = [lab for lab, hh in zip(labels, h) if hh < 1.0 - 1e-9]
    return {"loss": loss, "f_scale": None if s is None else float(s),
            "irls": {"iterations": int(info["iterations"]), "converged": bool(info["converged"]),
                     "min_weight": float(np.min(h)) if h.size else None},
            "downweighted": down}


# --------------------------------------------------------------------------------------
# Variable projection over b:  L_inf + A s(k) / (k + b)
# --------------------------------------------------------------------------------------


def b_grid(lo: float, hi: float, n: int = 241) -> np.ndarray:
    """The search grid for b in [lo, hi]."""
    # quadratic spacing: dense near the lower bound, where b usually lies
    return lo + (hi - lo) * np.linspace(0.0, 1.0, n) ** 2


def profile_b(ss, lo: float, hi: float) -> float:
    """The b in [lo, hi] minimising ``ss(b)`` (the projected residual sum of squares):
    a grid, then a bounded scalar refinement around the best grid point."""
    grid = b_grid(lo, hi)
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


def per_size_solve(kk: np.ndarray, yy: np.ndarray, w: np.ndarray, lo: float, hi: float,
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

    grid = b_grid(lo, hi)
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


def per_size_solve_batch(k: np.ndarray, Y: np.ndarray, W: np.ndarray, lo: float, hi: float):
    """``per_size_solve`` for every row of ``Y`` (R, n) at once, with the row's weights ``W``
    (R, n): weighted least squares of L_inf + A/(k+b) on the same ``b_grid``, then a
    golden-section refinement in the same bracket around the best grid point (where
    ``per_size_solve`` uses scipy's bounded Brent).  Returns L_inf, A, b (each (R,))."""
    wsum = W.sum(1)
    ybar = (Y * W).sum(1) / wsum
    Yc = Y - ybar[:, None]

    grid = b_grid(lo, hi)
    X = 1.0 / (k[None, :] + grid[:, None])                          # (G, n)
    # SS for every (replicate, grid b) with the replicate's weights: sum_w yc = 0, so
    # sxy = sum_w x yc and sxx = sum_w x^2 - (sum_w x)^2 / sum_w
    Sx = W @ X.T                                                     # (R, G)
    sxx = W @ (X * X).T - Sx**2 / wsum[:, None]
    sxy = (W * Yc) @ X.T
    syy = (W * Yc * Yc).sum(1)
    ss_grid = syy[:, None] - sxy**2 / np.where(sxx > 0, sxx, np.inf)
    i = np.argmin(ss_grid, axis=1)
    b_best = grid[i]
    # exact SS at the grid point (the closed form above can lose digits near zero)
    ss_at_grid = _proj_ss(1.0 / (k[None, :] + b_best[:, None]), Yc, W)[2]

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
    b = np.where(better, b_ref, b_best)
    A, c0, _ = _proj_ss(1.0 / (k[None, :] + b[:, None]), Yc, W)
    return ybar + c0, A, b


def huber_irls_batch(k, Y, w, lo, hi, f_scale, sol, max_iter=IRLS_MAX_ITER, tol=IRLS_TOL):
    """``huber_irls`` with ``per_size_solve_batch`` on every row of ``Y`` at once (the same
    residual scaling, threshold, weights and stopping rule; each row stops when its weights
    settle).  ``w``: (n,) weights shared by the rows; ``sol``: the least-squares
    (L_inf, A, b) to start from.  Returns L_inf, A, b (each (R,))."""
    L_inf, A, b = (np.array(v, dtype=float) for v in sol)
    pos = w > 0
    rw = np.sqrt(w / np.mean(w[pos]))
    H = np.ones_like(Y)
    done = np.zeros(Y.shape[0], dtype=bool)
    tiny = 1e-13 * np.maximum(1.0, np.max(np.abs(Y), axis=1))
    for _ in range(max_iter):
        r = rw * (Y - (L_inf[:, None] + A[:, None] / (k[None, :] + b[:, None])))
        if f_scale is None:
            s = HUBER_TUNING * np.median(np.abs(r[:, pos]), axis=1) * MAD_TO_SD
        else:
            s = np.full(Y.shape[0], float(f_scale))
        exact = ~np.isfinite(s) | (s <= tiny)
        Hn = np.where(exact[:, None], H, huber_weights(r, np.where(exact, 1.0, s)[:, None]))
        done |= exact | (np.max(np.abs(Hn - H), axis=1) <= tol)
        if done.all():
            break
        todo = ~done
        H[todo] = Hn[todo]
        L_inf[todo], A[todo], b[todo] = per_size_solve_batch(k, Y[todo], w * H[todo], lo, hi)
    return L_inf, A, b

