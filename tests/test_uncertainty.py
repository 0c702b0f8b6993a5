"""Tests for the intervals and checks of mergelaws.laws (bootstrap, holdout, per_size):
bootstrap intervals (recovery of the paper's laws), the vectorised refit, hold-out errors and
the finite-pool law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mergelaws import laws
from synthetic import (  # noqa: F401  (the paper's tables and the designs, shared with benchmarks/)
    KS,
    METHOD_TABLES,
    N_SUBSETS,
    SIZES_B,
    TABLE3,
    TABLE4,
    TABLE5,
    TABLE6,
    TABLE8,
    TABLE10,
    VAR_FLOOR,
    enumerated_design,
    paper_noise_sd,
    sampled_design,
    synth_losses,
)


@pytest.fixture(scope="module")
def synth():
    return synth_losses()


def recovery(synth, n_boot=200):
    rows = []
    for d in TABLE3:
        b = laws.bootstrap_per_size(synth, view=f"domain:{d}", n_boot=n_boot, seed=1)
        for _, r in b[b["parameter"].isin(["L_inf", "A"])].iterrows():
            Ls, B, beta, A0, gamma, _b0 = METHOD_TABLES[r["method"]][0][d]
            N = r["params"] / 1e9
            true = Ls + B * N ** -beta if r["parameter"] == "L_inf" else A0 * N ** -gamma
            rows.append({"domain": d, "method": r["method"], "size": r["size"],
                         "parameter": r["parameter"], "true": true, "estimate": r["estimate"],
                         "lo": r["lo"], "hi": r["hi"], "frac_converged": r["frac_converged"]})
    out = pd.DataFrame(rows)
    out["covered"] = (out["lo"] <= out["true"]) & (out["true"] <= out["hi"])
    out["rel_err"] = (out["estimate"] - out["true"]).abs() / out["true"].abs()
    return out


def _report(rec: pd.DataFrame, err: str, title: str) -> str:
    """The recovery figures, per method: coverage and worst / median error per parameter."""
    g = rec.groupby(["method", "parameter"], sort=False)
    t = pd.DataFrame({"coverage": g["covered"].mean(), "worst_err": g[err].max(),
                      "median_err": g[err].median(), "n": g.size()})
    per_method = rec.groupby("method", sort=False)["covered"].agg(["mean", "size"])
    lines = [f"\n== {title} ==", t.round(4).to_string(), "coverage per method (all parameters):"]
    lines += [f"  {m}: {r['mean']:.3f} of {int(r['size'])} intervals" for m, r in per_method.iterrows()]
    return "\n".join(lines)


def test_bootstrap_recovers_paper_laws(synth):
    """Per-size law: L_inf(N) = L* + B N^-beta and A(N) = A0 N^-gamma of Tables 3/4/5 at the
    paper's 7 sizes, k = 1..9, 126 i.i.d. subsets per (size, k) with the paper's variances
    (Tables 6/8/10); 95% parametric-bootstrap intervals (the default)."""
    rec = recovery(synth)
    print(_report(rec, "rel_err", "per-size law recovery (relative errors)"))
    assert len(rec) == 3 * 9 * 7 * 2  # methods x domains x sizes x (L_inf, A)
    assert set(rec["method"]) == {"average", "task_arithmetic", "ties"}
    assert (rec["frac_converged"] == 1.0).all()
    # measured (seed 0/1; parametric intervals, the default): coverage L_inf 1.0/.98/.92,
    # A .97/.94/.90 (average/TA/TIES; resampled subsets gave L_inf .89/.94/.92, A .89/.90/.92);
    # worst rel. error L_inf 1.7%/1.5%/5.1%, A 101%/177%/602%; median A 12%/10%/21%.
    # TIES has b0 up to 1.2 (Table 5): A and b trade off harder, so its bounds are looser.
    bounds = {"average": (0.03, 3.0, 0.2), "task_arithmetic": (0.03, 3.0, 0.2),
              "ties": (0.07, 8.0, 0.3)}
    for method, r in rec.groupby("method"):
        cov = r.groupby("parameter")["covered"].mean()
        worst = r.groupby("parameter")["rel_err"].max()
        w_floor, w_amp, med_amp = bounds[method]
        # nominal 95%; percentile intervals of a 3-parameter nonlinear fit under-cover a little
        assert cov["L_inf"] >= 0.85, (method, cov)
        assert cov["A"] >= 0.85, (method, cov)
        assert worst["L_inf"] < w_floor, (method, worst)  # the floor to a few percent at worst
        assert worst["A"] < w_amp, (method, worst)         # A trades off against a free b
        assert r.loc[r["parameter"] == "A", "rel_err"].median() < med_amp, method


def test_batch_fit_matches_fit_per_size():
    rng = np.random.default_rng(3)
    k = np.arange(1, 10, dtype=float)
    Y = 3.4 + 0.3 / (k + 0.7) + rng.normal(0, 0.01, (40, 9)) / np.sqrt(k)
    for w in ("k", "none"):
        batch = laws.fit_per_size_batch(k, Y, weights=w)
        for r in range(0, 40, 3):
            f = laws.fit_per_size(k, Y[r], weights=w)
            assert batch.loc[r, "L_inf"] == pytest.approx(f.L_inf, abs=1e-6)
            assert batch.loc[r, "A"] == pytest.approx(f.A, rel=1e-5, abs=1e-7)
            assert batch.loc[r, "b"] == pytest.approx(f.b, abs=1e-5)
    exact = laws.fit_per_size_batch(k, (0.5 + 0.2 / (k + 0.3))[None, :])
    assert exact.loc[0, "b"] == pytest.approx(0.3, abs=1e-7)


def test_batch_huber_matches_fit_per_size():
    rng = np.random.default_rng(4)
    k = np.arange(1, 10, dtype=float)
    Y = 3.4 + 0.3 / (k + 0.7) + rng.normal(0, 0.01, (30, 9)) / np.sqrt(k)
    Y[::3, 5] += 0.08  # every third replicate has an outlier at k = 6
    for f_scale in (None, 0.01):
        batch = laws.fit_per_size_batch(k, Y, loss="huber", f_scale=f_scale)
        plain = laws.fit_per_size_batch(k, Y)
        assert batch["converged"].all()
        for r in range(0, 30, 2):
            f = laws.fit_per_size(k, Y[r], loss="huber", f_scale=f_scale)
            assert batch.loc[r, "L_inf"] == pytest.approx(f.L_inf, abs=1e-5)
            assert batch.loc[r, "A"] == pytest.approx(f.A, rel=1e-3, abs=1e-5)
            assert batch.loc[r, "b"] == pytest.approx(f.b, abs=1e-3)
        # the outlier replicates: Huber stays near the truth, least squares does not
        out = np.arange(0, 30, 3)
        e_hub = np.abs(batch.loc[out, "L_inf"] - 3.4)
        e_ls = np.abs(plain.loc[out, "L_inf"] - 3.4)
        assert e_hub.max() < 0.04 < e_ls.max() and e_hub.mean() < e_ls.mean() / 3, (e_hub, e_ls)
    with pytest.raises(ValueError):
        laws.fit_per_size_batch(k, Y, loss="huber", f_scale=0.0)


def small_table(seed=0):
    # a small realistic table: 2 sizes x 2 methods, 3 domains, 5 subsets per k, k = 0..6
    rng = np.random.default_rng(seed)
    rows = []
    for size, params, L in (("a", 100_000, 4.0), ("b", 400_000, 3.6)):
        for method, A in (("average", 0.3), ("task_arithmetic", 0.2)):
            for k in range(0, 7):
                for j in range(1 if k in (0, 6) else 5):
                    for d in ("x", "y", "z"):
                        mu = L + 0.1 if k == 0 else L + A / (k + 0.2)
                        sd = 0 if k == 0 else 0.02 / np.sqrt(k)
                        rows.append((size, params, method, k, f"s{k}-{j}", "", d, False,
                                     mu + sd * rng.standard_normal(), 100))
    return pd.DataFrame(rows, columns=["size", "params", "method", "k", "subset", "members",
                                       "eval_domain", "in_domain", "loss", "tokens"])


def test_bootstrap_deterministic_and_shaped():
    t = small_table()
    a = laws.bootstrap_per_size(t, n_boot=50, seed=7)
    b = laws.bootstrap_per_size(t, n_boot=50, seed=7)
    c = laws.bootstrap_per_size(t, n_boot=50, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["lo"].equals(c["lo"])
    assert len(a) == 2 * 2 * 3 and set(a["parameter"]) == {"L_inf", "A", "b"}
    assert ((a["lo"] <= a["estimate"] + 1e-9) | (a["parameter"] == "b")).all()
    # the point estimate is the fit_all per-size fit
    fits = laws.fit_all(t, views=["cross_domain"])
    f = next(x for x in fits.per_size if x.size == "a" and x.method == "average")
    est = a[(a["size"] == "a") & (a["method"] == "average")].set_index("parameter")["estimate"]
    assert est["L_inf"] == pytest.approx(f.L_inf, abs=1e-7)
    # one cell's draws do not depend on the other cells
    one = laws.bootstrap_per_size(t[t["size"] == "a"], n_boot=50, seed=7)
    pd.testing.assert_frame_equal(one.reset_index(drop=True),
                                  a[a["size"] == "a"].reset_index(drop=True))


def test_holdout_errors():
    t = small_table()
    h = laws.holdout_errors(t)
    ke = h[h["kind"] == "k_extrapolation"]
    assert len(ke) == 4 and ke["converged"].all()
    assert (ke["predict_k"] == "5..6").all() and (ke["mae"] < 0.05).all()
    se = h[h["kind"] == "size_extrapolation"]
    assert len(se) == 2 and not se["converged"].any() and se["reason"].str.contains(">= 4 sizes").all()


# ------------------------------------------------------------------ unified law: bootstrap


def unified_recovery(losses: pd.DataFrame, n_boot: int = 60, seed: int = 1) -> pd.DataFrame:
    """Fit the unified law per method on every ``domain:<d>`` view with bootstrap intervals,
    against the published parameters.  ``err``: relative error for L*, B, beta, A0; absolute
    for gamma and b (published values ~ 0 for most domains).  ``covered``: the interval
    contains the published value (to 1e-6, for values such as gamma = 1e-11 at a bound)."""
    rows = []
    for d in TABLE3:
        b = laws.bootstrap_unified(losses, view=f"domain:{d}", n_boot=n_boot, seed=seed)
        for _, r in b.iterrows():
            true = dict(zip(laws.UNIFIED_PARAMS, METHOD_TABLES[r["method"]][0][d]))[r["parameter"]]
            rows.append({"domain": d, "method": r["method"], "parameter": r["parameter"],
                         "true": true, "estimate": r["estimate"], "lo": r["lo"], "hi": r["hi"],
                         "frac_converged": r["frac_converged"], "converged": r["converged"]})
    out = pd.DataFrame(rows)
    out["covered"] = (out["lo"] - 1e-6 <= out["true"]) & (out["true"] <= out["hi"] + 1e-6)
    relative = out["parameter"].isin(["L_star", "B", "beta", "A0"])
    diff = (out["estimate"] - out["true"]).abs()
    out["err"] = np.where(relative, diff / out["true"].abs(), diff)
    return out


def test_unified_bootstrap_recovers_paper_laws():
    """The unified law of Tables 3/4/5 (Average, TA, TIES) at the paper's 7 sizes and
    k = 1..9, every domain, 15 i.i.d. subsets per (size, k) with the paper's across-subset
    variances (Tables 6/8/10); 95% intervals from 60 parametric bootstrap replicates (the
    default; benchmarks/interval_coverage.py measures their coverage over 207 tables)."""
    rec = unified_recovery(synth_losses(n_subsets=sampled_design, seed=0), n_boot=60)
    print(_report(rec, "err", "unified law recovery, 15 subsets per (size, k) "
                              "(err: relative for L*, B, beta, A0; absolute for gamma, b)"))
    assert len(rec) == 3 * 9 * 6 and rec["converged"].all() and (rec["frac_converged"] == 1).all()
    # measured: coverage average .89, TA .96, TIES .93 (resampled subsets: .89/.94/.87; nine
    # domains of one table, so these move by ~.05 with the seed); worst relative error L* 5.6/3.5/5.2%,
    # B 7.2/4.5/5.3%, beta 7.8/7.4/6.2%; A0 (which trades off against b) 131/80/47%
    for method, r in rec.groupby("method"):
        assert r["covered"].mean() >= 0.8, (method, r["covered"].mean())
        worst = r.groupby("parameter")["err"].max()
        assert worst["L_star"] < 0.08 and worst["B"] < 0.1 and worst["beta"] < 0.1, (method, worst)
        assert worst["gamma"] < 0.25 and worst["A0"] < 2.0, (method, worst)
        med = r.groupby("parameter")["err"].median()
        assert med["L_star"] < 0.04 and med["beta"] < 0.05, (method, med)


def test_bootstrap_unified_matches_fit_all_and_is_deterministic():
    t = synth_losses(n_subsets=6, seed=3, methods=("average", "ties"))
    t = t[t["size"].isin(["0.5B", "3B", "14B", "72B"]) & t["eval_domain"].isin(["code", "algebra"])]
    a = laws.bootstrap_unified(t, view="domain:code", n_boot=12, seed=2)
    b = laws.bootstrap_unified(t.sample(frac=1.0, random_state=0), view="domain:code", n_boot=12, seed=2)
    pd.testing.assert_frame_equal(a, b)
    c = laws.bootstrap_unified(t, view="domain:code", n_boot=12, seed=5)
    assert not np.allclose(a["lo"], c["lo"])
    assert len(a) == 2 * 6 and (a["lo"] <= a["hi"]).all() and (a["frac_converged"] == 1).all()
    fits = laws.fit_all(t, views=("domain:code",), n_boot=12, seed=2)
    for u in fits.unified:
        got = a[a["method"] == u.method].set_index("parameter")
        for p in laws.UNIFIED_PARAMS:
            assert got.loc[p, "estimate"] == pytest.approx(getattr(u, p), rel=1e-12, abs=1e-300)
            assert got.loc[p, "lo"] == pytest.approx(u.ci[p].lo, rel=1e-12, abs=1e-300)
            assert got.loc[p, "hi"] == pytest.approx(u.ci[p].hi, rel=1e-12, abs=1e-300)
    # one method's draws do not depend on the other method being in the table
    one = laws.bootstrap_unified(t[t["method"] == "ties"], view="domain:code", n_boot=12, seed=2)
    pd.testing.assert_frame_equal(one.reset_index(drop=True),
                                  a[a["method"] == "ties"].reset_index(drop=True))
    # a point fit that did not converge gives no draws
    assert laws.unified_draws(t, laws.UnifiedFit(converged=False), n_boot=3).empty


def test_holdout_size_extrapolation_with_four_sizes():
    rows = []
    p = TABLE3["code"]
    for N in (0.5, 1.5, 3.0, 7.0):
        for k in range(1, 10):
            y = p[0] + p[1] * N ** -p[2] + p[3] * N ** -p[4] / (k + p[5])
            rows.append((f"{N}B", int(N * 1e9), "average", k, f"s{k}", "", "code", False, y, 1))
    t = pd.DataFrame(rows, columns=["size", "params", "method", "k", "subset", "members",
                                    "eval_domain", "in_domain", "loss", "tokens"])
    h = laws.holdout_errors(t)
    se = h[h["kind"] == "size_extrapolation"].iloc[0]
    assert se["converged"] and se["size"] == "7.0B" and se["reason"] is None
    assert se["max_rel_err"] < 0.01 and se["rmse"] < 1e-3 and se["insample_rmse"] < 1e-6
    # an outlier at the held-out size's k = 9 is measured, not fitted: least squares and
    # Huber both report it as a prediction error there
    t2 = t.copy()
    t2.loc[(t2["size"] == "1.5B") & (t2["k"] == 4), "loss"] += 0.05  # bad cell in the fitted part
    lin = laws.holdout_errors(t2)
    hub = laws.holdout_errors(t2, loss="huber")
    e_lin = lin[lin["kind"] == "size_extrapolation"].iloc[0]["max_rel_err"]
    e_hub = hub[hub["kind"] == "size_extrapolation"].iloc[0]["max_rel_err"]
    assert e_hub < 0.01 < e_lin


def test_finite_pool_fit():
    M = 9
    k = np.arange(1, M + 1, dtype=float)
    y = 2.0 + 0.4 * (M - k) / ((M - 1) * (k + 0.5))
    r = laws.finite_pool_fit(k, y, M)
    fp = r.finite_pool
    assert fp.converged and fp.L_inf == pytest.approx(2.0, abs=1e-7)
    assert fp.A == pytest.approx(0.4, rel=1e-5) and fp.b == pytest.approx(0.5, abs=1e-4)
    assert fp.rmse < 1e-8 and r.plain.rmse < 1e-8 and r.better == "tie"
    assert r.plain.L_inf < 2.0  # the plain law's "floor" sits below the full-pool merge
    # the same curves: A (M-k)/((M-1)(k+b)) = [A (M+b)/(M-1)]/(k+b) - A/(M-1)
    assert r.plain.L_inf == pytest.approx(2.0 - 0.4 / (M - 1), abs=1e-6)
    assert r.plain.A == pytest.approx(0.4 * (M + 0.5) / (M - 1), rel=1e-5)
    # with b = 0 the two laws are the same family: A(M-k)/((M-1)k) = A M/(M-1)/k - A/(M-1)
    y0 = 2.0 + 0.4 * (M - k) / ((M - 1) * k)
    r0 = laws.finite_pool_fit(k, y0, M)
    assert r0.plain.L_inf == pytest.approx(2.0 - 0.4 / (M - 1), abs=1e-6)
    assert r0.plain.A == pytest.approx(0.4 * M / (M - 1), rel=1e-5)
    assert abs(r0.delta_r2) < 1e-9


if __name__ == "__main__":  # run this file with python to print the recovery figures
    import sys

    n_boot = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    print(_report(recovery(synth_losses()), "rel_err",
                  "per-size law recovery, 126 subsets per (size, k) (relative errors)"))
    for name, design in (("15 subsets per (size, k)", sampled_design),
                         ("the paper's enumeration: C(9,k) subsets up to 7B, <= 15 above",
                          enumerated_design)):
        rec = unified_recovery(synth_losses(n_subsets=design, seed=0), n_boot=n_boot)
        print(_report(rec, "err", f"unified law recovery, {name} "
                                  "(err: relative for L*, B, beta, A0; absolute for gamma, b)"))
