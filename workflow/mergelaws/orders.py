"""Merge orders (Sec 4.3, App. M.2, Fig 8), sampled vs full enumeration (App. E, Fig 12) and the
experts' own fine-tuning record (App. F, Fig 11): pure functions of the config, the losses table
and the trainers' records; no new merges.

* Orders are not stored in the losses table (a subset is a set, and several orders share a
  prefix): ``merge_orders`` re-derives them from the config exactly as ``grid.subsets`` does
  for ``sweep.sampler: orders`` (the paper's Algorithm 1, ``grid.diverse_orders``, seeded by
  ``seed``), so an order's t-th model is the subset of its first t experts.
* ``order_table``: the value of one view (default the macro CE, ``cross_domain``) of every
  order's prefix at each k; ``order_dispersion``: per (size, method, k) the mean, std, range
  and CV across orders (Table 21); ``fit_order_std``: Std_order(k) ~ c0 + c1/(k + b) per
  (size, method), b grid-searched in [0, 2] and (c0, c1) by linear least squares (Table 22).
* ``sampled_vs_full``: on a table with every subset at every k (full enumeration), the mean
  curve over all subsets against the mean over the prefixes of P sampled orders (or over a
  second, sampled table), each fitted with the per-size law L_inf + A/(k+b), and the
  differences of the fitted parameters.
* ``expert_table``: per trained expert its record (``mergelaws_expert.json``: first and last
  training loss, seconds, tokens) and its in-domain eval CE (the k = 1 row of its own domain).
* ``figure_outputs``: the optional figure and table names these give (Figs 8, 11, 12), from
  the config alone, so that the workflow declares exactly what ``mergelaws figures`` writes.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mergelaws import grid

__all__ = ["EXPERT_RECORD", "enumerated_sizes", "expert_records", "expert_table",
           "figure_outputs", "fit_order_std", "merge_orders", "order_dispersion",
           "order_sizes", "order_table", "prefix_subsets", "read_expert_records",
           "sampled_vs_full"]

EXPERT_RECORD = "mergelaws_expert.json"
B_GRID = np.round(np.linspace(0.0, 2.0, 41), 6)


# ---- from the config ---------------------------------------------------------------------

def order_sizes(cfg: dict) -> list[str]:
    """The sizes swept with ``sampler: orders`` (globally or per bases.<size>.sweep)."""
    return [s for s in grid.sizes(cfg) if grid.sweep_settings(cfg, s)["sampler"] == "orders"]


def merge_orders(cfg: dict, size: str | None = None, n_orders: int | None = None) -> list[list[str]]:
    """The merge orders of a size, as ``grid.subsets`` draws them for ``sampler: orders``
    (same pool, same seeded generator, ``sweep.orders`` of them unless ``n_orders``)."""
    pool = sorted(grid.domains(cfg))
    n = int(n_orders if n_orders is not None else grid.sweep_settings(cfg, size)["orders"])
    rng = random.Random(f"mergelaws-orders:{cfg['seed']}")
    return grid.diverse_orders(pool, n, rng)


def enumerated_sizes(cfg: dict) -> list[str]:
    """The sizes whose sweep evaluates every subset at every k = 0..M (uniform sampler with
    ``subsets_per_k`` >= C(M, k) for all k): there the sampled-orders curve can be compared
    with full enumeration (Fig 12)."""
    m = len(grid.domains(cfg))
    ks = grid.k_values(cfg)
    out = []
    for s in grid.sizes(cfg):
        sw = grid.sweep_settings(cfg, s)
        if (sw["sampler"] == "uniform" and set(range(1, m + 1)) <= set(ks)
                and sw["subsets_per_k"] >= max(math.comb(m, k) for k in range(1, m + 1))):
            out.append(s)
    return out


def figure_outputs(cfg: dict, view: str, experts: bool) -> list[str]:
    """File names (relative to the figures directory) of the optional figures that
    ``mergelaws figures`` writes (figures first, then tables): Fig 8 and its table when a size is swept with
    ``sampler: orders``; Fig 12 and its table when a size enumerates every subset; Fig 11
    when ``experts`` (records of trained experts are passed)."""
    tag = view.replace(":", "-").replace("/", "-")
    stems, tables = [], []
    if order_sizes(cfg):
        stems.append(f"fig8_orders_{tag}")
        tables.append(f"orders_{tag}")
    if experts:
        stems.append("fig11_experts")
    if enumerated_sizes(cfg):
        stems.append(f"fig12_sampled_vs_full_{tag}")
        tables.append(f"sampled_vs_full_{tag}")
    return [f"{s}.{e}" for s in stems for e in ("png", "pdf")] + \
        [f"{t}.{e}" for t in tables for e in ("parquet", "csv")]


# ---- orders and their dispersion ---------------------------------------------------------

def _key(members) -> frozenset[str]:
    if isinstance(members, str):
        return frozenset(x for x in members.split("+") if x)
    return frozenset(members)


def _subset_values(losses: pd.DataFrame, view: str) -> pd.DataFrame:
    """One value per (size, params, method, subset, k) with its member set (column ``key``)."""
    from mergelaws.laws import normalise_losses, subset_values

    df = normalise_losses(losses)
    vals = subset_values(df, view)
    mem = df[["size", "method", "subset", "members"]].drop_duplicates(["size", "method", "subset"])
    vals = vals.merge(mem, on=["size", "method", "subset"], how="left")
    vals["key"] = [frozenset() if k == 0 else _key(m) for k, m in zip(vals["k"], vals["members"])]
    return vals


def prefix_subsets(orders: Sequence[Sequence[str]], ks: Iterable[int]) -> list[tuple[int, int, frozenset]]:
    """(order index, k, member set of the order's first k experts) for every order and k."""
    return [(i, int(k), frozenset(o[:int(k)])) for i, o in enumerate(orders) for k in ks
            if int(k) <= len(o)]


def order_table(losses: pd.DataFrame, orders: Mapping[str, Sequence[Sequence[str]]] | Sequence[Sequence[str]],
                view: str = "cross_domain") -> pd.DataFrame:
    """The ``view`` value of each order's prefix at each measured k: columns ``size, params,
    method, order, k, subset, value``.  ``orders``: one list of orders for every size, or a
    mapping size -> orders (sizes not in it are left out).  Prefixes not in the table are
    skipped (a table from another sampler has few of them)."""
    vals = _subset_values(losses, view)
    rows = []
    for (size, params, method), g in vals.groupby(["size", "params", "method"], sort=True):
        ords = orders.get(str(size)) if isinstance(orders, Mapping) else orders
        if not ords:
            continue
        lookup = {(int(k), key): (sub, v) for k, key, sub, v in zip(g["k"], g["key"], g["subset"], g["value"])}
        for i, k, key in prefix_subsets(ords, sorted(g["k"].unique())):
            hit = lookup.get((k, key))
            if hit is not None:
                rows.append({"size": size, "params": int(params), "method": method, "order": i,
                             "k": k, "subset": hit[0], "value": float(hit[1])})
    cols = ["size", "params", "method", "order", "k", "subset", "value"]
    return pd.DataFrame(rows, columns=cols)


def order_dispersion(table: pd.DataFrame) -> pd.DataFrame:
    """Per (size, params, method, k) across orders: ``n_orders``, ``n_distinct`` (distinct
    prefixes), ``mean``, ``std`` (sample, ddof = 1; 0 with one order), ``min``, ``max``,
    ``range`` (worst - best), ``cv`` (std / mean) — the paper's Table 21."""
    g = table.groupby(["size", "params", "method", "k"], sort=True)
    out = g["value"].agg(n_orders="count", mean="mean", std="std", min="min", max="max").reset_index()
    out["n_distinct"] = g["subset"].nunique().to_numpy()
    out["std"] = out["std"].fillna(0.0)
    out["range"] = out["max"] - out["min"]
    out["cv"] = out["std"] / out["mean"]
    out = out.sort_values(["params", "size", "method", "k"], kind="mergesort").reset_index(drop=True)
    return out[["size", "params", "method", "k", "n_orders", "n_distinct", "mean", "std", "min",
                "max", "range", "cv"]]


def _fit_c0_c1(k: np.ndarray, y: np.ndarray, b_grid: np.ndarray):
    best = None
    for b in b_grid:
        X = np.column_stack([np.ones_like(k), 1.0 / (k + b)])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(np.sum((X @ coef - y) ** 2))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, float(b), float(coef[0]), float(coef[1]))
    sse, b, c0, c1 = best
    sst = float(np.sum((y - y.mean()) ** 2))
    return c0, c1, b, (1.0 - sse / sst) if sst > 0 else float("nan")


def fit_order_std(disp: pd.DataFrame, b_grid: Sequence[float] = B_GRID) -> pd.DataFrame:
    """Std_order(k) = c0 + c1/(k + b) per (size, params, method) (App. M.2, Table 22): b
    grid-searched over ``b_grid`` (default 0..2 by 0.05), (c0, c1) by linear least squares,
    on the k >= 1 with at least two distinct prefixes (k = M is one subset: std 0 by
    construction).  Columns ``size, params, method, c0, c1, b, r2, n_k``; NaN with < 3 k."""
    rows = []
    b_grid = np.asarray(b_grid, dtype=float)
    for (size, params, method), g in disp.groupby(["size", "params", "method"], sort=True):
        d = g[(g["k"] >= 1) & (g["n_distinct"] >= 2)]
        k = d["k"].to_numpy(dtype=float)
        y = d["std"].to_numpy(dtype=float)
        c0 = c1 = b = r2 = float("nan")
        if np.unique(k).size >= 3:
            c0, c1, b, r2 = _fit_c0_c1(k, y, b_grid)
        rows.append({"size": size, "params": int(params), "method": method, "c0": c0, "c1": c1,
                     "b": b, "r2": r2, "n_k": int(np.unique(k).size)})
    out = pd.DataFrame(rows, columns=["size", "params", "method", "c0", "c1", "b", "r2", "n_k"])
    return out.sort_values(["params", "size", "method"], kind="mergesort").reset_index(drop=True)


# ---- sampled orders vs full enumeration (Fig 12) ------------------------------------------

_SVF_CURVE = ["size", "params", "method", "k", "design", "mean", "std", "n"]
_SVF_PARAMS = ["size", "params", "method", "design", "n_subsets", "L_inf", "A", "b", "r2",
               "converged", "d_L_inf", "d_A", "d_b", "max_abs_d_mean"]


def _is_full(g: pd.DataFrame, pool: int) -> bool:
    counts = g.groupby("k")["key"].nunique()
    return all(counts.get(k, 0) >= math.comb(pool, k) for k in range(1, pool + 1))


def sampled_vs_full(losses: pd.DataFrame, view: str = "cross_domain",
                    orders: Sequence[Sequence[str]] | None = None,
                    sampled: pd.DataFrame | None = None, weights: str = "k",
                    b_bounds: tuple[float, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig 12: for each (size, method) of ``losses`` that holds every subset at every
    k = 1..M (M = the experts among its members), the mean over all subsets ("full") against
    a sampled design ("sampled"): the prefixes of ``orders`` looked up in ``losses`` (the
    mean over orders at each k, an order's t-th model being its first t experts), or, with
    ``sampled``, that second table's subsets of the same (size, method) (mean over them; with
    ``orders`` too, over those orders' prefixes in it).  Each curve is fitted with the
    per-size law (``laws.fit_per_size``, ``weights``, ``b_bounds``).  Returns (curves:
    ``size, params, method, k, design, mean, std, n``; params: ``size, params, method,
    design, n_subsets, L_inf, A, b, r2, converged`` and on the sampled rows the differences
    sampled - full ``d_L_inf, d_A, d_b`` and ``max_abs_d_mean`` over k).  Raises ValueError
    when neither ``orders`` nor ``sampled`` is given."""
    from mergelaws.laws import DEFAULT_B_BOUNDS, fit_per_size

    if orders is None and sampled is None:
        raise ValueError("sampled_vs_full needs the sampled orders or a sampled losses table")
    vals = _subset_values(losses, view)
    vals = vals[vals["k"] >= 1]
    svals = _subset_values(sampled, view) if sampled is not None else None
    curves, params = [], []
    for (size, p, method), g in vals.groupby(["size", "params", "method"], sort=True):
        pool = len(frozenset().union(*g["key"]))
        if not _is_full(g, pool):
            continue
        full = g.groupby("k")["value"].agg(["mean", "std", "count"]).reset_index()
        if svals is not None:
            src = svals[(svals["size"] == size) & (svals["method"] == method) & (svals["k"] >= 1)]
        else:
            src = g
        if orders is not None:
            look = {(int(k), key): v for k, key, v in zip(src["k"], src["key"], src["value"])}
            pts = [(k, look[(k, key)]) for _, k, key in prefix_subsets(orders, range(1, pool + 1))
                   if (k, key) in look]
            s = pd.DataFrame(pts, columns=["k", "value"])
        else:
            s = src[["k", "value"]]
        if s.empty:
            continue
        samp = s.groupby("k")["value"].agg(["mean", "std", "count"]).reset_index()
        fitted = {}
        for design, c in (("full", full), ("sampled", samp)):
            for k, m, sd, n in zip(c["k"], c["mean"], c["std"], c["count"]):
                curves.append({"size": size, "params": int(p), "method": method, "k": int(k),
                               "design": design, "mean": float(m),
                               "std": float(sd) if np.isfinite(sd) else 0.0, "n": int(n)})
            f = fit_per_size(c["k"].to_numpy(), c["mean"].to_numpy(), weights=weights,
                             b_bounds=tuple(b_bounds or DEFAULT_B_BOUNDS))
            fitted[design] = f
            params.append({"size": size, "params": int(p), "method": method, "design": design,
                           "n_subsets": int(c["count"].sum()), "L_inf": f.L_inf, "A": f.A, "b": f.b,
                           "r2": f.r2, "converged": bool(f.converged)})
        both = full.merge(samp, on="k", suffixes=("_f", "_s"))
        d = params[-1]
        for name in ("L_inf", "A", "b"):
            d[f"d_{name}"] = _diff(getattr(fitted["sampled"], name), getattr(fitted["full"], name))
        d["max_abs_d_mean"] = float(np.max(np.abs(both["mean_s"] - both["mean_f"]))) if len(both) else float("nan")
    return (pd.DataFrame(curves, columns=_SVF_CURVE),
            pd.DataFrame(params, columns=_SVF_PARAMS))


def _diff(a, b) -> float:
    try:
        return float(a) - float(b)
    except (TypeError, ValueError):
        return float("nan")


# ---- the experts' fine-tuning record (Fig 11) ---------------------------------------------

def expert_records(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The ``mergelaws_expert.json`` beside each path (an expert directory, its config.json
    or the record itself) that exists; your own experts have none and are skipped."""
    out = []
    for p in paths:
        p = Path(p)
        rec = p if p.name == EXPERT_RECORD else (p if p.is_dir() else p.parent) / EXPERT_RECORD
        if rec.is_file():
            out.append(rec)
    return out


def read_expert_records(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per record: ``size, domain, loss_first, loss_last, seconds, tokens, steps,
    batch_size, examples, backend``.  ``tokens`` estimates the response tokens trained on:
    the record's target tokens per example x steps x batch size (one pass over the data
    when steps are not recorded)."""
    rows = []
    for rec in expert_records(paths):
        d = json.loads(rec.read_text())
        data, train = d.get("data") or {}, d.get("train") or {}
        per_ex = (data.get("target_tokens") or 0) / max(data.get("examples") or 1, 1)
        steps, bs = train.get("steps"), train.get("batch_size")
        tokens = per_ex * steps * bs if steps and bs else float(data.get("target_tokens") or np.nan)
        rows.append({"size": str(d.get("size")), "domain": str(d.get("domain")),
                     "loss_first": d.get("loss_first"), "loss_last": d.get("loss_last"),
                     "seconds": d.get("seconds"), "tokens": tokens, "steps": steps,
                     "batch_size": bs, "examples": data.get("examples"),
                     "backend": d.get("backend")})
    cols = ["size", "domain", "loss_first", "loss_last", "seconds", "tokens", "steps",
            "batch_size", "examples", "backend"]
    return pd.DataFrame(rows, columns=cols)


def expert_table(records: pd.DataFrame, losses: pd.DataFrame | None = None,
                 method: str | None = None) -> pd.DataFrame:
    """``read_expert_records`` joined with the base sizes' parameter counts and each expert's
    in-domain eval CE (``eval_loss``: its k = 1 row on its own domain, for ``method``, by
    default ``average`` when measured — a merge of one expert is the expert — else the mean
    over methods), and ``flops`` = 6 N tokens.  Sizes without params in ``losses`` get NaN."""
    out = records.copy()
    out["params"] = np.nan
    out["eval_loss"] = np.nan
    if losses is not None and len(losses):
        from mergelaws.laws import normalise_losses

        df = normalise_losses(losses)
        sizes = df[["size", "params"]].drop_duplicates("size").set_index("size")["params"]
        out["params"] = out["size"].map(lambda s: sizes.get(s, np.nan)).astype(float)
        one = df[(df["k"] == 1) & df["in_domain"]]
        methods = sorted(one["method"].astype(str).unique())
        m = method or ("average" if "average" in methods else None)
        if m is not None:
            one = one[one["method"] == m]
        ev = one.groupby(["size", "eval_domain"])["loss"].mean()
        out["eval_loss"] = [ev.get((s, d), np.nan) for s, d in zip(out["size"], out["domain"])]
    out["flops"] = 6.0 * out["params"] * out["tokens"]
    return out.sort_values(["params", "size", "domain"], kind="mergesort").reset_index(drop=True)
