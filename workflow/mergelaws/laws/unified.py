"""The unified law (arXiv 2509.24244, Eqs. 1 and 4):

    E[L | N, k] = L* + B N^-beta + A0 N^-gamma / (k + b),

N the base-model size in **billions** of parameters (``params / 1e9``).  Fitted by variable
projection: for fixed (beta, gamma, b) the law is linear in (L*, B, A0), obtained by
weighted least squares with L*, B >= 0; (beta, gamma, b) are searched on a grid and the
best points refined with a bounded optimiser.  ``loss="huber"`` refits all six parameters
under the Huber loss.  ``UnifiedFit`` is the result (and, with ``holdout`` and the bootstrap
``ci``, one entry of ``fits.json``'s ``unified`` list); ``HoldoutCheck`` is the held-out-size
check of ``holdout.holdout_largest_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from scipy import optimize

from mergelaws.laws.records import NAN, Interval, LawFit, Record, omit_none
from mergelaws.laws.solvers import (
    HUBER_TUNING,
    at_bound,
    check_loss,
    clean_xy,
    huber_rho,
    huber_weights,
    r2,
    resolve_weights,
    robust_fields,
    robust_scale,
    wlstsq_nonneg,
)

__all__ = ["DEFAULT_UNIFIED_BOUNDS", "UNIFIED_PARAMS", "HoldoutCheck", "UnifiedFit", "fit_unified",
           "predict_unified"]

#: default bounds (lo, hi) for beta, gamma and b in the unified law
DEFAULT_UNIFIED_BOUNDS: dict[str, tuple[float, float]] = {
    "beta": (0.0, 3.0),
    "gamma": (0.0, 3.0),
    "b": (0.0, 20.0),
}

#: the unified law's parameters, in the order of the paper's tables
UNIFIED_PARAMS: tuple[str, ...] = ("L_star", "B", "beta", "A0", "gamma", "b")


@dataclasses.dataclass
class HoldoutCheck(Record):
    """The held-out-size check of the unified law (``holdout.holdout_largest_size``): fitted
    on every size but the largest, the largest predicted at every k >= 1."""

    #: "ok", "skipped: needs >= 4 sizes ..." or "failed: <reason>"
    status: str | None = None
    #: the held-out (largest) size
    size: str | None = None
    fit_sizes: list[str] = dataclasses.field(default_factory=list)
    #: "<k min>..<k max>" of the predicted points
    predict_k: str | None = None
    n_predicted: int = 0
    mae: float | None = NAN
    rmse: float | None = NAN
    #: max |pred - meas| / meas
    max_rel_err: float | None = NAN
    #: pred - meas at the largest k
    err_at_M: float | None = NAN
    #: the all-size fit's errors on the same points
    insample_mae: float | None = NAN
    insample_rmse: float | None = NAN
    converged: bool = False
    reason: str | None = None


@dataclasses.dataclass
class UnifiedFit(LawFit):
    """A fit of L(N,k) = L* + B N^-beta + A0 N^-gamma/(k+b) (``fit_unified``), or one entry of
    ``fits.json``'s ``unified`` list (``fit_all``: then ``method``, ``view``, ``sizes``,
    ``params`` (one per size), the ``holdout`` check and the bootstrap: ``ci`` (parameter ->
    ``Interval``; None without bootstrap), ``n_boot``, ``boot_frac_converged`` and ``level``
    (left out of the dict without bootstrap)).

    Non-finite numbers are NaN in a fresh fit and None in a fits file."""

    _readers: ClassVar[dict[str, Any]] = {
        "holdout": HoldoutCheck.from_dict,
        "ci": lambda d: {p: Interval.from_dict(v) for p, v in d.items()},
    }

    L_star: float | None = NAN
    B: float | None = NAN
    beta: float | None = NAN
    A0: float | None = NAN
    gamma: float | None = NAN
    b: float | None = NAN
    #: unweighted, on the fitted points
    r2: float | None = NAN
    r2_weighted: float | None = NAN
    rmse: float | None = NAN
    n_points: int = 0
    n_sizes: int = 0
    n_k: int = 0
    converged: bool = False
    #: names of the parameters at a bound (L_star / B: pinned at 0)
    at_bound: list[str] = dataclasses.field(default_factory=list)
    #: the weight scheme used (None when the weights were invalid)
    weights: str | None = None
    #: None if the fit ran; else why not
    reason: str | None = None
    #: status, nfev, cost, n_starts of the optimiser
    optimizer: dict | None = None
    loss: str = "linear"
    #: the Huber threshold used (None for least squares)
    f_scale: float | None = None
    #: Huber refits: iterations, converged, min_weight (None for least squares)
    irls: dict | None = None
    #: the [N, k] points the Huber loss downweighted
    downweighted: list = dataclasses.field(default_factory=list)
    method: str | None = None
    view: str | None = None
    sizes: list[str] | None = None
    params: list[int] | None = None
    holdout: HoldoutCheck | None = None
    ci: dict[str, Interval] | None = None
    n_boot: int = 0
    boot_frac_converged: float | None = None
    level: float | None = omit_none()


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
        return wlstsq_nonneg(X, yy, sw, (0, 1))[1]

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
    coef, _ = wlstsq_nonneg(_unified_design(logN, kk, *theta), yy, sw, (0, 1))
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
    ``(sol, h, s, info)`` as ``solvers.huber_irls`` (``sol`` also carries ``objective``: the Huber
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
) -> UnifiedFit:
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
    kk, yy, weights, s, NN = clean_xy(k, y, weights, sem, extra=N)
    out = UnifiedFit(n_points=int(kk.size), n_k=int(np.unique(kk).size),
                     **robust_fields(loss, None, np.ones(0), {"iterations": 0, "converged": False}, []))
    if NN is None or NN.size != kk.size:
        out.reason = "N must have the same length as k and y"
        return out
    ok = np.isfinite(NN) & (NN > 0)
    kk, yy, NN = kk[ok], yy[ok], NN[ok]
    if s is not None:
        s = s[ok]
    if weights is not None and not isinstance(weights, str):
        weights = np.asarray(weights, dtype=float)[ok]
    out.n_points = int(kk.size)
    out.n_sizes = int(np.unique(NN).size)
    out.n_k = int(np.unique(kk).size)
    if out.n_sizes < 3:
        out.reason = f"need >= 3 distinct sizes for the unified law, got {out.n_sizes}"
        return out
    if out.n_k < 3:
        out.reason = f"need >= 3 distinct k >= 1, got {out.n_k}"
        return out
    if kk.size < 6:
        out.reason = f"need >= 6 points for 6 parameters, got {kk.size}"
        return out
    try:
        w, out.weights = resolve_weights(kk, weights, s)
    except ValueError as e:
        out.reason = str(e)
        return out
    logN = np.log(NN)
    names = ["beta", "gamma", "b"]
    lo = np.array([bnds[n][0] for n in names], dtype=float)
    hi = np.array([bnds[n][1] for n in names], dtype=float)
    if np.any(lo >= hi) or lo[2] <= -1.0:
        out.reason = f"invalid bounds {bnds!r}"
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
        out.update(**robust_fields(loss, sc, h, info, [[float(n), int(v)] for n, v in zip(NN, kk)]))
    theta, coef, status = sol["theta"], sol["coef"], sol["status"]
    X = _unified_design(logN, kk, *theta)
    pred = X @ coef
    r = yy - pred
    vals = [float(v) for v in theta]
    out.update(
        L_star=float(coef[0]), B=float(coef[1]), A0=float(coef[2]),
        beta=vals[0], gamma=vals[1], b=vals[2],
        r2=r2(yy, pred), r2_weighted=r2(yy, pred, w),
        rmse=float(np.sqrt(np.mean(r**2))),
        converged=bool(np.all(np.isfinite(coef)) and np.all(np.isfinite(theta)) and status != -1),
        at_bound=at_bound(names, vals, [tuple(bnds[n]) for n in names])
        + [n for n, c in (("L_star", coef[0]), ("B", coef[1])) if c == 0.0],
        optimizer={"status": status, "nfev": sol["nfev"], "cost": float(sol["cost"]),
                   "n_starts": sol["n_starts"]},
    )
    if not out.converged:
        out.reason = "optimizer failed or non-finite solution"
    return out


def predict_unified(fit: UnifiedFit, N, k) -> np.ndarray:
    """Evaluate the unified law (N in billions) for a fit; NaN if it did not converge."""
    N = np.asarray(N, dtype=float)
    k = np.asarray(k, dtype=float)
    N, k = np.broadcast_arrays(N, k)
    if not fit.converged:
        return np.full(N.shape, np.nan)
    f = fit
    return f.L_star + f.B * N ** (-f.beta) + f.A0 * N ** (-f.gamma) / (k + f.b)

