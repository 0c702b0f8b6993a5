"""Merge-order dispersion (Fig 8), experts' fine-tuning loss (Fig 11) and sampled orders vs full
enumeration (Fig 12): mergelaws.orders and mergelaws.plots.orders."""

from __future__ import annotations

import copy
import itertools
import json
import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from mergelaws import grid
from mergelaws import orders as O
from mergelaws import plots as P
from synthetic import synthetic_losses

SIZES = (("xs", 2_000_000), ("s", 8_000_000), ("m", 30_000_000))


def _losses_for(subsets, domains, seed=0, noise=0.01):
    """One row per (size, method, subset, eval domain): L = 2 + 0.05 N^-0.3 + A/(k+0.3) - in-domain
    bonus + noise; ``subsets``: member tuples (the empty one is the base)."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, amp in (("average", 0.10), ("dare", 0.07)):
        for size, params in SIZES:
            n = params / 1e9
            for s in subsets:
                k = len(s)
                for e in domains:
                    loss = (2.0 + 0.05 * n ** -0.3 + (0.2 if k == 0 else amp / (k + 0.3))
                            - 0.03 * (e in s) + (rng.normal(0, noise) if k else 0.0))
                    rows.append({"size": size, "params": params, "method": method, "k": k,
                                 "subset": grid.subset_id(s), "members": "+".join(sorted(s)),
                                 "eval_domain": e, "in_domain": e in s, "loss": loss, "tokens": 100})
    return pd.DataFrame(rows)


@pytest.fixture
def orders_cfg(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["sweep"].update(sampler="orders", orders=6)
    return cfg


def _check_png(path):
    img = mpimg.imread(path)
    assert img.shape[0] > 400 and img.shape[1] > 800
    assert np.unique(img[::5, ::5].reshape(-1, img.shape[-1]), axis=0).shape[0] > 50


def test_merge_orders_match_grid_subsets(orders_cfg):
    orders = O.merge_orders(orders_cfg)
    assert len(orders) == 6
    ks = grid.k_values(orders_cfg)
    want = {frozenset(s.members) for s in grid.subsets(orders_cfg)}
    got = {key for _, _, key in O.prefix_subsets(orders, ks)}
    assert got == want  # every subset of the sweep is some order's prefix, and only those


def test_order_dispersion_and_fit(orders_cfg):
    doms = grid.domains(orders_cfg)
    losses = _losses_for([s.members for s in grid.subsets(orders_cfg)], doms)
    orders = O.merge_orders(orders_cfg)
    ot = O.order_table(losses, orders)
    m = len(doms)
    assert len(ot) == 2 * 3 * 6 * (m + 1)  # every prefix of every order found
    d = O.order_dispersion(ot)
    one = d[(d["size"] == "m") & (d["method"] == "dare")].set_index("k")
    assert one.loc[0, "std"] == 0 and one.loc[m, "std"] == 0 and one.loc[m, "n_distinct"] == 1
    assert (one["n_orders"] == 6).all()
    assert np.isclose(one.loc[1, "range"], one.loc[1, "max"] - one.loc[1, "min"])
    # brute force at k = 2
    v = [losses[(losses["size"] == "m") & (losses["method"] == "dare")
                & (losses["members"] == "+".join(sorted(o[:2])))]["loss"].mean() for o in orders]
    assert np.isclose(one.loc[2, "mean"], np.mean(v)) and np.isclose(one.loc[2, "std"], np.std(v, ddof=1))
    # the Std_order law recovers c0 + c1/(k+b) from exact points (b on the grid)
    k = np.arange(1, 9, dtype=float)
    fake = pd.DataFrame({"size": "x", "params": 1, "method": "dare", "k": k, "n_distinct": 5,
                         "std": 0.002 + 0.03 / (k + 1.5)})
    f = O.fit_order_std(fake).iloc[0]
    assert f["b"] == pytest.approx(1.5) and f["c0"] == pytest.approx(0.002) and f["c1"] == pytest.approx(0.03)
    assert f["r2"] == pytest.approx(1.0)


def test_orders_outputs_and_figures(orders_cfg, tmp_path):
    doms = grid.domains(orders_cfg)
    losses = _losses_for([s.members for s in grid.subsets(orders_cfg)], doms)
    names = O.figure_outputs(orders_cfg, "cross_domain", experts=False)
    assert names == ["fig8_orders_cross_domain.png", "fig8_orders_cross_domain.pdf",
                     "orders_cross_domain.parquet", "orders_cross_domain.csv"]
    paths = P.order_figures(losses, orders_cfg, tmp_path)
    assert sorted(p.name for p in paths) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporaries
    _check_png(tmp_path / names[0])
    t = pd.read_parquet(tmp_path / "orders_cross_domain.parquet")
    assert {"std", "range", "cv", "c0", "c1", "b", "r2"} <= set(t.columns)
    # per-size override: only that size is an orders size
    cfg = copy.deepcopy(orders_cfg)
    cfg["sweep"]["sampler"] = "uniform"
    assert O.figure_outputs(cfg, "cross_domain", experts=False) == []
    cfg["bases"]["m"]["sweep"] = {"sampler": "orders", "orders": 3}
    assert O.order_sizes(cfg) == ["m"] and O.figure_outputs(cfg, "cross_domain", False)[0].startswith("fig8")


def test_sampled_vs_full_on_full_enumeration(tmp_path):
    doms = ["a", "b", "c", "d", "e"]
    losses = synthetic_losses(doms, seed=1)  # every subset at every k
    orders = grid.diverse_orders(doms, 4, __import__("random").Random(0))
    curves, params = O.sampled_vs_full(losses, orders=orders)
    assert set(params["design"]) == {"full", "sampled"} and len(params) == 2 * 3 * 2
    c = curves[(curves["size"] == "m") & (curves["method"] == "ties")]
    full = c[c["design"] == "full"].set_index("k")
    samp = c[c["design"] == "sampled"].set_index("k")
    assert list(full["n"]) == [math.comb(5, k) for k in range(1, 6)]
    assert (samp["n"] == 4).all()
    assert full.loc[5, "mean"] == pytest.approx(samp.loc[5, "mean"])  # k = M: the same subset
    # the sampled mean at k = 2 by hand
    g = losses[(losses["size"] == "m") & (losses["method"] == "ties")]
    v = [g[g["members"] == "+".join(sorted(o[:2]))]["loss"].mean() for o in orders]
    assert samp.loc[2, "mean"] == pytest.approx(np.mean(v))
    p = params[(params["size"] == "m") & (params["method"] == "ties")].set_index("design")
    assert p.loc["sampled", "d_L_inf"] == pytest.approx(p.loc["sampled", "L_inf"] - p.loc["full", "L_inf"])
    assert abs(p.loc["sampled", "d_L_inf"]) < 0.05 and p.loc["sampled", "max_abs_d_mean"] < 0.05
    # a second, sampled table instead of orders: the same subsets give the same curve
    sub = losses[losses["members"].isin(["+".join(sorted(o[:k])) for o in orders for k in range(6)])]
    c2, _ = O.sampled_vs_full(losses, sampled=sub)
    assert set(c2["design"]) == {"full", "sampled"}
    # a table without every subset has nothing to compare
    part = synthetic_losses(doms, per_k=3)
    assert O.sampled_vs_full(part, orders=orders)[0].empty
    with pytest.raises(ValueError):
        O.sampled_vs_full(losses)
    out = P.plot_sampled_vs_full(curves, params, tmp_path / "fig12")
    _check_png(out[0])


def test_enumerated_sizes_and_fig12_outputs(cfg, tmp_path):
    assert O.enumerated_sizes(cfg) == []  # default: 9 subsets per k, not C(9, 4) = 126
    cfg = copy.deepcopy(cfg)
    cfg["bases"]["xs"]["sweep"] = {"subsets_per_k": 126}
    assert O.enumerated_sizes(cfg) == ["xs"]
    names = O.figure_outputs(cfg, "cross_domain", experts=False)
    assert names[0] == "fig12_sampled_vs_full_cross_domain.png"
    doms = grid.domains(cfg)
    subsets = [c for k in range(len(doms) + 1) for c in itertools.combinations(doms, k)]
    losses = _losses_for(subsets, doms)
    losses = losses[losses["size"].isin(["xs", "s"])]
    paths = P.order_figures(losses, cfg, tmp_path)
    assert [p.name for p in paths] == names
    t = pd.read_csv(tmp_path / "sampled_vs_full_cross_domain.csv")
    assert set(t["size"]) == {"xs"}  # only the enumerated size is compared


def test_expert_records_and_fig11(tmp_path):
    losses = synthetic_losses(["a", "b", "c"], seed=2)
    dirs = []
    for size, _ in SIZES:
        for i, d in enumerate(["a", "b", "c"]):
            p = tmp_path / "experts" / size / d
            p.mkdir(parents=True)
            (p / "config.json").write_text("{}")
            rec = {"size": size, "domain": d, "loss_first": 3.0 + i, "loss_last": 2.0 + i - 0.1 * len(dirs) / 3,
                   "seconds": 1.5, "data": {"examples": 100, "target_tokens": 5000},
                   "train": {"steps": 10, "batch_size": 4}}
            (p / O.EXPERT_RECORD).write_text(json.dumps(rec))
            dirs.append(p / "config.json")
    own = tmp_path / "own"  # your own expert: no record, skipped
    own.mkdir()
    (own / "config.json").write_text("{}")
    recs = O.read_expert_records(dirs + [own / "config.json"])
    assert len(recs) == 9 and recs["tokens"].iloc[0] == pytest.approx(50 * 10 * 4)
    et = O.expert_table(recs, losses)
    assert et["params"].notna().all()
    row = et[(et["size"] == "m") & (et["domain"] == "b")].iloc[0]
    g = losses[(losses["size"] == "m") & (losses["method"] == "average") & (losses["k"] == 1)
               & (losses["members"] == "b") & (losses["eval_domain"] == "b")]
    assert row["eval_loss"] == pytest.approx(g["loss"].mean())
    assert row["flops"] == pytest.approx(6 * 30_000_000 * 2000)
    out = P.plot_expert_losses(et, tmp_path / "fig11")
    _check_png(out[0])
