"""The inverse planning question (issue #15): for a target 95% interval width on A or L_inf
of the per-size law, which k values to run and how many subsets at each, at what cost in merges.

The answer propagates the cell noise through the law's Jacobian. A cell mean at k over n_k
subsets has variance Var(mean_k) = C / (k n_k) (the variance law C/k of ``laws.fit_variance``,
the noise the fit step's parametric intervals draw: ``laws.cell_noise_sd``), or, with
``finite_pool=True``, for n_k distinct subsets of this very pool of M experts (N_k = C(M, k)),

    Var(mean_k) = Var_k / n_k x (1 - n_k / N_k),   Var_k = C (M - k) / (k (M - 1))

(the finite-pool law; 0 when every k-subset is in: the pool's own mean, no sampling noise). The fit is
weighted least squares with weights w_k (the paper's w_k = k), so to first order

    Cov(theta) = (J' W J)^-1 J' W S W J (J' W J)^-1,   S = diag(Var(mean_k)),

with J the Jacobian of L_inf + A/(k + b) in (L_inf, A, b) at the fitted law. The interval
width is 2 z sqrt(Cov) (z = 1.96 for 95%). ``design_for_width`` searches k sets (each with
k = 1 and k = M: the ends of the curve pin A and L_inf best)
and the smallest n subsets per k (n_k = min(n, N_k)) meeting the target; the cost is the
merges, sum n_k, plus one for the base (k = 0) that every sweep evaluates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["cell_variance", "param_covariance", "interval_width", "design_for_width", "DESIGN_PARAMS"]

DESIGN_PARAMS = ("L_inf", "A", "b")
Z95 = 1.959963984540054


def cell_variance(k, n, C: float, M: int | None = None, finite_pool: bool = False) -> np.ndarray:
    """Variance of a cell's mean over n subsets at k: C/k/n (the noise the fit step's parametric
    intervals draw, ``laws.cell_noise_sd``), or with ``finite_pool`` (needs M) the finite-pool law
    C (M-k)/(k (M-1)) / n x (1 - n/C(M,k)) (n distinct k-subsets of this very pool)."""
    k = np.asarray(k, dtype=float)
    n = np.broadcast_to(np.asarray(n, dtype=float), k.shape)
    if not finite_pool:
        return C / k / n
    if not M:
        raise ValueError("finite_pool needs the pool size M")
    var = C * (M - k) / (k * (M - 1.0))
    pool = np.array([math.comb(int(M), int(x)) for x in k], dtype=float)
    return var / n * np.clip(1.0 - n / pool, 0.0, 1.0)


def _jacobian(law: Mapping, k: np.ndarray) -> np.ndarray:
    A, b = float(law["A"]), float(law["b"])
    return np.column_stack([np.ones_like(k), 1.0 / (k + b), -A / (k + b) ** 2])


def param_covariance(law: Mapping, ks: Sequence[int], n: Sequence[int] | int, C: float, M: int | None = None,
                     weights: str | Sequence[float] = "k", fix_b: bool = False, finite_pool: bool = False
                     ) -> np.ndarray:
    """First-order covariance of the fitted (L_inf, A, b) (or (L_inf, A) with ``fix_b``) for a
    design: k values ``ks`` with ``n`` subsets each (an int or one per k), cell noise from the
    variance law (C, M), weighted least squares with ``weights`` ("k", "none" or an array)."""
    k = np.asarray(ks, dtype=float)
    n = np.broadcast_to(np.asarray(n, dtype=float), k.shape)
    J = _jacobian(law, k)
    if fix_b:
        J = J[:, :2]
    w = k.copy() if isinstance(weights, str) and weights == "k" else (
        np.ones_like(k) if isinstance(weights, str) else np.asarray(weights, dtype=float))
    S = cell_variance(k, n, C, M, finite_pool)
    JW = J.T * w
    bread = np.linalg.pinv(JW @ J)
    meat = (JW * S) @ JW.T
    return bread @ meat @ bread.T


def interval_width(law: Mapping, ks, n, C: float, M: int | None = None, param: str = "A", level_z: float = Z95,
                   weights="k", fix_b: bool = False, finite_pool: bool = False) -> float:
    """Predicted width (hi - lo) of the interval on ``param`` for the design (``2 z sd``)."""
    cov = param_covariance(law, ks, n, C, M, weights, fix_b, finite_pool)
    i = DESIGN_PARAMS.index(param)
    return float(2 * level_z * math.sqrt(max(cov[i, i], 0.0)))


def _candidate_ks(M: int, max_points: int) -> list[tuple[int, ...]]:
    """k sets with 1 and M and 1..max_points-2 interior k (from a roughly geometric grid for large M)."""
    inner = list(range(2, M)) if M <= 12 else sorted({int(round(x)) for x in np.geomspace(2, M - 1, 10)})
    out = []
    for r in range(1, max_points - 1):
        for combo in itertools.combinations(inner, r):
            out.append((1, *combo, M))
    return out


def design_for_width(law: Mapping, C: float, M: int, target_width: float, param: str = "A",
                     weights="k", fix_b: bool = False, max_points: int = 5, n_max: int = 10_000,
                     candidates: Sequence[Sequence[int]] | None = None, finite_pool: bool = False) -> dict:
    """The cheapest design (k values, subsets per k) whose predicted 95% interval on ``param``
    (``"A"`` or ``"L_inf"``) is at most ``target_width`` wide, for a pool of M experts, the law
    {L_inf, A, b} and the variance law's C. Returns ``{"param", "target_width", "ks", "n_per_k",
    "n", "merges" (incl. the base), "width", "reachable", "note"}``; with ``reachable`` False
    (even n_max subsets, or every k-subset, is not enough) ``ks``/``n_per_k`` are the design
    that comes closest."""
    if param not in ("A", "L_inf"):
        raise ValueError(f"param must be 'A' or 'L_inf', not {param!r}")
    if not (target_width > 0 and math.isfinite(target_width)):
        raise ValueError("target_width must be a positive number")
    if M < 3:
        raise ValueError("the per-size law needs a pool of M >= 3 experts (3 distinct k)")
    cands = [tuple(sorted(set(int(x) for x in c))) for c in candidates] if candidates else _candidate_ks(M, max_points)
    best, closest = None, None
    for ks in cands:
        if len(ks) < 3 or min(ks) < 1 or max(ks) > M:
            continue
        pools = [math.comb(M, k) for k in ks]
        top = min(n_max, max(pools))

        def width(n, ks=ks, pools=pools):
            return interval_width(law, ks, [min(n, p) for p in pools], C, M, param, weights=weights, fix_b=fix_b,
                                  finite_pool=finite_pool)

        w_top = width(top)
        if not math.isfinite(w_top):
            continue
        if w_top > target_width:
            if closest is None or w_top < closest[0]:
                closest = (w_top, ks, top)
            continue
        lo, hi = 1, top  # smallest n with width(n) <= target (width falls with n)
        while lo < hi:
            mid = (lo + hi) // 2
            if width(mid) <= target_width:
                hi = mid
            else:
                lo = mid + 1
        n_per_k = [min(lo, p) for p in pools]
        cost = sum(n_per_k) + 1
        if best is None or (cost, len(ks)) < (best["merges"], len(best["ks"])):
            best = {"ks": list(ks), "n_per_k": n_per_k, "n": lo, "merges": cost, "width": width(lo)}
    if best is not None:
        return {"param": param, "target_width": target_width, **best, "reachable": True,
                "note": "first-order propagation of the cell noise "
                        + ("(finite pool)" if finite_pool else "C/(k n)") + " through the law"}
    if closest is None:
        return {"param": param, "target_width": target_width, "ks": [], "n_per_k": [], "n": None,
                "merges": None, "width": float("nan"), "reachable": False, "note": "no usable design"}
    w, ks, top = closest
    n_per_k = [min(top, math.comb(M, k)) for k in ks]
    return {"param": param, "target_width": target_width, "ks": list(ks), "n_per_k": n_per_k, "n": top,
            "merges": sum(n_per_k) + 1, "width": w, "reachable": False,
            "note": f"unreachable: even {'every k-subset' if top < n_max else f'{n_max} subsets per k'} "
                    f"gives width {w:.3g}"}


def design_rows(table, laws: Mapping, variance: Sequence[Mapping], method: str, halve: bool = True) -> list[dict]:
    """The plan's answer per size for ``method``: the 95% interval widths on A and L_inf the
    measured design gives (predicted from its k values and subsets per k, the size's law and
    variance law C/k), and the cheapest design (``design_for_width``) reaching the same width
    and, with ``halve``, half of it. ``table``: the view table (size, method, k, n_subsets)."""
    var = {(str(r["size"]), str(r["method"])): r for r in variance}
    rows = []
    for size in dict.fromkeys(str(s) for s in table["size"]):
        law, v = laws.get((size, method)), var.get((size, method))
        h = table[(table["size"].astype(str) == size) & (table["method"] == method) & (table["k"] >= 1)]
        C = None if v is None else v.get("C_inv_k")
        M = None if v is None else v.get("M")
        M = int(M) if M else int(h["k"].max()) if len(h) else None
        if law is None or C is None or not math.isfinite(float(C)) or not M or M < 3 or len(h) < 3:
            continue
        if not all(math.isfinite(float(law[p])) for p in DESIGN_PARAMS):
            continue
        ks, n = h["k"].astype(int).tolist(), h["n_subsets"].astype(int).tolist()
        measured = int(sum(n)) + 1
        for param in ("A", "L_inf"):
            now = interval_width(law, ks, n, float(C), M, param)
            for label, target in [("as measured", now)] + ([("half", now / 2)] if halve else []):
                d = design_for_width(law, float(C), M, target, param,
                                     candidates=_candidate_ks(M, 5) + [tuple(sorted(set(ks)))])
                rows.append({"size": size, "method": method, "param": param, "target": label,
                             "width_now": now, "merges_now": measured, **d})
    return rows
