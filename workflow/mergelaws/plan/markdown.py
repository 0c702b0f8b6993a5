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


# how each kind of bootstrap interval draws its replicates (fit.interval)
_INTERVAL_TEXT = {
    "parametric": ("drawing each k's mean from the fitted law with the noise of the size's variance "
                   "law (parametric; calibrated also where a k holds one subset)"),
    "subsets": "resampling the merged subsets within each k",
}


def _krange(ks: list[int]) -> str:
    """1..9, or 1, 2, 4 where the measured k are not consecutive."""
    if not ks:
        return "none"
    if ks == list(range(ks[0], ks[-1] + 1)) and len(ks) > 2:
        return f"{ks[0]}..{ks[-1]}"
    return ", ".join(str(k) for k in ks)


def _est(r: Mapping, name: str, nd: int = 4) -> str:
    """The estimate with its interval where there is one."""
    lo, hi = r.get(f"{name}_lo"), r.get(f"{name}_hi")
    return _f(r[name], nd) + ("" if lo is None and hi is None else f" [{_f(lo, nd)}, {_f(hi, nd)}]")


def _r2(r2, dof) -> str:
    """R², or why it says nothing: with no degrees of freedom the law passes through every point."""
    if dof is not None and dof <= 0:
        return f"— (exact fit, {dof} dof)"
    return _f(r2)


def _k_interval(r: Mapping, name: str) -> str:
    """[lo, hi] of a bootstrap interval on an integer k; ∞ where > 2.5% of refits never get there;
    '' without bootstrap."""
    lo, hi = r.get(f"{name}_lo"), r.get(f"{name}_hi")
    if lo is None and hi is None and r.get("frac_unreachable") is None:
        return ""
    unreachable = r.get("frac_unreachable")
    top = "∞" if hi is None and (unreachable is None or unreachable > 0.025) else _f(hi)
    return f"[{_f(lo)}, {top}]"


def _reach_note(r: Mapping, M: int, pool: int) -> str:
    return {"extrapolated": f"extrapolated beyond the measured k ≤ {M}",
            "beyond_pool": f"beyond the pool of {pool} experts"}.get(r.get("reach"), "")


def _reach_summary(rows: list[Mapping], what: str, M: int, pool: int) -> str | None:
    ext = [r for r in rows if r.get("reach") in ("extrapolated", "beyond_pool")]
    if not ext:
        return None
    beyond = sum(r.get("reach") == "beyond_pool" for r in ext)
    return (f"**{len(ext)} of {len(rows)} {what} extrapolate beyond the measured k ≤ {M}**"
            + (f", {beyond} of them beyond the pool of {pool} experts (more experts than exist)"
               if beyond else "") + "; they rest on the law's form, not on measurements: read "
            "their intervals.")


def _median(xs) -> float:
    xs = sorted(float(x) for x in xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _interval_sentence(laws: list[Mapping]) -> str:
    """What the intervals of the law table say, from their numbers."""
    with_ci = [r for r in laws if r.get("L_inf_lo") is not None and r.get("L_inf_hi") is not None]
    if not with_ci:
        return "No intervals (n_boot = 0): the table gives point fits only."
    hw = [(0.5 * (r["L_inf_hi"] - r["L_inf_lo"]), r) for r in with_ci]
    widest = max(hw, key=lambda t: t[0])
    out = [f"The 95% interval of the floor L∞ has a half-width of {_g(_median(h for h, _ in hw))} "
           f"nats (median over {len(hw)} laws; widest ±{_g(widest[0])} at {widest[1]['size']} "
           f"{widest[1]['method']})."]
    rel = [(r["A_hi"] - r["A_lo"]) / abs(r["A"]) for r in with_ci
           if r.get("A_lo") is not None and r.get("A_hi") is not None and r.get("A")]
    if rel:
        out.append(f"A's interval spans {100 * _median(rel):.0f}% of its estimate (median).")
    cs = [r["corr_A_b"] for r in with_ci if r.get("corr_A_b") is not None]
    if cs:
        c = _median(cs)
        out.append(f"A and b {'trade off against each other' if c > 0.5 else 'are only weakly tied'} "
                   f"across bootstrap replicates (median correlation {c:.2f})"
                   + (", so their intervals widen together where b is free." if c > 0.5 else "."))
    return " ".join(out)


def _versus_section(vs: list[Mapping], s: Mapping, M: int, pool: int) -> list[str]:
    """Merging vs the multitask model: the table and sentences computed from its rows."""
    out = ["## Merging vs the multitask model"]
    boot = bool(s["n_boot"])
    measured = any(r.get("fraction") is not None for r in vs)
    head = ["view", "size", "method", "multitask", "best merge (k)", "k measured", "k (law)"]
    head += ["k [95%]"] if boot else []
    head += ["merging / multitask compute"] if measured else []
    rows = []
    for r in vs:
        row = [r["view"], r["size"], r["method"], _f(r["multitask_loss"]),
               f"{_f(r['best_merge_loss'])} ({r['best_merge_k']})",
               _f(r["k_measured"]) if r["k_measured"] is not None else f"not within k ≤ {M}",
               _f(r["k_law"]) + (f" ({_reach_note(r, M, pool)})" if _reach_note(r, M, pool) else "")]
        row += [_k_interval(r, "k")] if boot else []
        row += [("—" if r["fraction"] is None else f"{100 * r['fraction']:.0f}%")] if measured else []
        rows.append(row)
    out.append(_table(head, rows))
    out.append("The multitask model is one model per size fine-tuned on every domain's train split with "
               "the experts' trainer; its loss is the macro mean over all domains, compared with views "
               "that also average every domain (not in_domain, where a merge is scored on its own "
               "domains only); k "
               "measured = the first k whose mean merge loss is at or below it; k (law) = the same "
               "question on the fitted law" + ("; the interval asks it of every bootstrap refit"
                                              if boot else "") + ".")
    ref = s["reference_method"]
    main = [r for r in vs if r["view"] == vs[0]["view"] and r["method"] == ref]
    bullets = []
    for r in main:
        if r["k_measured"] is not None:
            txt = (f"{r['size']}: {ref} merging matches the multitask model ({_f(r['multitask_loss'])}) "
                   f"from k = {r['k_measured']}")
            if r.get("fraction") is not None:
                txt += (f", at {100 * r['fraction']:.0f}% of its compute counting the {r['k_measured']} "
                        f"experts' training ({100 * r['fraction_merge_only']:.1f}% for the merge alone "
                        f"when the experts exist)")
        else:
            gap = r["best_merge_loss"] - r["multitask_loss"]
            txt = (f"{r['size']}: {ref} merging does not reach the multitask model "
                   f"({_f(r['multitask_loss'])}) within the {M} measured k: its best mean is "
                   f"{_f(r['best_merge_loss'])} at k = {r['best_merge_k']}, {_f(gap)} above")
            txt += ("; the law puts the crossing at k = " + _f(r["k_law"]) + f" ({_reach_note(r, M, pool)})"
                    if r["k_law"] is not None else "; the law's floor is above it, so no k reaches it")
        bullets.append("- " + txt + ".")
    if bullets:
        out.append("\n".join(bullets))
    return out


def _theory_section(th: list[Mapping]) -> list[str]:
    """The curve predicted from the experts alone (Theorem 3.1, `mergelaws predict`) against the
    sweep, with the sentences built from the rows."""
    out = ["## Predicted from the experts alone (Theorem 3.1)"]
    out.append(_table(["size", "method", "variant", "Spearman (k ≥ 2)", "curve MAE", "k = 1 → M drop pred / meas",
                       "A pred / meas", "L∞ pred / meas", "variance ratio", "compute / sweep"], [
        [r["size"], r["method"], r["variant"], f"{_f(r.get('spearman'), 3)} ({_f(r.get('spearman_k2'), 3)})",
         _f(r.get("curve_mae")),
         f"{_f(r.get('drop_predicted'), 3)} / {_f(r.get('drop_measured'), 3)}",
         f"{_f(r.get('A_fit_pred'), 3)} / {_f(r.get('A_fit_meas'), 3)}",
         f"{_f(r.get('L_inf_fit_pred'), 3)} / {_f(r.get('L_inf_fit_meas'), 3)}",
         _f(r.get("variance_ratio"), 2),
         "—" if r.get("compute_fraction") is None else f"{100 * r['compute_fraction']:.0f}%"] for r in th]))
    ok = [r for r in th if r.get("spearman") is not None and r.get("drop_measured")]
    good = [r for r in ok if r["spearman"] >= 0.95
            and abs(r["drop_predicted"] - r["drop_measured"]) <= 0.15 * abs(r["drop_measured"])]
    variants = sorted({r["variant"] for r in good})
    out.append(f"Per-subset Spearman correlation of predicted and measured loss, mean absolute error "
               f"of the predicted E[L | k], and the k = 1 → M drop; A and L∞ from the law fitted to "
               f"the predicted and to the measured means. {len(good)} of {len(ok)} rows reach "
               f"Spearman ≥ 0.95 with the drop within 15%"
               + (f" (variants: {', '.join(variants)})." if variants else ".")
               + (" The calibrated and weights variants use the measured k = 1 losses, so their drop "
                  "matches by construction: judge them by the k ≥ 2 Spearman and the curve error."
                  if any(r["variant"] in ("calibrated", "weights") for r in th) else ""))
    return out


def render_markdown(plan: Mapping) -> str:
    s = plan["settings"]
    M = s["M"]
    pool = s.get("pool") or M
    ks = s.get("measured_k") or list(range(1, M + 1))
    boot = (f"intervals are 95% bootstraps {_INTERVAL_TEXT.get(s.get('interval'), 'over subsets within each k')} "
            f"({s['n_boot']} replicates, seed {s['seed']})" if s["n_boot"] else
            "no intervals (n_boot = 0: point fits only)")
    parts = [f"# Merging plan ({s['view']} view)",
             f"Per-size law L(k) = L∞ + A/(k+b) per (size, method), laws from {s['laws_from']}; "
             f"{boot}. Measured k = {_krange(ks)} ({len(ks)} values) from a pool of M = {pool} "
             f"experts (those in the table's subsets); ε = {s['eps']}. "
             f"Every law of the mean loss is fitted by {s.get('fit_choice', 'least squares')}."]
    exact = [r for r in plan["laws"] if r.get("dof") is not None and r["dof"] <= 0]
    if exact:
        parts.append(f"**{len(exact)} of {len(plan['laws'])} per-size laws are exactly determined** "
                     f"(as many k values as the law's 3 parameters, 0 degrees of freedom): they "
                     f"pass through every mean and their R² = 1 says nothing; "
                     + ("only the intervals tell how well the data pin them" if s["n_boot"] else
                        "without intervals (n_boot = 0) nothing here tells how well the data pin "
                        "them") + ". Measure more k values to test the law.")

    rising = [r for r in plan["laws"] if r.get("A") is not None and r["A"] < 0]
    if rising:
        names = ", ".join(f"{r['size']} {r['method']} (A = {r['A']:.3g})" for r in rising)
        parts.append(f"**Loss rises with k for {len(rising)} of {len(plan['laws'])} laws** ({names}): "
                     f"A < 0, so L∞ + A/(k+b) is not a floor approached with diminishing returns but a "
                     f"curve fitted to a loss that grows as experts are added; read their L∞, A, b, k_ε "
                     f"and k90 as a description of that rise, not as the paper's law.")

    parts.append("## Fitted laws")
    ci = " [95%]" if s["n_boot"] else ""
    parts.append(_table(["size", "method", f"L∞{ci}", f"A{ci}", f"b{ci}", "k values", "R²"], [
        [r["size"], r["method"], _est(r, "L_inf"), _est(r, "A"), _est(r, "b", 2), _f(r.get("n_k")),
         _r2(r["r2"], r.get("dof"))]
        for r in plan["laws"]]))
    parts.append(_interval_sentence(plan["laws"]))

    uni = plan.get("unified") or []
    if uni:
        with_ci = any(r["n_boot"] for r in uni)
        parts.append("## Unified law L(N, k) = L* + B·N^−β + A0·N^−γ/(k+b)")
        parts.append(_table(["method", "L*", "B", "β", "A0", "γ", "b", "R²", "at a bound"], [
            [r["method"]] + [_ci(r, name) for name in UNIFIED_PARAMS]
            + [_r2(r["r2"], r.get("dof")) if r.get("dof") is None or r["dof"] <= 0 else
               f"{_f(r['r2'], 3)} ({r['dof']} dof)", ", ".join(r["at_bound"]) or "—"] if r["converged"] else
            [r["method"]] + ["—"] * 6 + ["—", r.get("reason") or "not converged"] for r in uni]))
        parts.append("N in billions of parameters; one fit per method over every size and k ≥ 1"
                     + (f"; [95%] bootstrap intervals, {uni[0]['n_boot']} replicates "
                        f"{_INTERVAL_TEXT.get(s.get('interval'), 'resampling subsets').replace('each k', 'each (size, k)')}."
                        if with_ci else
                        "; no intervals (no bootstrap in the fits)."))

    parts.append("## Experts needed for a target loss")
    parts.append(f"Targets: {s['targets']}.")
    need = plan["experts_needed"]
    if s["n_boot"]:
        parts.append(_table(["size", "method", "target", "k", "k [95%]", "unreachable in boot", "note"], [
            [r["size"], r["method"], _f(r["target"]), _f(r["k"]), _k_interval(r, "k"),
             "—" if r["frac_unreachable"] is None else f"{100 * r['frac_unreachable']:.0f}%",
             _reach_note(r, M, pool)] for r in need]))
    else:
        parts.append(_table(["size", "method", "target", "k", "note"], [
            [r["size"], r["method"], _f(r["target"]), _f(r["k"]), _reach_note(r, M, pool)] for r in need]))
    parts.append("k is the smallest integer with L(k) ≤ target on the fitted law"
                 + ("; the interval is the same question asked of each bootstrap refit (∞ = floor "
                    "above the target)." if s["n_boot"] else "."))
    if (note := _reach_summary(need, "answers", M, pool)):
        parts.append(note)

    parts.append("## Saturation and fractional return")
    sat = plan["saturation"]
    parts.append(_table(["size", "method", "k_ε = A/ε − b", f"k_ε (↑){ci}", "first Δ_k < ε",
                         "k80 / k90 (fit)", "k80 / k90 (measured envelope)", "note"], [
        [r["size"], r["method"], _f(r["k_eps_value"], 1),
         f"{_f(r['k_eps'])} {_k_interval(r, 'k_eps')}".strip(), _f(r["k_marginal"]),
         f"{_f(r['k80_fit'])} / {_f(r['k90_fit'])}", f"{_f(r['k80_env'])} / {_f(r['k90_env'])}",
         _reach_note(r, M, pool)]
        for r in sat]))
    parts.append(f"k_ε (App. J.1) is where the tail A/(k+b) above the floor falls to ε = {s['eps']}; "
                 f"Δ_k < ε is where one more expert gains less than ε; k80/k90 are the first k "
                 f"with 80/90% of the k = 1 → {M} improvement"
                 + (f" (the measured range; the pool holds {pool})." if pool > M else "."))
    if (note := _reach_summary(sat, "k_ε values", M, pool)):
        parts.append(note)

    parts.append("## Three-point forecast (fit on k = 1, 2, 4)")
    tp = plan["three_point"]
    done = [r for r in tp if r.get("L_inf") is not None]
    if not done:
        parts.append("Not computed: " + "; ".join(sorted({r.get("reason") or "no law" for r in tp})) + ".")
    else:
        parts.append(_table(["size", "method", "exact", "L∞", "A", "b", "MAE (other k)",
                             "max rel. err", f"error at k={M}"], [
            [r["size"], r["method"], _f(r.get("exact")), _f(r.get("L_inf")), _f(r.get("A")),
             _f(r.get("b"), 2), _f(r.get("mae")), _f(r.get("max_rel_err")), _f(r.get("err_at_M"))]
            for r in tp]))
        n_exact = sum(bool(r.get("exact")) for r in done)
        parts.append(f"Three measured means determine the law exactly in {n_exact} of {len(done)} "
                     f"cases (else bounded least squares on the three); the errors are against the "
                     f"measured means at the k not used"
                     + ("." if any(r.get("mae") is not None for r in done) else
                        ": none measured, so nothing checks these forecasts."))

    hk = [r for r in plan["holdout"] if r["kind"] == "k_extrapolation"]
    hs = [r for r in plan["holdout"] if r["kind"] == "size_extrapolation"]
    parts.append("## Hold-out: fit k ≤ 4, predict the rest")
    if hk and all(r.get("mae") is None for r in hk):
        parts.append("Not computed: " + "; ".join(sorted({r.get("reason") or "no prediction"
                                                          for r in hk})) + ".")
    else:
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

    design = plan.get("design") or []
    if design:
        parts.append(f"## Which k, how many subsets ({design[0]['method']})")
        parts.append(_table(["size", "parameter", "95% width now", "merges now", "target", "k values",
                             "subsets per k", "merges", "width"], [
            [r["size"], "L∞" if r["param"] == "L_inf" else r["param"], _g(r.get("width_now")),
             r.get("merges_now"), f"{r['target']} ({_g(r.get('target_width'))})",
             ", ".join(str(k) for k in r.get("ks") or []) or "—",
             ", ".join(str(n) for n in r.get("n_per_k") or []) or "—",
             (r.get("merges") if r.get("reachable") else f"unreachable ({r.get('merges')})"),
             _g(r.get("width"))] for r in design]))
        parts.append("The interval on A or L∞ a design gives, predicted by propagating each k's noise "
                     "C/(k·n_k) (the variance law; the noise the fit's parametric intervals draw) through "
                     "the law's Jacobian (weighted least squares, first order), and the cheapest design "
                     "with k = 1, M and up to three k between reaching the width measured now or half of "
                     "it; merges include the base. Run it with `sweep.k` and `sweep.sampler: adaptive` "
                     "(`sweep.subsets_per_k` as the cap).")

    parts.append(f"## Budget ({s['reference_method']})")
    parts.append("Cost of (size, k) = k × expert + merge; unit = " + s["cost_unit"]
                 + ("; merge + eval = one sweep job's seconds over its subsets, averaged over methods"
                    if s.get("costs_measured") else
                    f"; merge + eval = {s['merge_fraction']} × the size's expert")
                 + f"; k ≤ {s['k_max']}"
                 + (" (the largest measured k)." if s["k_max"] == M else "."))
    parts.append(_table(["size", "expert", "merge + eval"], [
        [sz, _f(c["expert"], 2), _f(c["merge"], 2)] for sz, c in plan["costs"].items()]))
    parts.append("\n".join(f"- {line}" for line in plan["recommendation"]))

    vs = plan.get("versus_multitask") or []
    if vs:
        parts.extend(_versus_section(vs, s, M, pool))

    th = plan.get("theory") or []
    if th:
        parts.extend(_theory_section(th))

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
