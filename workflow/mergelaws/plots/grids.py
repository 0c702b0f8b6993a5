"""Grids of panels from the losses table: per-domain CE vs k with the unified law (Figs 16–19),
mean CE vs N per k (Fig 22), and the per-expert gain ΔL(k) with k80/k90 (Fig 9b)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mergelaws.laws import Fits, fit_per_size, predict_per_size, predict_unified
from mergelaws.plots.style import (
    MAX_COLS,
    RC,
    UNITS,
    add_legend,
    add_suptitle,
    fit_index,
    grid_figure,
    k_axis,
    legend_handles,
    method_styles,
    n_axis,
    panel_tag,
    save_figure,
    setup_view,
    size_label,
    size_styles,
    view_title,
)

__all__ = ["gain_table", "plot_ce_vs_N_per_k", "plot_domain_grid", "plot_gain"]


def _grid_shape(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    ncols = min(max(n, 1), max_cols, math.ceil(math.sqrt(max(n, 1))) if n > 4 else max_cols)
    return math.ceil(max(n, 1) / ncols), ncols


def plot_domain_grid(table: pd.DataFrame, fits: Fits | dict | None, method: str,
                     out_stem: str | os.PathLike) -> list[Path]:
    """Figs 16–19 analogue for one merge method: one panel per eval domain (view
    ``domain:<d>``), mean CE over merged subsets vs k (k >= 1) per base size (markers), with
    the unified law fitted to that domain (``fits.unified``, dotted) where it converged;
    where it did not (or without fits), the per-size law L_inf + A/(k+b) is fitted to that
    size's means on the spot and drawn dashed, and the panel says so.  ``table``:
    ``laws.view_table`` with the ``domain:`` views.  Returns [png, pdf]."""
    views = sorted(v for v in table["view"].unique() if str(v).startswith("domain:"))
    t = table[(table["method"].astype(str) == str(method)) & table["view"].isin(views) & (table["k"] >= 1)]
    if t.empty:
        raise ValueError(f"no per-domain rows for method {method!r}")
    sizes = t[["size", "params"]].drop_duplicates().sort_values(["params", "size"]).reset_index(drop=True)
    styles = size_styles(sizes)
    uni = fit_index(fits, "unified")
    kmax = int(t["k"].max())
    kfine = np.linspace(1.0, kmax, 200)
    nrows, ncols = _grid_shape(len(views))
    drawn = set()
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(nrows, ncols, panel_w=3.4, panel_h=2.9)
        for ax in axes[len(views):]:
            ax.set_visible(False)
        for i, (ax, view) in enumerate(zip(axes, views)):
            tv = t[t["view"] == view]
            f = uni.get((str(method), view))
            ok = bool(f and f.converged)
            for size, params in zip(sizes["size"], sizes["params"]):
                st = styles[size]
                d = tv[tv["size"] == size].sort_values("k")
                if d.empty:
                    continue
                ax.plot(d["k"], d["mean"], st["marker"], color=st["color"], mec="black", mew=0.5,
                        ms=4.5, ls="none", zorder=3)
                if ok:
                    y, ls, kind = predict_unified(f, float(params) / 1e9, kfine), ":", "unified"
                else:
                    p = fit_per_size(d["k"].to_numpy(), d["mean"].to_numpy(), weights="k")
                    y, ls, kind = (predict_per_size(p, kfine) if p.converged else None), "--", "per_size"
                if y is not None and np.all(np.isfinite(y)):
                    drawn.add(kind)
                    ax.plot(kfine, y, ls=ls, lw=1.5, color=st["color"], zorder=2)
            title = view.split(":", 1)[1]
            if ok and f.r2 is not None:
                title += f"  ($R^2$ = {f.r2:.3f})"
            elif not ok:
                title += "  (per-size fits)"
            ax.set_title(title, fontsize=10)
            k_axis(ax, 1, kmax)
            if i % ncols == 0:
                ax.set_ylabel(f"CE {UNITS}")
            if i < len(views) - ncols:
                ax.set_xlabel("")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls="none", mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        keys = [Line2D([], [], color="0.3", marker="o", ls="none", label="mean over merged subsets")]
        if "unified" in drawn:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.5,
                               label="unified law of the domain $L^* + BN^{-\\beta} + A_0N^{-\\gamma}/(k+b)$"))
        if "per_size" in drawn:
            keys.append(Line2D([], [], color="0.3", ls="--", lw=1.5,
                               label="per-size law $L_\\infty + A/(k+b)$ (no converged unified fit)"))
        add_legend(fig, [handles, keys])
        add_suptitle(fig, f"CE on each eval domain vs number of merged experts, method {method}")
        return save_figure(fig, out_stem)


def plot_ce_vs_N_per_k(table: pd.DataFrame, view: str, out_stem: str | os.PathLike) -> list[Path]:
    """Fig 22 analogue: mean CE over merged subsets vs N (log x), one panel per k >= 1 (shared
    y), one line per merge method, bars +-1 standard error of the mean across subsets (none
    where one subset was measured).  Returns [png, pdf]."""
    t, methods, sizes = setup_view(table, view)
    t = t[t["k"] >= 1]
    if t.empty:
        raise ValueError("no merged (k >= 1) rows to plot")
    ks = sorted(int(k) for k in t["k"].unique())
    mst = method_styles(methods)
    nrows, ncols = _grid_shape(len(ks))
    nm = len(methods)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(nrows, ncols, sharey=True, panel_w=3.3, panel_h=2.9)
        for ax in axes[len(ks):]:
            ax.set_visible(False)
        for i, (ax, k) in enumerate(zip(axes, ks)):
            tk = t[t["k"] == k]
            for j, m in enumerate(methods):
                st = mst[m]
                d = tk[tk["method"] == m].sort_values("params")
                if d.empty:
                    continue
                x = d["params"].to_numpy(float) * 1.04 ** (j - (nm - 1) / 2)
                ax.errorbar(x, d["mean"], yerr=d["sem"], marker=st["marker"], ls=st["ls"],
                            color=st["color"], mec="black", mew=0.5, ms=5, capsize=2, elinewidth=0.8)
            n_axis(ax, sizes["params"])
            n_sub = int(tk["n_subsets"].max()) if not tk.empty else 0
            panel_tag(ax, f"k = {k}  ({n_sub} subset{'s' if n_sub != 1 else ''})")
            if i % ncols == 0:
                ax.set_ylabel(f"mean CE {UNITS}")
            if i < len(ks) - ncols:
                ax.set_xlabel("")
        keys = [Line2D([], [], color="0.3", marker="o", ls="none",
                       label="mean over subsets, bars ±1 s.e.m.")]
        add_legend(fig, [legend_handles(mst), keys], title="merge method")
        add_suptitle(fig, f"{view_title(view)} vs base model size, one panel per k")
        return save_figure(fig, out_stem)


def gain_table(table: pd.DataFrame, view: str) -> pd.DataFrame:
    """ΔL(k) = L(k-1) - L(k) of the means over subsets, per (size, params, method, k), for
    k >= 2 (k = 1, the jump from the base model, is left out), with the k80 and k90 of the
    fractional return (``plan.k_fraction``) of that (size, method) as columns."""
    from mergelaws.plan import k_fraction

    t, _, _ = setup_view(table, view)
    rows = []
    for (size, params, method), d in t[t["k"] >= 1].groupby(["size", "params", "method"], sort=True):
        d = d.sort_values("k")
        kk = d["k"].to_numpy(int)
        v = d["mean"].to_numpy(float)
        q = k_fraction(v, kk) if len(kk) >= 2 else {"k80": None, "k90": None}
        for a, b, la, lb in zip(kk[:-1], kk[1:], v[:-1], v[1:]):
            if b == a + 1:
                rows.append({"size": size, "params": params, "method": method, "k": int(b),
                             "delta": la - lb, "k80": q["k80"], "k90": q["k90"]})
    return pd.DataFrame(rows, columns=["size", "params", "method", "k", "delta", "k80", "k90"])


def plot_gain(table: pd.DataFrame, view: str, out_stem: str | os.PathLike) -> list[Path]:
    """Fig 9b analogue for any study: ΔL(k) = L(k-1) - L(k), the drop of the mean CE from the
    k-th expert (k >= 2), one panel per method with one line per base size (each size is its
    own pool of experts); the last panel: k90 per (size, method) as bars with k80 marked
    (the smallest k reaching 80 % / 90 % of the k = 1 -> M gain, ``plan.k_fraction``).
    Returns [png, pdf]."""
    t, methods, sizes = setup_view(table, view)
    g = gain_table(table, view)
    if g.empty:
        raise ValueError("need means at >= 2 consecutive k >= 1 to draw ΔL(k)")
    styles = size_styles(sizes)
    mst = method_styles(methods)
    kmax = int(t["k"].max())
    n_panels = len(methods) + 1
    ncols = min(n_panels, MAX_COLS + 1 if n_panels == MAX_COLS + 1 else MAX_COLS)
    nrows = math.ceil(n_panels / ncols)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(nrows, ncols, panel_w=3.3, panel_h=3.1)
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        gm = g.groupby("method")
        ylo = min(0.0, float(g["delta"].min())) * 1.1
        yhi = float(g["delta"].max()) * 1.1
        for i, (ax, m) in enumerate(zip(axes, methods)):
            dm = gm.get_group(m) if m in gm.groups else g.iloc[:0]
            for size in sizes["size"]:
                st = styles[size]
                d = dm[dm["size"] == size].sort_values("k")
                if d.empty:
                    continue
                ax.plot(d["k"], d["delta"], marker=st["marker"], ls=st["ls"], color=st["color"],
                        mec="black", mew=0.5, ms=5)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylim(ylo, yhi)
            k_axis(ax, 2, kmax)
            panel_tag(ax, str(m))
            if i % ncols == 0:
                ax.set_ylabel(f"ΔL(k) = L(k−1) − L(k) {UNITS}")
        # k80 / k90 bars
        ax = axes[len(methods)]
        q = g.drop_duplicates(["size", "method"])
        w = 0.8 / len(methods)
        for j, m in enumerate(methods):
            st = mst[m]
            d = q[q["method"] == m].set_index("size").reindex(sizes["size"])
            x = np.arange(len(sizes)) - 0.4 + w / 2 + j * w
            k90 = d["k90"].to_numpy(float)
            k80 = d["k80"].to_numpy(float)
            ax.bar(x, k90, width=w, color=st["color"], edgecolor="black", lw=0.5)
            ax.plot(x, k80, ls="none", marker="_", ms=w * 28, mew=2.2, color="black")
        ax.set_xticks(np.arange(len(sizes)), [size_label(s, p) for s, p in zip(sizes["size"], sizes["params"])],
                      fontsize=8.5)
        ax.set_ylim(0, kmax + 0.5)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("experts k")
        ax.set_xlabel("base model size (pool)")
        ax.grid(axis="x", visible=False)
        panel_tag(ax, "$k_{90}$ (bars), $k_{80}$ (ticks)")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"], mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        keys = [Patch(fc=st["color"], ec="black", lw=0.5, label=f"{m}: $k_{{90}}$") for m, st in mst.items()]
        keys.append(Line2D([], [], ls="none", marker="_", ms=10, mew=2.2, color="black",
                           label="$k_{80}$"))
        add_legend(fig, [handles, keys])
        add_suptitle(fig, f"{view_title(view)}: gain from the k-th expert, and the k reaching "
                     "80 % / 90 % of the k = 1 → M gain")
        return save_figure(fig, out_stem)
