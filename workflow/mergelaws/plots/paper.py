"""Analogues of the paper's main figures on one view, drawn together by ``paper_figures``:
``plot_unified_fit`` (Fig 1), ``plot_subset_scatter`` (Fig 3(1-2)/13),
``plot_floor_tail_vs_N`` (Fig 4a), ``plot_fractional_return`` (Fig 4b),
``plot_methods`` (Fig 5), ``plot_forecast`` (Fig 7).

The fits come as typed ``laws.Fits`` (``laws.fit_all``, or ``laws.load_fits`` for a
fits.json; a fits.json mapping is read the same way).
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mergelaws.laws import (
    Fits,
    as_fits,
    normalise_losses,
    predict_unified,
    subset_values,
    view_table,
)
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
    new_figure,
    panel_tag,
    plain_log_y,
    save_figure,
    setup_view,
    size_label,
    size_styles,
    view_title,
)

__all__ = ["PAPER_FIGURES", "paper_figures", "plot_floor_tail_vs_N", "plot_forecast",
           "plot_fractional_return", "plot_methods", "plot_subset_scatter", "plot_unified_fit"]


def plot_unified_fit(table: pd.DataFrame, fits: Fits | dict | None, view: str,
                     out_stem: str | os.PathLike) -> list[Path]:
    """Fig 1 analogue: mean loss vs k (k >= 1), one panel per method (shared y), one series
    per base size; markers = measured means over merged subsets, dotted = the unified law
    ``L* + B N^-beta + A0 N^-gamma/(k+b)`` from ``fits.unified`` (one fit per method,
    evaluated at each size's N).  Panels whose unified fit is missing or did not converge
    show the means only and say so.  Returns the [png, pdf] paths."""
    t, methods, sizes = setup_view(table, view)
    t = t[t["k"] >= 1]
    if t.empty:
        raise ValueError("no merged (k >= 1) rows to plot")
    styles = size_styles(sizes)
    index = fit_index(fits, "unified")
    kmax = int(t["k"].max())
    kfine = np.linspace(1.0, max(kmax, 1), 200)
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(len(methods), sharey=True)
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
                ax.text(0.97, 0.97, "no unified fit:\n" + textwrap.fill(why, 30), transform=ax.transAxes,
                        bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
                        ha="right", va="top", fontsize=8, color="0.3")
            ax.set_title(title, fontsize=10)
            k_axis(ax, 1, kmax)
        for i, ax in enumerate(axes):
            if i % MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {UNITS}")
        handles = [Line2D([], [], color=st["color"], marker=st["marker"], ls=":", mec="black",
                          mew=0.5, label=st["label"]) for st in styles.values()]
        keys = [Line2D([], [], color="0.3", marker="o", ls="none", label="measured mean over subsets")]
        if any_fit:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.8,
                               label="unified law $L^* + BN^{-\\beta} + A_0N^{-\\gamma}/(k+b)$"))
        add_legend(fig, [handles, keys])
        add_suptitle(fig, f"{view_title(view)} vs k, with the unified (N, k) law")
        return save_figure(fig, out_stem)


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
    styles = size_styles(sizes)
    kmin, kmax = int(ps["k"].min()), int(ps["k"].max())
    rng = np.random.default_rng(0)  # fixed jitter: identical files for identical input
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(len(sizes), sharey=False)
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
            k_axis(ax, kmin, kmax)
        for i, ax in enumerate(axes):
            if i % MAX_COLS == 0:
                ax.set_ylabel(f"cross-entropy {UNITS}")
        keys = [Line2D([], [], color="0.45", marker="o", ms=4, alpha=0.6, ls="none",
                       label="one merged subset (jittered in k)"),
                Line2D([], [], color="black", marker="o", mfc="0.6", ls="-",
                       label="mean over subsets $E[L\\,|\\,N,k]$")]
        add_legend(fig, [keys], title=None)
        add_suptitle(fig, f"{view_title(view)}: every merged subset, method {method}")
        return save_figure(fig, out_stem)


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
    mstyles = method_styles(methods)
    uni = fit_index(fits, "unified")
    allN = np.array([float(f.params) for f in rows])
    nfine = np.geomspace(allN.min() / 1.3, allN.max() * 1.3, 100)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 2, panel_w=4.2, panel_h=3.6)
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
            n_axis(ax, allN)
            ax.set_yscale("log")
            plain_log_y(ax)
            ax.set_ylabel(("floor $L_\\infty$ " if key == "L_inf" else "amplitude $A$ ") + UNITS)
            panel_tag(ax, title)
            if dropped:
                ax.text(0.03, 0.03, f"{dropped} estimate(s) <= 0 or unconverged not shown",
                        transform=ax.transAxes, fontsize=7.5, color="0.3", va="bottom")
        keys = [Line2D([], [], color="0.3", marker="o", ls="-", label="per-size fit estimate")]
        if any_uni:
            keys.append(Line2D([], [], color="0.3", ls=":", lw=1.4,
                               label="unified law (dotted)"))
        add_legend(fig, [legend_handles(mstyles), keys], title="merge method")
        add_suptitle(fig, f"{view_title(view)}: fitted floor and tail vs N")
        return save_figure(fig, out_stem)


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

    t, methods, sizes = setup_view(table, view)
    ks, curves = _return_curves(t)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 2, panel_w=4.2, panel_h=3.6, legend_h=0.9)
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
        k_axis(ax, 1, int(ks.max()) if ks.size else 1)
        panel_tag(ax, f"(a) R(k), {len(curves)} (size, method) curves")
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
        panel_tag(ax, "(b) $k_{90}$: smallest k with R(k) ≥ 0.9")
        keys = [Line2D([], [], color="navy", marker="o", mec="black", mew=0.5, label="median"),
                matplotlib.patches.Patch(color="tab:blue", alpha=0.25, label="interquartile range"),
                Line2D([], [], color="0.75", lw=0.7, label="one (size, method)"),
                Line2D([], [], color="black", ls="--", lw=1, label="80 %"),
                Line2D([], [], color="black", ls=":", lw=1, label="90 %")]
        add_legend(fig, [keys], title=None)
        add_suptitle(fig, f"{view_title(view)}: fractional return R(k)")
        return save_figure(fig, out_stem)


def plot_methods(table: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                 size: str | None = None) -> list[Path]:
    """Fig 5 analogue, comparing the merge methods.  At one base size (default the
    largest): (a) mean loss vs k (bars +-1 standard error of the mean), (b) variance across
    subsets vs k (log y; k with < 2 subsets or zero variance left out); (c) mean loss vs N
    (log x) at k = 3 (or the largest measured k below 3).  One line per method.
    Returns [png, pdf]."""
    t, methods, sizes = setup_view(table, view)
    size = str(sizes["size"].iloc[-1]) if size is None else str(size)
    if size not in set(sizes["size"]):
        raise ValueError(f"no size {size!r} in the table (have {list(sizes['size'])})")
    params = float(sizes.loc[sizes["size"] == size, "params"].iloc[0])
    mst = method_styles(methods)
    merged = t[t["k"] >= 1]
    kmin, kmax = int(merged["k"].min()), int(merged["k"].max())
    avail = sorted(merged["k"].unique())
    kc = 3 if 3 in avail else max([k for k in avail if k <= 3] or avail[:1])
    nm = len(methods)
    off = {m: (i - (nm - 1) / 2) * 0.08 for i, m in enumerate(methods)}
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 3, panel_w=3.7, panel_h=3.5)
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
        k_axis(ax_a, kmin, kmax)
        ax_a.set_ylabel(f"mean cross-entropy {UNITS}")
        panel_tag(ax_a, f"(a) mean vs k at {slabel}")
        k_axis(ax_b, kmin, kmax)
        ax_b.set_yscale("log")
        ax_b.set_ylabel(f"variance across subsets {UNITS}$^2$")
        panel_tag(ax_b, f"(b) variance vs k at {slabel}")
        n_axis(ax_c, sizes["params"])
        ax_c.set_ylabel(f"mean cross-entropy {UNITS}")
        panel_tag(ax_c, f"(c) mean vs N at k = {kc}")
        keys = [Line2D([], [], color="0.3", marker="o", ls="none",
                       label="mean over subsets, bars ±1 s.e.m. (a, c)")]
        add_legend(fig, [legend_handles(mst), keys], title="merge method")
        add_suptitle(fig, f"{view_title(view)}: merge methods compared")
        return save_figure(fig, out_stem)


def plot_forecast(table: pd.DataFrame, view: str, out_stem: str | os.PathLike,
                  points: tuple[int, int, int] = (1, 2, 4)) -> list[Path]:
    """Fig 7 analogue: the three-point forecast (``plan.three_point_forecast``: the per-size
    law fitted through the measured means at k in ``points`` only) vs the measured means.
    One panel per base size with every method (markers = measured, lines = forecast,
    larger ringed markers = the three fitted points); the last panel: forecast error
    (forecast - measured) vs k, median over sizes per method, bars = min..max over sizes.
    (size, method) pairs lacking a fitted point are skipped.  Returns [png, pdf]."""
    from mergelaws.plan import three_point_forecast

    t, methods, sizes = setup_view(table, view)
    merged = t[t["k"] >= 1]
    kmax = int(merged["k"].max())
    mst = method_styles(methods)
    kfine = np.linspace(1.0, kmax, 200)
    errs: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    n_panels = len(sizes) + 1
    ncols = min(n_panels, MAX_COLS)
    nrows = math.ceil(n_panels / ncols)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(nrows, ncols)
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
            k_axis(ax, 1, kmax)
            ax.set_ylabel(f"cross-entropy {UNITS}")
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
        k_axis(ax, 1, kmax)
        ax.set_ylabel(f"forecast − measured {UNITS}")
        ax.set_title("forecast error (median, min–max over sizes)", fontsize=9.5)
        keys = [Line2D([], [], color="0.3", marker="o", ls="none", label="measured mean"),
                Line2D([], [], color="0.3", ls="-", label="forecast from k ∈ {" +
                       ", ".join(str(p) for p in points) + "}"),
                Line2D([], [], color="black", marker="o", mfc="none", ms=9, ls="none",
                       label="points used by the forecast")]
        if skipped:
            keys.append(Line2D([], [], ls="none", label=f"{skipped} (size, method) without forecast"))
        add_legend(fig, [legend_handles(mst), keys], title="merge method")
        add_suptitle(fig, f"{view_title(view)}: three-point forecast vs measurement")
        return save_figure(fig, out_stem)


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
