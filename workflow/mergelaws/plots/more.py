"""The further analyses of the paper, drawn together (with their tables) by ``more_figures``:
pool size (Fig 6), ΔL(k) with k80/k90 (Fig 9b), every subset per method (Figs 13–15),
per-domain grids (Figs 16–19), synergy (Fig 21), mean CE vs N per k (Fig 22)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mergelaws import io
from mergelaws.analyses import pool_size_table, synergy_table
from mergelaws.laws import Fits, as_fits, view_names, view_table
from mergelaws.plots.grids import plot_ce_vs_N_per_k, plot_domain_grid, plot_gain
from mergelaws.plots.paper import plot_subset_scatter
from mergelaws.plots.pool import plot_pool_size
from mergelaws.plots.synergy import plot_synergy

__all__ = ["more_figures", "more_outputs", "write_table"]


def write_table(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """``<stem>.parquet`` and ``<stem>.csv``, each written atomically; returns both paths."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + ".parquet"), stem.with_name(stem.name + ".csv")]
    with io.atomic_path(paths[0]) as tmp:
        df.to_parquet(tmp, index=False)
    with io.atomic_path(paths[1]) as tmp:
        df.to_csv(tmp, index=False, float_format="%.8g")
    return paths


def more_outputs(view: str, methods) -> list[str]:
    """The file names ``more_figures`` writes (relative to its ``out_dir``), in its order:
    what a workflow declares as outputs."""
    tag = view.replace(":", "-").replace("/", "-")
    stems = ([f"fig6_pool_size_{tag}", f"fig9b_gain_{tag}"]
             + [f"fig13_scatter_{m}_{tag}" for m in sorted(methods)]
             + [f"fig16_domains_{m}" for m in sorted(methods)]
             + ["fig21_synergy", f"fig22_ce_vs_N_{tag}"])
    figs = [f"{s}.{e}" for s in stems for e in ("png", "pdf")]
    tables = [f"{s}.{e}" for s in (f"pool_size_{tag}", "synergy") for e in ("parquet", "csv")]
    return figs + tables


def more_figures(losses: pd.DataFrame, fits: Fits | dict | None, out_dir: str | os.PathLike,
                 view: str = "cross_domain") -> list[Path]:
    """Draw the further analyses for ``view`` into ``out_dir`` (names: ``more_outputs``):
    the pool-size refit (table ``pool_size_<view>``, Fig 6), ΔL(k) with k80/k90 (Fig 9b),
    every merged subset per method (Figs 13–15), per-domain grids per method (Figs 16–19,
    unified law per domain from ``fits``), the synergy matrix (table ``synergy``, Fig 21;
    ``analyses.synergy_table`` with ``estimator="auto"``), and mean CE vs N per k (Fig 22).
    The per-size refits use the fit settings recorded in ``fits`` (weights, b bounds, loss)
    when there are any.  Returns every path written, figures then tables."""
    fits = as_fits(fits)
    out = Path(out_dir)
    tag = view.replace(":", "-").replace("/", "-")
    doms = [v for v in view_names(losses) if v.startswith("domain:")]
    table = view_table(losses, [view] + [v for v in doms if v != view])
    methods = sorted(table["method"].astype(str).unique())
    settings = (fits.settings if fits else None) or {}
    fit_kw = {k: settings[k] for k in ("weights", "loss", "f_scale") if k in settings}
    if settings.get("b_bounds"):
        fit_kw["b_bounds"] = tuple(settings["b_bounds"])
    pool = pool_size_table(losses, view, **fit_kw)
    syn = synergy_table(losses)
    paths: list[Path] = []
    paths += plot_pool_size(pool, out / f"fig6_pool_size_{tag}")
    paths += plot_gain(table, view, out / f"fig9b_gain_{tag}")
    for m in methods:
        paths += plot_subset_scatter(losses, view, out / f"fig13_scatter_{m}_{tag}", method=m)
    for m in methods:
        paths += plot_domain_grid(table, fits, m, out / f"fig16_domains_{m}")
    paths += plot_synergy(syn, out / "fig21_synergy")
    paths += plot_ce_vs_N_per_k(table, view, out / f"fig22_ce_vs_N_{tag}")
    paths += write_table(pool, out / f"pool_size_{tag}")
    paths += write_table(syn, out / "synergy")
    return paths
