"""Tests for mergelaws.plan: planning answers on synthetic laws, and write_plan."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mergelaws import plan as P

LAWS = [
    {"L_inf": 2.0, "A": 0.5, "b": 0.3},
    {"L_inf": 3.7, "A": 0.074, "b": 0.25},
    {"L_inf": 1.2, "A": 1.7, "b": 2.5},
    {"L_inf": 0.8, "A": 0.04, "b": 0.0},
]


def L(law, k):
    return law["L_inf"] + law["A"] / (k + law["b"])


def brute_needed(law, target, k_max=100000):
    for k in range(1, k_max + 1):
        if L(law, k) <= target:
            return k
    return None


@pytest.mark.parametrize("law", LAWS)
def test_experts_needed_exact(law):
    for frac in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 0.999):
        target = L(law, 1) - frac * (L(law, 1) - law["L_inf"])
        assert P.experts_needed(law, target) == brute_needed(law, target)
    for k in range(1, 30):  # targets exactly on the curve
        assert P.experts_needed(law, L(law, k)) == brute_needed(law, L(law, k))
    assert P.experts_needed(law, law["L_inf"]) is None
    assert P.experts_needed(law, law["L_inf"] - 0.1) is None
    assert P.experts_needed(law, L(law, 1) + 1) == 1
    t = L(law, 7) - 1e-12
    assert P.experts_needed(law, t, k_max=7) is None and P.experts_needed(law, t, k_max=8) == 8
    rising = {"L_inf": 2.0, "A": -0.1, "b": 0.0}  # L(1) = 1.9, rising towards 2.0
    assert P.experts_needed(rising, 1.85) is None and P.experts_needed(rising, 1.95) == 1


def test_k_epsilon_paper_worked_numbers():
    # The paper's App. J.1: code (b, A0, gamma) = (0.25, 0.068, 0.115): 0.5B -> 8, 32B -> 5
    for N, want in ((0.5, 8), (32.0, 5)):
        A = 0.068 * N ** -0.115
        r = P.k_epsilon({"L_inf": 0.3, "A": A, "b": 0.25}, eps=0.01)
        assert r["k_eps"] == want and r["k_eps_value"] == pytest.approx(A / 0.01 - 0.25)
    assert P.k_epsilon({"L_inf": 0.3, "A": -0.1, "b": 0.0})["k_eps"] is None


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("eps", [0.001, 0.01, 0.03])
def test_k_marginal_exact(law, eps):
    k = 1
    while L(law, k) - L(law, k + 1) >= eps:
        k += 1
    assert P.k_marginal(law, eps) == k


@pytest.mark.parametrize("law", LAWS)
def test_k80_k90_on_curve_and_envelope(law):
    ks = np.arange(1, 10)
    v = L(law, ks.astype(float))
    gain = v[0] - v[-1]
    r = P.k_fraction(v)
    for q, key in ((0.8, "k80"), (0.9, "k90")):
        assert r[key] == next(k for k in ks if (v[0] - v[k - 1]) / gain >= q)
    # a measured curve with a bump: the envelope ignores the bump
    m = np.array([5.0, 4.0, 4.5, 3.5, 3.2, 3.3, 3.1, 3.05, 3.0])
    r = P.k_fraction(m)
    env = np.minimum.accumulate(m)
    R = (m[0] - env) / (m[0] - env[-1])
    assert r["k80"] == 1 + int(np.argmax(R >= 0.8)) == 5
    assert r["k90"] == 1 + int(np.argmax(R >= 0.9)) == 7
    assert P.k_fraction([3.0, 3.1, 3.2])["k90"] is None


@pytest.mark.parametrize("law", LAWS)
def test_three_point_forecast_recovers_curve(law):
    ks = np.arange(1, 10)
    y = L(law, ks.astype(float))
    r = P.three_point_forecast(ks, y)
    assert r["exact"]
    assert r["b"] == pytest.approx(law["b"], abs=1e-9)
    assert r["A"] == pytest.approx(law["A"], rel=1e-9)
    assert r["L_inf"] == pytest.approx(law["L_inf"], abs=1e-9)
    assert r["mae"] < 1e-10 and abs(r["err_at_M"]) < 1e-10
    assert max(abs(r["forecast"][k] - L(law, k)) for k in range(1, 10)) < 1e-10


def test_three_point_forecast_no_exact_solution():
    ks = np.arange(1, 10)
    y = 2.0 + 0.5 / ks + 0.02 * (ks == 4)  # k=2 -> 4 drop too small for any b >= 0
    r = P.three_point_forecast(ks, y)
    assert not r["exact"] and r["b"] == pytest.approx(0.0) and r["reason"]


def test_budget_picks_analytic_cheapest():
    laws = {"s": {"L_inf": 3.0, "A": 0.6, "b": 0.2}, "m": {"L_inf": 2.8, "A": 0.5, "b": 0.3},
            "l": {"L_inf": 2.5, "A": 0.4, "b": 0.1}}
    costs = P.expert_costs({"s": 1e5, "m": 3e5, "l": 1e6})
    assert costs["m"]["expert"] == pytest.approx(3.0) and costs["m"]["merge"] == pytest.approx(0.3)
    opts = P.budget_options(laws, costs, k_max=9)
    for target in (3.5, 3.2, 3.1, 3.02, 2.95, 2.7, 2.6, 2.4):
        ok = opts[opts["loss"] <= target]
        r = P.cheapest_for_target(laws, costs, target, k_max=9)
        if ok.empty:
            assert r["best"] is None
            continue
        want = ok.sort_values(["cost", "loss"]).iloc[0]
        assert (r["best"]["size"], r["best"]["k"]) == (want["size"], want["k"])
        assert r["best"]["cost"] == pytest.approx(want["cost"])
    for budget in (0.5, 1.2, 3.4, 5.0, 9.3, 12.0, 30.0):
        ok = opts[opts["cost"] <= budget + 1e-12]
        r = P.best_for_budget(laws, costs, budget, k_max=9)
        if ok.empty:
            assert r["best"] is None
            continue
        want = ok.sort_values(["loss", "cost"]).iloc[0]
        assert (r["best"]["size"], r["best"]["k"]) == (want["size"], want["k"])
    # explicit costs
    c2 = P.expert_costs({"s": 1, "m": 2}, costs={"s": 5.0, "m": {"expert": 1.0, "merge": 0.0}})
    assert c2 == {"s": {"expert": 5.0, "merge": 0.5}, "m": {"expert": 1.0, "merge": 0.0}}


def realistic_losses(seed=0):
    """3 sizes x 3 methods, 4 domains, 6 shared subsets per k in 1..M-1, one at k=0 and k=M."""
    rng = np.random.default_rng(seed)
    doms = ["w", "x", "y", "z"]
    M = 6
    rows = []
    # a subset's shift is shared by every method: the same experts are merged
    shifts = {(size, k, j): 0.03 / np.sqrt(max(k, 1)) * rng.standard_normal()
              for size in ("xs", "s", "m") for k in range(1, M) for j in range(6)}
    for size, params, Linf, A in (("xs", 150_000, 4.2, 0.30), ("s", 530_000, 3.8, 0.32),
                                  ("m", 1_720_000, 3.4, 0.50)):
        for method, dA in (("average", 0.0), ("task_arithmetic", -0.1), ("ties", 0.05)):
            for k in range(0, M + 1):
                for j in range(1 if k in (0, M) else 6):
                    shift = shifts.get((size, k, j), 0.0)
                    for d in doms:
                        mu = Linf + 0.1 if k == 0 else Linf + (A + dA) / (k + 0.3)
                        loss = mu + shift + 0.005 * rng.standard_normal()
                        rows.append((size, params, method, k, f"s{k}-{j}", "", d, False, loss, 100))
    return pd.DataFrame(rows, columns=["size", "params", "method", "k", "subset", "members",
                                       "eval_domain", "in_domain", "loss", "tokens"])


def test_compare_methods_paired():
    from mergelaws import laws

    t = realistic_losses()
    cmp = P.compare_methods(laws.per_subset_values(t))
    assert len(cmp) == 3 * 6
    early = cmp[cmp["k"] <= 3]
    assert (early["best"] == "task_arithmetic").all() and early["significant"].all()
    assert (early["pairing"] == "paired").all()
    last = cmp[cmp["k"] == 6]
    assert last["significant"].isna().all() and (last["n"] == 1).all()


def test_write_plan(tmp_path):
    from mergelaws import laws

    t = realistic_losses()
    fits = laws.fit_all(t, views=["cross_domain"])
    paths = P.write_plan(t, fits, tmp_path / "plan", n_boot=40)
    assert [p.name for p in paths] == ["plan.md", "plan.json"]
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json", "plan.md"]
    plan = json.loads(paths[1].read_text())
    md = paths[0].read_text()
    for head in ("## Fitted laws", "## Experts needed", "## Saturation", "## Three-point",
                 "## Hold-out", "## Budget", "## Methods at matched k"):
        assert head in md
    assert plan["settings"]["M"] == 6 and plan["sizes"] == ["xs", "s", "m"]
    assert len(plan["laws"]) == 9 and all(r["L_inf_lo"] <= r["L_inf_hi"] for r in plan["laws"])
    need = {(r["size"], r["method"]): r for r in plan["experts_needed"]}
    law = next(r for r in plan["laws"] if r["size"] == "m" and r["method"] == "average")
    r = need[("m", "average")]
    assert r["k"] == brute_needed(law, r["target"])
    assert r["k_lo"] <= r["k"] <= r["k_hi"]
    assert plan["recommendation"] and all(isinstance(s, str) for s in plan["recommendation"])
    # given targets and no fits (refit inside)
    P.write_plan(t, None, tmp_path / "plan2", targets=4.0, n_boot=20, costs={"m": 1.0})
    p2 = json.loads((tmp_path / "plan2" / "plan.json").read_text())
    assert p2["settings"]["laws_from"] == "refit"
    assert {r["target"] for r in p2["experts_needed"]} == {4.0}
    assert p2["costs"]["m"]["expert"] == 1.0
    # re-writing leaves no temp files
    P.write_plan(t, fits, tmp_path / "plan", n_boot=20)
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json", "plan.md"]


def test_plan_reports_fit_choice_variance_unified_and_holdout(tmp_path):
    from mergelaws import laws

    t = realistic_losses()
    fits = laws.fit_all(t, views=["cross_domain"], loss="huber", n_boot=8)
    choice = P.fit_choice(fits)
    assert choice == {"weights": "k", "loss": "huber", "f_scale": None, "interval": "parametric"}
    assert P.fit_choice(fits, loss="linear")["loss"] == "linear"
    assert P.fit_choice(None) == {"weights": "k", "loss": "linear", "f_scale": None, "interval": "parametric"}
    assert P.fit_choice(laws.fit_all(t, views=["cross_domain"], n_boot=2, interval="subsets"))["interval"] == "subsets"
    with pytest.raises(ValueError):
        P.fit_choice(None, interval="jackknife")
    with pytest.raises(ValueError):
        P.fit_choice(None, loss="huber", f_scale=-2.0)
    md_path, js_path = P.write_plan(t, fits, tmp_path / "plan", n_boot=20)
    plan = json.loads(js_path.read_text())
    md = md_path.read_text()
    assert plan["settings"]["loss"] == "huber" and "Huber loss" in md and "weights ∝ k" in md
    # variance laws, from the fits file, one row per (size, method)
    assert len(plan["variance"]) == 9
    fv = {(f.size, f.method): f for f in fits.variance}
    for r in plan["variance"]:
        assert r["C_inv_k"] == pytest.approx(fv[(r["size"], r["method"])].C_inv_k)
        assert r["M"] == 6
    assert "## Variance across subsets" in md and "C·(M−k)/(k·(M−1))" in md
    # the unified law with its intervals, per method
    assert [r["method"] for r in plan["unified"]] == ["average", "task_arithmetic", "ties"]
    assert all(r["n_boot"] == 8 and r["L_star_lo"] <= r["L_star_hi"] for r in plan["unified"])
    assert "## Unified law" in md
    # three sizes: the held-out-size check says why it was skipped
    assert "## Held-out size" in md and "skipped: needs >= 4 sizes" in md
    # without a fits file: least squares, variance and unified law fitted here
    P.write_plan(t, None, tmp_path / "plan2", n_boot=10)
    p2 = json.loads((tmp_path / "plan2" / "plan.json").read_text())
    assert p2["settings"]["loss"] == "linear" and len(p2["variance"]) == 9
    assert {(r["size"], r["method"]): r["C_inv_k"] for r in p2["variance"]} == pytest.approx(
        {k: v.C_inv_k for k, v in fv.items()})
    assert all(r["n_boot"] == 0 and r["L_star_lo"] is None for r in p2["unified"])
    assert "least squares" in (tmp_path / "plan2" / "plan.md").read_text()


def test_plan_holdout_size_with_four_sizes(tmp_path):
    from mergelaws import laws

    t = realistic_losses()
    extra = t[t["size"] == "m"].copy()
    extra["size"], extra["params"] = "l", 5_600_000
    extra["loss"] = extra["loss"] - 0.35  # a fourth, larger size on the same trend
    t4 = pd.concat([t, extra], ignore_index=True)
    fits = laws.fit_all(t4, views=["cross_domain"])
    plan = P.build_plan(t4, fits, n_boot=10)
    hs = [r for r in plan["holdout"] if r["kind"] == "size_extrapolation"]
    assert len(hs) == 3 and all(r["converged"] and r["size"] == "l" for r in hs)
    md = P.render_markdown(plan)
    assert "## Held-out size" in md and "in-sample RMSE" in md and "skipped" not in md


# -- honest reporting on small grids (#15): every sentence of plan.md from its numbers --------

def _small_grid(max_k: int, per_k: int = 3):
    """The default grid cut to k <= max_k with `per_k` subsets per k, from a pool of 9 experts."""
    from synthetic import synthetic_losses

    domains = [f"d{i}" for i in range(9)]
    t = synthetic_losses(domains, seed=3)
    t = t[t["k"] <= max_k]
    keep = t[["size", "method", "k", "subset"]].drop_duplicates().groupby(["size", "method", "k"]).head(per_k)
    return t.merge(keep, on=["size", "method", "k", "subset"])


@pytest.mark.parametrize("n_boot", [0, 30])
def test_small_grid_plan_says_what_its_numbers_say(tmp_path, n_boot):
    t = _small_grid(3)  # k = 0..3: 3 values of k >= 1 for a 3-parameter law
    P.write_plan(t, None, tmp_path, n_boot=n_boot)
    plan = json.loads((tmp_path / "plan.json").read_text())
    md = (tmp_path / "plan.md").read_text()
    s = plan["settings"]
    pool = len({m for ms in t["members"] for m in ms.split("+") if m})  # experts in the table: 5
    assert s["M"] == 3 and s["pool"] == pool < 9 and s["measured_k"] == [1, 2, 3] and s["n_boot"] == n_boot
    assert f"Measured k = 1..3 (3 values) from a pool of M = {pool} experts" in md
    # zero degrees of freedom: flagged, and R² is not printed as a number
    assert all(r["n_k"] == 3 and r["dof"] == 0 for r in plan["laws"])
    assert f"**{len(plan['laws'])} of {len(plan['laws'])} per-size laws are exactly determined**" in md
    assert "— (exact fit, 0 dof)" in md and "| 1.0000 |" not in md
    # the replicate count is the one used, and no interval is invented without a bootstrap
    if n_boot == 0:
        assert "replicates" not in md and "[95%]" not in md and "no intervals (n_boot = 0" in md
        assert all(r["L_inf_lo"] is None for r in plan["laws"])
        assert "pinned" not in md and "half-width" not in md
    else:
        assert f"({n_boot} replicates, seed 0)" in md
        hw = sorted(0.5 * (r["L_inf_hi"] - r["L_inf_lo"]) for r in plan["laws"])
        med = 0.5 * (hw[len(hw) // 2 - 1] + hw[len(hw) // 2]) if len(hw) % 2 == 0 else hw[len(hw) // 2]
        assert f"has a half-width of {med:.3g} nats" in md
    # answers beyond the measured k are flagged, and counted from the rows
    sat = plan["saturation"]
    flagged = [r for r in sat if r["k_eps"] is not None and r["k_eps"] > 3]
    assert flagged and all(r["reach"] in ("extrapolated", "beyond_pool") for r in flagged)
    beyond = [r for r in flagged if r["k_eps"] > pool]
    assert all(r["reach"] == "beyond_pool" for r in beyond)
    assert all(r["reach"] == "extrapolated" for r in flagged if r["k_eps"] <= pool)
    assert f"**{len(flagged)} of {len(sat)} k_ε values extrapolate beyond the measured k ≤ 3**" in md
    if beyond:
        assert f"{len(beyond)} of them beyond the pool of {pool} experts" in md
    if n_boot:
        assert all(r["k_eps_lo"] is not None for r in flagged)
    # the three-point forecast and the k hold-out cannot run: said once, not as empty tables
    assert "Not computed: k = [4] not measured." in md
    assert "Not computed: no k > 4 measured." in md
    assert "(the largest measured k)" in md


def test_full_grid_plan_has_no_small_grid_warnings(tmp_path):
    t = _small_grid(9, per_k=4)
    P.write_plan(t, None, tmp_path, n_boot=10)
    plan = json.loads((tmp_path / "plan.json").read_text())
    md = (tmp_path / "plan.md").read_text()
    assert plan["settings"]["M"] == plan["settings"]["pool"] == 9
    assert all(r["dof"] == 6 for r in plan["laws"]) and "exactly determined" not in md
    assert "exact fit" not in md and "Not computed" not in md
    assert all(r["reach"] == "measured" for r in plan["experts_needed"] if r["k"] is not None)


def test_plan_cli_takes_n_boot_from_the_config(tmp_path):
    """`mergelaws plan --config` uses fit.n_boot (the rule passes only --config); 0 = no intervals,
    not a traceback."""
    import yaml

    from mergelaws.cli import main

    t = _small_grid(4)
    t.to_parquet(tmp_path / "losses.parquet")
    cfg = yaml.safe_load(open("config.yaml"))
    cfg["fit"]["n_boot"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "losses.parquet"), "--out", str(tmp_path / "p"),
                 "--config", str(tmp_path / "config.yaml")]) in (0, None)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["settings"]["n_boot"] == 0 and "replicates" not in (tmp_path / "p" / "plan.md").read_text()
    assert main(["plan", str(tmp_path / "losses.parquet"), "--out", str(tmp_path / "p"),
                 "--config", str(tmp_path / "config.yaml"), "--n-boot", "5"]) in (0, None)
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["settings"]["n_boot"] == 5


def test_plan_reports_the_theory_scores_it_is_given(tmp_path):
    t = _small_grid(9, per_k=2)
    th = pd.DataFrame([
        {"size": "m", "method": "average", "variant": "center", "spearman": 0.99, "spearman_k2": 0.98,
         "curve_mae": 0.01, "drop_measured": 0.25, "drop_predicted": 0.27, "A_fit_pred": 0.3, "A_fit_meas": 0.3,
         "L_inf_fit_pred": 3.4, "L_inf_fit_meas": 3.4, "variance_ratio": 1.2, "compute_fraction": 0.5},
        {"size": "m", "method": "average", "variant": "theta0", "spearman": 0.93, "spearman_k2": 0.9,
         "curve_mae": 0.1, "drop_measured": 0.25, "drop_predicted": 0.47, "A_fit_pred": 0.9, "A_fit_meas": 0.3,
         "L_inf_fit_pred": 3.4, "L_inf_fit_meas": 3.4, "variance_ratio": 27.0, "compute_fraction": 0.6}])
    P.write_plan(t, None, tmp_path, n_boot=0, theory=th)
    md = (tmp_path / "plan.md").read_text()
    assert "## Predicted from the experts alone (Theorem 3.1)" in md
    assert "1 of 2 rows reach Spearman ≥ 0.95 with the drop within 15% (variants: center)." in md
    assert "| m | average | theta0 | 0.930 (0.900) | 0.1000 | 0.470 / 0.250 |" in md
    assert len(json.loads((tmp_path / "plan.json").read_text())["theory"]) == 2


def test_plan_flags_laws_whose_loss_rises_with_k(tmp_path):
    """A method whose loss grows with k (FR-Merging's summed vectors on the tiny bases) fits A < 0:
    plan.md says so for exactly those laws, naming them, and for no falling one."""
    t = _small_grid(9, per_k=2)
    meth = sorted(t["method"].unique())[0]
    rising = t["method"] == meth
    t.loc[rising, "loss"] = t.loc[rising, "loss"] + 0.15 * t.loc[rising, "k"]  # the loss now grows with k
    P.write_plan(t, None, tmp_path, n_boot=0)
    plan = json.loads((tmp_path / "plan.json").read_text())
    md = (tmp_path / "plan.md").read_text()
    neg = [r for r in plan["laws"] if r["A"] < 0]
    assert neg and {r["method"] for r in neg} == {meth}
    assert f"**Loss rises with k for {len(neg)} of {len(plan['laws'])} laws**" in md
    assert all(f"{r['size']} {meth} (A = {r['A']:.3g})" in md for r in neg)
    P.write_plan(t[~rising], None, tmp_path / "falling", n_boot=0)
    assert "Loss rises with k" not in (tmp_path / "falling" / "plan.md").read_text()
