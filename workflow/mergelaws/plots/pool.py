"""Fig 6 analogue: how the per-size law's floor L_inf(N) and tail A(N) move when the pool of
experts shrinks from M to M - 1 and M - 2 (``analyses.pool_size_table``: every choice of
dropped experts, the subsets restricted to the smaller pool, no new merges)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from mergelaws.analyses import pool_size_summary
from mergelaws.plots.style import (
    RC,
    UNITS,
    add_legend,
    add_suptitle,
    grid_figure,
    n_axis,
    panel_tag,
    save_figure,
    view_title,
)

__all__ = ["plot_pool_size"]

_POOL_MARKERS = ["o", "s", "^", "D", "v"]
_POOL_LINES = ["-", "--", "-.", ":", (0, (6, 1.5))]


def plot_pool_size(pool: pd.DataFrame, out_stem: str | os.PathLike) -> list[Path]:
    """How the per-size law moves when the pool shrinks, one column per merge method, x = N
    (log): (top) the floor shift L_inf(M) - L_inf(full pool) in nats, (bottom) the tail ratio
    A(M) / A(full pool) (log y); one line per reduced pool size M, the median over every
    choice of dropped experts with bars spanning the interquartile range
    (``analyses.pool_size_summary`` of ``pool``, a ``pool_size_table``); the full pool is the
    black reference line (0 and 1).  Points of one N are spread slightly in x.  The full
    pool's own L_inf(N) and A(N) are Fig 4a's.  A table without a reduced pool (M <= 3) gives
    a figure that says so.  Returns [png, pdf]."""
    if pool.empty:
        raise ValueError("empty pool-size table")
    s = pool_size_summary(pool)
    view = str(s["view"].iloc[0])
    methods = sorted(s["method"].astype(str).unique())
    full = int(s["M"].max())
    ref = s[s["M"] == full].set_index(["size", "method"])
    Ms = sorted((M for M in s["M"].unique() if M != full), reverse=True)
    if not Ms:  # a pool of 3 experts: one fewer leaves too few k to fit 3 parameters
        with matplotlib.rc_context(RC):
            fig, axes = grid_figure(1, 1, panel_w=6.0, panel_h=2.0, legend_h=0.2)
            axes[0].set_axis_off()
            axes[0].text(0.5, 0.5, f"pool of M = {full} experts: a reduced pool (M - 1 experts) has "
                         "fewer than 3 values of k,\nso the per-size law cannot be refitted",
                         ha="center", va="center", transform=axes[0].transAxes)
            add_suptitle(fig, f"{view_title(view)}: per-size law on smaller expert pools")
            return save_figure(fig, out_stem)
    cmap = matplotlib.colormaps["plasma"]
    mst = {M: {"marker": _POOL_MARKERS[i % 5], "ls": _POOL_LINES[i % 5],
               "color": cmap(0.15 + 0.55 * i / max(len(Ms) - 1, 1))} for i, M in enumerate(Ms)}
    nm = len(methods)
    with matplotlib.rc_context(RC):
        fig, axes = grid_figure(2, nm, panel_w=3.3, panel_h=3.0)
        for col, method in enumerate(methods):
            sm = s[s["method"] == method]
            for row, key in ((0, "L_inf"), (1, "A")):
                ax = axes[row * nm + col]
                ax.axhline(0.0 if row == 0 else 1.0, color="black", lw=1.2, zorder=1)
                for i, M in enumerate(Ms):
                    d = sm[sm["M"] == M].sort_values("params")
                    base = ref[key].reindex(list(zip(d["size"], [method] * len(d)))).to_numpy(float)
                    cols = [key, f"{key}_q25", f"{key}_q75"]
                    v = d[cols].to_numpy(float)
                    v = v - base[:, None] if row == 0 else v / base[:, None]
                    ok = np.all(np.isfinite(v), axis=1) & ((row == 0) | np.all(v > 0, axis=1))
                    if not ok.any():
                        continue
                    st = mst[M]
                    x = d["params"].to_numpy(float)[ok] * 1.07 ** (i - (len(Ms) - 1) / 2)
                    y = v[ok, 0]
                    yerr = np.clip(np.vstack([y - v[ok, 1], v[ok, 2] - y]), 0, None)
                    ax.errorbar(x, y, yerr=yerr, marker=st["marker"], ls=st["ls"], color=st["color"],
                                mec="black", mew=0.5, ms=5.5, capsize=2.5, elinewidth=0.9, zorder=3)
                n_axis(ax, s["params"])
                if row == 1:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                if col == 0:
                    ax.set_ylabel("floor shift $L_\\infty(M) - L_\\infty(M_{full})$ " + UNITS if row == 0
                                  else "tail ratio $A(M) / A(M_{full})$ (log scale)")
                if row == 0:
                    ax.set_xlabel("")
                    panel_tag(ax, str(method))
        handles = [Line2D([], [], color="black", lw=1.2, label=f"M = {full} (full pool: reference)")]
        handles += [Line2D([], [], color=st["color"], marker=st["marker"], ls=st["ls"], mec="black",
                           mew=0.5, label=f"M = {M} (median of {int(s.loc[s['M'] == M, 'n_fits'].max())} "
                           "choices of dropped experts, bars IQR)") for M, st in mst.items()]
        add_legend(fig, [handles], title="experts in the pool")
        add_suptitle(fig, f"{view_title(view)}: floor and tail of the per-size law refitted on smaller "
                     "expert pools (subsets restricted to the pool, no new merges)")
        return save_figure(fig, out_stem)
