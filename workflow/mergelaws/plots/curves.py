"""Loss and variance across merged subsets vs k, one panel per merge method.

* ``plot_loss_vs_k``: mean loss across merged subsets vs k (one curve per base size) with
  the spread across subsets and the fitted law (per-size or unified).
* ``plot_variance_vs_k``: variance across subsets vs k (log y), with the fitted variance
  laws C/k and C (M-k)/(k (M-1)) when given the fits.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mergelaws.laws import (
    Fits,
    as_fits,
    predict_per_size,
    predict_unified,
    predict_variance,
)
from mergelaws.plots.style import (
    MAX_COLS,
    RC,
    UNITS,
    add_legend,
    add_suptitle,
    fit_index,
    new_figure,
    save_figure,
    setup_view,
    size_styles,
    view_title,
)

__all__ = ["plot_loss_vs_k", "plot_variance_vs_k", "variance_fit_index"]


def plot_loss_vs_k(
    table: pd.DataFrame,
    fits: Fits | dict | None,
    view: str,
    out_stem: str | os.PathLike,
    law: str = "per_size",
    reference: dict[str, float] | None = None,
    reference_label: str = "multitask model",
) -> list[Path]:
    """Mean loss vs k, one panel per method (shared y), one curve per base size.

    ``reference``: per size, a loss drawn as a dotted horizontal line in the size's colour (the
    multitask model's, in the views that average every domain).

    ``table``: ``laws.view_table`` output; ``fits``: ``laws.Fits`` (``laws.fit_all`` or
    ``laws.load_fits``; None for no fitted lines); ``law``: draw the per-size fits (default)
    or the unified fit.  Markers = mean over merged subsets, error bars = +-1 sd across
    subsets, line = fitted law on a fine k grid (k >= 1; the fits use k >= 1 only), hollow
    marker at k = 0 = base model.
    Writes ``<out_stem>.png`` and ``<out_stem>.pdf``; returns their paths.
    """
    t, methods, sizes = setup_view(table, view)
    styles = size_styles(sizes)
    index = fit_index(fits, law)
    kmax = int(t["k"].max())
    kfine = np.linspace(1.0, max(kmax, 1), 200)
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(len(methods), sharey=True)
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
                if reference and str(size) in reference:
                    ax.axhline(reference[str(size)], color=st["color"], ls=":", lw=1.6, zorder=1)
            ax.set_title(str(method))
            ax.set_xlabel("number of merged experts k")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(-0.4 if any_base else 0.6, kmax + 0.4)
        for i, ax in enumerate(axes):
            if i % MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {UNITS}")
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
        if reference:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.6, label=reference_label))
        add_legend(fig, [handles, keys])
        add_suptitle(fig, f"{view_title(view)} vs number of merged experts")
        return save_figure(fig, out_stem)


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
    t, methods, sizes = setup_view(table, view)
    styles = size_styles(sizes)
    index = variance_fit_index(fits)
    kmax = int(t["k"].max())
    drawn = set()
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(len(methods), sharey=True)
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
            if i % MAX_COLS == 0:
                ax.set_ylabel(f"variance across subsets {UNITS}$^2$")
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
        add_legend(fig, rows)
        add_suptitle(fig, f"{view_title(view)}: variance across merged subsets")
        return save_figure(fig, out_stem)

