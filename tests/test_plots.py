"""Tests for mergelaws.plots: files written atomically, readable, expected size."""

from __future__ import annotations

import os

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from mergelaws import laws
from mergelaws import plots as P
from synthetic import synthetic_losses as _synthetic

DOMAINS = ["a", "b", "c", "d"]


def synthetic_losses(seed: int = 0) -> pd.DataFrame:
    """3 sizes x 2 methods x all subsets of a 4-domain pool, with noise across subsets."""
    return _synthetic(DOMAINS, seed=seed)


@pytest.fixture(scope="module")
def table_and_fits():
    losses = synthetic_losses()
    views = ("in_domain", "cross_domain")
    return laws.view_table(losses, views), laws.fit_all(losses, views=views)


def _check_outputs(paths, outdir, stem, n_panels):
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    assert sorted(p.name for p in outdir.iterdir()) == sorted([f"{stem}.png", f"{stem}.pdf"])
    for p in paths:
        assert p.stat().st_size > 5_000
        assert p.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # not 0600
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    img = mpimg.imread(paths[0])
    w, h = P.figure_size(n_panels)
    assert img.shape[:2] == (round(h * P.DPI), round(w * P.DPI))
    # not blank: many distinct pixel values
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 50


@pytest.mark.parametrize("view", ["cross_domain", "in_domain"])
def test_plot_loss_vs_k(tmp_path, table_and_fits, view):
    table, fits = table_and_fits
    out = tmp_path / "figs"
    paths = P.plot_loss_vs_k(table, fits, view, out / f"loss_vs_k.{view}")
    _check_outputs(paths, out, f"loss_vs_k.{view}", n_panels=2)


def test_plot_loss_vs_k_unified_and_without_fits(tmp_path, table_and_fits):
    table, fits = table_and_fits
    p1 = P.plot_loss_vs_k(table, fits, "cross_domain", tmp_path / "u", law="unified")
    p2 = P.plot_loss_vs_k(table, None, "cross_domain", tmp_path / "nofit")
    for p in p1 + p2:
        assert p.exists() and p.stat().st_size > 5_000
    # the fitted lines are drawn: figures with and without fits differ
    assert not np.array_equal(mpimg.imread(p1[0]), mpimg.imread(p2[0]))
    assert not list(tmp_path.glob(".*tmp*"))


def test_plot_variance_vs_k(tmp_path, table_and_fits):
    table, _ = table_and_fits
    paths = P.plot_variance_vs_k(table, "in_domain", tmp_path / "var_vs_k")
    _check_outputs(paths, tmp_path, "var_vs_k", n_panels=2)


def test_plot_overwrites_atomically(tmp_path, table_and_fits):
    table, fits = table_and_fits
    stem = tmp_path / "fig"
    (tmp_path / "fig.png").write_bytes(b"old")
    paths = P.plot_loss_vs_k(table, fits, "cross_domain", stem)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]


def test_plot_unknown_view_raises_and_leaves_nothing(tmp_path, table_and_fits):
    table, fits = table_and_fits
    with pytest.raises(ValueError):
        P.plot_loss_vs_k(table, fits, "held_out", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_size_label():
    assert P.size_label("xs", 2_000_000) == "xs (2M)"
    assert P.size_label("0.5B", 500_000_000) == "0.5B"
    assert P.size_label("tiny", 200_000) == "tiny (0.2M)"
    assert P.size_label("7B", 7_000_000_000) == "7B"


def test_plot_variance_vs_k_with_fitted_laws(tmp_path, table_and_fits):
    table, fits = table_and_fits
    index = P.variance_fit_index(fits)
    assert ("average", "in_domain", "xs") in index and ("ties", "cross_domain", "m") in index
    f = index[("average", "in_domain", "xs")]
    assert f.converged and f.M == 4 and f.C_inv_k > 0
    with_fit = P.plot_variance_vs_k(table, "in_domain", tmp_path / "a" / "v", fits=fits)
    without = P.plot_variance_vs_k(table, "in_domain", tmp_path / "b" / "v")
    only_inv = P.plot_variance_vs_k(table, "in_domain", tmp_path / "c" / "v", fits=fits,
                                    laws=("inv_k",))
    _check_outputs(with_fit, tmp_path / "a", "v", n_panels=2)
    a, b, c = (mpimg.imread(p[0]) for p in (with_fit, without, only_inv))
    assert a.shape == b.shape == c.shape
    # the fitted curves are drawn, and the finite-pool curve is a separate line
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        P.plot_variance_vs_k(table, "in_domain", tmp_path / "d" / "v", fits=fits, laws=("cubic",))
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())
