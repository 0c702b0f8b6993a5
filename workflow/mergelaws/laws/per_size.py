"""The per-size law (arXiv 2509.24244, Eq. 3):  E[L | k] = L_inf + A / (k + b).

Fitted by variable projection (``solvers.per_size_solve``): for fixed b the law is linear in
(L_inf, A), obtained by weighted least squares; b is searched on a grid in ``b_bounds`` and
refined with a bounded optimiser.  A is not sign-constrained: a curve that rises with k is
reported with A < 0.  Only k >= 1 is fitted (k = 0 is the base model, outside the law).
The default weights on squared residuals are proportional to k, as in the paper.

``finite_pool_fit`` compares the law with its finite-pool form
L_inf + A (M-k) / ((M-1)(k+b)) on the same points.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from mergelaws.laws.records import NAN, LawFit, Record
from mergelaws.laws.solvers import (
    at_bound,
    check_loss,
    clean_xy,
    huber_irls,
    per_size_solve,
    profile_b,
    r2,
    resolve_weights,
    robust_fields,
    wlstsq,
)

__all__ = ["DEFAULT_B_BOUNDS", "PerSizeFit", "FinitePoolFit", "fit_per_size", "predict_per_size",
           "finite_pool_fit"]

#: default bounds for b in the per-size law
DEFAULT_B_BOUNDS: tuple[float, float] = (0.0, 20.0)


@dataclasses.dataclass
class PerSizeFit(LawFit):
    """A fit of L(k) = L_inf + A/(k+b) (``fit_per_size``), or one entry of ``fits.json``'s
    ``per_size`` list (``fit_all``: then ``size``, ``params``, ``N`` = params / 1e9,
    ``method``, ``view`` and ``k_fitted`` say which curve it is; None for a fit on its own).

    Non-finite numbers are NaN in a fresh fit and None in a fits file (``fit_all``,
    ``load_fits``)."""

    L_inf: float | None = NAN
    A: float | None = NAN
    b: float | None = NAN
    #: unweighted, on the fitted points
    r2: float | None = NAN
    r2_weighted: float | None = NAN
    rmse: float | None = NAN
    n_points: int = 0
    n_k: int = 0
    converged: bool = False
    #: names of the parameters at a bound
    at_bound: list[str] = dataclasses.field(default_factory=list)
    #: the weight scheme used (None when the weights were invalid)
    weights: str | None = None
    #: None if the fit ran; else why not
    reason: str | None = None
    loss: str = "linear"
    #: the Huber threshold used (None for least squares)
    f_scale: float | None = None
    #: Huber IRLS: iterations, converged, min_weight (None for least squares)
    irls: dict | None = None
    #: the k whose points the Huber loss downweighted
    downweighted: list = dataclasses.field(default_factory=list)
    size: str | None = None
    params: int | None = None
    N: float | None = None
    method: str | None = None
    view: str | None = None
    k_fitted: list[int] | None = None


def fit_per_size(
    k,
    y,
    weights: Any = None,
    b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
    sem=None,
    loss: str = "linear",
    f_scale: float | None = None,
) -> PerSizeFit:
    """Fit L(k) = L_inf + A/(k+b) by variable projection over b.

    ``k``, ``y``: points (means per k, or one point per subset); only k >= 1 is used.
    ``weights``: None or ``"k"`` (default, weight on squared residual proportional to k),
    ``"sem"`` (1/sem**2, needs ``sem``; zero sem falls back, see ``solvers.resolve_weights``),
    ``"none"``, or an array.  ``b_bounds``: search interval for b.
    ``loss``: ``"linear"`` (least squares) or ``"huber"`` (Huber loss on the weighted
    residuals, by IRLS around the variable-projection fit; see ``solvers.huber_irls``) with
    threshold ``f_scale`` (None: 1.345 x a robust sd of the residuals, re-estimated each
    iteration).

    Returns a ``PerSizeFit``.  Never raises on degenerate data: with fewer than 3 distinct
    k it returns ``converged=False`` with a reason.
    """
    check_loss(loss, f_scale)
    kk, yy, weights, s, _ = clean_xy(k, y, weights, sem)
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    out = PerSizeFit(n_points=int(kk.size), n_k=int(np.unique(kk).size),
                     **robust_fields(loss, None, np.ones(0), {"iterations": 0, "converged": False}, []))
    if not (lo < hi) or lo <= -1.0:
        out.reason = f"invalid b_bounds {b_bounds!r} (need -1 < lo < hi)"
        return out
    if out.n_k < 3:
        out.reason = f"need >= 3 distinct k >= 1 to fit 3 parameters, got {out.n_k}"
        return out
    try:
        w, out.weights = resolve_weights(kk, weights, s)
    except ValueError as e:
        out.reason = str(e)
        return out
    if np.count_nonzero(w > 0) < 3:
        out.reason = "fewer than 3 points with positive weight"
        return out
    L_inf, A, b = per_size_solve(kk, yy, w, lo, hi)
    if loss == "huber":
        (L_inf, A, b), h, sc, info = huber_irls(
            lambda we, _prev: per_size_solve(kk, yy, we, lo, hi),
            lambda sol: sol[0] + sol[1] / (kk + sol[2]), yy, w, f_scale, (L_inf, A, b))
        out.update(**robust_fields(loss, sc, h, info, [int(v) if float(v).is_integer() else float(v)
                                                       for v in kk]))
    pred = L_inf + A / (kk + b)
    resid = yy - pred
    out.update(
        L_inf=L_inf, A=A, b=float(b),
        r2=r2(yy, pred), r2_weighted=r2(yy, pred, w),
        rmse=float(np.sqrt(np.mean(resid**2))),
        converged=bool(np.isfinite(L_inf) and np.isfinite(A) and np.isfinite(b)),
        at_bound=at_bound(["b"], [b], [(lo, hi)]),
    )
    if not out.converged:
        out.reason = "non-finite solution"
    return out


def predict_per_size(fit: PerSizeFit, k) -> np.ndarray:
    """Evaluate L_inf + A/(k+b) for a per-size fit (NaN for a fit that did not converge)."""
    k = np.asarray(k, dtype=float)
    if not fit.converged:
        return np.full_like(k, np.nan, dtype=float)
    return fit.L_inf + fit.A / (k + fit.b)


# --------------------------------------------------------------------------------------
# Finite-pool correction
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinitePoolFit(Record):
    """``finite_pool_fit``: the finite-pool law and the plain law on the same points."""

    _readers: ClassVar[dict[str, Any]] = {"finite_pool": PerSizeFit.from_dict,
                                          "plain": PerSizeFit.from_dict}

    M: int
    #: L_inf + A (M-k)/((M-1)(k+b)): L_inf is the loss of the full-pool merge
    finite_pool: PerSizeFit
    #: L_inf + A/(k+b)
    plain: PerSizeFit
    #: "finite_pool", "plain" or "tie" (None unless both converged)
    better: str | None = None
    #: r2 / rmse of the finite-pool law minus the plain law's
    delta_r2: float = NAN
    delta_rmse: float = NAN


def finite_pool_fit(k, y, M: int, weights: Any = "k", b_bounds=DEFAULT_B_BOUNDS) -> FinitePoolFit:
    """Fit the finite-pool law L(k) = L_inf + A (M-k) / ((M-1)(k+b)) and compare it with
    the plain law L_inf + A/(k+b) on the same points (k >= 1, k <= M).

    Exact averaging over the k-subsets of a fixed pool of M experts multiplies the quadratic
    (dispersion) term by (M-k)/(M-1) (the finite-pool correction), so the curve reaches
    its floor L_inf at k = M: here L_inf is the loss of the full-pool merge, not an
    infinite-pool limit.  Since A (M-k)/((M-1)(k+b)) = [A (M+b)/(M-1)]/(k+b) - A/(M-1),
    the two laws span the same curves for the same b: they differ in what L_inf and A mean,
    not in fit, and ``better`` is ``"tie"`` unless their rmse differ by more than 1e-9 x the
    spread of y (numerical noise).  Both fits are ``PerSizeFit`` (least squares).
    """
    kk, yy, w_in, _, _ = clean_xy(k, y, weights, None)
    if int(M) < 2:
        raise ValueError("M must be >= 2")
    M = int(M)
    keep = kk <= M
    kk, yy = kk[keep], yy[keep]
    if w_in is not None and not isinstance(w_in, str):
        w_in = np.asarray(w_in, dtype=float)[keep]
    plain = fit_per_size(kk, yy, weights=w_in, b_bounds=b_bounds)
    lo, hi = float(b_bounds[0]), float(b_bounds[1])
    fp = PerSizeFit(n_points=int(kk.size), n_k=int(np.unique(kk).size))
    if np.unique(kk).size < 3:
        fp.reason = "need >= 3 distinct k in 1..M"
    else:
        w, fp.weights = resolve_weights(kk, w_in, None)
        sw = np.sqrt(w)
        shrink = (M - kk) / (M - 1.0)

        def solve(b):
            X = np.column_stack([np.ones_like(kk), shrink / (kk + b)])
            return wlstsq(X, yy, sw)

        b = profile_b(lambda b: float(np.sum(solve(b)[1] ** 2)), lo, hi)
        coef, _ = solve(b)
        pred = coef[0] + coef[1] * shrink / (kk + b)
        fp.update(L_inf=float(coef[0]), A=float(coef[1]), b=float(b), r2=r2(yy, pred),
                  r2_weighted=r2(yy, pred, w), rmse=float(np.sqrt(np.mean((yy - pred) ** 2))),
                  converged=bool(np.all(np.isfinite(coef))),
                  at_bound=at_bound(["b"], [b], [(lo, hi)]))
    out = FinitePoolFit(M=M, finite_pool=fp, plain=plain)
    if fp.converged and plain.converged:
        out.delta_r2 = fp.r2 - plain.r2
        out.delta_rmse = fp.rmse - plain.rmse
        tol = 1e-9 * max(float(np.std(yy)), 1e-300)
        out.better = ("tie" if abs(out.delta_rmse) <= tol else
                      "finite_pool" if fp.rmse < plain.rmse else "plain")
    return out
