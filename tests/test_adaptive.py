"""sweep.sampler: adaptive (issue #15): the stopping rule, its seeded order, determinism, a
resume after a kill giving the same rows, and bad config refused in one line.

The sweeps use the shipped tiny base data/bases/xs with four seeded perturbed experts and a
small eval, so the whole file runs in well under a minute.
"""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import domain_specs, noise_experts
import yaml

from mergelaws import grid
from mergelaws.sweep import adaptive_decision, adaptive_state_path, finite_pool_sem

ROOT = Path(__file__).resolve().parents[1]
DOMS = ["algebra", "code", "quotes", "scripture"]


# ---- the stopping rule on synthetic values -------------------------------------------------------

def test_finite_pool_sem_matches_the_closed_form():
    v = [1.0, 1.2, 0.9, 1.1]
    n, N = len(v), 10
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    assert finite_pool_sem(v, N) == pytest.approx(sd / math.sqrt(n) * math.sqrt((N - n) / N))
    assert finite_pool_sem(v, 4) == 0.0  # the whole pool: no sampling error
    assert math.isnan(finite_pool_sem([1.0], 10))


def test_finite_pool_sem_is_the_sd_of_the_sample_mean():
    """Simulation: the spread of means of n draws without replacement from a pool of N."""
    rng = random.Random(3)
    pool = [rng.gauss(0, 1) for _ in range(12)]
    n = 5
    means = [sum(rng.sample(pool, n)) / n for _ in range(40000)]
    mu = sum(means) / len(means)
    sd_means = math.sqrt(sum((m - mu) ** 2 for m in means) / len(means))
    pmean = sum(pool) / len(pool)
    sigma = math.sqrt(sum((x - pmean) ** 2 for x in pool) / (len(pool) - 1))
    assert sd_means == pytest.approx(sigma / math.sqrt(n) * math.sqrt((12 - n) / 12), rel=0.03)


def test_decision_rule():
    # below min_per_k: never stops on the SEM, whatever it is
    d = adaptive_decision([1.0, 1.0], n_pool=36, target_sem=0.01, min_per_k=3, cap=9)
    assert not d.stop and "min_per_k" in d.reason
    # three equal values: SEM 0 < target -> stop
    d = adaptive_decision([1.0, 1.0, 1.0], n_pool=36, target_sem=0.01, min_per_k=3, cap=9)
    assert d.stop and d.n == 3 and d.sem == 0.0 and "< target" in d.reason
    # known SEM: values +-a around a mean; sd = a*sqrt(4/3) for 4 values [-a,-a,a,a]
    a = 0.02
    vals = [1 - a, 1 - a, 1 + a, 1 + a]
    sem = a * math.sqrt(4 / 3) / 2 * math.sqrt((36 - 4) / 36)
    assert adaptive_decision(vals, 36, sem * 1.01, 3, 9).stop
    d = adaptive_decision(vals, 36, sem * 0.99, 3, 9)
    assert not d.stop and d.sem == pytest.approx(sem)
    # the cap stops whatever the SEM; a cell smaller than min_per_k is enumerated
    vals = [1.0 + (-1) ** i * 0.5 for i in range(9)]
    d = adaptive_decision(vals, 36, 1e-9, 3, 9)
    assert d.stop and "cap reached" in d.reason
    assert not adaptive_decision([1.0], 2, 10.0, 3, 2).stop
    d = adaptive_decision([1.0, 2.0], 2, 1e-9, 3, 2)
    assert d.stop and "all C(M,k) = 2" in d.reason and d.sem == 0.0
    # k = 0: one subset, the base
    assert adaptive_decision([1.0], 1, 1e-9, 3, 1).stop
    # a failed merge (NaN) counts towards the cap but not towards min_per_k or the SEM
    d = adaptive_decision([1.0, float("nan"), 1.0], 36, 0.01, 3, 9)
    assert not d.stop
    assert adaptive_decision([1.0, float("nan"), 1.0, 1.0], 36, 0.01, 3, 9).stop


# ---- the seeded order --------------------------------------------------------------------------

def test_adaptive_order_extends_the_uniform_sample(cfg):
    cfg = copy.deepcopy(cfg)
    uni = grid.subsets(cfg)
    cfg["sweep"]["sampler"] = "adaptive"
    orders = grid.adaptive_orders(cfg)
    m, cap = len(cfg["domains"]), cfg["sweep"]["subsets_per_k"]
    for k, seq in orders.items():
        assert len(seq) == min(cap, math.comb(m, k)) and len({s.id for s in seq}) == len(seq)
        assert {s.id for s in seq} == {s.id for s in uni if s.k == k}  # same set as uniform at the cap
    assert {s.id for s in grid.subsets(cfg)} == {s.id for s in uni}
    # deterministic, and a larger cap extends the order (prefix)
    assert grid.adaptive_orders(cfg) == orders
    big = copy.deepcopy(cfg)
    big["sweep"]["subsets_per_k"] = cap + 5
    for k, seq in grid.adaptive_orders(big).items():
        assert seq[:len(orders[k])] == orders[k]
    # k = 1 is visited in a seeded permutation, not alphabetically
    assert [s.members for s in orders[1]] != sorted(s.members for s in orders[1])


# ---- the sweep ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mergelaws import config

    work = tmp_path_factory.mktemp("adaptive")
    xs = ROOT / "data" / "bases" / "xs"
    dirs = noise_experts(work, DOMS, 300, lambda j: 0.01 + 0.01 * j)
    raw = {
        "results": str(work / "results"),
        "domains": domain_specs(DOMS),
        "bases": {"xs": {"model": str(xs)}},
        "methods": {"average": {}, "ties": {"density": 0.5}},
        "sweep": {"k": "all", "subsets_per_k": 4, "chunk": 1, "device": "cpu", "sampler": "adaptive",
                  "min_per_k": 2, "target_sem": 0.004},
        "eval": {"max_examples": 4, "max_len": 64},
    }
    return work, raw, config.validate(copy.deepcopy(raw)), dirs


def _run(cfg, method, out, dirs, logs=None):
    from mergelaws.sweep import run_sweep

    return run_sweep(copy.deepcopy(cfg), "xs", method, out, expert_dirs=dirs,
                     log=(logs.append if logs is not None else (lambda *_: None)))


@pytest.mark.parametrize("method", ["average", "ties"])
def test_adaptive_sweep_is_deterministic_and_resumes_to_the_same_rows(setup, method, monkeypatch):
    from mergelaws import sweep

    work, _, cfg, dirs = setup
    logs = []
    ref = _run(cfg, method, work / f"{method}-a.parquet", dirs, logs)
    text = "\n".join(logs)
    assert "k=0: stopped after 1 subset: all C(M,k) = 1" in text
    assert "k=4: stopped after 1 subset" in text
    state = json.loads(adaptive_state_path(work / f"{method}-a.parquet").read_text())
    assert state["sampler"] == "adaptive" and state["target_sem"] == 0.004
    orders = grid.adaptive_orders(cfg, "xs")
    for k, st in state["k"].items():
        # a prefix of the seeded order, at least min_per_k where the cell allows, at most the cap
        assert st["subsets"] == [s.id for s in orders[int(k)][:st["n"]]]
        assert min(2, len(orders[int(k)])) <= st["n"] <= len(orders[int(k)])
        assert f"k={k}: stopped after {st['n']} subset" in text
        assert st["stop"]
    assert sorted(ref["subset"].unique()) == sorted(i for st in state["k"].values() for i in st["subsets"])
    assert len(ref) == len(DOMS) * ref["subset"].nunique()
    # the table's per-k SEM is the one the rule saw; stops before the cap satisfy the target
    for st in state["k"].values():
        if st["n"] < st["n_pool"] and "cap" not in st["reason"] and "all" not in st["reason"]:
            assert st["sem"] < 0.004

    # a repeated run gives the same rows
    again = _run(cfg, method, work / f"{method}-b.parquet", dirs)
    pd.testing.assert_frame_equal(again, ref)

    # killed after the second persisted chunk (chunk = 1 subset): the rerun resumes and matches
    out = work / f"{method}-killed.parquet"
    real_add, calls = sweep.PartialResults.add, []

    def add_then_die(self, rows):
        real_add(self, rows)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(sweep.PartialResults, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, method, out, dirs)
    monkeypatch.setattr(sweep.PartialResults, "add", real_add)
    assert not out.exists() and len(list((work / f".{out.name}.partial").glob("chunk-*.parquet"))) == 3
    logs = []
    resumed = _run(cfg, method, out, dirs, logs)
    assert any("resuming the adaptive sampler with 3 subsets" in line for line in logs)
    pd.testing.assert_frame_equal(resumed, ref)
    assert json.loads(adaptive_state_path(out).read_text()) == state


def test_target_changes_how_many_subsets(setup):
    work, _, cfg, dirs = setup
    loose = copy.deepcopy(cfg)
    loose["sweep"]["target_sem"] = 10.0  # any SEM passes: min_per_k everywhere
    t = _run(loose, "average", work / "loose.parquet", dirs)
    per_k = t.groupby("k")["subset"].nunique().to_dict()
    assert per_k == {0: 1, 1: 2, 2: 2, 3: 2, 4: 1}
    tight = copy.deepcopy(cfg)
    tight["sweep"]["target_sem"] = 1e-9  # never: the cap (4) or every subset
    t = _run(tight, "average", work / "tight.parquet", dirs)
    assert t.groupby("k")["subset"].nunique().to_dict() == {0: 1, 1: 4, 2: 4, 3: 4, 4: 1}


def _validate_cli(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "mergelaws.cli", "validate", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("change,key", [
    ({"shards": 2}, "sweep.shards"),
    ({"target_sem": 0}, "sweep.target_sem"),
    ({"min_per_k": 1}, "sweep.min_per_k"),
    ({"sampler": "adaptiv"}, "sweep.sampler"),
])
def test_bad_adaptive_config_is_one_line_exit_2(setup, tmp_path, change, key):
    _, raw, _, _ = setup
    raw = copy.deepcopy(raw)
    raw["sweep"].update(change)
    r = _validate_cli(tmp_path, raw)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert key in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_adaptive_with_shards_per_size_is_refused(setup, tmp_path):
    _, raw, _, _ = setup
    raw = copy.deepcopy(raw)
    raw["sweep"]["sampler"] = "uniform"
    raw["bases"]["xs"]["sweep"] = {"sampler": "adaptive", "shards": 3}
    r = _validate_cli(tmp_path, raw)
    assert r.returncode == 2 and "bases.xs.sweep.shards" in r.stderr and "shards: 1" in r.stderr


def test_default_config_keeps_the_uniform_sampler(cfg):
    assert cfg["sweep"]["sampler"] == "uniform"
    assert cfg["sweep"]["target_sem"] == 0.005 and cfg["sweep"]["min_per_k"] == 3


# ---- plan: which k, how many subsets for a target interval width --------------------------------

def test_design_width_matches_simulated_fits():
    """The predicted sd of A and L_inf (first order, weights k) against 400 synthetic tables
    whose cell means carry the noise C/(k n)."""
    import numpy as np

    from mergelaws.laws import fit_per_size
    from mergelaws.plan.design import cell_variance, interval_width

    law, C, ks, n = {"L_inf": 3.0, "A": 0.5, "b": 0.3}, 0.002, [1, 2, 4, 9], [6, 6, 6, 1]
    k = np.array(ks, float)
    sd = np.sqrt(cell_variance(k, n, C))
    rng = np.random.default_rng(0)
    est = []
    for _ in range(400):
        y = law["L_inf"] + law["A"] / (k + law["b"]) + rng.normal(size=k.size) * sd
        f = fit_per_size(k, y, weights="k")
        est.append((f.L_inf, f.A))
    sim = np.std(np.array(est), axis=0, ddof=1)
    for i, p in enumerate(("L_inf", "A")):
        pred = interval_width(law, ks, n, C, 9, p) / (2 * 1.959963984540054)
        assert pred == pytest.approx(sim[i], rel=0.15), p


def test_design_for_width_is_the_cheapest_meeting_the_target():
    from mergelaws.plan.design import design_for_width, interval_width

    law, C, M = {"L_inf": 3.0, "A": 0.5, "b": 0.3}, 0.002, 9
    d = design_for_width(law, C, M, 0.6, "A")
    assert d["reachable"] and d["ks"][0] == 1 and d["ks"][-1] == M and d["width"] <= 0.6
    assert d["merges"] == sum(d["n_per_k"]) + 1
    assert interval_width(law, d["ks"], [min(d["n"] - 1, math.comb(M, k)) for k in d["ks"]], C, M, "A") > 0.6
    # no design of the same candidates with fewer merges meets it
    import itertools
    for r in range(1, 4):
        for mid in itertools.combinations(range(2, M), r):
            ks = (1, *mid, M)
            for n in range(1, 85):
                nk = [min(n, math.comb(M, k)) for k in ks]
                if sum(nk) + 1 >= d["merges"]:
                    break
                assert interval_width(law, ks, nk, C, M, "A") > 0.6
    # a tighter target costs more; an impossible one says so
    assert design_for_width(law, C, M, 0.4, "A")["merges"] > d["merges"]
    far = design_for_width(law, C, M, 1e-4, "L_inf")
    assert not far["reachable"] and "unreachable" in far["note"]
    # finite pool: every k-subset of this pool = no sampling noise
    assert interval_width(law, [1, 8, 9], [9, 9, 1], C, M, "A", finite_pool=True) == 0.0
    with pytest.raises(ValueError):
        design_for_width(law, C, M, 0.1, "b")
