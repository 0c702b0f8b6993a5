"""Merging vs the multitask model (the paper's Fig 2): per-domain radar of merges of k experts
against the multitask reference, with the compute of each in a panel beside it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from mergelaws.laws import normalise_losses
from mergelaws.plots.style import RC, UNITS, save_figure

__all__ = ["radar_table", "plot_radar", "multitask_reference"]


def multitask_reference(multitask: pd.DataFrame | None) -> dict[str, float]:
    """Per size, the multitask model's macro-mean loss over every eval domain (its value in the
    cross-domain view)."""
    if multitask is None or multitask.empty:
        return {}
    ok = multitask[np.isfinite(multitask["loss"].astype(float))]
    return {str(s): float(g.groupby("eval_domain")["loss"].mean().mean()) for s, g in ok.groupby("size")}


def _pick_ks(ks: Sequence[int], want: Sequence[int] = (1, 3, 6, 9)) -> list[int]:
    """The paper's k = 1, 3, 6, 9 where measured; else four spread over the measured k >= 1."""
    have = sorted(k for k in ks if k >= 1)
    chosen = [k for k in want if k in have]
    if len(chosen) >= 3 or len(have) <= 4:
        return chosen if len(chosen) >= 3 else have
    idx = np.unique(np.round(np.linspace(0, len(have) - 1, 4)).astype(int))
    return [have[i] for i in idx]


def radar_table(losses: pd.DataFrame, multitask: pd.DataFrame, size: str, method: str,
                ks: Sequence[int] | None = None) -> pd.DataFrame:
    """Rows = series (``k = …`` means over the measured subsets, ``multitask``, ``base``), columns
    = eval domains: each domain's mean loss, the values of the radar."""
    t = normalise_losses(losses)
    t = t[(t["size"].astype(str) == str(size)) & (t["method"] == method)]
    ks = list(ks) if ks is not None else _pick_ks(t["k"].unique())
    doms = sorted(t["eval_domain"].unique())
    rows = {}
    base = t[t["k"] == 0]
    if len(base):
        rows["base (k = 0)"] = base.groupby("eval_domain")["loss"].mean()
    for k in ks:
        rows[f"k = {k}"] = t[t["k"] == k].groupby("eval_domain")["loss"].mean()
    m = multitask[multitask["size"].astype(str) == str(size)]
    rows["multitask"] = m.groupby("eval_domain")["loss"].mean()
    return pd.DataFrame(rows).T.reindex(columns=doms)


def _matching_k(losses: pd.DataFrame, multitask: pd.DataFrame, size: str, method: str) -> int | None:
    """The first k whose mean cross-domain loss is at or below the multitask model's (the plan's
    'k measured'), or None."""
    from mergelaws.laws import view_table

    ref = multitask_reference(multitask).get(size)
    t = view_table(losses, ["cross_domain"])
    t = t[(t["size"].astype(str) == size) & (t["method"] == method) & (t["k"] >= 1)].sort_values("k")
    hit = t[t["mean"] <= ref] if ref is not None else t.iloc[0:0]
    return int(hit["k"].iloc[0]) if len(hit) else None


def plot_radar(losses: pd.DataFrame, multitask: pd.DataFrame, out_stem: str | os.PathLike,
               method: str = "average", size: str | None = None,
               costs: Mapping[str, Mapping] | None = None, k_match: int | None = None) -> list[Path]:
    """One axis per eval domain: each domain's loss relative to the base model (1 = the base;
    nearer the centre is better) for merges of k experts and for the multitask model, at one
    size (default the largest). Beside it, where ``costs`` (``compute.unit_costs``) measured them:
    the multitask model's seconds against a merge's, with and without training its k experts."""
    if size is None:
        p = losses.groupby("size")["params"].max().sort_values()
        size = str(p.index[-1])
    tab = radar_table(losses, multitask, size, method)
    base = tab.loc["base (k = 0)"] if "base (k = 0)" in tab.index else None
    rel = tab / base if base is not None else tab
    doms = list(tab.columns)
    angles = np.linspace(0, 2 * np.pi, len(doms), endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    c = (costs or {}).get(str(size), {})
    inset = all(x in c for x in ("expert", "merge", "multitask"))
    series = [s for s in tab.index if s.startswith("k = ")]
    cmap = matplotlib.colormaps["viridis"]
    with matplotlib.rc_context(RC):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10.5 if inset else 6.8, 6.0))
        FigureCanvasAgg(fig)
        ax = fig.add_axes([0.05, 0.07, 0.48 if inset else 0.6, 0.72], projection="polar")
        for i, s in enumerate(series):
            v = rel.loc[s].to_numpy(float)
            color = cmap(0.15 + 0.7 * i / max(1, len(series) - 1))
            ax.plot(closed, np.concatenate([v, v[:1]]), color=color, lw=1.6, marker="o", ms=3.5, label=s)
        v = rel.loc["multitask"].to_numpy(float)
        ax.plot(closed, np.concatenate([v, v[:1]]), color="#c0392b", lw=2.2, ls="--", marker="s", ms=4,
                label="multitask model")
        if base is not None:
            ax.plot(closed, np.ones_like(closed), color="0.35", lw=1.0, ls=":", label="base model (= 1)")
        ax.set_xticks(angles)
        ax.set_xticklabels(doms)
        lo, hi = np.nanmin(rel.to_numpy(float)), np.nanmax(rel.to_numpy(float))
        pad = 0.1 * (hi - lo) if hi > lo else 0.05
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_rlabel_position(float(np.degrees(angles[1] / 2)) if len(doms) > 1 else 0.0)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(f"{method}, size {size}: per-domain CE {UNITS} relative to the base\n"
                     "(nearer the centre is better)", pad=26)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02 if not inset else 0.98, 1.02), fontsize=8.5,
                  frameon=False)
        if inset:
            bx = fig.add_axes([0.72, 0.18, 0.25, 0.5])
            k = k_match or _matching_k(losses, multitask, str(size), method)
            k = k or max(int(s.split("= ")[1]) for s in series)
            labels = ["multitask\n(train + eval)", f"merge k = {k}\n+ its experts", "merge only\n(experts exist)"]
            vals = [c["multitask"], k * c["expert"] + c["merge"], c["merge"]]
            bx.bar(range(3), vals, color=["#c0392b", cmap(0.5), cmap(0.85)], edgecolor="black", lw=0.6)
            bx.set_xticks(range(3))
            bx.set_xticklabels(labels, fontsize=8)
            bx.set_ylabel("wall time of the jobs (s)")
            for i, val in enumerate(vals):
                bx.text(i, val, f"{val:.0f} s" if val >= 10 else f"{val:.1f} s", ha="center", va="bottom",
                        fontsize=8)
            bx.set_title(f"compute, measured (k = {k})"
                         + ("\nthe first k where merging\nmatches the multitask model" if k_match is None and
                            _matching_k(losses, multitask, str(size), method) == k else ""), fontsize=9.5)
            bx.set_ylim(0, max(vals) * 1.18)
        return save_figure(fig, out_stem)
