"""Tests for the intervals and checks of mergelaws.laws (bootstrap, holdout, per_size):
bootstrap intervals (recovery of the paper's laws), the vectorised refit, hold-out errors and
the finite-pool law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mergelaws import laws

# The paper's Table 3 (Average) and Table 4 (TA): L*, B, beta, A0, gamma, b0
TABLE3 = {
    "algebra": (0.18092, 0.11453, 0.42335, 0.052334, 0.0086009, 0.096378),
    "analysis": (0.18784, 0.11445, 0.46899, 0.054877, 0.02738, 0.1375),
    "biology": (0.63884, 0.6201, 0.37247, 0.1588, 1.4702e-11, 0.022561),
    "chemistry": (0.50824, 0.54954, 0.34262, 0.12219, 2.15e-08, 1.668e-14),
    "code": (0.28292, 0.20851, 0.41186, 0.082102, 0.13678, 0.43453),
    "discrete": (0.2052, 0.3295, 0.26766, 0.066181, 4.7525e-12, 9.8614e-05),
    "geometry": (0.20278, 0.16029, 0.35431, 0.052369, 1.3982e-12, 0.0087202),
    "number_theory": (0.21726, 0.16818, 0.38339, 0.055823, 6.8172e-09, 0.0070628),
    "physics": (0.54195, 0.52847, 0.33756, 0.1111, 0.0038941, 9.3222e-17),
}
TABLE4 = {
    "algebra": (0.1912, 0.10481, 0.48613, 0.031756, 2.0539e-12, 3.0949e-12),
    "analysis": (0.19859, 0.10452, 0.53812, 0.032072, 0.020433, 8.3408e-12),
    "biology": (0.67453, 0.6048, 0.39438, 0.10437, 2.0948e-10, 6.7298e-13),
    "chemistry": (0.5471, 0.52754, 0.3698, 0.079144, 1.4331e-15, 5.2296e-13),
    "code": (0.29195, 0.19378, 0.4604, 0.061683, 0.11845, 0.41132),
    "discrete": (0.26439, 0.26479, 0.36064, 0.045787, 5.5863e-10, 1.153e-15),
    "geometry": (0.21888, 0.14605, 0.40757, 0.034849, 3.6096e-12, 6.4127e-08),
    "number_theory": (0.23532, 0.15, 0.45207, 0.037155, 2.7958e-12, 4.9617e-11),
    "physics": (0.57646, 0.50399, 0.36559, 0.073691, 1.0052e-07, 5.0247e-15),
}
# App. H.2: variance across subsets, Var = a0 N^-gamma / (k + b0) (V*, B^var ~ 0):
# Table 6 (Average) and Table 8 (TA): a0, gamma, b0
TABLE6 = {
    "algebra": (0.00159, 0.0178, 1.89e-11), "discrete": (0.00254, 0.00496, 2.29e-19),
    "analysis": (0.00146, 0.0283, 1.57e-12), "geometry": (0.00192, 0.032, 1.82e-16),
    "code": (0.0085, 0.254, 0.912), "number_theory": (0.00248, 0.0273, 5.79e-13),
    "chemistry": (0.0393, 0.127, 0.205), "physics": (0.0229, 0.119, 0.125),
    "biology": (0.0556, 0.151, 0.272),
}
TABLE8 = {
    "algebra": (0.00109, 1.62e-06, 3.41e-16), "discrete": (0.0017, 1.14e-10, 9.33e-23),
    "analysis": (9.98e-04, 2.01e-06, 7.55e-23), "geometry": (0.00133, 0.00682, 5.56e-16),
    "code": (0.00525, 0.206, 0.514), "number_theory": (0.00171, 5.25e-07, 8.13e-21),
    "chemistry": (0.0266, 0.112, 1.88e-11), "physics": (0.0169, 0.0995, 1.70e-28),
    "biology": (0.0372, 0.137, 4.71e-12),
}
# The paper's Table 5 (TIES; lambda not stated) and App. H.2 Table 10 (TIES variance: a0, gamma, b0)
TABLE5 = {
    "algebra": (0.18929, 0.10752, 0.46554, 0.035371, 0.011425, 0.19757),
    "analysis": (0.19237, 0.10912, 0.50434, 0.050902, 0.016536, 0.58856),
    "biology": (0.6077, 0.60414, 0.38384, 0.37301, 0.0080666, 1.1634),
    "chemistry": (0.48423, 0.53452, 0.35563, 0.30644, 0.0069314, 1.2221),
    "code": (0.26877, 0.21391, 0.38297, 0.079839, 0.11961, 1.1999),
    "discrete": (0.22555, 0.30917, 0.28993, 0.037062, 2.9507e-10, 1.2161e-08),
    "geometry": (0.21017, 0.15222, 0.38672, 0.051128, 5.5086e-10, 0.39637),
    "number_theory": (0.22585, 0.15954, 0.41453, 0.046348, 1.0173e-09, 0.27291),
    "physics": (0.53415, 0.51524, 0.34897, 0.15923, 0.00073252, 0.50358),
}
TABLE10 = {
    "algebra": (7.48e-04, 7.09e-11, 1.94e-09), "discrete": (0.00117, 6.34e-13, 8.13e-11),
    "analysis": (6.83e-04, 1.33e-08, 3.31e-09), "geometry": (8.99e-04, 1.43e-11, 2.86e-08),
    "code": (0.00424, 0.12, 1.09), "number_theory": (0.00114, 8.10e-12, 6.51e-11),
    "chemistry": (0.0241, 0.00132, 0.446), "physics": (0.0137, 0.00363, 0.164),
    "biology": (0.0344, 0.0366, 0.397),
}
# the variance fits' B^var N^-beta^var term, where it is not ~0 (App. H.2: TA and TIES code)
VAR_FLOOR = {("task_arithmetic", "code"): (2.30e-05, 3.0), ("ties", "code"): (1.76e-05, 3.0)}
#: method -> (mean-law table, variance-law table)
METHOD_TABLES = {"average": (TABLE3, TABLE6), "task_arithmetic": (TABLE4, TABLE8),
                 "ties": (TABLE5, TABLE10)}
SIZES_B = {"0.5B": 0.5, "1.5B": 1.5, "3B": 3.0, "7B": 7.0, "14B": 14.0, "32B": 32.0, "72B": 72.0}
KS = np.arange(1, 10)
N_SUBSETS = 126  # subsets per k: max C(9, k), the most the paper could draw per k


def paper_noise_sd(method: str, domain: str, N: float, k) -> np.ndarray:
    """sd across subsets from the paper's variance law (Tables 6/8/10):
    Var = B^var N^-beta^var + a0 N^-gamma / (k + b0) (V* ~ 0)."""
    a0, g, bv = METHOD_TABLES[method][1][domain]
    Bv, betav = VAR_FLOOR.get((method, domain), (0.0, 0.0))
    return np.sqrt(Bv * N ** -betav + a0 * N ** -g / (np.asarray(k, dtype=float) + bv))


def synth_losses(n_subsets=N_SUBSETS, seed: int = 0, methods=tuple(METHOD_TABLES)) -> pd.DataFrame:
    """A losses table: per (method, size, k) ``n_subsets`` i.i.d. subsets (a number, or a
    function (N, k) -> number), each scored on every domain as truth + N(0, Var(N, k)) with
    the paper's law of the mean (Tables 3/4/5) and of the variance (Tables 6/8/10)."""
    rng = np.random.default_rng(seed)
    parts = []
    for method in methods:
        tab = METHOD_TABLES[method][0]
        for size, N in SIZES_B.items():
            n_k = [int(n_subsets(N, kk)) if callable(n_subsets) else int(n_subsets) for kk in KS]
            k = np.repeat(KS, n_k)
            subsets = [f"k{kk}-{j}" for kk, n in zip(KS, n_k) for j in range(n)]
            for d, (Ls, B, beta, A0, gamma, b0) in tab.items():
                mu = Ls + B * N ** -beta + A0 * N ** -gamma / (k + b0)
                sd = paper_noise_sd(method, d, N, k)
                parts.append(pd.DataFrame({
                    "size": size, "params": int(round(N * 1e9)), "method": method, "k": k,
                    "subset": subsets, "members": "", "eval_domain": d, "in_domain": False,
                    "loss": mu + sd * rng.standard_normal(k.size)}))
    return pd.concat(parts, ignore_index=True)


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
    (Tables 6/8/10); 95% percentile-bootstrap intervals."""
    rec = recovery(synth)
    print(_report(rec, "rel_err", "per-size law recovery (relative errors)"))
    assert len(rec) == 3 * 9 * 7 * 2  # methods x domains x sizes x (L_inf, A)
    assert set(rec["method"]) == {"average", "task_arithmetic", "ties"}
    assert (rec["frac_converged"] == 1.0).all()
    # measured (seed 0/1): coverage L_inf .89/.94/.92, A .89/.90/.92 (average/TA/TIES);
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


def sampled_design(N, k):
    """15 subsets per (size, k): Algorithm 1's 15 orders at the sampled sizes (Fig 12)."""
    return 15


def enumerated_design(N, k):
    """The paper's design: every C(9, k) subset up to 7B, at most 15 above (so 1 at k = 9)."""
    from math import comb

    return comb(9, int(k)) if N <= 7 else min(comb(9, int(k)), 15)


def test_unified_bootstrap_recovers_paper_laws():
    """The unified law of Tables 3/4/5 (Average, TA, TIES) at the paper's 7 sizes and
    k = 1..9, every domain, 15 i.i.d. subsets per (size, k) with the paper's across-subset
    variances (Tables 6/8/10); 95% percentile intervals from 60 bootstrap replicates."""
    rec = unified_recovery(synth_losses(n_subsets=sampled_design, seed=0), n_boot=60)
    print(_report(rec, "err", "unified law recovery, 15 subsets per (size, k) "
                              "(err: relative for L*, B, beta, A0; absolute for gamma, b)"))
    assert len(rec) == 3 * 9 * 6 and rec["converged"].all() and (rec["frac_converged"] == 1).all()
    # measured: coverage average .89, TA .94, TIES .87; worst relative error L* 5.6/3.5/5.2%,
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
