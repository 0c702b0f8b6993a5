"""Tests for the paper-figure analogues in mergelaws.plots (Figs 1, 3, 4a, 4b, 5, 7)."""

from __future__ import annotations


import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from mergelaws import laws
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
