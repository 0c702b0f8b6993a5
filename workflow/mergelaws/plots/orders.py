"""Merge-order dispersion (Fig 8), expert fine-tuning loss (Fig 11) and sampled orders vs full
enumeration (Fig 12); the tables come from ``mergelaws.orders``."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from mergelaws.plots.style import (
    RC,
    UNITS,
    add_legend,
    add_suptitle,
    fmt_params,
    grid_figure,
    k_axis,
    method_styles,
    n_axis,
    panel_tag,
    save_figure,
    size_label,
    view_title,
)
from mergelaws.plots.synergy import default_synergy_method

__all__ = ["order_figures", "plot_expert_losses", "plot_order_dispersion", "plot_sampled_vs_full"]


def _sizes(t: pd.DataFrame) -> pd.DataFrame:
    return (t[["size", "params"]].drop_duplicates().sort_values(["params", "size"])
            .reset_index(drop=True))


def plot_order_dispersion(orders: pd.DataFrame, disp: pd.DataFrame, fit: pd.DataFrame,
                          out_stem: str | os.PathLike, view: str = "cross_domain",
                          method: str | None = None, size: str | None = None) -> list[Path]:
    """Fig 8 analogue for one method (default DARE when measured, as the paper): (a) violins
    of the ``view`` value across merge orders per k at one size (default the largest);
    (b) heatmap of the across-order std over base size x k; (c) worst - best range across
    orders per k at up to three sizes (smallest, middle, largest); (d) the std vs k per size
    with the fitted Std_order = c0 + c1/(k+b).  ``orders``: ``orders.order_table``, ``disp``:
    ``orders.order_dispersion``, ``fit``: ``orders.fit_order_std``.  Returns [png, pdf]."""
    if orders.empty:
        raise ValueError("no merge-order prefixes in the losses table (sweep.sampler: orders)")
    methods = sorted(orders["method"].astype(str).unique())
    method = default_synergy_method(methods) if method is None else str(method)
    o = orders[orders["method"] == method]
    d = disp[disp["method"] == method]
    f = fit[fit["method"] == method].set_index("size")
    sizes = _sizes(o)
    size = str(sizes["size"].iloc[-1]) if size is None else str(size)
    labels = {s: size_label(s, p) for s, p in zip(sizes["size"], sizes["params"])}
    ks = sorted(int(k) for k in o["k"].unique() if k >= 1)
    kmin, kmax = ks[0], ks[-1]
    cmap = matplotlib.colormaps["viridis"]
    colors = {s: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes["size"])}
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(2, 2, panel_w=4.6, panel_h=3.5, legend_h=0.9)
        # (a) violins at one size
        ax = axes[0]
        os_ = o[(o["size"] == size) & (o["k"] >= 1)]
        data = [os_[os_["k"] == k]["value"].to_numpy() for k in ks]
        keep = [(k, v) for k, v in zip(ks, data) if v.size]
        if keep:
            vk, vv = zip(*keep)
            multi = [i for i, v in enumerate(vv) if np.unique(v).size > 1]
            if multi:
                parts = ax.violinplot([vv[i] for i in multi], positions=[vk[i] for i in multi],
                                      widths=0.8, showmedians=True, showextrema=True)
                for b in parts["bodies"]:
                    b.set_facecolor(colors[size])
                    b.set_alpha(0.45)
            for k, v in keep:
                jit = (np.random.default_rng(k).random(v.size) - 0.5) * 0.25
                ax.plot(k + jit, v, "o", ms=2.5, color="black", alpha=0.6, zorder=3)
        k_axis(ax, kmin, kmax)
        ax.set_ylabel(f"cross-entropy {UNITS}")
        n_ord = int(os_["order"].nunique()) if len(os_) else 0
        panel_tag(ax, f"(a) across {n_ord} orders at {labels.get(size, size)}")
        # (b) heatmap of std over size x k
        ax = axes[1]
        S = np.full((len(sizes), len(ks)), np.nan)
        for i, s in enumerate(sizes["size"]):
            for j, k in enumerate(ks):
                r = d[(d["size"] == s) & (d["k"] == k)]
                if len(r):
                    S[i, j] = float(r["std"].iloc[0])
        im = ax.imshow(S, cmap="magma_r", aspect="auto", origin="lower")
        vmax = np.nanmax(S) if np.isfinite(S).any() else 1.0
        for i in range(S.shape[0]):
            for j in range(S.shape[1]):
                v = S[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3f}".lstrip("0") if v < 1 else f"{v:.2f}", ha="center",
                            va="center", fontsize=7, color="white" if v > 0.6 * vmax else "black")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(sizes)), [labels[s] for s in sizes["size"]])
        ax.set_xlabel("number of merged experts k")
        ax.set_ylabel("base model size")
        ax.grid(False)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label(f"std across orders {UNITS}")
        panel_tag(ax, "(b) across-order std, N × k")
        # (c) worst - best range bars
        ax = axes[2]
        pick = list(dict.fromkeys([sizes["size"].iloc[0], sizes["size"].iloc[len(sizes) // 2],
                                   sizes["size"].iloc[-1]]))
        w = 0.8 / len(pick)
        for i, s in enumerate(pick):
            r = d[(d["size"] == s) & (d["k"] >= 1)].sort_values("k")
            ax.bar(r["k"] + (i - (len(pick) - 1) / 2) * w, r["range"], width=w, color=colors[s],
                   edgecolor="black", linewidth=0.4, label=labels[s])
        k_axis(ax, kmin, kmax)
        ax.set_ylabel(f"worst − best across orders {UNITS}")
        ax.legend(fontsize=8, title="size", title_fontsize=8)
        panel_tag(ax, "(c) range across orders")
        # (d) std vs k with the fitted law
        ax = axes[3]
        kf = np.linspace(kmin, kmax, 200)
        for s in sizes["size"]:
            r = d[(d["size"] == s) & (d["k"] >= 1)].sort_values("k")
            one = r["n_distinct"] < 2  # k = M (or a shared prefix): one subset, std 0, not fitted
            ax.plot(r["k"][~one], r["std"][~one], "o", color=colors[s], mec="black", mew=0.5, ms=5, zorder=3)
            ax.plot(r["k"][one], r["std"][one], "o", mfc="none", mec=colors[s], ms=5, zorder=3)
            if s in f.index and np.isfinite(f.loc[s, "c1"]):
                c0, c1, b = (float(f.loc[s, c]) for c in ("c0", "c1", "b"))
                ax.plot(kf, c0 + c1 / (kf + b), color=colors[s], lw=1.3, ls="--",
                        label=f"{labels[s]}: {c0:+.3f} {c1:+.3f}/(k+{b:.2f}), "
                              f"$R^2$ {float(f.loc[s, 'r2']):.2f}")
        k_axis(ax, kmin, kmax)
        ax.set_ylabel(f"std across orders {UNITS}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
        panel_tag(ax, "(d) $\\mathrm{Std}_{order} = c_0 + c_1/(k+b)$")
        keys = [Line2D([], [], color="black", marker="o", ls="none", ms=3, label="one order's prefix"),
                Line2D([], [], color="0.3", ls="--", label="fitted Std$_{order}$ (b on a grid in [0, 2])"),
                Line2D([], [], color="0.3", marker="o", mfc="none", ls="none",
                       label="one distinct subset (std 0, not fitted)")]
        add_legend(fig, [keys], title=None)
        add_suptitle(fig, f"{view_title(view)}: dispersion across merge orders ({method}; an "
                          "order's k-th model merges its first k experts)")
        return save_figure(fig, out_stem)


def plot_sampled_vs_full(curves: pd.DataFrame, params: pd.DataFrame, out_stem: str | os.PathLike,
                         view: str = "cross_domain", max_sizes: int = 4) -> list[Path]:
    """Fig 12 analogue: per (size, method) with full enumeration (rows: up to ``max_sizes``
    sizes, smallest first; columns: methods), the mean over every subset (band: ±1 std across
    subsets) and the mean over the sampled orders' prefixes, each with its fitted per-size
    law; the panel text gives sampled - full of L_inf, A and b.  ``curves``, ``params``:
    ``orders.sampled_vs_full``.  Returns [png, pdf]."""
    if curves.empty:
        raise ValueError("no (size, method) with every subset measured to compare against")
    sizes = _sizes(curves).head(max_sizes)
    methods = sorted(curves["method"].astype(str).unique())
    mst = method_styles(methods)
    fig, axes = None, None
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(len(sizes), len(methods), panel_w=3.4, panel_h=3.0, legend_h=0.8)
        for i, (size, p) in enumerate(zip(sizes["size"], sizes["params"])):
            for j, m in enumerate(methods):
                ax = axes[i * len(methods) + j]
                c = curves[(curves["size"] == size) & (curves["method"] == m)]
                pr = params[(params["size"] == size) & (params["method"] == m)].set_index("design")
                if c.empty:
                    ax.set_visible(False)
                    continue
                full = c[c["design"] == "full"].sort_values("k")
                samp = c[c["design"] == "sampled"].sort_values("k")
                col = mst[m]["color"]
                ax.fill_between(full["k"], full["mean"] - full["std"], full["mean"] + full["std"],
                                color=col, alpha=0.15, lw=0)
                ax.plot(full["k"], full["mean"], "o", color=col, mec="black", mew=0.5, ms=5, zorder=3)
                ax.plot(samp["k"], samp["mean"], "D", mfc="none", mec="black", mew=1.0, ms=6, zorder=4)
                kf = np.linspace(float(full["k"].min()), float(full["k"].max()), 200)
                for design, ls in (("full", "-"), ("sampled", "--")):
                    if design in pr.index and bool(pr.loc[design, "converged"]):
                        L, A, b = (float(pr.loc[design, x]) for x in ("L_inf", "A", "b"))
                        ax.plot(kf, L + A / (kf + b), ls=ls, color=col if design == "full" else "black",
                                lw=1.2, zorder=2)
                if "sampled" in pr.index:
                    r = pr.loc["sampled"]
                    n_s = int(r["n_subsets"])
                    ax.text(0.97, 0.97, f"sampled − full ({n_s} prefixes):\n"
                            f"ΔL∞ {r['d_L_inf']:+.4f}  ΔA {r['d_A']:+.4f}\nΔb {r['d_b']:+.2f}  "
                            f"max|Δmean| {r['max_abs_d_mean']:.4f}", transform=ax.transAxes,
                            ha="right", va="top", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.85})
                k_axis(ax, int(full["k"].min()), int(full["k"].max()))
                if j == 0:
                    ax.set_ylabel(f"cross-entropy {UNITS}")
                ax.set_title(f"{m} at {size_label(size, p)}", fontsize=9.5)
        keys = [Line2D([], [], color="0.4", marker="o", ls="-", mec="black", mew=0.5,
                       label="all subsets: mean (band ±1 std) and its law"),
                Line2D([], [], color="black", marker="D", mfc="none", ls="--",
                       label="sampled orders' prefixes: mean and its law")]
        add_legend(fig, [keys], title=None)
        add_suptitle(fig, f"{view_title(view)}: sampled merge orders vs full enumeration")
        return save_figure(fig, out_stem)


def plot_expert_losses(experts: pd.DataFrame, out_stem: str | os.PathLike) -> list[Path]:
    """Fig 11 analogue: each expert's fine-tuning loss, one series per domain: (a) final
    training loss (``loss_last``, and the first step's, hollow) vs base size N; (b) the
    expert's in-domain eval CE (its k = 1 row) vs N; (c) final training loss vs training
    compute C = 6 N D (D = response tokens trained on, from the record).  ``experts``:
    ``orders.expert_table``.  Returns [png, pdf]."""
    e = experts.dropna(subset=["params"])
    if e.empty:
        raise ValueError("no expert records with a base size in the losses table")
    doms = sorted(e["domain"].astype(str).unique())
    st = method_styles(doms)  # one marker, line style and colour per domain
    cmap = matplotlib.colormaps["tab10" if len(doms) <= 10 else "tab20"]
    for i, dmn in enumerate(doms):
        st[dmn]["color"] = cmap(i % cmap.N)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 3, panel_w=3.9, panel_h=3.6)
        for dmn in doms:
            g = e[e["domain"] == dmn].sort_values("params")
            s = st[dmn]
            kw = {"marker": s["marker"], "ls": s["ls"], "color": s["color"], "mec": "black",
                  "mew": 0.5, "ms": 5}
            axes[0].plot(g["params"], g["loss_last"], **kw)
            axes[0].plot(g["params"], g["loss_first"], s["marker"], mfc="none", mec=s["color"],
                         ms=4, ls="none", alpha=0.7)
            if g["eval_loss"].notna().any():
                axes[1].plot(g["params"], g["eval_loss"], **kw)
            c = g.dropna(subset=["flops"]).sort_values("flops")
            axes[2].plot(c["flops"], c["loss_last"], **kw)
        for ax in axes[:2]:
            n_axis(ax, e["params"])
        axes[0].set_ylabel(f"training loss {UNITS}")
        panel_tag(axes[0], "(a) final training loss vs N")
        axes[1].set_ylabel(f"in-domain eval CE of the expert {UNITS}")
        panel_tag(axes[1], "(b) expert's eval CE (k = 1) vs N")
        ax = axes[2]
        ax.set_xscale("log")
        ax.set_xlabel("training compute 6·N·D (FLOPs, log scale)")
        ax.set_ylabel(f"training loss {UNITS}")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: fmt_params(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        panel_tag(ax, "(c) final training loss vs compute")
        secs = e["seconds"].dropna()
        if len(secs):
            ax.text(0.03, 0.03, f"wall time {secs.min():.3g}–{secs.max():.3g} s per expert",
                    transform=ax.transAxes, fontsize=7.5, color="0.3")
        handles = [Line2D([], [], color=st[dm]["color"], marker=st[dm]["marker"], ls=st[dm]["ls"],
                          mec="black", mew=0.5, label=dm) for dm in doms]
        handles.append(Line2D([], [], color="0.4", marker="o", mfc="none", ls="none",
                              label="first training step (a)"))
        add_legend(fig, [handles], title="expert domain")
        add_suptitle(fig, "Expert fine-tuning loss vs base size and vs training compute")
        return save_figure(fig, out_stem)


def order_figures(losses: pd.DataFrame, cfg: dict, out_dir: str | os.PathLike,
                  view: str = "cross_domain", experts=(), fits=None) -> list[Path]:
    """The optional figures, exactly those named by ``orders.figure_outputs(cfg, view,
    bool(experts))``: Fig 8 with table ``orders_<view>`` (dispersion per
    (size, method, k) and the Std_order fit per (size, method)) for the sizes swept with
    ``sampler: orders``; Fig 11 from the experts' records (``experts``: expert directories,
    their config.json or records); Fig 12 with table ``sampled_vs_full_<view>`` for the sizes
    that enumerate every subset, against the prefixes of ``sweep.orders`` orders.  The
    per-size fits of Fig 12 use the fit settings recorded in ``fits``.  A figure whose data
    are missing from the table is drawn with a note saying so, so the outputs always match."""
    from mergelaws import orders as O
    from mergelaws.laws import as_fits
    from mergelaws.plots.more import write_table

    out = Path(out_dir)
    tag = view.replace(":", "-").replace("/", "-")
    paths: list[Path] = []
    osizes = O.order_sizes(cfg)
    if osizes:
        ot = O.order_table(losses, {s: O.merge_orders(cfg, s) for s in osizes}, view)
        disp = O.order_dispersion(ot)
        fit = O.fit_order_std(disp)
        if ot.empty:
            paths += _note(out / f"fig8_orders_{tag}", "no prefix of a merge order is in the losses table")
        else:
            paths += plot_order_dispersion(ot, disp, fit, out / f"fig8_orders_{tag}", view=view)
        table = disp.merge(fit, on=["size", "params", "method"], how="left")
        paths += write_table(table, out / f"orders_{tag}")
    if experts:
        et = O.expert_table(O.read_expert_records(experts), losses)
        if et.dropna(subset=["params"]).empty:
            paths += _note(out / "fig11_experts", "no expert record (mergelaws_expert.json) matches a size")
        else:
            paths += plot_expert_losses(et, out / "fig11_experts")
    esizes = O.enumerated_sizes(cfg)
    if esizes:
        settings = (as_fits(fits).settings if fits else None) or {}
        kw = {"weights": settings.get("weights", "k")}
        if settings.get("b_bounds"):
            kw["b_bounds"] = tuple(settings["b_bounds"])
        sub = losses[losses["size"].astype(str).isin(esizes)]
        curves, params = O.sampled_vs_full(sub, view, orders=O.merge_orders(cfg, esizes[0]), **kw)
        if curves.empty:
            paths += _note(out / f"fig12_sampled_vs_full_{tag}", "no size has every subset measured")
        else:
            paths += plot_sampled_vs_full(curves, params, out / f"fig12_sampled_vs_full_{tag}", view=view)
        paths += write_table(params, out / f"sampled_vs_full_{tag}")
    return paths


def _note(out_stem, text: str) -> list[Path]:
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 1, legend_h=0.2)
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, text, ha="center", va="center", transform=axes[0].transAxes)
        return save_figure(fig, out_stem)
