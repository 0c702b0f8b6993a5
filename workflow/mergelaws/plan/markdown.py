"""plan.md: the plan dict rendered as Markdown; every sentence is built from the numbers it
describes."""

from __future__ import annotations

import math
from collections.abc import Mapping


from mergelaws.laws import (
    UNIFIED_PARAMS,
)

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
