"""Paper-style figures for merging scaling laws.

* ``plot_loss_vs_k``: mean loss across merged subsets vs k (one panel per merge method,
  one curve per base size) with the spread across subsets and the fitted law.
* ``plot_variance_vs_k``: variance across subsets vs k (log y), with the fitted variance
  laws C/k and C (M-k)/(k (M-1)) when given the fits.
* Paper analogues (the paper's figures), drawn together by ``paper_figures``:
  ``plot_unified_fit`` (Fig 1), ``plot_subset_scatter`` (Fig 3(1-2)/13),
  ``plot_floor_tail_vs_N`` (Fig 4a), ``plot_fractional_return`` (Fig 4b),
  ``plot_methods`` (Fig 5), ``plot_forecast`` (Fig 7).

Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global
state), are readable in greyscale (each base size has its own marker and line style, and
the viridis colours also differ in lightness), and are written as PNG (200 dpi) and PDF.
The fits come as typed ``laws.Fits`` (``laws.fit_all``, or ``laws.load_fits`` for a
fits.json; a fits.json mapping is read the same way).
Every file is written atomically: a temporary file in the destination directory, then
``os.replace`` onto the final name.
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

from mergelaws.laws import (
    Fits,
    as_fits,
    normalise_losses,
    predict_per_size,
    predict_unified,
    predict_variance,
    subset_values,
    view_table,
)
from mergelaws.io import atomic_path

__all__ = ["DPI", "FORMATS", "figure_size", "paper_figures", "plot_floor_tail_vs_N", "plot_forecast",
           "plot_fractional_return", "plot_loss_vs_k", "plot_methods", "plot_subset_scatter",
           "plot_unified_fit", "plot_variance_vs_k", "size_label", "variance_fit_index"]

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
    """PNG and PDF beside each other, each written to a temp name and renamed (io.atomic_path)."""
    stem = Path(out_stem)
    paths = []
    for fmt in FORMATS:
        final = stem.parent / f"{stem.name}.{fmt}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        paths.append(final)
    return paths


def _legend(fig: Figure, rows: list[list[Line2D]], title: str | None = "base model size") -> None:
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


def _suptitle(fig: Figure, text: str) -> None:
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(text, width=max(30, int(width * 9.5))))


def _fit_index(fits: Fits | dict | None, law: str) -> dict:
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


def plot_loss_vs_k(
    table: pd.DataFrame,
    fits: Fits | dict | None,
    view: str,
    out_stem: str | os.PathLike,
    law: str = "per_size",
) -> list[Path]:
    """Mean loss vs k, one panel per method (shared y), one curve per base size.

    ``table``: ``laws.view_table`` output; ``fits``: ``laws.Fits`` (``laws.fit_all`` or
    ``laws.load_fits``; None for no fitted lines); ``law``: draw the per-size fits (default)
    or the unified fit.  Markers = mean over merged subsets, error bars = +-1 sd across
    subsets, line = fitted law on a fine k grid (k >= 1; the fits use k >= 1 only), hollow
    marker at k = 0 = base model.
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


def variance_fit_index(fits: Fits | dict | None) -> dict:
    """``fits.variance`` (``laws.VarianceFit``) keyed by (method, view, size)."""
    fits = as_fits(fits)
    return {(str(f.method), str(f.view), str(f.size)): f for f in (fits.variance if fits else [])}


def plot_variance_vs_k(table: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                       fits: Fits | dict | None = None,
                       laws: tuple[str, ...] = ("inv_k", "finite_pool")) -> list[Path]:
    """Variance of the view's loss across merged subsets vs k (log y), one panel per method,
    one series per base size; k with fewer than 2 subsets (or zero variance) is skipped.

    With ``fits`` (``laws.Fits``, its ``variance`` entries), the fitted variance
    laws are drawn over the fitted k range: ``inv_k`` Var = C/k (Cor. 3.2) as a line in the
    size's style, ``finite_pool`` Var = C (M-k)/(k (M-1)) as a thin dotted line; the
    measured variances are then markers only.  Without fits, markers joined by lines.
    Writes ``<out_stem>.png`` and ``<out_stem>.pdf``; returns their paths."""
    for law in laws:
        if law not in ("inv_k", "finite_pool"):
            raise ValueError(f"unknown variance law {law!r}; use 'inv_k' or 'finite_pool'")
    t, methods, sizes = _setup(table, view)
    styles = _styles(sizes)
    index = variance_fit_index(fits)
    kmax = int(t["k"].max())
    drawn = set()
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
                f = index.get((str(method), view, str(size)))
                ok = bool(f and f.converged and f.k_fitted)
                ax.plot(d["k"], d["var"], marker=st["marker"], ls="none" if ok else st["ls"],
                        color=st["color"], mec="black", mew=0.5, ms=5.5, zorder=3)
                if not ok:
                    continue
                k_lo, k_hi = min(f.k_fitted), max(f.k_fitted)
                kfine = np.linspace(k_lo, k_hi, 100)
                for law in laws:
                    y = predict_variance(f, kfine, law)
                    if not (np.all(np.isfinite(y)) and np.all(y > 0)):
                        continue
                    drawn.add(law)
                    if law == "inv_k":
                        ax.plot(kfine, y, ls=st["ls"], color=st["color"], lw=1.5, zorder=2)
                    else:
                        ax.plot(kfine, y, ls=":", color=st["color"], lw=1.0, alpha=0.9, zorder=2)
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
        rows = [handles]
        keys = []
        if "inv_k" in drawn:
            keys.append(Line2D([], [], color="0.3", ls="-", lw=1.5,
                               label="fit Var = C/k (Cor. 3.2)"))
        if "finite_pool" in drawn:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.0,
                               label="fit Var = C(M−k)/(k(M−1)) (finite pool)"))
        if keys:
            rows.append([Line2D([], [], color="0.3", marker="o", ls="none", mec="black", mew=0.5,
                                label="measured variance")] + keys)
        _legend(fig, rows)
        _suptitle(fig, f"{_view_title(view)}: variance across merged subsets")
        return _save(fig, out_stem)


# --------------------------------------------------------------------------------------
# Paper-figure analogues (the paper's figures)
# --------------------------------------------------------------------------------------

_K_LABEL = "number of merged experts k"
_N_LABEL = "base model parameters N"
_METHOD_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# no plain ":" here: dotted lines mean "unified law" in these figures
_METHOD_LINESTYLES = ["-", "--", "-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (6, 1.5)),
                      (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2, 2, 2)), (0, (4, 4))]


def _method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Marker, line style and colour per method (plasma: lightness rises with the index,
    so the methods also differ in greyscale; distinct from the viridis size colours)."""
    n = len(methods)
    cmap = matplotlib.colormaps["plasma"]
    return {m: {"marker": _METHOD_MARKERS[i % len(_METHOD_MARKERS)],
                "ls": _METHOD_LINESTYLES[i % len(_METHOD_LINESTYLES)],
                "color": cmap(0.8 * i / max(n - 1, 1)), "label": str(m)}
            for i, m in enumerate(methods)}


def _handles(styles: dict[str, dict[str, Any]], ls: bool = True) -> list[Line2D]:
    return [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"] if ls else "none",
                   mec="black", mew=0.5, label=st["label"]) for st in styles.values()]


def _grid_figure(nrows: int, ncols: int, sharey: bool = False, sharex: bool = False,
                 panel_w: float = _PANEL_W, panel_h: float = _PANEL_H, legend_h: float = _LEGEND_H):
    fig = Figure(figsize=(max(panel_w * ncols + 0.6, 6.4), panel_h * nrows + legend_h + 0.4),
                 dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=sharey, sharex=sharex, squeeze=False).ravel()
    return fig, list(axes)


def _k_axis(ax, kmin: int, kmax: int) -> None:
    ax.set_xlabel(_K_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(kmin - 0.4, kmax + 0.4)


def _n_axis(ax, params) -> None:
    """Log x axis of parameter counts, ticks at the measured sizes labelled like ``1.72M``."""
    ps = sorted({float(p) for p in params})
    ax.set_xscale("log")
    ax.set_xticks(ps, [_fmt_params(p) for p in ps])
    ax.set_xlim(ps[0] / 1.35, ps[-1] * 1.35)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"{_N_LABEL} (log scale)")


def _plain_log_y(ax) -> None:
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


def _panel_tag(ax, tag: str) -> None:
    ax.set_title(tag, loc="left", fontsize=10, fontweight="bold")


def plot_unified_fit(table: pd.DataFrame, fits: Fits | dict | None, view: str,
                     out_stem: str | os.PathLike) -> list[Path]:
    """Fig 1 analogue: mean loss vs k (k >= 1), one panel per method (shared y), one series
    per base size; markers = measured means over merged subsets, dotted = the unified law
    ``L* + B N^-beta + A0 N^-gamma/(k+b)`` from ``fits.unified`` (one fit per method,
    evaluated at each size's N).  Panels whose unified fit is missing or did not converge
    show the means only and say so.  Returns the [png, pdf] paths."""
    t, methods, sizes = _setup(table, view)
    t = t[t["k"] >= 1]
    if t.empty:
        raise ValueError("no merged (k >= 1) rows to plot")
    styles = _styles(sizes)
    index = _fit_index(fits, "unified")
    kmax = int(t["k"].max())
    kfine = np.linspace(1.0, max(kmax, 1), 200)
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(len(methods), sharey=True)
        any_fit = False
        for ax, method in zip(axes, methods):
            tm = t[t["method"] == method]
            f = index.get((method, view))
            ok = bool(f and f.converged)
            for size, params in zip(sizes["size"], sizes["params"]):
                st = styles[size]
                d = tm[tm["size"] == size].sort_values("k")
                if d.empty:
                    continue
                ax.plot(d["k"], d["mean"], st["marker"], color=st["color"], mec="black", mew=0.5,
                        ms=5.5, ls="none", zorder=3)
                if ok:
                    y = predict_unified(f, float(params) / 1e9, kfine)
                    if np.all(np.isfinite(y)):
                        any_fit = True
                        ax.plot(kfine, y, ls=":", lw=1.8, color=st["color"], zorder=2)
            title = str(method)
            if ok and f.r2 is not None:
                title += f"  (unified $R^2$ = {f.r2:.3f})"
            elif not ok:
                why = (f.reason if f else None) or "it did not converge"
                import textwrap

                ax.text(0.97, 0.97, "no unified fit:\n" + textwrap.fill(why, 30), transform=ax.transAxes,
                        bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
                        ha="right", va="top", fontsize=8, color="0.3")
            ax.set_title(title, fontsize=10)
            _k_axis(ax, 1, kmax)
        for i, ax in enumerate(axes):
            if i % _MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {_UNITS}")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls=":", mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        keys = [Line2D([], [], color="0.3", marker="o", ls="none", label="measured mean over subsets")]
        if any_fit:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.8,
                               label="unified law $L^* + BN^{-\\beta} + A_0N^{-\\gamma}/(k+b)$"))
        _legend(fig, [handles, keys])
        _suptitle(fig, f"{_view_title(view)} vs k, with the unified (N, k) law")
        return _save(fig, out_stem)


def plot_subset_scatter(losses: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                        method: str | None = None) -> list[Path]:
    """Fig 3(1-2)/13 analogue: the view's value of every merged subset (small translucent
    points, jittered in k) and the mean over subsets per k (line), one panel per base size,
    for one merge method (default: the first in sorted order).  ``losses``: the raw long
    losses table (one row per size, method, subset, eval domain).  Returns [png, pdf]."""
    ps = subset_values(normalise_losses(losses), view)
    if ps.empty:
        raise ValueError(f"no rows for view {view!r}")
    methods = sorted(ps["method"].astype(str).unique())
    method = methods[0] if method is None else str(method)
    ps = ps[ps["method"] == method]
    if ps.empty:
        raise ValueError(f"no rows for method {method!r} (have {methods})")
    sizes = (ps[["size", "params"]].drop_duplicates().sort_values(["params", "size"])
             .reset_index(drop=True))
    styles = _styles(sizes)
    kmin, kmax = int(ps["k"].min()), int(ps["k"].max())
    rng = np.random.default_rng(0)  # fixed jitter: identical files for identical input
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(len(sizes), sharey=False)
        for ax, size in zip(axes, sizes["size"]):
            st = styles[size]
            d = ps[ps["size"] == size].sort_values(["k", "subset"])
            jit = rng.uniform(-0.18, 0.18, len(d))
            ax.scatter(d["k"] + jit, d["value"], s=11, color=st["color"], alpha=0.45,
                       edgecolors="none", zorder=2)
            m = d.groupby("k")["value"].mean()
            ax.plot(m.index, m.values, color="black", lw=1.4, ls="-", marker=st["marker"],
                    mfc=st["color"], mec="black", mew=0.6, ms=6, zorder=3)
            ax.set_title(st["label"])
            _k_axis(ax, kmin, kmax)
        for i, ax in enumerate(axes):
            if i % _MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {_UNITS}")
        keys = [Line2D([], [], color="0.45", marker="o", ms=4, alpha=0.6, ls="none",
                       label="one merged subset (jittered in k)"),
                Line2D([], [], color="black", marker="o", mfc="0.6", ls="-",
                       label="mean over subsets $E[L\\,|\\,N,k]$")]
        _legend(fig, [keys], title=None)
        _suptitle(fig, f"{_view_title(view)}: every merged subset, method {method}")
        return _save(fig, out_stem)


def plot_floor_tail_vs_N(fits: Fits | dict, view: str, out_stem: str | os.PathLike) -> list[Path]:
    """Fig 4a analogue: the per-size fits' floor L_inf(N) and tail amplitude A(N) vs N
    (parameters), log-log, one line per method; dotted = the unified law's floor
    ``L* + B N^-beta`` and tail ``A0 N^-gamma`` (where converged).  Non-positive or
    unconverged estimates cannot go on log axes and are left out (counted in the panel).
    Returns [png, pdf]."""
    fits = as_fits(fits)
    rows = fits.per_size_of(view) if fits else []
    if not rows:
        raise ValueError(f"no per-size fits for view {view!r}")
    methods = sorted({str(f.method) for f in rows})
    mstyles = _method_styles(methods)
    uni = _fit_index(fits, "unified")
    allN = np.array([float(f.params) for f in rows])
    nfine = np.geomspace(allN.min() / 1.3, allN.max() * 1.3, 100)
    with matplotlib.rc_context(_RC):
        fig, axes = _grid_figure(1, 2, panel_w=4.2, panel_h=3.6)
        any_uni = False
        for ax, key, ukey, title in ((axes[0], "L_inf", "floor", "(a) floor $L_\\infty(N)$"),
                                     (axes[1], "A", "tail", "(b) tail amplitude $A(N)$")):
            dropped = 0
            for method in methods:
                st = mstyles[method]
                fm = sorted((f for f in rows if f.method == method), key=lambda f: f.params)
                pts = [(float(f.params), getattr(f, key)) for f in fm]
                good = [(n, v) for n, v in pts
                        if v is not None and np.isfinite(v) and v > 0 and
                        next(f for f in fm if float(f.params) == n).converged]
                dropped += len(pts) - len(good)
                if good:
                    n, v = zip(*good)
                    ax.plot(n, v, marker=st["marker"], ls=st["ls"], color=st["color"], mec="black",
                            mew=0.5, ms=6, zorder=3)
                u = uni.get((method, view))
                if u and u.converged:
                    nb = nfine / 1e9
                    if ukey == "floor":
                        y = u.L_star + u.B * nb ** (-u.beta)
                    else:
                        y = u.A0 * nb ** (-u.gamma)
                    y = np.asarray(y, dtype=float)
                    if np.all(np.isfinite(y)) and np.all(y > 0):
                        any_uni = True
                        ax.plot(nfine, y, ls=":", lw=1.4, color=st["color"], zorder=2)
            _n_axis(ax, allN)
            ax.set_yscale("log")
            _plain_log_y(ax)
            ax.set_ylabel(("floor $L_\\infty$ " if key == "L_inf" else "amplitude $A$ ") + _UNITS)
            _panel_tag(ax, title)
            if dropped:
                ax.text(0.03, 0.03, f"{dropped} estimate(s) <= 0 or unconverged not shown",
                        transform=ax.transAxes, fontsize=7.5, color="0.3", va="bottom")
        keys = [Line2D([], [], color="0.3", marker="o", ls="-", label="per-size fit estimate")]
        if any_uni:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.4,
                               label="unified law (dotted)"))
        _legend(fig, [_handles(mstyles), keys], title="merge method")
        _suptitle(fig, f"{_view_title(view)}: fitted floor and tail vs N")
        return _save(fig, out_stem)


def _return_curves(t: pd.DataFrame) -> tuple[np.ndarray, list[tuple[str, str, np.ndarray]]]:
    """R(k) on the common k >= 1 grid for every (size, method) with an improvement."""
    merged = t[t["k"] >= 1]
    ks = np.array(sorted(merged["k"].unique()), dtype=int)
    curves = []
    for (size, method), d in merged.groupby(["size", "method"], sort=False):
        s = d.set_index("k")["mean"].reindex(ks)
        if s.isna().any() or len(ks) < 2:
            continue
        v = s.to_numpy(dtype=float)
        env = np.minimum.accumulate(v)
        gain = v[0] - env[-1]
        if gain > 0:
            curves.append((str(size), str(method), (v[0] - env) / gain))
    return ks, curves


def plot_fractional_return(table: pd.DataFrame, view: str, out_stem: str | os.PathLike) -> list[Path]:
    """Fig 4b analogue: the fractional return R(k) = (L(1) - env(k)) / (L(1) - env(M)) with
    env the cumulative minimum of the measured means over k = 1..M.  (a) median over all
    (size, method) curves with the interquartile band (thin grey: each curve) and the
    80 % / 90 % lines; (b) k90, the smallest k with R >= 0.9, per method x size.
    Curves without an improvement (L(1) <= env(M)) are left out.  Returns [png, pdf]."""
    from mergelaws.plan import k_fraction

    t, methods, sizes = _setup(table, view)
    ks, curves = _return_curves(t)
    with matplotlib.rc_context(_RC):
        fig, axes = _grid_figure(1, 2, panel_w=4.2, panel_h=3.6, legend_h=0.9)
        ax = axes[0]
        if curves:
            R = np.vstack([c for _, _, c in curves])
            for r in R:
                ax.plot(ks, r, color="0.75", lw=0.7, zorder=1)
            q25, q50, q75 = np.percentile(R, [25, 50, 75], axis=0)
            ax.fill_between(ks, q25, q75, color="tab:blue", alpha=0.25, lw=0, zorder=2)
            ax.plot(ks, q50, color="navy", marker="o", mec="black", mew=0.5, lw=1.8, zorder=3)
        else:
            ax.text(0.5, 0.5, "no curve improves from k = 1", transform=ax.transAxes,
                    ha="center", va="center")
        for q, ls in ((0.8, "--"), (0.9, ":")):
            ax.axhline(q, color="black", ls=ls, lw=1.0, zorder=1)
            ax.text(0.03, q + 0.01, f"{int(q * 100)}%", va="bottom", ha="left", fontsize=8,
                    transform=ax.get_yaxis_transform(), zorder=4)
        ax.set_ylim(-0.05, 1.08)
        ax.set_ylabel("fractional return R(k) (fraction of the k=1→M gain)")
        _k_axis(ax, 1, int(ks.max()) if ks.size else 1)
        _panel_tag(ax, f"(a) R(k), {len(curves)} (size, method) curves")
        # (b) k90 heatmap
        ax = axes[1]
        size_list, meth_list = list(sizes["size"]), list(methods)
        K = np.full((len(meth_list), len(size_list)), np.nan)
        for i, m in enumerate(meth_list):
            for j, s in enumerate(size_list):
                d = t[(t["method"] == m) & (t["size"] == s) & (t["k"] >= 1)].sort_values("k")
                if len(d) >= 2:
                    kk = k_fraction(d["mean"].to_numpy(), d["k"].to_numpy(), fractions=(0.9,))
                    if kk.get("k90") is not None:
                        K[i, j] = kk["k90"]
        kmax = int(t["k"].max())
        im = ax.imshow(K, cmap="viridis", vmin=1, vmax=max(kmax, 2), aspect="auto")
        for i in range(K.shape[0]):
            for j in range(K.shape[1]):
                v = K[i, j]
                txt = "–" if not np.isfinite(v) else f"{int(v)}"
                dark = np.isfinite(v) and (v - 1) / max(kmax - 1, 1) < 0.55
                ax.text(j, i, txt, ha="center", va="center", fontsize=10,
                        color="white" if dark else "black", fontweight="bold")
        ax.set_xticks(range(len(size_list)),
                      [size_label(s, p) for s, p in zip(sizes["size"], sizes["params"])])
        ax.set_yticks(range(len(meth_list)), meth_list)
        ax.set_xlabel("base model size")
        ax.grid(False)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label("$k_{90}$ (experts)")
        cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _panel_tag(ax, "(b) $k_{90}$: smallest k with R(k) ≥ 0.9")
        keys = [Line2D([], [], color="navy", marker="o", mec="black", mew=0.5, label="median"),
                matplotlib.patches.Patch(color="tab:blue", alpha=0.25, label="interquartile range"),
                Line2D([], [], color="0.75", lw=0.7, label="one (size, method)"),
                Line2D([], [], color="black", ls="--", lw=1, label="80 %"),
                Line2D([], [], color="black", ls=":", lw=1, label="90 %")]
        _legend(fig, [keys], title=None)
        _suptitle(fig, f"{_view_title(view)}: fractional return R(k)")
        return _save(fig, out_stem)


def plot_methods(table: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                 size: str | None = None) -> list[Path]:
    """Fig 5 analogue, comparing the merge methods.  At one base size (default the
    largest): (a) mean loss vs k (bars +-1 standard error of the mean), (b) variance across
    subsets vs k (log y; k with < 2 subsets or zero variance left out); (c) mean loss vs N
    (log x) at k = 3 (or the largest measured k below 3).  One line per method.
    Returns [png, pdf]."""
    t, methods, sizes = _setup(table, view)
    size = str(sizes["size"].iloc[-1]) if size is None else str(size)
    if size not in set(sizes["size"]):
        raise ValueError(f"no size {size!r} in the table (have {list(sizes['size'])})")
    params = float(sizes.loc[sizes["size"] == size, "params"].iloc[0])
    mst = _method_styles(methods)
    merged = t[t["k"] >= 1]
    kmin, kmax = int(merged["k"].min()), int(merged["k"].max())
    avail = sorted(merged["k"].unique())
    kc = 3 if 3 in avail else max([k for k in avail if k <= 3] or avail[:1])
    nm = len(methods)
    off = {m: (i - (nm - 1) / 2) * 0.08 for i, m in enumerate(methods)}
    with matplotlib.rc_context(_RC):
        fig, axes = _grid_figure(1, 3, panel_w=3.7, panel_h=3.5)
        ax_a, ax_b, ax_c = axes
        for m in methods:
            st = mst[m]
            d = merged[(merged["method"] == m) & (merged["size"] == size)].sort_values("k")
            if not d.empty:
                ax_a.errorbar(d["k"] + off[m], d["mean"], yerr=d["sem"], marker=st["marker"],
                              ls=st["ls"], color=st["color"], mec="black", mew=0.5, ms=5,
                              capsize=2, elinewidth=0.8)
                dv = d[(d["n_subsets"] >= 2) & (d["var"] > 0)]
                ax_b.plot(dv["k"], dv["var"], marker=st["marker"], ls=st["ls"], color=st["color"],
                          mec="black", mew=0.5, ms=5)
            c = merged[(merged["method"] == m) & (merged["k"] == kc)].sort_values("params")
            if not c.empty:
                ax_c.errorbar(c["params"], c["mean"], yerr=c["sem"], marker=st["marker"], ls=st["ls"],
                              color=st["color"], mec="black", mew=0.5, ms=5, capsize=2,
                              elinewidth=0.8)
        slabel = size_label(size, params)
        _k_axis(ax_a, kmin, kmax)
        ax_a.set_ylabel(f"mean cross-entropy {_UNITS}")
        _panel_tag(ax_a, f"(a) mean vs k at {slabel}")
        _k_axis(ax_b, kmin, kmax)
        ax_b.set_yscale("log")
        ax_b.set_ylabel(f"variance across subsets {_UNITS}$^2$")
        _panel_tag(ax_b, f"(b) variance vs k at {slabel}")
        _n_axis(ax_c, sizes["params"])
        ax_c.set_ylabel(f"mean cross-entropy {_UNITS}")
        _panel_tag(ax_c, f"(c) mean vs N at k = {kc}")
        keys = [Line2D([], [], color="0.3", marker="o", ls="none",
                       label="mean over subsets, bars ±1 s.e.m. (a, c)")]
        _legend(fig, [_handles(mst), keys], title="merge method")
        _suptitle(fig, f"{_view_title(view)}: merge methods compared")
        return _save(fig, out_stem)


def plot_forecast(table: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                  points: tuple[int, int, int] = (1, 2, 4)) -> list[Path]:
    """Fig 7 analogue: the three-point forecast (``plan.three_point_forecast``: the per-size
    law fitted through the measured means at k in ``points`` only) vs the measured means.
    One panel per base size with every method (markers = measured, lines = forecast,
    larger ringed markers = the three fitted points); the last panel: forecast error
    (forecast - measured) vs k, median over sizes per method, bars = min..max over sizes.
    (size, method) pairs lacking a fitted point are skipped.  Returns [png, pdf]."""
    from mergelaws.plan import three_point_forecast

    t, methods, sizes = _setup(table, view)
    merged = t[t["k"] >= 1]
    kmax = int(merged["k"].max())
    mst = _method_styles(methods)
    kfine = np.linspace(1.0, kmax, 200)
    errs: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    n_panels = len(sizes) + 1
    ncols = min(n_panels, _MAX_COLS)
    nrows = math.ceil(n_panels / ncols)
    with matplotlib.rc_context(_RC):
        fig, axes = _grid_figure(nrows, ncols)
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        skipped = 0
        for ax, size, params in zip(axes, sizes["size"], sizes["params"]):
            for m in methods:
                st = mst[m]
                d = merged[(merged["method"] == m) & (merged["size"] == size)].sort_values("k")
                if d.empty:
                    continue
                fc = three_point_forecast(d["k"].to_numpy(), d["mean"].to_numpy(), points=points)
                ax.plot(d["k"], d["mean"], st["marker"], ls="none", color=st["color"], mec="black",
                        mew=0.5, ms=5, zorder=3)
                if fc.get("L_inf") is None:
                    skipped += 1
                    continue
                law = {"L_inf": fc["L_inf"], "A": fc["A"], "b": fc["b"]}
                ax.plot(kfine, law["L_inf"] + law["A"] / (kfine + law["b"]), ls=st["ls"],
                        color=st["color"], lw=1.3, zorder=2)
                fp = d[d["k"].isin(points)]
                ax.plot(fp["k"], fp["mean"], "o", ms=10, mfc="none", mec="black", mew=0.9, zorder=4)
                for kk, yy in zip(d["k"], d["mean"]):
                    if int(kk) not in points:
                        errs[m].setdefault(int(kk), []).append(fc["forecast"][int(kk)] - float(yy))
            for p in points:
                ax.axvline(p, color="0.85", lw=0.8, zorder=0)
            _k_axis(ax, 1, kmax)
            ax.set_ylabel(f"cross-entropy {_UNITS}")
            ax.set_title(size_label(size, params))
        ax = axes[len(sizes)]
        nm = len(methods)
        any_err = False
        for i, m in enumerate(methods):
            st = mst[m]
            kk = sorted(errs[m])
            if not kk:
                continue
            any_err = True
            e = [np.array(errs[m][k]) for k in kk]
            med = np.array([np.median(v) for v in e])
            lo = med - np.array([v.min() for v in e])
            hi = np.array([v.max() for v in e]) - med
            x = np.array(kk) + (i - (nm - 1) / 2) * 0.1
            ax.errorbar(x, med, yerr=[lo, hi], marker=st["marker"], ls=st["ls"], color=st["color"],
                        mec="black", mew=0.5, ms=5, capsize=2, elinewidth=0.8)
        ax.axhline(0, color="black", lw=0.8)
        if not any_err:
            ax.text(0.5, 0.5, "no held-out k", transform=ax.transAxes, ha="center", va="center")
        _k_axis(ax, 1, kmax)
        ax.set_ylabel(f"forecast − measured {_UNITS}")
        ax.set_title("forecast error (median, min–max over sizes)", fontsize=9.5)
        keys = [Line2D([], [], color="0.3", marker="o", ls="none", label="measured mean"),
                Line2D([], [], color="0.3", ls="-", label="forecast from k ∈ {%s}" %
                       ", ".join(str(p) for p in points)),
                Line2D([], [], color="black", marker="o", mfc="none", ms=9, ls="none",
                       label="points used by the forecast")]
        if skipped:
            keys.append(Line2D([], [], ls="none", label=f"{skipped} (size, method) without forecast"))
        _legend(fig, [_handles(mst), keys], title="merge method")
        _suptitle(fig, f"{_view_title(view)}: three-point forecast vs measurement")
        return _save(fig, out_stem)


PAPER_FIGURES = ("fig1_unified", "fig3_scatter", "fig4a_floor_tail", "fig4b_return",
                 "fig5_methods", "fig7_forecast")


def paper_figures(losses: pd.DataFrame, fits: Fits | dict | None, out_dir: str | os.PathLike,
                  view: str = "cross_domain") -> list[Path]:
    """Draw every paper-figure analogue for ``view`` into ``out_dir`` as
    ``<name>_<view>.png/.pdf`` with ``name`` in ``PAPER_FIGURES`` (a ``domain:x`` view
    becomes ``domain-x`` in file names).  ``fits``: ``laws.Fits``; without it the
    figures that need fits (Fig 1 draws means only; Fig 4a is skipped).  Returns every
    path written, in ``PAPER_FIGURES`` order."""
    fits = as_fits(fits)
    out = Path(out_dir)
    tag = view.replace(":", "-").replace("/", "-")
    table = view_table(losses, [view])
    stem = {n: out / f"{n}_{tag}" for n in PAPER_FIGURES}
    paths: list[Path] = []
    paths += plot_unified_fit(table, fits, view, stem["fig1_unified"])
    paths += plot_subset_scatter(losses, view, stem["fig3_scatter"])
    if fits and fits.per_size_of(view):
        paths += plot_floor_tail_vs_N(fits, view, stem["fig4a_floor_tail"])
    paths += plot_fractional_return(table, view, stem["fig4b_return"])
    paths += plot_methods(table, view, stem["fig5_methods"])
    paths += plot_forecast(table, view, stem["fig7_forecast"])
    return paths
