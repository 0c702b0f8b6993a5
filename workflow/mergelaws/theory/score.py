"""Scoring predicted curves against a measured sweep (cross_domain view: the all-domain mean).

Per (size, method, variant), on the subsets the sweep measured: per-subset Pearson and Spearman
(k >= 1, and k >= 2, the points no variant was calibrated on), the MAE of the per-k means, the
k = 1 -> M drop, the per-size law L_inf + A/(k+b) fitted (weights k) to the predicted and to the
measured means, the theorem's L_inf and A, the ratio of the across-subset variances (summed over
k = 1..M-1, same subsets) and the prediction's cost:

* ``compute_fraction``: its measured seconds (its passes and arithmetic, not loading the models)
  over the measured sweep's (that size and method, from the sweep's logs; they include the
  sweep's loading of the base, the experts and the eval sets) -- the headline number;
* ``compute_fraction_no_load``: the same seconds over the sweep's time less its logged loading
  (like for like: neither side's loading counted);
* ``forward_fraction``: its work in passes over the full eval set -- positions through the model,
  padding included, over those of one merge's evaluation in the sweep; a backward counted as 2 --
  over the sweep's merges (one full-set evaluation each; the merges themselves not counted): the
  same ratio free of timing noise (on a CPU a backward pass costs nearer 2.5-3 forward passes);
* ``compute_fraction_enumeration``: a second, separate number: its seconds over the estimated time
  of a sweep of every subset the predictor predicts, the 2^M - 1 non-empty subsets at the measured
  sweep's seconds per merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

VIEW = "cross_domain"


@dataclass
class Score:
    size: str
    method: str
    variant: str
    n_subsets: int
    spearman: float
    pearson: float
    spearman_k2: float  # k >= 2 only
    curve_mae: float  # mean |pred - meas| of the per-k means, k = 1..M
    drop_measured: float  # mean L(k=1) - mean L(k=M)
    drop_predicted: float
    drop_error: float  # relative
    L_inf_fit_pred: float
    A_fit_pred: float
    b_fit_pred: float
    L_inf_fit_meas: float
    A_fit_meas: float
    b_fit_meas: float
    L_inf_theorem: float
    A_theorem: float
    variance_ratio: float  # sum_k var_pred / sum_k var_meas, k = 1..M-1
    seconds: float
    sweep_seconds: float
    compute_fraction: float  # seconds / sweep_seconds (the measured sweep)
    sweep_load_seconds: float = float("nan")  # the sweep's loading, inside sweep_seconds
    compute_fraction_no_load: float = float("nan")  # seconds / (sweep_seconds - sweep_load_seconds)
    forward_equivalents: float = float("nan")  # full eval-set passes, a backward as 2
    sweep_merges: float = float("nan")  # merges the measured sweep evaluated
    forward_fraction: float = float("nan")  # forward_equivalents / sweep_merges
    enumeration_subsets: int = 0  # 2^M - 1
    enumeration_seconds: float = float("nan")  # estimated: sweep_seconds / sweep_merges x (2^M - 1)
    compute_fraction_enumeration: float = float("nan")  # seconds / enumeration_seconds (second number)


def subset_view(table: pd.DataFrame, view: str = VIEW) -> pd.DataFrame:
    from mergelaws.laws.views import per_subset_values

    return per_subset_values(table, view)


def score(pred: pd.DataFrame, losses: pd.DataFrame, summary: dict, sweep_seconds: dict[str, float | None],
          sweep_merges: dict[str, int | None] | None = None,
          sweep_load_seconds: dict[str, float | None] | None = None) -> list[Score]:
    """Scores of every (method, variant) of one size's predictions against the losses table;
    ``sweep_merges``: the merges the measured sweep evaluated in ``sweep_seconds`` (default: the
    table's subsets of that size and method); ``sweep_load_seconds``: the loading inside them."""
    from scipy.stats import pearsonr, spearmanr

    from mergelaws.laws import fit_per_size

    size, M = summary["size"], summary["M"]
    meas_all = subset_view(losses[losses["size"].astype(str) == size])
    out = []
    for (method, variant), g in pred.groupby(["method", "variant"], sort=False):
        meas = meas_all[meas_all["method"] == method]
        if meas.empty:
            continue
        p = subset_view(g.drop(columns="variant"))
        j = meas.merge(p[["subset", "value"]], on="subset", suffixes=("_meas", "_pred"))
        j = j[j["k"] >= 1]
        k2 = j[j["k"] >= 2]
        means = j.groupby("k")[["value_meas", "value_pred"]].mean()
        var = j.groupby("k")[["value_meas", "value_pred"]].var(ddof=1)
        var = var[(var.index >= 1) & (var.index < M)].dropna()
        fm = fit_per_size(means.index.to_numpy(), means["value_meas"].to_numpy(), weights="k")
        fp = fit_per_size(means.index.to_numpy(), means["value_pred"].to_numpy(), weights="k")
        drop_m = float(means["value_meas"].iloc[0] - means["value_meas"].iloc[-1])
        drop_p = float(means["value_pred"].iloc[0] - means["value_pred"].iloc[-1])
        entry = summary["methods"][method][variant]
        sw = sweep_seconds.get(method)
        n_sw = (sweep_merges or {}).get(method) or int(meas["subset"].nunique())
        n_enum = 2 ** M - 1
        fe = float(entry.get("forward_equivalents", float("nan")))
        enum_s = sw / n_sw * n_enum if sw else float("nan")
        load = (sweep_load_seconds or {}).get(method)
        load = float(load) if load is not None and sw else float("nan")
        rest = sw - load if sw and np.isfinite(load) and sw > load else float("nan")
        out.append(Score(
            size, method, variant, int(len(j)),
            float(spearmanr(j["value_meas"], j["value_pred"])[0]), float(pearsonr(j["value_meas"], j["value_pred"])[0]),
            float(spearmanr(k2["value_meas"], k2["value_pred"])[0]),
            float(np.mean(np.abs(means["value_pred"] - means["value_meas"]))),
            drop_m, drop_p, (drop_p - drop_m) / drop_m if drop_m else float("nan"),
            fp.L_inf, fp.A, fp.b, fm.L_inf, fm.A, fm.b,
            entry["theorem"]["L_inf"], entry["theorem"]["A"],
            float(var["value_pred"].sum() / var["value_meas"].sum()) if len(var) else float("nan"),
            entry["seconds"], float(sw) if sw else float("nan"),
            entry["seconds"] / sw if sw else float("nan"),
            load, entry["seconds"] / rest,
            fe, float(n_sw), fe / n_sw, n_enum, enum_s, entry["seconds"] / enum_s if sw else float("nan")))
    return out


def scores_frame(scores: list[Score]) -> pd.DataFrame:
    return pd.DataFrame([asdict(s) for s in scores])


def figure(pred: pd.DataFrame, losses: pd.DataFrame, size: str, out: str | Path, method: str = "average") -> Path | None:
    """Predicted vs measured per subset (left) and the per-k mean curves (right), one method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergelaws.io import atomic_path

    meas = subset_view(losses[(losses["size"].astype(str) == size) & (losses["method"] == method)])
    g = pred[pred["method"] == method]
    if meas.empty or g.empty:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    mm = meas[meas["k"] >= 1].groupby("k")["value"].mean()
    ax2.plot(mm.index, mm.values, "ko-", label="measured", lw=2)
    for variant, gv in g.groupby("variant", sort=False):
        p = subset_view(gv.drop(columns="variant"))
        j = meas.merge(p[["subset", "value"]], on="subset", suffixes=("_meas", "_pred"))
        j = j[j["k"] >= 1]
        ax1.scatter(j["value_meas"], j["value_pred"], s=10, label=variant)
        pm = j.groupby("k")["value_pred"].mean()
        ax2.plot(pm.index, pm.values, ".--", label=variant)
    lo = float(meas["value"].min())
    hi = float(meas["value"].max())
    ax1.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax1.set(xlabel="measured loss (cross_domain, nats/token)", ylabel="predicted loss (nats/token)",
            title=f"{size} {method}: per subset (dotted: equal)")
    ax2.set(xlabel="k (experts merged)", ylabel="mean loss over subsets (nats/token)",
            title=f"{size} {method}: E[L|k], predicted vs measured")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
