"""The planning answers as pure functions of one per-size law {"L_inf", "A", "b"} or of
the measured means (see :mod:`mergelaws.plan`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mergelaws.laws import (
    DEFAULT_B_BOUNDS,
    fit_per_size,
)


def _abk(law: Mapping) -> tuple[float, float, float]:
    return float(law["L_inf"]), float(law["A"]), float(law["b"])


def law_value(law: Mapping, k) -> np.ndarray | float:
    """L(k) = L_inf + A/(k+b)."""
    L, A, b = _abk(law)
    out = L + A / (np.asarray(k, dtype=float) + b)
    return float(out) if np.ndim(out) == 0 else out


# --------------------------------------------------------------------------------------
# Experts, saturation, fractional return
# --------------------------------------------------------------------------------------


def experts_needed(law: Mapping, target: float, k_max: int | None = None) -> int | None:
    """Smallest integer k >= 1 with L(k) <= target, or None.

    None when the target is unreachable: the floor L_inf is at or above the target (for a
    falling curve, A > 0), L(1) is above it for a flat or rising curve (A <= 0), or the k
    needed exceeds ``k_max``.
    """
    L, A, b = _abk(law)
    if not all(map(math.isfinite, (L, A, b))) or not math.isfinite(target):
        return None
    if law_value(law, 1) <= target:
        k = 1
    elif A <= 0 or L >= target:
        return None
    else:
        x = A / (target - L) - b          # L(k) <= target  <=>  k >= x  (A > 0, k + b > 0)
        k = max(1, math.ceil(x - 1e-9 * max(1.0, abs(x))))
        # guard the rounding: the answer is defined by direct evaluation
        while k > 1 and law_value(law, k - 1) <= target:
            k -= 1
        while law_value(law, k) > target:
            k += 1
    if k_max is not None and k > k_max:
        return None
    return int(k)


def k_epsilon(law: Mapping, eps: float = 0.01) -> dict:
    """Experts to eps-saturation (the paper's App. J.1): k_eps = A/eps - b, the k at which the
    tail A/(k+b) above the floor falls to eps; ``k`` is it rounded up (>= 1), as the
    paper's worked numbers.  None when A <= 0 (no tail)."""
    L, A, b = _abk(law)
    if not (eps > 0):
        raise ValueError("eps must be > 0")
    if not (math.isfinite(A) and math.isfinite(b)) or A <= 0:
        return {"k_eps_value": None, "k_eps": None}
    x = A / eps - b
    return {"k_eps_value": float(x), "k_eps": int(max(1, math.ceil(x - 1e-9 * max(1.0, abs(x)))))}


def k_marginal(law: Mapping, eps: float = 0.01, k_max: int = 10**6) -> int | None:
    """Smallest integer k >= 1 whose marginal gain Delta_k = L(k) - L(k+1) is below eps
    (Delta_k = A/((k+b)(k+1+b)) for the law).  1 when A <= 0."""
    L, A, b = _abk(law)
    if not all(map(math.isfinite, (L, A, b))):
        return None
    if A <= 0:
        return 1
    # (k+b)(k+1+b) > A/eps  <=>  k + b > root of u(u+1) = A/eps
    u = (-1.0 + math.sqrt(1.0 + 4.0 * A / eps)) / 2.0
    k = max(1, math.floor(u - b))
    while k > 1 and law_value(law, k - 1) - law_value(law, k) < eps:
        k -= 1
    while law_value(law, k) - law_value(law, k + 1) >= eps:
        k += 1
        if k > k_max:
            return None
    return int(k)


def k_fraction(values: Sequence[float], ks: Sequence[int] | None = None,
               fractions: Sequence[float] = (0.8, 0.9), envelope: bool = True) -> dict:
    """Smallest k reaching each fraction of the k = first -> last improvement.

    ``values``: the loss at ``ks`` (default 1..len(values)), e.g. measured means or the
    fitted curve at k = 1..M.  With ``envelope`` the monotone envelope (cumulative minimum)
    is used, as the paper's fractional return R(k) = (L(1) - env(k)) / (L(1) - env(M)).
    Returns ``{"k80": .., "k90": .., "gain": L(1) - env(M)}`` (keys from ``fractions``);
    None for every k when there is no improvement.
    """
    v = np.asarray(values, dtype=float)
    ks = np.arange(1, v.size + 1) if ks is None else np.asarray(ks)
    env = np.minimum.accumulate(v) if envelope else v
    gain = float(v[0] - env[-1])
    out: dict[str, Any] = {"gain": gain}
    for q in fractions:
        key = f"k{int(round(100 * q))}"
        if not (gain > 0):
            out[key] = None
            continue
        r = (v[0] - env) / gain
        hit = np.nonzero(r >= q)[0]
        out[key] = int(ks[hit[0]]) if hit.size else None
    return out


# --------------------------------------------------------------------------------------
# Three-point forecast
# --------------------------------------------------------------------------------------


def three_point_forecast(k, y, points: Sequence[int] = (1, 2, 4), M: int | None = None,
                         b_bounds=DEFAULT_B_BOUNDS) -> dict:
    """Fit L_inf + A/(k+b) through the measured means at ``points`` only (Sec 4.2) and
    forecast k = 1..M (M = the largest measured k).

    Three points and three parameters: solved exactly when a solution with b in
    ``b_bounds`` exists (closed form: b is linear in the ratio of the two differences);
    otherwise the bounded least-squares fit of ``laws.fit_per_size`` on the three points
    (``exact`` False).  Returns the law, ``exact``, the forecast and, where measured,
    errors: ``mae`` and ``max_rel_err`` over k not in ``points``, ``err_at_M`` (signed).
    """
    k = np.asarray(k, dtype=float)
    y = np.asarray(y, dtype=float)
    M = int(k.max()) if M is None else int(M)
    pts = sorted(int(p) for p in points)
    if len(pts) != 3:
        raise ValueError("three_point_forecast needs exactly 3 points")
    meas = {int(kk): float(yy) for kk, yy in zip(k, y) if np.isfinite(yy)}
    missing = [p for p in pts if p not in meas]
    out: dict[str, Any] = {"points": pts, "M": M, "exact": False, "L_inf": None, "A": None,
                           "b": None, "reason": None}
    if missing:
        out["reason"] = f"k = {missing} not measured"
        return out
    (k1, k2, k3), (y1, y2, y3) = pts, [meas[p] for p in pts]
    law = None
    if y2 != y3:
        r = (y1 - y2) / (y2 - y3)
        den = r * (k3 - k2) - (k2 - k1)
        if den != 0:
            b = ((k2 - k1) * k3 - r * (k3 - k2) * k1) / den
            if math.isfinite(b) and b_bounds[0] <= b <= b_bounds[1]:
                A = (y1 - y2) / (1.0 / (k1 + b) - 1.0 / (k2 + b))
                law = {"L_inf": y1 - A / (k1 + b), "A": A, "b": b}
                out["exact"] = True
    if law is None:
        f = fit_per_size(np.array(pts, float), np.array([y1, y2, y3]), b_bounds=b_bounds)
        if not f.converged:
            out["reason"] = f.reason
            return out
        law = {"L_inf": f.L_inf, "A": f.A, "b": f.b}
        out["reason"] = "no exact solution with b in bounds: bounded least squares"
    out.update({key: float(v) for key, v in law.items()})
    ks = np.arange(1, M + 1)
    pred = law_value(law, ks)
    out["forecast"] = {int(kk): float(p) for kk, p in zip(ks, pred)}
    held = [kk for kk in ks if kk in meas and kk not in pts]
    if held:
        e = np.array([out["forecast"][kk] - meas[kk] for kk in held])
        rel = np.abs(e) / np.abs([meas[kk] for kk in held])
        out.update(mae=float(np.mean(np.abs(e))), max_rel_err=float(np.max(rel)))
    out["err_at_M"] = float(out["forecast"][M] - meas[M]) if M in meas else None
    return out


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


def expert_costs(params: Mapping[str, float], costs: Mapping | None = None,
                 merge_fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """Cost per size: ``{size: {"expert": c_e, "merge": c_m}}``.

    Default: training one expert costs params / min(params) (the smallest size's expert
    = 1 unit) and one merge + eval costs ``merge_fraction`` of that size's expert.  ``costs``
    overrides per size, either a number (the expert cost) or ``{"expert": .., "merge": ..}``.
    """
    p0 = min(float(v) for v in params.values())
    out = {}
    for size, p in params.items():
        ce = float(p) / p0
        cm = merge_fraction * ce
        c = (costs or {}).get(size)
        if isinstance(c, Mapping):
            ce = float(c.get("expert", ce))
            cm = float(c.get("merge", merge_fraction * ce))
        elif c is not None:
            ce = float(c)
            cm = merge_fraction * ce
        out[str(size)] = {"expert": ce, "merge": cm}
    return out


def budget_options(laws: Mapping[str, Mapping], costs: Mapping[str, Mapping],
                   k_max: int) -> pd.DataFrame:
    """Every (size, k <= k_max) with its predicted loss and cost k * expert + merge."""
    rows = []
    for size, law in laws.items():
        c = costs[size]
        for k in range(1, k_max + 1):
            rows.append({"size": size, "k": k, "loss": float(law_value(law, k)),
                         "cost": k * c["expert"] + c["merge"]})
    return pd.DataFrame(rows, columns=["size", "k", "loss", "cost"])


def cheapest_for_target(laws: Mapping[str, Mapping], costs: Mapping[str, Mapping], target: float,
                        k_max: int) -> dict:
    """The cheapest (size, k) with predicted L(k) <= target, k <= k_max.

    Per size the cheapest is its ``experts_needed`` (cost rises with k); ties in cost go to
    the lower loss.  Returns ``{"best": {...} | None, "per_size": [...]}``."""
    per = []
    for size, law in laws.items():
        k = experts_needed(law, target, k_max=k_max)
        c = costs[size]
        per.append({"size": size, "k": k,
                    "loss": None if k is None else float(law_value(law, k)),
                    "cost": None if k is None else k * c["expert"] + c["merge"]})
    ok = [p for p in per if p["k"] is not None]
    best = min(ok, key=lambda p: (p["cost"], p["loss"])) if ok else None
    return {"target": float(target), "best": best, "per_size": per}


def best_for_budget(laws: Mapping[str, Mapping], costs: Mapping[str, Mapping], budget: float,
                    k_max: int) -> dict:
    """The lowest predicted loss affordable with ``budget``: per size the largest k with
    k * expert + merge <= budget (capped at k_max; the law falls with k when A > 0, else
    k = 1).  Returns ``{"best": {...} | None, "per_size": [...]}``."""
    per = []
    for size, law in laws.items():
        c = costs[size]
        kk = math.floor((budget - c["merge"]) / c["expert"] + 1e-12) if c["expert"] > 0 else k_max
        kk = min(kk, k_max)
        if kk < 1:
            per.append({"size": size, "k": None, "loss": None, "cost": None})
            continue
        ks = np.arange(1, kk + 1)
        vals = law_value(law, ks)
        j = int(np.argmin(vals))
        per.append({"size": size, "k": int(ks[j]), "loss": float(vals[j]),
                    "cost": float(ks[j] * c["expert"] + c["merge"])})
    ok = [p for p in per if p["k"] is not None]
    best = min(ok, key=lambda p: (p["loss"], p["cost"])) if ok else None
    return {"budget": float(budget), "best": best, "per_size": per}


# --------------------------------------------------------------------------------------
# Method comparison
# --------------------------------------------------------------------------------------


def compare_methods(values: pd.DataFrame, n_se: float = 2.0) -> pd.DataFrame:
    """Per (size, k >= 1): the method with the lowest mean view value and whether its lead
    over the runner-up exceeds the noise.

    ``values``: per-subset values (``laws.per_subset_values``).  The difference
    runner-up - best is paired over the subsets both methods share (the default grid merges
    the same subsets with every method); without shared subsets, two-sample (Welch) SE.
    ``significant``: diff - n_se * se > 0; with one subset (k = M) there is no SE and
    ``significant`` is None.
    """
    rows = []
    for (params, size, k), g in values[values["k"] >= 1].groupby(["params", "size", "k"], sort=True):
        means = g.groupby("method")["value"].mean().sort_values(kind="mergesort")
        if len(means) < 2:
            continue
        best, second = means.index[0], means.index[1]
        a = g[g["method"] == best].set_index("subset")["value"]
        c = g[g["method"] == second].set_index("subset")["value"]
        shared = a.index.intersection(c.index)
        if len(shared) >= 1 and len(shared) == len(a) == len(c):
            d = (c.loc[shared] - a.loc[shared]).to_numpy()
            diff, n = float(d.mean()), d.size
            se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            pairing = "paired"
        else:
            diff = float(c.mean() - a.mean())
            n = min(len(a), len(c))
            se = (float(math.sqrt(a.var(ddof=1) / len(a) + c.var(ddof=1) / len(c)))
                  if len(a) > 1 and len(c) > 1 else float("nan"))
            pairing = "unpaired"
        sig = None if not math.isfinite(se) else bool(diff - n_se * se > 0)
        rows.append({"size": str(size), "params": int(params), "k": int(k), "best": best,
                     "best_mean": float(means.iloc[0]), "runner_up": second,
                     "runner_up_mean": float(means.iloc[1]), "diff": diff, "se": se,
                     "n": int(n), "pairing": pairing, "significant": sig})
    return pd.DataFrame(rows, columns=["size", "params", "k", "best", "best_mean", "runner_up",
                                       "runner_up_mean", "diff", "se", "n", "pairing",
                                       "significant"])
