"""Fig 21 analogue: cross-domain synergy S_{d->e} (``analyses.synergy_table``), the mean
marginal CE drop on eval domain e when expert d is added to a merge."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.patches import Patch

from mergelaws.analyses import synergy_sums, synergy_top_pairs
from mergelaws.plots.style import (
    RC,
    add_legend,
    add_suptitle,
    grid_figure,
    panel_tag,
    save_figure,
    size_label,
    size_styles,
)

__all__ = ["default_synergy_method", "plot_synergy"]

_ESTIMATOR = {"pairs": "measured pairs (S, S+{d}), |S| ≥ 1",
              "matched_k": "(k−1)-subsets without d vs k-subsets with d, mean over k"}


def default_synergy_method(methods) -> str:
    """The method drawn by default: DARE when present (the paper's App. M), else the first."""
    methods = sorted(str(m) for m in methods)
    return "dare" if "dare" in methods else methods[0]


def plot_synergy(table: pd.DataFrame, out_stem: str | os.PathLike, method: str | None = None,
                 size: str | None = None, n_top: int = 5) -> list[Path]:
    """(a) the donor x receiver heatmap of S_{d->e} (nats; red = adding d lowers the CE on e)
    at one size (default the largest) for one method (default ``default_synergy_method``),
    diagonal (a domain's own expert) hatched and left out of the colour scale; (b) the
    ``n_top`` largest positive and negative off-diagonal pairs; (c) donor sums (off-diagonal)
    at every size.  ``table``: ``analyses.synergy_table``.  Returns [png, pdf]."""
    if table.empty:
        raise ValueError("empty synergy table")
    method = default_synergy_method(table["method"].unique()) if method is None else str(method)
    t = table[table["method"].astype(str) == method]
    if t.empty:
        raise ValueError(f"no synergy rows for method {method!r}")
    sizes = t[["size", "params"]].drop_duplicates().sort_values(["params", "size"]).reset_index(drop=True)
    size = str(sizes["size"].iloc[-1]) if size is None else str(size)
    ts = t[t["size"].astype(str) == size]
    if ts.empty:
        raise ValueError(f"no synergy rows for size {size!r}")
    params = float(ts["params"].iloc[0])
    donors, receivers = sorted(ts["donor"].unique()), sorted(ts["receiver"].unique())
    S = ts.pivot(index="donor", columns="receiver", values="S").reindex(index=donors, columns=receivers)
    Sv = S.to_numpy(float)
    diag = np.array([[d == e for e in receivers] for d in donors])
    off = Sv[~diag & np.isfinite(Sv)]
    lim = float(np.max(np.abs(off))) if off.size else 1.0
    lim = lim if lim > 0 else 1.0
    estimator = str(ts["estimator"].iloc[0])
    pos, neg = synergy_top_pairs(table, size, method, n=n_top)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(1, 3, panel_w=4.7, panel_h=4.9, legend_h=0.9)
        ax = axes[0]
        cmap = matplotlib.colormaps["RdBu_r"]
        im = ax.imshow(np.where(diag, np.nan, Sv), cmap=cmap, norm=TwoSlopeNorm(0.0, -lim, lim),
                       aspect="equal")
        for i in range(len(donors)):
            for j in range(len(receivers)):
                v = Sv[i, j]
                if diag[i, j]:
                    ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fc="0.85",
                                                              ec="0.5", hatch="///", lw=0))
                if np.isfinite(v):
                    strong = not diag[i, j] and abs(v) > 0.6 * lim
                    txt = "0" if abs(v) < 0.005 else f"{v:.2f}".replace("0.", ".", 1)
                    ax.text(j, i, txt, ha="center", va="center",
                            fontsize=6.5, color="white" if strong else "black")
        ax.set_xticks(range(len(receivers)), receivers, rotation=55, ha="right", fontsize=8.5)
        ax.set_yticks(range(len(donors)), donors, fontsize=8.5)
        ax.set_xlabel("receiver domain e (CE measured on)")
        ax.set_ylabel("donor expert d (added to the merge)")
        ax.grid(False)
        cb = fig.colorbar(im, ax=ax, shrink=0.75, pad=0.02)
        cb.set_label("$S_{d\\to e}$, CE drop (nats/token)")
        panel_tag(ax, f"(a) $S_{{d\\to e}}$ at {size_label(size, params)}")
        # (b) top pairs
        ax = axes[1]
        bars = pd.concat([pos, neg.iloc[::-1]], ignore_index=True)
        y = np.arange(len(bars))[::-1]
        colors = [cmap(0.85) if v > 0 else cmap(0.15) for v in bars["S"]]
        ax.barh(y, bars["S"], color=colors, edgecolor="black", lw=0.5)
        ax.set_yticks(y, [f"{d} → {e}" for d, e in zip(bars["donor"], bars["receiver"])], fontsize=8.5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("$S_{d\\to e}$, CE drop on e when d is added (nats/token)")
        ax.grid(axis="y", visible=False)
        panel_tag(ax, f"(b) top {n_top} positive / negative pairs")
        # (c) donor sums per size
        ax = axes[2]
        styles = size_styles(sizes)
        sums = {str(s): synergy_sums(table, str(s), method)[0] for s in sizes["size"]}
        order = list(sums[size].index)  # sorted at the drawn size
        w = 0.8 / len(sizes)
        for i, s in enumerate(sizes["size"]):
            st = styles[s]
            v = sums[str(s)].reindex(order).to_numpy(float)
            ax.barh(np.arange(len(order))[::-1] + (len(sizes) - 1) / 2 * w - i * w, v, height=w,
                    color=st["color"], edgecolor="black", lw=0.4, label=st["label"])
        ax.set_yticks(np.arange(len(order))[::-1], order, fontsize=8.5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("donor sum $\\sum_{e\\neq d} S_{d\\to e}$ (nats/token)")
        ax.grid(axis="y", visible=False)
        panel_tag(ax, "(c) donor sums, every size")
        handles = [Patch(fc=st["color"], ec="black", lw=0.4, label=st["label"]) for st in styles.values()]
        handles.append(Patch(fc="0.85", ec="0.5", hatch="///", label="diagonal: own expert (not in scale)"))
        add_legend(fig, [handles], title="base model size (c)")
        add_suptitle(fig, f"Cross-domain synergy, method {method}: mean CE drop on e when expert d is "
                     f"added; estimator: {_ESTIMATOR.get(estimator, estimator)}")
        return save_figure(fig, out_stem)
