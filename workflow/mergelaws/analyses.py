"""Analyses of the losses table beyond the laws' fits: cross-domain synergy (App. M, Fig 21)
and the candidate-pool-size refit (Sec 4.1, Fig 6).  Pure functions of a losses table (one row
per size, method, merged subset and eval domain, with ``members``), no new merges.

* ``synergy_table``: S_{d->e}, the mean marginal drop of the CE on eval domain e when expert d
  is added to a merge (positive = adding d helps e), per (size, method, d, e), by one of two
  estimators (both are in the table):

  - ``pairs``: over every measured pair (S, S + {d}) with d not in S and |S| >= 1, the mean
    of L_e(S) - L_e(S + {d}).  Exact, but a sampled design measures few such pairs.
  - ``matched_k``: for each k = 2..M, the mean L_e over the measured (k-1)-subsets without d
    minus the mean L_e over the measured k-subsets with d; then the mean over the k where
    both exist.  Under uniform subset sampling this estimates the same quantity as random
    merge orders (the paper's definition: d appended at a uniformly random position after a
    uniformly random prefix) and uses every subset.

  ``estimator="auto"`` takes ``pairs`` when every (size, method, donor) has at least
  ``min_pairs`` pairs, else ``matched_k``; one estimator for the whole table.
* ``synergy_top_pairs``, ``synergy_sums``: the top positive / negative off-diagonal pairs, the
  donor and receiver sums (off-diagonal: a donor's effect on the other domains).
* ``pool_size_table``: the per-size law L_inf + A/(k+b) refitted with the pool reduced from M
  to M - 1, M - 2, ... experts, for every choice of the dropped experts: the subsets kept are
  those with no dropped member (the eval domains, and so the view, are unchanged);
  ``pool_size_summary`` takes the median (and interquartile range) over the choices.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import pandas as pd

from mergelaws.laws import (
    DEFAULT_B_BOUNDS,
    fit_per_size,
    normalise_losses,
    subset_values,
)

__all__ = ["SYNERGY_ESTIMATORS", "pool_size_summary", "pool_size_table", "synergy_sums",
           "synergy_table", "synergy_top_pairs"]

SYNERGY_ESTIMATORS = ("auto", "pairs", "matched_k")
_SYN_COLUMNS = ["size", "params", "method", "donor", "receiver", "S", "estimator", "n",
                "S_pairs", "n_pairs", "S_matched_k", "n_k"]


def _members(m: str) -> frozenset[str]:
    return frozenset(x for x in str(m).split("+") if x)


def _subset_matrix(g: pd.DataFrame, receivers: list[str]) -> tuple[list[frozenset], np.ndarray]:
    """Merged subsets (by members) and their loss on each receiver (NaN where not evaluated)."""
    p = g.pivot_table(index="members", columns="eval_domain", values="loss", aggfunc="mean")
    p = p.reindex(columns=receivers)
    return [_members(m) for m in p.index], p.to_numpy(dtype=float)


def _synergy_group(subsets: list[frozenset], X: np.ndarray, donors: list[str]):
    """(S_pairs, n_pairs, S_matched, n_k) arrays of shape (donors, receivers) / (donors,)."""
    index = {s: i for i, s in enumerate(subsets)}
    nd, ne = len(donors), X.shape[1]
    sp, npairs = np.zeros((nd, ne)), np.zeros(nd, dtype=int)
    sm, nk = np.full((nd, ne), np.nan), np.zeros(nd, dtype=int)
    sizes = np.array([len(s) for s in subsets])
    M = max(len(frozenset().union(*subsets)), int(sizes.max()))
    for i, d in enumerate(donors):
        has = np.array([d in s for s in subsets])
        for T, x in zip(subsets, X):
            if d in T and len(T) >= 2 and (T - {d}) in index:
                sp[i] += X[index[T - {d}]] - x
                npairs[i] += 1
        diffs = []
        for k in range(2, M + 1):
            without = (~has) & (sizes == k - 1)
            with_d = has & (sizes == k)
            if without.any() and with_d.any():
                diffs.append(X[without].mean(axis=0) - X[with_d].mean(axis=0))
        if diffs:
            sm[i] = np.mean(diffs, axis=0)
            nk[i] = len(diffs)
    sp = np.where(npairs[:, None] > 0, sp / np.maximum(npairs, 1)[:, None], np.nan)
    return sp, npairs, sm, nk


def synergy_table(losses: pd.DataFrame, estimator: str = "auto", min_pairs: int = 5) -> pd.DataFrame:
    """S_{d->e} per (size, method, donor d, receiver e), in nats (positive: adding d lowers the
    CE on e).  Columns ``size, params, method, donor, receiver, S, estimator, n, S_pairs,
    n_pairs, S_matched_k, n_k``: ``S`` is the chosen estimator's value and ``n`` its support
    (pairs, or k levels); both estimators are kept (see the module docstring).  Donors are the
    experts in the merged subsets' members, receivers the eval domains; rows sorted by params,
    size, method, donor, receiver.  Raises ValueError without members or an unknown
    estimator."""
    if estimator not in SYNERGY_ESTIMATORS:
        raise ValueError(f"unknown synergy estimator {estimator!r}; use one of {SYNERGY_ESTIMATORS}")
    df = normalise_losses(losses)
    merged = df[df["k"] >= 1]
    if merged.empty or not (merged["members"].str.len() > 0).all():
        raise ValueError("synergy needs merged rows with their members recorded (column 'members')")
    receivers = sorted(df["eval_domain"].unique())
    frames = []
    for (size, params, method), g in merged.groupby(["size", "params", "method"], sort=True):
        subsets, X = _subset_matrix(g, receivers)
        donors = sorted(frozenset().union(*subsets))
        sp, npairs, sm, nk = _synergy_group(subsets, X, donors)
        frames.append(pd.DataFrame({
            "size": size, "params": params, "method": method,
            "donor": np.repeat(donors, len(receivers)), "receiver": np.tile(receivers, len(donors)),
            "S_pairs": sp.ravel(), "n_pairs": np.repeat(npairs, len(receivers)),
            "S_matched_k": sm.ravel(), "n_k": np.repeat(nk, len(receivers))}))
    out = pd.concat(frames, ignore_index=True)
    if estimator == "auto":
        estimator = "pairs" if int(out["n_pairs"].min()) >= min_pairs else "matched_k"
    out["estimator"] = estimator
    out["S"] = out["S_pairs"] if estimator == "pairs" else out["S_matched_k"]
    out["n"] = out["n_pairs"] if estimator == "pairs" else out["n_k"]
    out = out.sort_values(["params", "size", "method", "donor", "receiver"], kind="mergesort")
    return out[_SYN_COLUMNS].reset_index(drop=True)


def _one(table: pd.DataFrame, size: str, method: str) -> pd.DataFrame:
    t = table[(table["size"].astype(str) == str(size)) & (table["method"].astype(str) == str(method))]
    if t.empty:
        raise ValueError(f"no synergy rows for size {size!r}, method {method!r}")
    return t


def synergy_top_pairs(table: pd.DataFrame, size: str, method: str, n: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` largest positive and ``n`` most negative off-diagonal S_{d->e} of one
    (size, method) (columns ``donor, receiver, S``; ties broken by name)."""
    t = _one(table, size, method)
    off = t[(t["donor"] != t["receiver"]) & np.isfinite(t["S"])][["donor", "receiver", "S"]]
    pos = off[off["S"] > 0].sort_values(["S", "donor", "receiver"], ascending=[False, True, True])
    neg = off[off["S"] < 0].sort_values(["S", "donor", "receiver"], ascending=[True, True, True])
    return pos.head(n).reset_index(drop=True), neg.head(n).reset_index(drop=True)


def synergy_sums(table: pd.DataFrame, size: str, method: str) -> tuple[pd.Series, pd.Series]:
    """Donor sums (sum over the other receivers of S_{d->e}) and receiver sums (sum over the
    other donors), off-diagonal, each sorted descending."""
    t = _one(table, size, method)
    off = t[t["donor"] != t["receiver"]]
    donor = off.groupby("donor")["S"].sum().sort_values(ascending=False, kind="mergesort")
    recv = off.groupby("receiver")["S"].sum().sort_values(ascending=False, kind="mergesort")
    return donor, recv


_POOL_COLUMNS = ["size", "params", "method", "view", "M", "dropped", "n_subsets", "k_max",
                 "L_inf", "A", "b", "r2", "converged", "reason"]


def pool_size_table(losses: pd.DataFrame, view: str = "cross_domain", drops: Iterable[int] = (1, 2),
                    weights: str = "k", b_bounds: tuple[float, float] = DEFAULT_B_BOUNDS,
                    loss: str = "linear", f_scale: float | None = None) -> pd.DataFrame:
    """The per-size law refitted on reduced pools.  For each (size, method) with pool M (the
    experts among the members), the full pool (``dropped`` = "") and, for each m in ``drops``
    with M - m >= 3, every choice of m dropped experts (``dropped`` = their names joined by
    '+'): the merged subsets with no dropped member are kept, their ``view`` values averaged
    per k (k >= 1) and L_inf + A/(k+b) fitted (``laws.fit_per_size`` with ``weights``,
    ``b_bounds``, ``loss``, ``f_scale``).  Columns ``size, params, method, view, M, dropped,
    n_subsets, k_max, L_inf, A, b, r2, converged, reason``, M being the reduced pool's size."""
    df = normalise_losses(losses)
    vals = subset_values(df, view)
    vals = vals[vals["k"] >= 1]
    if vals.empty:
        raise ValueError(f"no merged rows for view {view!r}")
    mem = df[["size", "method", "subset", "members"]].drop_duplicates(["size", "method", "subset"])
    vals = vals.merge(mem, on=["size", "method", "subset"], how="left")
    rows = []
    for (size, params, method), g in vals.groupby(["size", "params", "method"], sort=True):
        sets = [_members(m) for m in g["members"]]
        pool = sorted(frozenset().union(*sets))
        M = len(pool)
        choices = [()] + [c for m in drops if M - int(m) >= 3 for c in itertools.combinations(pool, int(m))]
        for dropped in choices:
            keep = np.array([not (s & set(dropped)) for s in sets])
            h = g[keep].groupby("k")["value"].agg(["mean", "std", "count"]).reset_index()
            sem = (h["std"].fillna(0.0) / np.sqrt(h["count"])).to_numpy()
            f = fit_per_size(h["k"].to_numpy(), h["mean"].to_numpy(), weights=weights,
                             b_bounds=b_bounds, sem=sem, loss=loss, f_scale=f_scale)
            rows.append({"size": size, "params": int(params), "method": method, "view": view,
                         "M": M - len(dropped), "dropped": "+".join(dropped),
                         "n_subsets": int(keep.sum()), "k_max": int(h["k"].max()),
                         "L_inf": f.L_inf, "A": f.A, "b": f.b, "r2": f.r2,
                         "converged": bool(f.converged), "reason": f.reason or ""})
    out = pd.DataFrame(rows, columns=_POOL_COLUMNS)
    return out.sort_values(["params", "size", "method", "M", "dropped"], ascending=[True, True, True, False, True],
                           kind="mergesort").reset_index(drop=True)


def pool_size_summary(table: pd.DataFrame) -> pd.DataFrame:
    """``pool_size_table`` summarised over the choices of dropped experts (converged fits
    only): per (size, params, method, view, M) the median and interquartile range of L_inf
    and A (``L_inf``, ``L_inf_q25``, ``L_inf_q75``, ``A``, ``A_q25``, ``A_q75``; the median,
    because a few reduced pools put b at a bound and trade A against L_inf), their means
    (``L_inf_mean``, ``A_mean``), and the number of fits (``n_fits``) and of those that
    converged (``n_converged``)."""
    keys = ["size", "params", "method", "view", "M"]
    ok = table[table["converged"]]
    g = ok.groupby(keys, sort=True)
    agg = pd.concat({f"{c}{suffix}": g[c].quantile(q) if q is not None else g[c].mean()
                     for c in ("L_inf", "A")
                     for suffix, q in (("", 0.5), ("_q25", 0.25), ("_q75", 0.75), ("_mean", None))},
                    axis=1)
    n = table.groupby(keys, sort=True).agg(n_fits=("converged", "size"),
                                           n_converged=("converged", "sum"))
    out = n.join(agg).reset_index()
    out["n_converged"] = out["n_converged"].astype(int)
    return out.sort_values(["params", "size", "method", "M"], ascending=[True, True, True, False],
                           kind="mergesort").reset_index(drop=True)
