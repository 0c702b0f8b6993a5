"""The whole plan as one JSON-serialisable dict (:func:`build_plan`), from a losses table and
the fits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mergelaws.laws import (
    DEFAULT_INTERVAL,
    HUBER_TUNING,
    PARAMS,
    UNIFIED_PARAMS,
    Fits,
    as_fits,
    bootstrap_draws,
    check_interval,
    check_loss,
    fit_unified,
    fit_variance,
    holdout_errors,
    jsonable,
    per_subset_values,
    pool_sizes,
    summarise_draws,
    view_table,
)
from mergelaws.plan.answers import (
    best_for_budget,
    cheapest_for_target,
    compare_methods,
    expert_costs,
    experts_needed,
    k_epsilon,
    k_fraction,
    k_marginal,
    law_value,
    three_point_forecast,
)
from mergelaws.plan.design import design_rows
from mergelaws.plan.versus import versus_rows

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


# the columns of `mergelaws predict`'s comparison table the plan reports
THEORY_COLUMNS = ["size", "method", "variant", "spearman", "spearman_k2", "curve_mae", "drop_measured", "drop_predicted",
                  "A_fit_pred", "A_fit_meas", "L_inf_fit_pred", "L_inf_fit_meas", "variance_ratio",
                  "compute_fraction"]


def _laws_from_fits(fits: Fits | None, view: str) -> dict[tuple[str, str], dict]:
    laws = {}
    for f in fits.per_size_of(view) if fits else []:
        if f.converged:
            laws[(str(f.size), str(f.method))] = {"L_inf": f.L_inf, "A": f.A, "b": f.b}
    return laws


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two replicate columns; None with < 3 finite pairs or no spread."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _reach(k: int | None, measured: int, pool: int) -> dict:
    """Where an answer k lies: within the measured k, extrapolated beyond them, or beyond the
    pool of experts (more experts than exist)."""
    if k is None:
        return {"reach": None}
    return {"reach": "measured" if k <= measured else "extrapolated" if k <= pool else "beyond_pool"}


def _pct(v: np.ndarray, q: float):
    v = np.asarray(v, dtype=float)
    if v.size == 0:
        return None
    x = float(np.percentile(v, q, method="inverted_cdf"))  # an actual replicate's value
    return None if not math.isfinite(x) else int(x)


def fit_choice(fits: Fits | Mapping | None, weights: str | None = None, loss: str | None = None,
               f_scale: float | None = None, interval: str | None = None) -> dict:
    """The weights / loss / bootstrap interval the plan fits with: given values, else the fits
    file's settings, else the defaults (weights "k", least squares, parametric intervals)."""
    fits = as_fits(fits)
    st = fits.settings if fits else {}
    out = {"weights": weights or st.get("weights") or "k",
           "loss": loss or st.get("loss") or "linear",
           "f_scale": f_scale if f_scale is not None else st.get("f_scale"),
           "interval": interval or (st.get("bootstrap") or {}).get("interval") or DEFAULT_INTERVAL}
    check_interval(out["interval"])
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
        n = int(len(g))  # (size, k >= 1) means fitted
        row = {"method": str(method), "converged": bool(f.converged), "r2": f.r2,
               "n_points": n, "dof": n - len(UNIFIED_PARAMS),
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
               f_scale: float | None = None, multitask: pd.DataFrame | None = None,
               measured_costs: Mapping[str, Mapping] | None = None,
               theory: pd.DataFrame | None = None, interval: str | None = None) -> dict:
    """Everything in the plan, as a JSON-serialisable dict (see ``write_plan``).

    ``multitask``: the multitask reference's rows (:mod:`mergelaws.multitask`), for the merging
    vs multitask answers; ``measured_costs``: per size, measured seconds (``expert``, ``merge``,
    ``multitask``; :func:`mergelaws.compute.unit_costs`), for their compute fractions. When
    ``costs`` is given too it is taken as measured (the budget's unit is then seconds)."""
    fits = as_fits(fits)
    choice = fit_choice(fits, weights, loss, f_scale, interval)
    table = view_table(losses, [view])
    if table.empty:
        raise ValueError(f"no rows for view {view!r}")
    values = per_subset_values(losses, view)
    sizes = table[["params", "size"]].drop_duplicates().sort_values("params")
    size_order = [str(s) for s in sizes["size"]]
    params = {str(s): int(p) for p, s in zip(sizes["params"], sizes["size"])}
    methods = sorted(table["method"].unique())
    M = int(table["k"].max())  # the largest measured k
    pools = pool_sizes(losses)
    pool = max(pools.values()) if pools else M  # experts in the pool (>= M)
    measured_k = sorted(int(k) for k in table.loc[table["k"] >= 1, "k"].unique())
    k_cap = M if k_max is None else int(k_max)
    ref = reference_method or ("average" if "average" in methods else methods[0])

    n_boot = int(n_boot)
    points, draws = bootstrap_draws(losses, view, n_boot=max(n_boot, 1), seed=seed,
                                    weights=choice["weights"], loss=choice["loss"],
                                    f_scale=choice["f_scale"], interval=choice["interval"])
    if n_boot < 1:  # the point fits only: no intervals
        draws = draws.iloc[0:0]
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
            row["n_k"] = int(pt["n_k"].iloc[0]) if len(pt) else None
            # three parameters (L_inf, A, b): with as many k values the law passes through every
            # mean, and R² = 1 says nothing
            row["dof"] = None if row["n_k"] is None else row["n_k"] - len(PARAMS)
            d = draws[(draws["size"] == size) & (draws["method"] == method) & draws["converged"].astype(bool)]
            row["corr_A_b"] = _corr(d["A"].to_numpy(float), d["b"].to_numpy(float))
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
                              "within_pool": (experts_needed(law, t) or 10**9) <= M,
                              **_reach(experts_needed(law, t), M, pool)})

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
            d = draws[(draws["size"] == size) & (draws["method"] == method) & draws["converged"].astype(bool)]
            kes = [k_epsilon(r, eps)["k_eps"] for r in d[["L_inf", "A", "b"]].to_dict("records")]
            kes = np.array([np.inf if v is None else v for v in kes], dtype=float)
            ke.update(k_eps_lo=_pct(kes, 2.5), k_eps_hi=_pct(kes, 97.5), **_reach(ke["k_eps"], M, pool))
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

    versus = []
    if multitask is not None and len(multitask):
        # like for like: the multitask model's macro mean over all domains against views that
        # also average every domain (not in_domain, a subset's own domains, nor held_out)
        vt, vl, vd = {}, {}, {}
        if view not in ("in_domain", "held_out"):
            vt, vl, vd = {view: table}, {view: laws}, {view: draws}
        other = "cross_domain"
        t2 = view_table(losses, [other]) if other not in vt else pd.DataFrame()
        if not t2.empty:
            p2, d2 = bootstrap_draws(losses, other, n_boot=max(n_boot, 1), seed=seed,
                                     weights=choice["weights"], loss=choice["loss"],
                                     f_scale=choice["f_scale"], interval=choice["interval"])
            l2 = _laws_from_fits(fits, other)
            for _, p in p2[p2["converged"].astype(bool)].iterrows():
                l2.setdefault((p["size"], p["method"]), {"L_inf": p["L_inf"], "A": p["A"], "b": p["b"]})
            vt[other], vl[other], vd[other] = t2, l2, d2.iloc[0:0] if n_boot < 1 else d2
        versus = versus_rows(multitask, vt, vl, vd, measured_costs, M, pool)

    cmp = compare_methods(values)
    plan = {
        "settings": {"view": view, "eps": eps, "M": M, "pool": pool, "measured_k": measured_k,
                     "k_max": k_cap, "n_boot": n_boot,
                     "weights": choice["weights"], "loss": choice["loss"],
                     "f_scale": choice["f_scale"], "fit_choice": _describe_fit_choice(choice),
                     "interval": choice["interval"],
                     "seed": seed, "reference_method": ref, "targets": tsource,
                     "laws_from": source, "merge_fraction": merge_fraction,
                     "cost_unit": ("wall seconds, measured by the jobs' benchmark files (compute.csv)"
                                   if costs is not None and measured_costs is not None else
                                   "one expert of the smallest size (default: cost ∝ params)"),
                     "costs_measured": costs is not None and measured_costs is not None},
        "sizes": size_order, "params": params, "methods": methods,
        "laws": law_rows, "experts_needed": need_rows, "saturation": sat_rows,
        "three_point": tp_rows,
        "holdout": hold.to_dict("records"),
        "unified": uni_rows,
        "variance": var_rows,
        "design": design_rows(table, laws, var_rows, ref),
        "costs": cst, "cheapest_for_target": cheapest, "best_for_budget": affordable,
        "recommendation": _recommend(cheapest, affordable, size_order, ref),
        "method_comparison": cmp.to_dict("records"),
        "versus_multitask": versus,
        "theory": ([] if theory is None else
                   theory[[c for c in THEORY_COLUMNS if c in theory.columns]].to_dict("records")),
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
