"""Paper-style figures for merging scaling laws.

* ``plot_loss_vs_k``: mean loss across merged subsets vs k (one panel per merge method,
  one curve per base size) with the spread across subsets and the fitted law.
* ``plot_variance_vs_k``: variance across subsets vs k (log y).

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global
state), are readable in greyscale (each base size has its own marker and line style, and
the viridis colours also differ in lightness), and are written as PNG (200 dpi) and PDF.
Every file is written atomically: a temporary file in the destination directory, then
``os.replace`` onto the final name.
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mergelaws.fit import predict_per_size, predict_unified

__all__ = ["DPI", "FORMATS", "figure_size", "plot_loss_vs_k", "plot_variance_vs_k", "size_label"]

DPI = 200
FORMATS = ("png", "pdf")
_PANEL_W, _PANEL_H, _LEGEND_H = 3.6, 3.2, 1.25
_MAX_COLS = 4
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
_LINESTYLES = ["-", "--", "-.", ":", (0, (6, 1.5)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2.5)),
               (0, (8, 2, 2, 2)), (0, (4, 4)), (0, (2, 1))]
_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5,
    "legend.fontsize": 9,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "lines.markersize": 6,
    "pdf.fonttype": 42,  # embed TrueType, editable text
    "ps.fonttype": 42,
}
_UNITS = "(nats/token)"
_UMASK = os.umask(0)
os.umask(_UMASK)


def figure_size(n_panels: int) -> tuple[float, float]:
    """Figure size in inches for ``n_panels`` method panels (PNG pixels = size * DPI)."""
    n = max(int(n_panels), 1)
    ncols = min(n, _MAX_COLS)
    nrows = math.ceil(n / ncols)
    return (max(_PANEL_W * ncols + 0.6, 6.4), _PANEL_H * nrows + _LEGEND_H + 0.4)


def _fmt_params(p: float) -> str:
    for div, unit, start in ((1e9, "B", 1e8), (1e6, "M", 1e5), (1e3, "K", 1e2)):
        if p >= start:
            return f"{p / div:.3g}{unit}"
    return f"{p:.0f}"


def size_label(size: str, params: float) -> str:
    """Legend label of a base size: the label plus its parameter count, e.g. ``xs (14.2M)``;
    just the count when the label already says it (``0.5B``)."""
    pretty = _fmt_params(float(params))
    return pretty if str(size) == pretty else f"{size} ({pretty})"


def _view_title(view: str) -> str:
    if view == "in_domain":
        return "In-domain CE (mean over the merged experts' own domains)"
    if view == "cross_domain":
        return "Cross-domain CE (macro mean over all eval domains)"
    if view == "held_out":
        return "Held-out CE (macro mean over domains not merged)"
    if view.startswith("domain:"):
        return f"CE on domain '{view.split(':', 1)[1]}' (all merged subsets)"
    return view


def _styles(sizes: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Marker, line style and colour per size (sizes sorted by params)."""
    n = len(sizes)
    cmap = matplotlib.colormaps["viridis"]
    out = {}
    for i, (size, params) in enumerate(zip(sizes["size"], sizes["params"])):
        out[size] = {
            "marker": _MARKERS[i % len(_MARKERS)],
            "ls": _LINESTYLES[i % len(_LINESTYLES)],
            "color": cmap(0.85 * i / max(n - 1, 1)),
            "label": size_label(size, params),
        }
    return out


def _setup(table: pd.DataFrame, view: str):
    if "view" not in table.columns:
        raise ValueError("table must be a view_table() frame (needs a 'view' column)")
    t = table[table["view"] == view]
    if t.empty:
        raise ValueError(f"no rows for view {view!r} in the table")
    methods = sorted(t["method"].astype(str).unique())
    sizes = (t[["size", "params"]].drop_duplicates().sort_values(["params", "size"])
             .reset_index(drop=True))
    return t, methods, sizes


def _new_figure(n_panels: int, sharey: bool, logy: bool = False):
    n = max(n_panels, 1)
    ncols = min(n, _MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=figure_size(n), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _save(fig: Figure, out_stem: str | os.PathLike) -> list[Path]:
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        final = stem.parent / f"{stem.name}.{fmt}"
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{final.name}.tmp-", suffix=f".{fmt}")
        os.close(fd)
        try:
            fig.savefig(tmp, format=fmt, dpi=DPI)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(final)
    return paths


def _legend(fig: Figure, rows: list[list[Line2D]]) -> None:
    """One legend below the panels; each list in ``rows`` starts a new legend row.

    The number of columns is the largest (up to 7) whose estimated width fits the figure
    (legend columns are as wide as their widest entry; about 0.065 in per character at 9 pt).
    """
    width = fig.get_size_inches()[0] - 0.3
    blank = Line2D([], [], ls="none", label=" ")

    def layout(ncol: int) -> list[list[Line2D]]:
        grid = []
        for r in rows:
            for i in range(0, len(r), ncol):
                chunk = r[i:i + ncol]
                grid.append(chunk + [blank] * (ncol - len(chunk)))
        return grid

    def est_width(grid: list[list[Line2D]]) -> float:
        return sum(0.75 + 0.065 * max(len(row[j].get_label()) for row in grid)
                   for j in range(len(grid[0])))

    ncol = max(1, min(max(len(r) for r in rows), 7))
    while ncol > 1 and est_width(layout(ncol)) > width:
        ncol -= 1
    grid = layout(ncol)
    # matplotlib fills legends column by column: transpose so that rows read across
    ordered = [grid[i][j] for j in range(ncol) for i in range(len(grid))]
    fig.legend(handles=ordered, loc="outside lower center", ncol=ncol, frameon=False,
               title="base model size", title_fontsize=9)


def _suptitle(fig: Figure, text: str) -> None:
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(text, width=max(30, int(width * 9.5))))


def _fit_index(fits: dict | None, law: str) -> dict:
    idx: dict = {}
    if not fits:
        return idx
    if law == "per_size":
        for f in fits.get("per_size", []):
            idx[(f["method"], f["view"], str(f["size"]))] = f
    elif law == "unified":
        for f in fits.get("unified", []):
            idx[(f["method"], f["view"])] = f
    else:
        raise ValueError("law must be 'per_size' or 'unified'")
    return idx


def plot_loss_vs_k(
    table: pd.DataFrame,
    fits: dict | None,
    view: str,
    out_stem: str | os.PathLike,
    law: str = "per_size",
) -> list[Path]:
    """Mean loss vs k, one panel per method (shared y), one curve per base size.

    ``table``: ``fit.view_table`` output; ``fits``: ``fit.fit_all`` output (or None for no
    fitted lines); ``law``: draw the per-size fits (default) or the unified fit.  Markers =
    mean over merged subsets, error bars = +-1 sd across subsets, line = fitted law on a
    fine k grid (k >= 1; the fits use k >= 1 only), hollow marker at k = 0 = base model.
    Writes ``<out_stem>.png`` and ``<out_stem>.pdf``; returns their paths.
    """
    t, methods, sizes = _setup(table, view)
    styles = _styles(sizes)
    index = _fit_index(fits, law)
    kmax = int(t["k"].max())
    kfine = np.linspace(1.0, max(kmax, 1), 200)
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(len(methods), sharey=True)
        any_fit = any_base = False
        for ax, method in zip(axes, methods):
            tm = t[t["method"] == method]
            for size in sizes["size"]:
                st = styles[size]
                d = tm[(tm["size"] == size)].sort_values("k")
                if d.empty:
                    continue
                merged, base = d[d["k"] >= 1], d[d["k"] == 0]
                if not merged.empty:
                    ax.errorbar(merged["k"], merged["mean"], yerr=merged["std"], fmt=st["marker"],
                                color=st["color"], mec="black", mew=0.5, ms=5.5, capsize=2.5,
                                elinewidth=0.9, ecolor=st["color"], zorder=3)
                if not base.empty:
                    any_base = True
                    ax.errorbar(base["k"], base["mean"], yerr=base["std"], fmt=st["marker"],
                                mfc="white", mec=st["color"], mew=1.4, ms=6.5, capsize=2.5,
                                ecolor=st["color"], zorder=3)
                if law == "per_size":
                    f = index.get((method, view, str(size)))
                    yfit = predict_per_size(f, kfine) if f else None
                else:
                    f = index.get((method, view))
                    params = float(d["params"].iloc[0])
                    yfit = predict_unified(f, params / 1e9, kfine) if f else None
                if yfit is not None and np.all(np.isfinite(yfit)):
                    any_fit = True
                    ax.plot(kfine, yfit, ls=st["ls"], color=st["color"], lw=1.5, zorder=2)
            ax.set_title(str(method))
            ax.set_xlabel("number of merged experts k")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(-0.4 if any_base else 0.6, kmax + 0.4)
        for i, ax in enumerate(axes):
            if i % _MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {_UNITS}")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"], mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        law_name = "per-size fit $L_\\infty + A/(k+b)$" if law == "per_size" else \
            "unified fit $L^* + BN^{-\\beta} + A_0N^{-\\gamma}/(k+b)$"
        keys = [Line2D([], [], color="0.3", marker="o", ls="none",
                       label="mean over subsets, bars ±1 sd")]
        if any_fit:
            keys.append(Line2D([], [], color="0.3", ls="-", label=law_name))
        if any_base:
            keys.append(Line2D([], [], color="0.3", marker="o", mfc="white", ls="none",
                               label="base model (k = 0)"))
        _legend(fig, [handles, keys])
        _suptitle(fig, f"{_view_title(view)} vs number of merged experts")
        return _save(fig, out_stem)


def plot_variance_vs_k(table: pd.DataFrame, view: str, out_stem: str | os.PathLike) -> list[Path]:
    """Variance of the view's loss across merged subsets vs k (log y), one panel per method,
    one curve per base size; k with fewer than 2 subsets (or zero variance) is skipped.
    Writes ``<out_stem>.png`` and ``<out_stem>.pdf``; returns their paths."""
    t, methods, sizes = _setup(table, view)
    styles = _styles(sizes)
    kmax = int(t["k"].max())
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(len(methods), sharey=True)
        plotted = False
        for ax, method in zip(axes, methods):
            tm = t[(t["method"] == method) & (t["n_subsets"] >= 2) & (t["var"] > 0)]
            for size in sizes["size"]:
                st = styles[size]
                d = tm[tm["size"] == size].sort_values("k")
                if d.empty:
                    continue
                plotted = True
                ax.plot(d["k"], d["var"], marker=st["marker"], ls=st["ls"], color=st["color"],
                        mec="black", mew=0.5, ms=5.5)
            ax.set_yscale("log")
            ax.set_title(str(method))
            ax.set_xlabel("number of merged experts k")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(-0.4 if (t["k"] == 0).any() else 0.6, kmax + 0.4)
        if not plotted:
            for ax in axes:
                ax.text(0.5, 0.5, "no k with >= 2 subsets", transform=ax.transAxes,
                        ha="center", va="center")
        for i, ax in enumerate(axes):
            if i % _MAX_COLS == 0:
                ax.set_ylabel(f"variance across subsets {_UNITS}$^2$")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"], mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        _legend(fig, [handles])
        _suptitle(fig, f"{_view_title(view)}: variance across merged subsets")
        return _save(fig, out_stem)
