"""Fig 10's analogue (App. K): downstream score vs k for the merged subsets of one pool, beside
the cross-entropy of the same merges, both as the fraction of the k = 1 -> max-k gain, so that
"scores saturate earlier than CE" reads off as the score curve reaching 1 at a smaller k.

Input: tables written by `mergelaws downstream` (one row per (subset, task, metric), with the
pool's cross-entropy as task ``cross_entropy``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergelaws.downstream import CE_TASK, k_at, normalised


def saturation(table: pd.DataFrame, metric: str = "acc", level: float = 0.9) -> pd.DataFrame:
    """Per (size, method, task): the per-k means, the gain k = 1 -> max k with its standard error,
    and k at which ``level`` of it is reached, for the tasks' ``metric`` and for the cross-entropy;
    k90 is NaN where the gain is not resolved (below 2 standard errors, or negative): a curve of
    noise has no saturation point."""
    rows = []
    for (size, method), g in table.groupby(["size", "method"], sort=False):
        tasks = [t for t in g["task"].unique() if t != CE_TASK] + [CE_TASK]
        for task in tasks:
            m = "loss" if task == CE_TASK else metric
            if not ((g["task"] == task) & (g["metric"] == m)).any():
                continue
            frac, t = normalised(g, task, m)
            by_k = t.groupby("k")["value"]
            means = by_k.mean()
            # the gain's standard error from the two end cells: lm-eval's per-subset stderr over
            # the subsets (the CE has none: its gain is taken as resolved)
            err = t.groupby("k")["stderr"].apply(lambda e: (e.pow(2).sum() ** 0.5) / len(e))
            gain = means.iloc[-1] - means.iloc[0]
            se = float((err.iloc[0] ** 2 + err.iloc[-1] ** 2) ** 0.5) if task != CE_TASK else 0.0
            sign = -1.0 if task == CE_TASK else 1.0
            resolved = sign * gain > 2 * se
            rows.append({"size": size, "method": method, "task": task, "metric": m,
                         "k1": means.iloc[0], "kmax": means.iloc[-1], "gain": gain, "gain_se": se,
                         "resolved": resolved,
                         f"k{int(level * 100)}": k_at(frac, level) if resolved else float("nan"),
                         **{f"frac_k{k}": v for k, v in frac.items()}})
    return pd.DataFrame(rows)


def plot_downstream(tables: list[str | Path] | pd.DataFrame, out: str | Path, metric: str = "acc",
                    level: float = 0.9):
    """One panel per task (columns) and size/method (rows): per-subset scores (translucent),
    per-k means (filled markers), the base's score, and the same merges' mean cross-entropy
    (dashed, right axis, inverted so up = better); titles give the k = 1 -> max gain with its
    standard error and k at ``level`` of it for the score and the CE (see :func:`saturation`).
    Saved as ``out`` (png/pdf); returns the saturation table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = tables if isinstance(tables, pd.DataFrame) else pd.concat([pd.read_parquet(p) for p in tables],
                                                                      ignore_index=True)
    sat = saturation(table, metric, level)
    tasks = [t for t in table["task"].unique() if t != CE_TASK]
    groups = list(table.groupby(["size", "method"], sort=False).groups)
    fig, axes = plt.subplots(len(groups), len(tasks), figsize=(3.8 * len(tasks), 3.2 * len(groups)),
                             squeeze=False)
    tag = f"k{int(level * 100)}"
    for r, (size, method) in enumerate(groups):
        g = table[(table["size"] == size) & (table["method"] == method)]
        ce_frac, _ = normalised(g, CE_TASK, "loss")
        ce_k = sat[(sat["size"] == size) & (sat["method"] == method) & (sat["task"] == CE_TASK)][tag].iloc[0]
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            frac, t = normalised(g, task, metric)
            ax.scatter(t["k"] + (t.index % 7 - 3) * 0.02, t["value"], s=14, alpha=0.25, color="C0",
                       edgecolors="none", label="subsets")
            mean = t.groupby("k")["value"].mean()
            ax.plot(mean.index, mean.values, "o-", color="C0", ms=6, label=f"{metric} (mean)")
            base = g[(g["task"] == task) & (g["metric"] == metric) & (g["k"] == 0)]["value"]
            if len(base):
                ax.axhline(float(base.iloc[0]), color="C0", lw=0.8, ls="-.", alpha=0.6, label="base (k=0)")
            ax2 = ax.twinx()
            ce = g[(g["task"] == CE_TASK) & (g["k"] >= 1)].groupby("k")["value"].mean()
            ax2.plot(ce.index, ce.values, "s--", color="C3", ms=5, mfc="none", label="CE (mean)")
            ax2.invert_yaxis()
            ax2.tick_params(axis="y", colors="C3", labelsize=7)
            if c == len(tasks) - 1:
                ax2.set_ylabel("cross-entropy, nats (inverted)", color="C3")
            row = sat[(sat["size"] == size) & (sat["method"] == method) & (sat["task"] == task)].iloc[0]
            k_s = row[tag]
            raw = t.groupby("k")["value"].mean()
            ax.set_title(f"{task.replace('mergelaws_', '')} — {size}/{method}\n"
                         f"{metric} {raw.iloc[0]:.2f}→{raw.iloc[-1]:.2f} (gain {row['gain']:+.3f} ± {row['gain_se']:.3f})\n"
                         + (f"{tag}: score {k_s:g}" if row["resolved"] else f"{tag}: score — (gain not resolved)")
                         + f", CE {ce_k:g}",
                         fontsize=8)
            ax.set_xticks(list(frac.index))
            ax.set_xlabel("k (experts merged)")
            if c == 0:
                ax.set_ylabel(f"{metric} (higher is better)")
            if r == 0 and c == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    fig.suptitle(f"Downstream score vs k (Fig 10 analogue): translucent = subsets, filled = means; "
                 f"dashed = cross-entropy of the same merges", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return sat
