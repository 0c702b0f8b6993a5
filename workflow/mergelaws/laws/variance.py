"""The across-subset variance laws (Cor. 3.2 and the finite pool):

* ``inv_k``: Var(k) = C/k;
* ``finite_pool``: Var(k) = C (M-k) / (k (M-1)), k-subsets drawn without replacement from a
  pool of M experts (0 at k = M).

``fit_variance`` fits both to the variance across subsets at each k (``VarianceFit``: also
one entry of ``fits.json``'s ``variance`` list); ``predict_variance`` evaluates one.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from mergelaws.laws.records import NAN, LawFit
from mergelaws.laws.solvers import r2

__all__ = ["VARIANCE_LAWS", "VarianceFit", "fit_variance", "predict_variance"]

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


@dataclasses.dataclass
class VarianceFit(LawFit):
    """The variance laws fitted to one curve (``fit_variance``), or one entry of
    ``fits.json``'s ``variance`` list (``fit_all``: then ``size``, ``params``, ``N``,
    ``method`` and ``view`` say which; None for a fit on its own).  Non-finite numbers are
    NaN in a fresh fit and None in a fits file."""

    #: the expert pool size (None: finite-pool law not fitted)
    M: int | None = None
    k_fitted: list[int] = dataclasses.field(default_factory=list)
    n_points: int = 0
    C_inv_k: float | None = NAN
    r2_inv_k: float | None = NAN
    rmse_inv_k: float | None = NAN
    C_finite_pool: float | None = NAN
    r2_finite_pool: float | None = NAN
    rmse_finite_pool: float | None = NAN
    #: least-squares slope of log Var on log k (-1 for Var ~ 1/k)
    loglog_slope: float | None = NAN
    #: the law with the lower rmse
    better: str | None = None
    converged: bool = False
    reason: str | None = None
    size: str | None = None
    params: int | None = None
    N: float | None = None
    method: str | None = None
    view: str | None = None


def fit_variance(k, var, M: int | None = None, n_subsets=None) -> VarianceFit:
    """Fit the across-subset variance laws to the variances at each k.

    * ``inv_k``: Var(k) = C/k (Corollary 3.2: Var = Theta(1/k); App. H.2's joint variance
      law at one size, with V* ~ 0 and b0 ~ 0 as the paper finds);
    * ``finite_pool``: Var(k) = C (M-k)/(k (M-1)), the variance of a mean of k experts
      drawn without replacement from a pool of M (the finite-pool correction): 0 at k = M.

    Each by unweighted least squares (as the paper fits its variance model), C >= 0 by
    construction (closed form C = <x, v>/<x, x> clipped at 0).  Points: k >= 1 with a finite
    variance and, when ``n_subsets`` is given, >= 2 subsets (a single subset, e.g. k = M,
    has no variance).  Returns a ``VarianceFit``: ``C_inv_k, r2_inv_k, rmse_inv_k, C_finite_pool,
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
    out = VarianceFit(M=M, k_fitted=[int(x) for x in k], n_points=int(k.size))
    if np.unique(k).size < 2:
        out.reason = f"need >= 2 distinct k with >= 2 subsets, got {np.unique(k).size}"
        return out
    for law in ("inv_k", "finite_pool"):
        if law == "finite_pool" and M is None:
            continue
        x = _variance_shape(k, law, M)
        xx = float(x @ x)
        C = max(float(x @ v) / xx, 0.0) if xx > 0 else nan
        pred = C * x
        setattr(out, f"C_{law}", C)
        setattr(out, f"r2_{law}", r2(v, pred))
        setattr(out, f"rmse_{law}", float(np.sqrt(np.mean((v - pred) ** 2))))
    pos = v > 0
    if np.unique(k[pos]).size >= 2:
        out.loglog_slope = float(np.polyfit(np.log(k[pos]), np.log(v[pos]), 1)[0])
    out.converged = bool(np.isfinite(out.C_inv_k))
    if M is not None and np.isfinite(out.rmse_finite_pool):
        out.better = "finite_pool" if out.rmse_finite_pool < out.rmse_inv_k else "inv_k"
    else:
        out.better = "inv_k"
    return out


def predict_variance(fit: VarianceFit, k, law: str = "inv_k") -> np.ndarray:
    """Evaluate a variance law of a ``fit_variance`` result at k (NaN if not fitted)."""
    if law not in VARIANCE_LAWS:
        raise ValueError(f"unknown variance law {law!r}; known: {sorted(VARIANCE_LAWS)}")
    C = getattr(fit, f"C_{law}")
    k = np.asarray(k, dtype=float)
    if C is None or not np.isfinite(C) or (law == "finite_pool" and not fit.M):
        return np.full(k.shape, np.nan)
    return C * _variance_shape(k, law, fit.M)
