"""Planning from the fitted merging laws (arXiv 2509.24244: the planning quantities derived from
its Eqs. 3-4, App. J).

Pure functions on one per-size law ``{"L_inf", "A", "b"}`` (L(k) = L_inf + A/(k+b)):

* ``experts_needed``: smallest integer k >= 1 with L(k) <= target (None when the floor
  L_inf is not below the target, or when k would exceed ``k_max``);
* ``k_epsilon``: k_eps = A/eps - b (App. J.1; the tail above the floor is <= eps), rounded up,
  and ``k_marginal``: the first k whose marginal gain L(k) - L(k+1) is below eps;
* ``k_fraction``: k80 / k90 on the fitted curve or on the measured monotone envelope;
* ``three_point_forecast``: the law through k in {1, 2, 4} only, forecast at k = 1..M;
* ``budget_options`` / ``cheapest_for_target`` / ``best_for_budget``: (size, k) trade-offs;
* ``compare_methods``: the best method per (size, k), paired over shared subsets;
* ``unified_rows`` / ``variance_rows``: the unified law (with intervals) and the variance
  laws of the plan's view, from the fits file (or fitted here).

The fits file is read as typed ``laws.Fits`` (``laws.load_fits``); the plan fits with its
weights and loss (least squares or Huber) (``fit_choice``) and says which.

``write_plan`` runs all of them on a losses table and writes ``plan.md`` and ``plan.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mergelaws import io
from mergelaws.laws import (
    DEFAULT_B_BOUNDS,
    HUBER_TUNING,
    PARAMS,
    UNIFIED_PARAMS,
    Fits,
    as_fits,
    bootstrap_draws,
    check_loss,
    fit_per_size,
    fit_unified,
    fit_variance,
    holdout_errors,
    jsonable,
    per_subset_values,
    pool_sizes,
    summarise_draws,
    view_table,
)

__all__ = [
    "law_value",
    "experts_needed",
    "k_epsilon",
    "k_marginal",
    "k_fraction",
    "three_point_forecast",
    "expert_costs",
    "budget_options",
    "cheapest_for_target",
    "best_for_budget",
    "compare_methods",
    "auto_targets",
    "fit_choice",
    "unified_rows",
    "variance_rows",
    "build_plan",
    "render_markdown",
    "write_plan",
]


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


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def auto_targets(table: pd.DataFrame, laws: Mapping[tuple[str, str], Mapping],
                 method: str) -> dict[str, float]:
    """Per size: midway between the measured k = 1 mean and the fitted floor of ``method``."""
    out = {}
    for size, h in table[table["method"] == method].groupby("size", sort=False):
        law = laws.get((size, method))
        m1 = h.loc[h["k"] == 1, "mean"]
        if law is None or m1.empty or not math.isfinite(law["L_inf"]):
            continue
        out[str(size)] = float((m1.iloc[0] + law["L_inf"]) / 2.0)
    return out


def _laws_from_fits(fits: Fits | None, view: str) -> dict[tuple[str, str], dict]:
    laws = {}
    for f in fits.per_size_of(view) if fits else []:
        if f.converged:
            laws[(str(f.size), str(f.method))] = {"L_inf": f.L_inf, "A": f.A, "b": f.b}
    return laws


def _pct(v: np.ndarray, q: float):
    v = np.asarray(v, dtype=float)
    if v.size == 0:
        return None
    x = float(np.percentile(v, q, method="inverted_cdf"))  # an actual replicate's value
    return None if not math.isfinite(x) else int(x)


def fit_choice(fits: Fits | Mapping | None, weights: str | None = None, loss: str | None = None,
               f_scale: float | None = None) -> dict:
    """The weights / loss the plan fits with: given values, else the fits file's settings,
    else the defaults (weights "k", least squares)."""
    fits = as_fits(fits)
    st = fits.settings if fits else {}
    out = {"weights": weights or st.get("weights") or "k",
           "loss": loss or st.get("loss") or "linear",
           "f_scale": f_scale if f_scale is not None else st.get("f_scale")}
    check_loss(out["loss"], out["f_scale"])
    return out


def _describe_fit_choice(c: Mapping) -> str:
    w = {"k": "weights ∝ k on squared residuals (the paper's)",
         "sem": "weights 1/sem² on squared residuals", "none": "unweighted"}.get(c["weights"], c["weights"])
    if c["loss"] == "huber":
        t = (f"threshold {c['f_scale']:g} nats" if c.get("f_scale") is not None else
             f"threshold {HUBER_TUNING} × a robust (MAD) sd of the residuals")
        return f"Huber loss (IRLS, {t}), {w}"
    return f"least squares, {w}"


def variance_rows(table: pd.DataFrame, fits: Fits | Mapping | None, view: str,
                  pools: Mapping | None = None) -> list[dict]:
    """The variance-law fits of ``view`` per (size, method): from ``fits.variance`` where
    present, else fitted here (``laws.fit_variance``; M from ``pools`` or the largest k)."""
    fits = as_fits(fits)
    have = {(str(f.size), str(f.method)): f for f in (fits.variance_of(view) if fits else [])}
    rows = []
    for (params, size, method), h in table.groupby(["params", "size", "method"], sort=True):
        f = have.get((str(size), str(method)))
        if f is None:
            M = (pools or {}).get((str(size), str(method))) or int(h["k"].max())
            f = fit_variance(h["k"].to_numpy(), h["var"].to_numpy(), M=M if M >= 2 else None,
                             n_subsets=h["n_subsets"].to_numpy())
        rows.append({"size": str(size), "method": str(method),
                     **{k: getattr(f, k) for k in ("M", "C_inv_k", "r2_inv_k", "C_finite_pool",
                                                   "r2_finite_pool", "loglog_slope", "better",
                                                   "n_points", "reason")}})
    return rows


def unified_rows(table: pd.DataFrame, fits: Fits | Mapping | None, view: str,
                 choice: Mapping) -> list[dict]:
    """The unified law of ``view`` per method, with its bootstrap intervals when the fits
    file has them (otherwise fitted here, without intervals)."""
    fits = as_fits(fits)
    have = {str(f.method): f for f in (fits.unified_of(view) if fits else [])}
    rows = []
    for method, g in table[table["k"] >= 1].groupby("method", sort=True):
        f = have.get(str(method))
        if f is None:
            g = g.sort_values(["params", "k"])
            f = fit_unified(g["params"].to_numpy() / 1e9, g["k"].to_numpy(), g["mean"].to_numpy(),
                            weights=choice["weights"], sem=g["sem"].to_numpy(),
                            loss=choice["loss"], f_scale=choice["f_scale"])
        ci = f.ci or {}
        row = {"method": str(method), "converged": bool(f.converged), "r2": f.r2,
               "rmse": f.rmse, "at_bound": list(f.at_bound or []),
               "n_boot": int(f.n_boot or 0), "reason": f.reason}
        for name in UNIFIED_PARAMS:
            iv = ci.get(name)
            row[name] = getattr(f, name)
            row[f"{name}_lo"] = iv.lo if iv else None
            row[f"{name}_hi"] = iv.hi if iv else None
        rows.append(row)
    return rows


def build_plan(losses: pd.DataFrame, fits: Fits | Mapping | None = None, targets=None, eps: float = 0.01,
               costs: Mapping | None = None, view: str = "cross_domain", n_boot: int = 200,
               seed: int = 0, reference_method: str | None = None, merge_fraction: float = 0.1,
               budgets: Sequence[float] | None = None, k_max: int | None = None,
               weights: str | None = None, loss: str | None = None,
               f_scale: float | None = None) -> dict:
    """Everything in the plan, as a JSON-serialisable dict (see ``write_plan``)."""
    fits = as_fits(fits)
    choice = fit_choice(fits, weights, loss, f_scale)
    table = view_table(losses, [view])
    if table.empty:
        raise ValueError(f"no rows for view {view!r}")
    values = per_subset_values(losses, view)
    sizes = table[["params", "size"]].drop_duplicates().sort_values("params")
    size_order = [str(s) for s in sizes["size"]]
    params = {str(s): int(p) for p, s in zip(sizes["params"], sizes["size"])}
    methods = sorted(table["method"].unique())
    M = int(table["k"].max())
    k_cap = M if k_max is None else int(k_max)
    ref = reference_method or ("average" if "average" in methods else methods[0])

    points, draws = bootstrap_draws(losses, view, n_boot=n_boot, seed=seed,
                                    weights=choice["weights"], loss=choice["loss"],
                                    f_scale=choice["f_scale"])
    boot = summarise_draws(points, draws)
    laws = _laws_from_fits(fits, view)
    source = "fits" if laws else "refit"
    for _, p in points.iterrows():  # fill in anything the fits file lacks
        key = (p["size"], p["method"])
        if key not in laws and p["converged"]:
            laws[key] = {"L_inf": p["L_inf"], "A": p["A"], "b": p["b"]}

    # -- law table with intervals
    law_rows = []
    for size in size_order:
        for method in methods:
            law = laws.get((size, method))
            if law is None:
                continue
            bs = boot[(boot["size"] == size) & (boot["method"] == method)].set_index("parameter")
            row = {"size": size, "method": method, **{k: float(v) for k, v in law.items()}}
            for name in PARAMS:
                row[f"{name}_lo"] = float(bs.loc[name, "lo"]) if name in bs.index else None
                row[f"{name}_hi"] = float(bs.loc[name, "hi"]) if name in bs.index else None
            row["frac_converged"] = float(bs["frac_converged"].iloc[0]) if len(bs) else None
            pt = points[(points["size"] == size) & (points["method"] == method)]
            row["r2"] = float(pt["r2"].iloc[0]) if len(pt) else None
            law_rows.append(row)

    # -- targets
    if targets is None:
        tmap = auto_targets(table, laws, ref)
        tsource = f"auto: midway between the measured k=1 mean and the fitted floor ({ref})"
    elif isinstance(targets, Mapping):
        tmap, tsource = {str(k): float(v) for k, v in targets.items()}, "given per size"
    elif isinstance(targets, (int, float)):
        tmap, tsource = {s: float(targets) for s in size_order}, "given (one for all sizes)"
    else:
        tlist = [float(t) for t in targets]
        tmap, tsource = {s: t for s, t in zip(size_order, tlist)}, "given (list, by size order)"

    need_rows = []
    for size in size_order:
        if size not in tmap:
            continue
        t = tmap[size]
        for method in methods:
            law = laws.get((size, method))
            if law is None:
                continue
            d = draws[(draws["size"] == size) & (draws["method"] == method) & draws["converged"].astype(bool)]
            ks = [experts_needed(r, t) for r in d[["L_inf", "A", "b"]].to_dict("records")]
            arr = np.array([np.inf if v is None else v for v in ks], dtype=float)
            need_rows.append({"size": size, "method": method, "target": t,
                              "k": experts_needed(law, t), "k_lo": _pct(arr, 2.5),
                              "k_hi": _pct(arr, 97.5),
                              "frac_unreachable": float(np.mean(~np.isfinite(arr))) if arr.size else None,
                              "within_pool": (experts_needed(law, t) or 10**9) <= M})

    # -- saturation and fractional return
    sat_rows = []
    for size in size_order:
        for method in methods:
            law = laws.get((size, method))
            if law is None:
                continue
            h = table[(table["size"] == size) & (table["method"] == method) & (table["k"] >= 1)].sort_values("k")
            fitted = k_fraction(law_value(law, np.arange(1, M + 1)))
            measured = k_fraction(h["mean"].to_numpy(), h["k"].to_numpy())
            ke = k_epsilon(law, eps)
            sat_rows.append({"size": size, "method": method, **ke, "k_marginal": k_marginal(law, eps),
                             "k80_fit": fitted["k80"], "k90_fit": fitted["k90"],
                             "k80_env": measured["k80"], "k90_env": measured["k90"]})

    # -- three-point forecasts
    tp_rows = []
    for size in size_order:
        for method in methods:
            h = table[(table["size"] == size) & (table["method"] == method) & (table["k"] >= 1)]
            r = three_point_forecast(h["k"].to_numpy(), h["mean"].to_numpy(), M=M)
            tp_rows.append({"size": size, "method": method, **{k: v for k, v in r.items() if k != "forecast"},
                            "forecast": r.get("forecast")})

    hold = holdout_errors(losses, view, weights=choice["weights"], loss=choice["loss"],
                          f_scale=choice["f_scale"])
    var_rows = variance_rows(table, fits, view, pool_sizes(losses))
    uni_rows = unified_rows(table, fits, view, choice)

    # -- budget (reference method)
    cst = expert_costs(params, costs, merge_fraction)
    ref_laws = {s: laws[(s, ref)] for s in size_order if (s, ref) in laws}
    budget_targets = [tmap[s] for s in size_order if s in tmap]
    cheapest = [cheapest_for_target(ref_laws, cst, t, k_cap) for t in budget_targets]
    if budgets is None:
        mid = size_order[len(size_order) // 2]
        budgets = [M * cst[mid]["expert"] + cst[mid]["merge"]]
    affordable = [best_for_budget(ref_laws, cst, float(B), k_cap) for B in budgets]

    cmp = compare_methods(values)
    plan = {
        "settings": {"view": view, "eps": eps, "M": M, "k_max": k_cap, "n_boot": n_boot,
                     "weights": choice["weights"], "loss": choice["loss"],
                     "f_scale": choice["f_scale"], "fit_choice": _describe_fit_choice(choice),
                     "seed": seed, "reference_method": ref, "targets": tsource,
                     "laws_from": source, "merge_fraction": merge_fraction,
                     "cost_unit": "one expert of the smallest size (default: cost ∝ params)"},
        "sizes": size_order, "params": params, "methods": methods,
        "laws": law_rows, "experts_needed": need_rows, "saturation": sat_rows,
        "three_point": tp_rows,
        "holdout": hold.to_dict("records"),
        "unified": uni_rows,
        "variance": var_rows,
        "costs": cst, "cheapest_for_target": cheapest, "best_for_budget": affordable,
        "recommendation": _recommend(cheapest, affordable, size_order, ref),
        "method_comparison": cmp.to_dict("records"),
    }
    return jsonable(plan)


def _recommend(cheapest: list, affordable: list, size_order: list, ref: str) -> list[str]:
    lines = []
    smallest = size_order[0] if size_order else None
    for c in cheapest:
        b = c["best"]
        if b is None:
            lines.append(f"Target {c['target']:.4f} ({ref}): no size reaches it within k_max.")
            continue
        others = [p for p in c["per_size"] if p["k"] is not None and p["size"] != b["size"]]
        alt = min(others, key=lambda p: p["cost"]) if others else None
        bigger = size_order.index(b["size"]) > 0 and (alt is None or
                                                     size_order.index(alt["size"]) < size_order.index(b["size"]))
        verdict = ("a larger base" if bigger and b["size"] != smallest else
                   "more experts on a smaller base" if alt is not None else "the only size that reaches it")
        alt_txt = (f"; next best {alt['size']} k={alt['k']} costs {alt['cost']:.2f}" if alt else
                   "; no other size reaches it")
        lines.append(f"Target L ≤ {c['target']:.4f} ({ref}): cheapest is {b['size']} with k={b['k']} "
                     f"(cost {b['cost']:.2f}, predicted {b['loss']:.4f}){alt_txt} → {verdict}.")
    for a in affordable:
        b = a["best"]
        if b is None:
            lines.append(f"Budget {a['budget']:.2f}: affords no merge.")
            continue
        lines.append(f"Budget {a['budget']:.2f} ({ref}): best is {b['size']} with k={b['k']} "
                     f"(predicted {b['loss']:.4f}, cost {b['cost']:.2f}); "
                     + ", ".join(f"{p['size']}: " + ("—" if p["k"] is None else f"k={p['k']} → {p['loss']:.4f}")
                                 for p in a["per_size"]) + ".")
    return lines


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _f(x, nd=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{nd}f}"


def _g(x, sig=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) < 1e-9:  # a parameter pinned at a zero bound (e.g. gamma ~ 1e-30)
        return "0"
    return f"{x:.{sig}g}"


def _ci(row: Mapping, name: str) -> str:
    est, lo, hi = row.get(name), row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None or hi is None:
        return _g(est)
    return f"{_g(est)} [{_g(lo)}, {_g(hi)}]"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(plan: Mapping) -> str:
    s = plan["settings"]
    M = s["M"]
    parts = [f"# Merging plan ({s['view']} view)",
             f"Per-size law L(k) = L∞ + A/(k+b) per (size, method), laws from {s['laws_from']}; "
             f"intervals are 95% percentile bootstraps over subsets within each k "
             f"({s['n_boot']} replicates, seed {s['seed']}). Pool M = {M}; ε = {s['eps']}. "
             f"Every law of the mean loss is fitted by {s.get('fit_choice', 'least squares')}."]

    parts.append("## Fitted laws")
    parts.append(_table(["size", "method", "L∞ [95%]", "A [95%]", "b [95%]", "R²"], [
        [r["size"], r["method"], f"{_f(r['L_inf'])} [{_f(r['L_inf_lo'])}, {_f(r['L_inf_hi'])}]",
         f"{_f(r['A'])} [{_f(r['A_lo'])}, {_f(r['A_hi'])}]",
         f"{_f(r['b'], 2)} [{_f(r['b_lo'], 2)}, {_f(r['b_hi'], 2)}]", _f(r["r2"])]
        for r in plan["laws"]]))
    parts.append("The floor L∞ is pinned to a few thousandths; A and b trade off against each other, "
                 "so their intervals are wide where b is free.")

    uni = plan.get("unified") or []
    if uni:
        with_ci = any(r["n_boot"] for r in uni)
        parts.append("## Unified law L(N, k) = L* + B·N^−β + A0·N^−γ/(k+b)")
        parts.append(_table(["method", "L*", "B", "β", "A0", "γ", "b", "R²", "at a bound"], [
            [r["method"]] + [_ci(r, name) for name in UNIFIED_PARAMS]
            + [_f(r["r2"], 3), ", ".join(r["at_bound"]) or "—"] if r["converged"] else
            [r["method"]] + ["—"] * 6 + ["—", r.get("reason") or "not converged"] for r in uni]))
        parts.append("N in billions of parameters; one fit per method over every size and k ≥ 1"
                     + (f"; [95%] bootstrap intervals, {uni[0]['n_boot']} replicates resampling "
                        "subsets within each (size, k)." if with_ci else
                        "; no intervals (no bootstrap in the fits)."))

    parts.append("## Experts needed for a target loss")
    parts.append(f"Targets: {s['targets']}.")
    parts.append(_table(["size", "method", "target", "k", "k [95%]", "unreachable in boot"], [
        [r["size"], r["method"], _f(r["target"]), _f(r["k"]),
         f"[{_f(r['k_lo'])}, {'∞' if r['k_hi'] is None and (r['frac_unreachable'] or 0) > 0.025 else _f(r['k_hi'])}]",
         f"{100 * (r['frac_unreachable'] or 0):.0f}%"] for r in plan["experts_needed"]]))
    parts.append("k is the smallest integer with L(k) ≤ target on the fitted law; the interval is "
                 "the same question asked of each bootstrap refit (∞ = floor above the target).")

    parts.append("## Saturation and fractional return")
    parts.append(_table(["size", "method", "k_ε = A/ε − b", "k_ε (↑)", "first Δ_k < ε",
                         "k80 / k90 (fit)", "k80 / k90 (measured envelope)"], [
        [r["size"], r["method"], _f(r["k_eps_value"], 1), _f(r["k_eps"]), _f(r["k_marginal"]),
         f"{_f(r['k80_fit'])} / {_f(r['k90_fit'])}", f"{_f(r['k80_env'])} / {_f(r['k90_env'])}"]
        for r in plan["saturation"]]))
    parts.append(f"k_ε (App. J.1) is where the tail A/(k+b) above the floor falls to ε = {s['eps']}; "
                 f"Δ_k < ε is where one more expert gains less than ε; k80/k90 are the first k "
                 f"with 80/90% of the k = 1 → {M} improvement.")

    parts.append("## Three-point forecast (fit on k = 1, 2, 4)")
    parts.append(_table(["size", "method", "exact", "L∞", "A", "b", "MAE (other k)",
                         "max rel. err", f"error at k={M}"], [
        [r["size"], r["method"], _f(r.get("exact")), _f(r.get("L_inf")), _f(r.get("A")),
         _f(r.get("b"), 2), _f(r.get("mae")), _f(r.get("max_rel_err")), _f(r.get("err_at_M"))]
        for r in plan["three_point"]]))
    parts.append("Three measured means determine the law; the errors are against the measured "
                 "means at the k not used.")

    hk = [r for r in plan["holdout"] if r["kind"] == "k_extrapolation"]
    hs = [r for r in plan["holdout"] if r["kind"] == "size_extrapolation"]
    parts.append("## Hold-out: fit k ≤ 4, predict the rest")
    parts.append(_table(["size", "method", "predict k", "MAE", "max rel. err", f"error at k={M}"], [
        [r["size"], r["method"], r["predict_k"], _f(r.get("mae")), _f(r.get("max_rel_err")),
         _f(r.get("err_at_M"))] for r in hk]))
    if hs:
        parts.append("## Held-out size: unified law fitted without the largest size")
        reasons = {r.get("reason") for r in hs if r.get("reason")}
        if reasons and not any(r.get("converged") for r in hs):
            parts.append(f"Held-out size ({hs[0]['size']}): " + "; ".join(sorted(reasons)) + ".")
        else:
            parts.append(_table(["held-out size", "method", "MAE", "RMSE", "in-sample RMSE",
                                 "max rel. err", f"error at k={M}"], [
                [r["size"], r["method"], _f(r.get("mae")), _f(r.get("rmse")),
                 _f(r.get("insample_rmse")), _f(r.get("max_rel_err")), _f(r.get("err_at_M"))]
                if r.get("converged") else [r["size"], r["method"], r.get("reason") or "—", "", "", "", ""]
                for r in hs]))
            parts.append("Errors of the prediction of the largest size's curve (k ≥ 1) from the "
                         "smaller sizes; in-sample RMSE = the all-size fit on the same points.")

    var = plan.get("variance") or []
    if var:
        parts.append("## Variance across subsets")
        parts.append(_table(["size", "method", "C (C/k)", "R²", "M", "C (finite pool)", "R²",
                             "log–log slope"], [
            [r["size"], r["method"], _g(r.get("C_inv_k")), _f(r.get("r2_inv_k"), 3),
             _f(r.get("M")), _g(r.get("C_finite_pool")), _f(r.get("r2_finite_pool"), 3),
             _f(r.get("loglog_slope"), 2)] for r in var]))
        parts.append("Corollary 3.2 predicts Var ∝ 1/k (log–log slope −1); drawing k of a fixed pool "
                     "of M experts without replacement gives C·(M−k)/(k·(M−1)), which is 0 at k = M. "
                     "Unweighted least squares on k with ≥ 2 subsets.")

    parts.append(f"## Budget ({s['reference_method']})")
    parts.append("Cost of (size, k) = k × expert + merge; unit = " + s["cost_unit"]
                 + f"; merge + eval = {s['merge_fraction']} × the size's expert; k ≤ {s['k_max']}.")
    parts.append(_table(["size", "expert", "merge + eval"], [
        [sz, _f(c["expert"], 2), _f(c["merge"], 2)] for sz, c in plan["costs"].items()]))
    parts.append("\n".join(f"- {line}" for line in plan["recommendation"]))

    parts.append("## Methods at matched k")
    cmp = plan["method_comparison"]
    sizes = plan["sizes"]
    ks = sorted({r["k"] for r in cmp})
    cell = {(r["size"], r["k"]): r for r in cmp}

    def fmt(r):
        if r is None:
            return "—"
        mark = "" if r["significant"] is None else ("*" if r["significant"] else "")
        se = "n=1" if r["se"] is None else f"±{2 * r['se']:.4f}"
        return f"{r['best']}{mark} (+{r['diff']:.4f} {se} vs {r['runner_up']})"

    parts.append(_table(["k"] + sizes, [[k] + [fmt(cell.get((sz, k))) for sz in sizes] for k in ks]))
    n_sig = sum(1 for r in cmp if r["significant"])
    parts.append(f"Best method per (size, k) by mean loss, with the runner-up's excess (paired over "
                 f"shared subsets, ± 2 SE); * = the lead exceeds 2 SE ({n_sig} of {len(cmp)} cells).")
    return "\n\n".join(parts) + "\n"


def write_plan(losses: pd.DataFrame, fits: Fits | Mapping | None, out_dir, targets=None, eps: float = 0.01,
               costs: Mapping | None = None, **kwargs) -> list[Path]:
    """Write ``plan.md`` and ``plan.json`` to ``out_dir`` (atomically); returns their paths.

    ``fits``: the ``Fits`` of ``laws.fit_all`` or ``laws.load_fits`` (or a fits.json
    mapping), whose per-size fits of ``view`` are the point estimates (missing ones are
    refitted), or None.  ``targets``: None (per size, midway
    between the measured k = 1 mean and the fitted floor of the reference method), a number,
    a ``{size: target}`` dict or a list in size order.  ``costs``: per size, an expert cost
    or ``{"expert": .., "merge": ..}`` (default ∝ params).  Other keyword arguments go to
    ``build_plan`` (view, n_boot, seed, reference_method, merge_fraction, budgets, k_max, and
    weights / loss / f_scale, which default to the fits file's settings).
    """
    plan = build_plan(losses, fits, targets=targets, eps=eps, costs=costs, **kwargs)
    out = Path(out_dir)
    md, js = out / "plan.md", out / "plan.json"
    io.write_text(js, json.dumps(plan, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    io.write_text(md, render_markdown(plan))
    return [md, js]
