import copy
import math

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
