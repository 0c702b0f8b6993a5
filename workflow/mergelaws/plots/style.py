"""The shared look of every figure: sizes, fonts, styles per base size and per merge method,
axes helpers, the legend below the panels, and the atomic PNG + PDF writer.

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global
state), are readable in greyscale (each base size has its own marker and line style, and
the viridis colours also differ in lightness; methods use plasma), and are written as PNG
(200 dpi) and PDF, each to a temporary file in the destination directory and then renamed
(``io.atomic_path``).
"""

from __future__ import annotations

import math
import os
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

from mergelaws.io import atomic_path
from mergelaws.laws import Fits, as_fits

__all__ = ["DPI", "FORMATS", "K_LABEL", "LEGEND_H", "LINESTYLES", "MARKERS", "MAX_COLS",
           "METHOD_LINESTYLES", "METHOD_MARKERS", "N_LABEL", "PANEL_H", "PANEL_W", "RC", "UNITS",
           "add_legend", "add_suptitle", "figure_size", "fit_index", "fmt_params", "grid_figure",
           "k_axis", "legend_handles", "method_styles", "n_axis", "new_figure", "panel_tag",
           "plain_log_y", "save_figure", "setup_view", "size_label", "size_styles", "view_title"]

DPI = 200
FORMATS = ("png", "pdf")
PANEL_W, PANEL_H, LEGEND_H = 3.6, 3.2, 1.25
MAX_COLS = 4
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
LINESTYLES = ["-", "--", "-.", ":", (0, (6, 1.5)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2.5)),
               (0, (8, 2, 2, 2)), (0, (4, 4)), (0, (2, 1))]
RC = {
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
UNITS = "(nats/token)"


def figure_size(n_panels: int) -> tuple[float, float]:
    """Figure size in inches for ``n_panels`` method panels (PNG pixels = size * DPI)."""
    n = max(int(n_panels), 1)
    ncols = min(n, MAX_COLS)
    nrows = math.ceil(n / ncols)
    return (max(PANEL_W * ncols + 0.6, 6.4), PANEL_H * nrows + LEGEND_H + 0.4)


def fmt_params(p: float) -> str:
    for div, unit, start in ((1e9, "B", 1e8), (1e6, "M", 1e5), (1e3, "K", 1e2)):
        if p >= start:
            return f"{p / div:.3g}{unit}"
    return f"{p:.0f}"


def size_label(size: str, params: float) -> str:
    """Legend label of a base size: the label plus its parameter count, e.g. ``xs (14.2M)``;
    just the count when the label already says it (``0.5B``)."""
    pretty = fmt_params(float(params))
    return pretty if str(size) == pretty else f"{size} ({pretty})"


def view_title(view: str) -> str:
    if view == "in_domain":
        return "In-domain CE (mean over the merged experts' own domains)"
    if view == "cross_domain":
        return "Cross-domain CE (macro mean over all eval domains)"
    if view == "held_out":
        return "Held-out CE (macro mean over domains not merged)"
    if view.startswith("domain:"):
        return f"CE on domain '{view.split(':', 1)[1]}' (all merged subsets)"
    return view


def size_styles(sizes: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Marker, line style and colour per size (sizes sorted by params)."""
    n = len(sizes)
    cmap = matplotlib.colormaps["viridis"]
    out = {}
    for i, (size, params) in enumerate(zip(sizes["size"], sizes["params"])):
        out[size] = {
            "marker": MARKERS[i % len(MARKERS)],
            "ls": LINESTYLES[i % len(LINESTYLES)],
            "color": cmap(0.85 * i / max(n - 1, 1)),
            "label": size_label(size, params),
        }
    return out


def setup_view(table: pd.DataFrame, view: str):
    if "view" not in table.columns:
        raise ValueError("table must be a view_table() frame (needs a 'view' column)")
    t = table[table["view"] == view]
    if t.empty:
        raise ValueError(f"no rows for view {view!r} in the table")
    methods = sorted(t["method"].astype(str).unique())
    sizes = (t[["size", "params"]].drop_duplicates().sort_values(["params", "size"])
             .reset_index(drop=True))
    return t, methods, sizes


def new_figure(n_panels: int, sharey: bool, logy: bool = False):
    n = max(n_panels, 1)
    ncols = min(n, MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=figure_size(n), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def save_figure(fig: Figure, out_stem: str | os.PathLike) -> list[Path]:
    """PNG and PDF beside each other, each written to a temp name and renamed (io.atomic_path)."""
    stem = Path(out_stem)
    paths = []
    for fmt in FORMATS:
        final = stem.parent / f"{stem.name}.{fmt}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        paths.append(final)
    return paths


def add_legend(fig: Figure, rows: list[list[Line2D]], title: str | None = "base model size") -> None:
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
               title=title, title_fontsize=9)


def add_suptitle(fig: Figure, text: str) -> None:
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(text, width=max(30, int(width * 9.5))))


def fit_index(fits: Fits | dict | None, law: str) -> dict:
    idx: dict = {}
    fits = as_fits(fits)
    if not fits:
        return idx
    if law == "per_size":
        for f in fits.per_size:
            idx[(f.method, f.view, str(f.size))] = f
    elif law == "unified":
        for f in fits.unified:
            idx[(f.method, f.view)] = f
    else:
        raise ValueError("law must be 'per_size' or 'unified'")
    return idx


K_LABEL = "number of merged experts k"
N_LABEL = "base model parameters N"
METHOD_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# no plain ":" here: dotted lines mean "unified law" in these figures
METHOD_LINESTYLES = ["-", "--", "-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (6, 1.5)),
                      (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2, 2, 2)), (0, (4, 4))]


def method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Marker, line style and colour per method (plasma: lightness rises with the index,
    so the methods also differ in greyscale; distinct from the viridis size colours)."""
    n = len(methods)
    cmap = matplotlib.colormaps["plasma"]
    return {m: {"marker": METHOD_MARKERS[i % len(METHOD_MARKERS)],
                "ls": METHOD_LINESTYLES[i % len(METHOD_LINESTYLES)],
                "color": cmap(0.8 * i / max(n - 1, 1)), "label": str(m)}
            for i, m in enumerate(methods)}


def legend_handles(styles: dict[str, dict[str, Any]], ls: bool = True) -> list[Line2D]:
    return [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"] if ls else "none",
                   mec="black", mew=0.5, label=st["label"]) for st in styles.values()]


def grid_figure(nrows: int, ncols: int, sharey: bool | str = False, sharex: bool | str = False,
                 panel_w: float = PANEL_W, panel_h: float = PANEL_H, legend_h: float = LEGEND_H):
    fig = Figure(figsize=(max(panel_w * ncols + 0.6, 6.4), panel_h * nrows + legend_h + 0.4),
                 dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=sharey, sharex=sharex, squeeze=False).ravel()
    return fig, list(axes)


def k_axis(ax, kmin: int, kmax: int) -> None:
    ax.set_xlabel(K_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(kmin - 0.4, kmax + 0.4)


def n_axis(ax, params) -> None:
    """Log x axis of parameter counts, ticks at the measured sizes labelled like ``1.72M``."""
    ps = sorted({float(p) for p in params})
    ax.set_xscale("log")
    ax.set_xticks(ps, [fmt_params(p) for p in ps])
    ax.set_xlim(ps[0] / 1.35, ps[-1] * 1.35)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"{N_LABEL} (log scale)")


def plain_log_y(ax) -> None:
    """Plain-number labels (``3.6`` rather than ``3.6 x 10^0``) on a log y axis; minor
    ticks are all labelled when the axis spans less than one decade, those at 2 and 5 x
    10^n when it spans less than two, none otherwise."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(fmt)
    lo, hi = ax.get_ylim()
    span = hi / lo if lo > 0 else np.inf

    def minor(v, _):
        if span < 10:
            return f"{v:.3g}"
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return f"{v:.3g}" if span < 100 and lead in (2.0, 5.0) else ""

    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))


def panel_tag(ax, tag: str) -> None:
    ax.set_title(tag, loc="left", fontsize=10, fontweight="bold")

