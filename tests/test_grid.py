import copy
import math

import pytest

from mergelaws import grid


def test_all_subsets_when_few(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["sweep"]["subsets_per_k"] = 1000
    subs = grid.subsets(cfg)
    m = len(cfg["domains"])
    assert len(subs) == 2 ** m  # every subset incl. the empty one (the base)
    assert len({s.id for s in subs}) == len(subs)


def test_sampled_counts_and_determinism(cfg):
    m = len(cfg["domains"])
    n = cfg["sweep"]["subsets_per_k"]
    subs = grid.subsets(cfg)
    for k in range(m + 1):
        got = [s for s in subs if s.k == k]
        assert len(got) == min(math.comb(m, k), n)
        assert all(len(s.members) == k and list(s.members) == sorted(s.members) for s in got)
    assert [s.id for s in grid.subsets(cfg)] == [s.id for s in subs]
    other = copy.deepcopy(cfg)
    other["seed"] = cfg["seed"] + 1
    assert [s.id for s in grid.subsets(other)] != [s.id for s in subs]


def test_subset_id_is_order_free_and_stable():
    assert grid.subset_id(["b", "a"]) == grid.subset_id(["a", "b"])
    assert grid.subset_id([]) == "base"
    assert grid.subset_id(["a"]) != grid.subset_id(["b"])


def test_diverse_orders_are_prefix_subsets(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["sweep"].update(sampler="orders", orders=4)
    subs = grid.subsets(cfg)
    m = len(cfg["domains"])
    # 4 orders x m prefixes, identity and reverse share only k=0 and k=m
    assert sum(1 for s in subs if s.k == m) == 1
    assert sum(1 for s in subs if s.k == 1) <= 4


def test_algorithm1_first_two_orders():
    import random

    items = list("abcdef")
    orders = grid.diverse_orders(items, 3, random.Random(0), candidates=200)
    assert orders[0] == items and orders[1] == items[::-1]
    assert sorted(orders[2]) == sorted(items)


def test_shards_partition_the_subsets_round_robin(cfg):
    cfg = copy.deepcopy(cfg)
    size = grid.sizes(cfg)[0]
    cfg["sweep"]["shards"] = 3
    everything = grid.subsets(cfg, size)
    parts = [grid.shard_subsets(cfg, size, sh) for sh in grid.shards(cfg, size)]
    assert grid.shards(cfg, size) == ["1of3", "2of3", "3of3"]
    ids = [s.id for p in parts for s in p]
    assert sorted(ids) == sorted(s.id for s in everything) and len(set(ids)) == len(ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert len(grid.sweep_files(cfg)) == 3 * len(grid.sizes(cfg)) * len(grid.methods(cfg))
    with pytest.raises(ValueError, match="does not match the 3 shards"):
        grid.shard_subsets(cfg, size, "1of2")
    with pytest.raises(ValueError, match="form '<i>of<n>'"):
        grid.shard_subsets(cfg, size, "4of3")


def test_per_size_sweep_overrides(cfg):
    cfg = copy.deepcopy(cfg)
    small, big = grid.sizes(cfg)[0], grid.sizes(cfg)[-1]
    cfg["bases"][big]["sweep"] = {"sampler": "orders", "orders": 2, "shards": 2}
    assert grid.n_shards(cfg, small) == 1 and grid.n_shards(cfg, big) == 2
    assert [s.id for s in grid.subsets(cfg, small)] == [s.id for s in grid.subsets(cfg)]
    big_subs = grid.subsets(cfg, big)
    m = len(cfg["domains"])
    # identity and reverse orders: two prefixes per k except k = 0 and k = m
    assert len(big_subs) == 2 * (m + 1) - 2
