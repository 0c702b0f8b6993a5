"""Views of a losses table: one number per (size, method, merged subset), then per-k means.

The losses table is long: one row per base size, method, merged subset and eval domain
(columns ``size, params, method, k, subset, eval_domain, loss``; ``members`` and ``in_domain``
optional).  ``normalise_losses`` cleans it once (types, failed merges dropped, the shared base
model copied onto every method, repeated evaluations averaged); a *view* (``VIEWS``) then
turns it into one value per (size, method, subset) (``subset_values``), and
``aggregate_views`` / ``view_table`` into per-k statistics across subsets (mean, std, var,
sem, n_subsets): the points every law is fitted to.  The functions whose names say
"normalised" (``subset_values``, ``aggregate_views``, ``pools_of``) take the output of
``normalise_losses``; the others take a raw losses table.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "VIEWS",
    "view_names",
    "fit_views",
    "normalise_losses",
    "subset_values",
    "per_subset_values",
    "aggregate_views",
    "view_table",
    "pools_of",
    "pool_sizes",
]

VIEWS: dict[str, str] = {
    "in_domain": (
        "Mean loss over the eval domains that are among the subset's members "
        "(rows with in_domain True), one number per merged subset. Defined for k >= 1."
    ),
    "cross_domain": (
        "Macro mean of the loss over ALL eval domains (each domain weighs the same), "
        "one number per merged subset: the paper's cross-domain CE (Fig 1). "
        "Defined for k >= 0 (k = 0 is the base model)."
    ),
    "held_out": (
        "Macro mean of the loss over the eval domains NOT among the subset's members. "
        "Defined for k < M (M = number of eval domains / pool size)."
    ),
    "domain:<name>": (
        "The loss on the single eval domain <name>, for every subset (whether or not "
        "the domain's expert is a member): the paper's per-domain curves (Table 3). "
        "Defined for k >= 0."
    ),
}

_GROUP_KEYS = ["size", "params", "method"]
_VIEW_COLUMNS = ["size", "params", "method", "view", "k", "mean", "std", "var", "sem", "n_subsets"]
_REQUIRED = ["size", "params", "method", "k", "subset", "eval_domain", "loss"]


def view_names(losses: pd.DataFrame) -> list[str]:
    """All views that apply to ``losses``: the three aggregate views, then one
    ``domain:<name>`` per eval domain (sorted)."""
    doms = sorted(str(d) for d in pd.unique(losses["eval_domain"]))
    return ["in_domain", "cross_domain", "held_out"] + [f"domain:{d}" for d in doms]


def normalise_losses(losses: pd.DataFrame) -> pd.DataFrame:
    """The losses table cleaned once for every view: column types fixed, ``members`` and
    ``in_domain`` filled in, failed merges (non-finite loss) dropped whole with a warning,
    a base-only method's k = 0 rows copied onto every merged method, and repeated
    evaluations of one (size, method, subset, domain) averaged.  Raises ValueError when a
    required column is missing."""
    missing = [c for c in _REQUIRED if c not in losses.columns]
    if missing:
        raise ValueError(f"losses table lacks columns {missing}")
    df = losses.copy()
    if "members" not in df.columns:
        df["members"] = ""
    df["members"] = df["members"].fillna("").astype(str)
    df["size"] = df["size"].astype(str)
    df["method"] = df["method"].astype(str)
    df["subset"] = df["subset"].astype(str)
    df["eval_domain"] = df["eval_domain"].astype(str)
    df["params"] = df["params"].astype("int64")
    df["k"] = df["k"].astype("int64")
    df["loss"] = df["loss"].astype(float)
    # A failed merge (non-finite weights or loss) is dropped whole, so that it poisons neither
    # the macro means of its subset nor the means across subsets.
    bad = ~np.isfinite(df["loss"].to_numpy())
    if bad.any():
        keys = ["size", "method", "subset"]
        failed = df.loc[bad, keys].drop_duplicates()
        warnings.warn(f"dropping {len(failed)} failed merge(s) with non-finite loss: "
                      + ", ".join(f"{r.size}/{r.method}/{r.subset}" for r in failed.itertuples()), stacklevel=3)
        df = df.merge(failed.assign(_failed=True), on=keys, how="left")
        df = df[df["_failed"].isna()].drop(columns="_failed")
    if "in_domain" in df.columns:
        col = df["in_domain"]
        if col.dtype == object:  # e.g. CSV strings
            col = col.astype(str).str.strip().str.lower().map({"true": True, "1": True, "false": False, "0": False})
        df["in_domain"] = col.fillna(False).astype(bool)
    else:
        df["in_domain"] = [
            d in set(m.split("+")) if m else False for d, m in zip(df["eval_domain"], df["members"])
        ]
    # A method whose rows are all k = 0 (e.g. "base") is the shared base model: copy it
    # onto every method that has merged rows, unless that method already has k = 0 rows.
    methods = sorted(df["method"].unique())
    base_only = [m for m in methods if (df.loc[df["method"] == m, "k"] == 0).all()]
    merged = [m for m in methods if m not in base_only]
    if base_only and merged:
        base = df[df["method"].isin(base_only)]
        parts = [df[df["method"].isin(merged)]]
        for m in merged:
            for size in base["size"].unique():
                have = df[(df["method"] == m) & (df["size"] == size) & (df["k"] == 0)]
                if have.empty:
                    b = base[base["size"] == size].copy()
                    # one base model per size even if several base-only labels exist
                    b = b[b["method"] == sorted(b["method"].unique())[0]]
                    b["method"] = m
                    parts.append(b)
        df = pd.concat(parts, ignore_index=True)
    # Repeated evaluations of the same (size, method, subset, domain) (e.g. seeds) are
    # averaged first so that every domain weighs the same in the macro means.
    keys = ["size", "params", "method", "subset", "k", "members", "eval_domain", "in_domain"]
    df = df.groupby(keys, sort=True, dropna=False, as_index=False)["loss"].mean()
    return df


def subset_values(df: pd.DataFrame, view: str) -> pd.DataFrame:
    """One value per (size, params, method, subset, k) for ``view`` (columns
    ``size, params, method, subset, k, value``), from a normalised losses frame."""
    keys = _GROUP_KEYS + ["subset", "k"]
    if view == "in_domain":
        sub = df[df["in_domain"] & (df["k"] >= 1)]
    elif view == "cross_domain":
        sub = df
    elif view == "held_out":
        sub = df[~df["in_domain"]]
    elif view.startswith("domain:"):
        name = view.split(":", 1)[1]
        sub = df[df["eval_domain"] == name]
    else:
        raise ValueError(f"unknown view {view!r}; known: {sorted(VIEWS)}")
    if sub.empty:
        return pd.DataFrame(columns=keys + ["value"])
    out = sub.groupby(keys, sort=True, as_index=False)["loss"].mean()
    return out.rename(columns={"loss": "value"})


def view_table(losses: pd.DataFrame, views: Iterable[str] | None = None) -> pd.DataFrame:
    """Aggregate a losses table into per-k statistics across subsets, per view.

    Returns columns ``size, params, method, view, k, mean, std, var, sem, n_subsets``:
    mean / sample std (ddof=1; 0 when one subset) / sample variance / standard error
    of the mean of the per-subset view values.  ``views=None`` means every view in
    ``view_names(losses)``.  Rows are sorted by params, size, method, view, k.
    """
    return aggregate_views(normalise_losses(losses), views)


def aggregate_views(df: pd.DataFrame, views: Iterable[str] | None = None) -> pd.DataFrame:
    """``view_table`` of a normalised losses frame."""
    views = view_names(df) if views is None else list(views)
    frames = []
    for view in views:
        ps = subset_values(df, view)
        if ps.empty:
            continue
        g = ps.groupby(_GROUP_KEYS + ["k"], sort=True)["value"]
        agg = g.agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    n_subsets="count").reset_index()
        agg["var"] = agg["std"] ** 2
        agg["sem"] = agg["std"] / np.sqrt(agg["n_subsets"])
        agg["view"] = view
        frames.append(agg)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in _VIEW_COLUMNS})
    out = pd.concat(frames, ignore_index=True)[_VIEW_COLUMNS]
    out["n_subsets"] = out["n_subsets"].astype("int64")
    out["k"] = out["k"].astype("int64")
    out = out.sort_values(["params", "size", "method", "view", "k"], kind="mergesort")
    return out.reset_index(drop=True)


def per_subset_values(losses: pd.DataFrame, view: str = "cross_domain") -> pd.DataFrame:
    """One value per (size, params, method, subset, k) for ``view`` (columns
    ``size, params, method, subset, k, value``), as ``view_table`` aggregates them."""
    return subset_values(normalise_losses(losses), view)


def fit_views(losses: pd.DataFrame) -> list[str]:
    """The views the fit step fits: the in-domain and cross-domain macro views, then one
    ``domain:<d>`` view per eval domain (sorted)."""
    return ["in_domain", "cross_domain"] + [v for v in view_names(losses) if v.startswith("domain:")]


def pools_of(df: pd.DataFrame) -> dict[tuple[str, str], int]:
    """``pool_sizes`` of a normalised losses frame."""
    out = {}
    for (size, method), g in df[df["k"] >= 1].groupby(["size", "method"], sort=True):
        experts = {m for s in g["members"].unique() for m in str(s).split("+") if m}
        out[(str(size), str(method))] = max(len(experts), int(g["k"].max()))
    return out


def pool_sizes(losses: pd.DataFrame) -> dict[tuple[str, str], int]:
    """Expert pool size M per (size, method): the number of distinct experts among the
    merged subsets' members (at least the largest k, which is all when members are not
    recorded)."""
    return pools_of(normalise_losses(losses))
