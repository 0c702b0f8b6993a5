"""Tests for the paper-figure analogues in mergelaws.plots (Figs 1, 3, 4a, 4b, 5, 7) and the
further analyses (mergelaws.analyses, plots.more_figures: Figs 6, 9b, 13-22)."""

from __future__ import annotations

import itertools

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from mergelaws import analyses, laws
from mergelaws import plots as P
from synthetic import synthetic_losses as _synthetic

DOMAINS = ["a", "b", "c", "d", "e"]
VIEW = "cross_domain"


def synthetic_losses(seed: int = 0) -> pd.DataFrame:
    """3 sizes x 2 methods x k = 0..5 (up to 4 subsets per k), with noise across subsets and domains."""
    return _synthetic(DOMAINS, seed=seed, per_k=4, in_domain_bonus=0.03)


@pytest.fixture(scope="module")
def data():
    losses = synthetic_losses()
    fits = laws.fit_all(losses, views=(VIEW,))
    return losses, laws.view_table(losses, [VIEW]), fits


NAMES = ("fig1_unified", "fig3_scatter", "fig4a_floor_tail", "fig4b_return", "fig5_methods",
         "fig7_forecast")


@pytest.fixture(scope="module")
def drawn(data, tmp_path_factory):
    """All figures drawn once (via paper_figures) into one directory."""
    losses, _, fits = data
    out = tmp_path_factory.mktemp("paper")
    return out, P.paper_figures(losses, fits, out)


def _check(paths, outdir, stem, alone=True):
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    if alone:  # atomic writes: nothing but the two final files (no temporaries) remain
        assert sorted(p.name for p in outdir.iterdir()) == sorted([f"{stem}.png", f"{stem}.pdf"])
    for p in paths:
        assert p.stat().st_size > 5_000
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    img = mpimg.imread(paths[0])
    assert img.shape[0] > 400 and img.shape[1] > 800
    sample = img[::5, ::5].reshape(-1, img.shape[-1])
    assert np.unique(sample, axis=0).shape[0] > 50  # not blank


def test_paper_figures_names_and_no_temporaries(drawn):
    out, paths = drawn
    names = [f"{n}_{VIEW}.{e}" for n in NAMES for e in ("png", "pdf")]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left


@pytest.mark.parametrize("name", NAMES)
def test_each_figure_readable(drawn, name):
    out, paths = drawn
    stem = f"{name}_{VIEW}"
    _check([p for p in paths if p.stem == stem], out, stem, alone=False)


def test_single_function_writes_only_its_files(data, tmp_path):
    _, table, _ = data
    _check(P.plot_fractional_return(table, VIEW, tmp_path / "r"), tmp_path, "r")


def test_plot_unified_fit_without_fits(data, tmp_path):
    _, table, _ = data
    _check(P.plot_unified_fit(table, None, VIEW, tmp_path / "u"), tmp_path, "u")


def test_bad_arguments_raise(data, tmp_path):
    losses, table, _ = data
    with pytest.raises(ValueError):
        P.plot_subset_scatter(losses, VIEW, tmp_path / "x", method="nope")
    with pytest.raises(ValueError):
        P.plot_methods(table, VIEW, tmp_path / "x", size="huge")
    with pytest.raises(ValueError):
        P.plot_floor_tail_vs_N(laws.Fits(), VIEW, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_return_curves_are_monotone_from_0_to_1(data):
    _, table, _ = data
    ks, curves = P._return_curves(table[table["view"] == VIEW])
    assert list(ks) == [1, 2, 3, 4, 5] and len(curves) == 6
    for _, _, r in curves:
        assert r[0] == 0 and r[-1] == pytest.approx(1.0) and np.all(np.diff(r) >= 0)


# --------------------------------------------------------------------------------------
# The further analyses (more_figures): synergy (Fig 21), pool size (Fig 6), Figs 9b, 13-22
# --------------------------------------------------------------------------------------


def _brute_synergy(losses: pd.DataFrame, size: str, method: str):
    """S_{d->e} by explicit loops over the measured subsets: (pairs, matched_k) dicts."""
    g = losses[(losses["size"] == size) & (losses["method"] == method) & (losses["k"] >= 1)]
    L = {(frozenset(m.split("+")), e): v for m, e, v in zip(g["members"], g["eval_domain"], g["loss"])}
    subsets = {s for s, _ in L}
    doms = sorted(g["eval_domain"].unique())
    pairs, matched = {}, {}
    for d in doms:
        for e in doms:
            diffs = [L[(T - {d}, e)] - L[(T, e)] for T in subsets
                     if d in T and len(T) >= 2 and (T - {d}) in subsets]
            pairs[(d, e)] = (np.mean(diffs) if diffs else np.nan, len(diffs))
            per_k = []
            for k in range(2, len(doms) + 1):
                a = [L[(S, e)] for S in subsets if len(S) == k - 1 and d not in S]
                b = [L[(T, e)] for T in subsets if len(T) == k and d in T]
                if a and b:
                    per_k.append(np.mean(a) - np.mean(b))
            matched[(d, e)] = (np.mean(per_k) if per_k else np.nan, len(per_k))
    return pairs, matched


@pytest.mark.parametrize("per_k", [None, 4])
def test_synergy_matches_brute_force(per_k):
    losses = _synthetic(DOMAINS, seed=3, per_k=per_k)
    tab = analyses.synergy_table(losses)
    assert len(tab) == 3 * 2 * len(DOMAINS) ** 2
    for (size, method), t in tab.groupby(["size", "method"]):
        pairs, matched = _brute_synergy(losses, size, method)
        for r in t.itertuples():
            sp, n_p = pairs[(r.donor, r.receiver)]
            sm, n_k = matched[(r.donor, r.receiver)]
            assert r.n_pairs == n_p and r.n_k == n_k
            np.testing.assert_allclose(r.S_pairs, sp, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(r.S_matched_k, sm, rtol=1e-12, atol=1e-12)
    # auto: pairs when every donor has >= 5 pairs, else matched_k, for the whole table
    want = "pairs" if tab["n_pairs"].min() >= 5 else "matched_k"
    assert set(tab["estimator"]) == {want}
    assert want == ("pairs" if per_k is None else "matched_k")
    col = "S_pairs" if want == "pairs" else "S_matched_k"
    np.testing.assert_array_equal(tab["S"].to_numpy(), tab[col].to_numpy())


def test_synergy_summaries_and_bad_input():
    losses = _synthetic(DOMAINS, seed=3)
    tab = analyses.synergy_table(losses, estimator="pairs")
    t = tab[(tab["size"] == "m") & (tab["method"] == "average")]
    off = t[t["donor"] != t["receiver"]]
    pos, neg = analyses.synergy_top_pairs(tab, "m", "average", n=3)
    assert list(pos["S"]) == sorted(off.loc[off["S"] > 0, "S"], reverse=True)[:3]
    assert (pos["donor"] != pos["receiver"]).all() and (neg["S"] < 0).all()
    donor, recv = analyses.synergy_sums(tab, "m", "average")
    assert donor["a"] == pytest.approx(off.loc[off["donor"] == "a", "S"].sum())
    assert recv["b"] == pytest.approx(off.loc[off["receiver"] == "b", "S"].sum())
    # the in-domain bonus makes the diagonal (a domain's own expert) the largest
    diag = t[t["donor"] == t["receiver"]]["S"]
    assert diag.min() > off["S"].max()
    with pytest.raises(ValueError):
        analyses.synergy_table(losses, estimator="nope")
    with pytest.raises(ValueError):
        analyses.synergy_table(losses.assign(members=""))


def test_pool_size_refit_restricts_subsets():
    losses = _synthetic(DOMAINS, seed=1)  # every subset of the 5-expert pool
    pool = analyses.pool_size_table(losses, VIEW, drops=(1, 2))
    one = pool[(pool["size"] == "s") & (pool["method"] == "ties")]
    # full pool, 5 choices of one dropped expert, 10 of two (M - 2 = 3 >= 3)
    assert list(one["M"].value_counts().sort_index()) == [10, 5, 1]
    assert set(one.loc[one["M"] == 3, "dropped"]) == {"+".join(c) for c in itertools.combinations(DOMAINS, 2)}
    for r in one.itertuples():
        dropped = set(r.dropped.split("+")) - {""}
        assert r.n_subsets == 2 ** (5 - len(dropped)) - 1 and r.k_max == r.M
    # the refit of one reduced pool, by hand: keep the subsets without 'c', mean per k, fit
    r = one[one["dropped"] == "c"].iloc[0]
    g = losses[(losses["size"] == "s") & (losses["method"] == "ties") & (losses["k"] >= 1)]
    g = g[~g["members"].str.split("+").apply(lambda m: "c" in m)]
    per_subset = g.groupby(["subset", "k"])["loss"].mean().reset_index()
    means = per_subset.groupby("k")["loss"].mean()
    f = laws.fit_per_size(means.index.to_numpy(), means.to_numpy(), weights="k")
    assert r.converged and r.L_inf == pytest.approx(f.L_inf) and r.A == pytest.approx(f.A)
    # the summary: median over the choices of dropped experts
    s = analyses.pool_size_summary(pool)
    got = s[(s["size"] == "s") & (s["method"] == "ties") & (s["M"] == 4)].iloc[0]
    assert got["n_fits"] == 5 and got["L_inf"] == pytest.approx(one.loc[one["M"] == 4, "L_inf"].median())


@pytest.fixture(scope="module")
def more_drawn(data, tmp_path_factory):
    losses, _, fits = data
    out = tmp_path_factory.mktemp("more")
    return out, P.more_figures(losses, fits, out)


def test_more_figures_outputs(more_drawn):
    out, paths = more_drawn
    names = P.more_outputs(VIEW, ["average", "ties"])
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporaries
    syn = pd.read_csv(out / "synergy.csv")
    assert len(syn) == 3 * 2 * len(DOMAINS) ** 2
    pool = pd.read_parquet(out / f"pool_size_{VIEW}.parquet")
    assert set(pool["M"]) == {5, 4, 3}


@pytest.mark.parametrize("stem", [n.rsplit(".", 1)[0] for n in P.more_outputs(VIEW, ["average", "ties"])
                                  if n.endswith(".png")])
def test_each_more_figure_readable(more_drawn, stem):
    out, paths = more_drawn
    _check([p for p in paths if p.stem == stem], out, stem, alone=False)


def test_pool_size_too_small_pool_says_so(tmp_path):
    losses = _synthetic(["a", "b", "c"], seed=0)
    pool = analyses.pool_size_table(losses, VIEW)
    assert set(pool["M"]) == {3}
    paths = P.plot_pool_size(pool, tmp_path / "p")
    assert [p.name for p in paths] == ["p.png", "p.pdf"] and paths[0].stat().st_size > 5_000
