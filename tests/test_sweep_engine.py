"""The sweep's merge engine (merging.SubsetMerger): sum reuse across subsets for average and
task_arithmetic, streaming from safetensors under a memory budget, and the exact O(n) selection.

Real shipped models (data/bases/*) with seeded perturbed experts; results are compared with
merging.merge_state_dicts, the direct one-merge-at-a-time path.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import domain_specs, noise_experts
import torch

from mergelaws import merging as M
from mergelaws.merging import sparsify as S

ROOT = Path(__file__).resolve().parents[1]
EPS32 = 2.0 ** -24


def _state(size: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {n: t.float() for n, t in load_file(ROOT / "data" / "bases" / size / "model.safetensors").items()}


def _perturb(base, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}


@pytest.fixture(scope="module")
def pool():
    """data/bases/xs and six experts: base + seeded noise of different scales."""
    base = _state("xs")
    experts = {f"e{j}": _perturb(base, 100 + j, 0.003 * (j + 1)) for j in range(6)}
    return base, experts


def _all_subsets(keys, kmax=None):
    kmax = len(keys) if kmax is None else kmax
    return [list(c) for k in range(kmax + 1) for c in itertools.combinations(keys, k)]


def _merger(method, params, base, experts, mode="memory", **kw):
    mg = M.SubsetMerger(method, params, base, seed=5, mode=mode, **kw)
    for key, e in experts.items():
        mg.add_expert(key, e)
    return mg


# ---- sum reuse: equal to the direct merge, to fp32 rounding -------------------------------------

@pytest.mark.parametrize("method,params", [("average", {}), ("average", {"scale": 0.7}), ("task_arithmetic", {}),
                                           ("task_arithmetic", {"combine": "sum", "scale": 0.3})])
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_sum_reuse_equals_direct_merge(pool, method, params, mode):
    base, experts = pool
    subsets = _all_subsets(sorted(experts))
    mg = _merger(method, params, base, experts, mode)
    assert mg.reuses_sums
    for i in M.reuse_order(subsets):
        s = subsets[i]
        got = mg.merge(s, "id")
        if not s:
            assert all(torch.equal(got[n], base[n]) for n in base)
            continue
        ref = M.merge_state_dicts(method, base, [experts[m] for m in s], params)
        for n in ref:  # the output's own rounding (|theta| ~ 1) dominates: a few ulps
            torch.testing.assert_close(got[n], ref[n], rtol=4 * EPS32, atol=4 * EPS32, msg=f"{s} {n}")
    c = mg.cost
    assert c.merges == len(subsets) and c.direct == 0
    # the walk reuses: fewer expert-sized steps than the direct path's sum of k (anchors counted at k = M)
    assert c.updates + c.anchors * len(experts) < 0.6 * sum(len(s) for s in subsets)


def test_sum_reuse_does_not_depend_on_the_mode(pool):
    base, experts = pool
    subsets = _all_subsets(sorted(experts), 4)
    outs = []
    for mode in ("memory", "stream"):
        mg = _merger("average", {}, base, experts, mode)
        outs.append([mg.merge(s) for s in subsets])
    for a, b in zip(*outs):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_running_sum_drift_is_bounded_and_reanchored(pool):
    """A long walk with re-anchoring switched off drifts only by fp32 rounding of the running
    sum; the documented bound holds; with the default re-anchoring it is tighter still."""
    base, experts = pool
    keys = sorted(experts)
    subsets = [s for s in _all_subsets(keys) if s]
    order = M.reuse_order(subsets)
    walk = [subsets[i] for i in order] * 3  # 189 merges
    vmax = {n: sum(float((experts[k][n] - base[n]).abs().max()) for k in keys) for n in base}
    for every in (10 ** 6, 32):
        mg = _merger("task_arithmetic", {"combine": "sum", "scale": 1.0}, base, experts, reanchor_every=every)
        worst = 0.0
        for s in walk:
            got = mg.merge(s)
            for n in base:
                exact = sum((experts[k][n].double() - base[n].double()) for k in s)
                err = float((got[n].double() - base[n].double() - exact).abs().max())
                # running-sum error + the output's rounding (half an ulp of |theta|)
                bound = (len(s) + min(every, len(walk) * len(keys))) * EPS32 * vmax[n] \
                    + EPS32 * float(got[n].abs().max()) * 2
                assert err <= bound, (every, s, n, err, bound)
                worst = max(worst, err / bound)
        if every == 32:
            assert mg.cost.anchors >= len(walk) * 2 // 32 - 1


def test_nonfinite_expert_does_not_poison_later_sums(pool):
    base, experts = pool
    experts = dict(experts)
    bad = {n: t.clone() for n, t in experts["e2"].items()}
    name = sorted(bad)[0]
    bad[name].view(-1)[3] = float("nan")
    experts["e2"] = bad
    mg = _merger("average", {}, base, experts)
    for s in [["e0", "e1"], ["e0", "e1", "e2"], ["e0", "e1"], ["e1"], ["e1", "e3"]]:
        got = mg.merge(s)
        assert (name in mg.last_nonfinite) == ("e2" in s)
        if "e2" not in s:
            ref = M.merge_state_dicts("average", base, [experts[m] for m in s])
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=4 * EPS32, atol=4 * EPS32)


# ---- every other method: bit-identical to merge_state_dicts, in both modes -----------------------

DIRECT = [("ties", {"density": 0.3}), ("ties", {"density": 0.5, "trim_scope": "global", "zero_sign": "majority"}),
          ("dare", {"drop_rate": 0.3}), ("dare_ties", {}), ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
          ("della", {}), ("model_stock", {}), ("average", {})]


@pytest.mark.parametrize("method,params", DIRECT, ids=[f"{m}-{i}" for i, (m, _) in enumerate(DIRECT)])
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_direct_methods_bit_identical(pool, method, params, mode):
    base, experts = pool
    mg = _merger(method, params, base, experts, mode, reuse=False)
    assert not mg.reuses_sums
    for s in [["e0"], ["e3", "e1"], ["e0", "e2", "e5"], sorted(experts)]:
        got = mg.merge(s, subset_id="sub-" + "".join(s))
        ref = M.merge_state_dicts(method, base, [experts[m] for m in s], params, seed=5, subset_id="sub-" + "".join(s))
        assert set(got) == set(ref)
        for n in ref:
            assert torch.equal(got[n], ref[n]), (method, s, n)


def test_merge_into_live_tensors_casts_like_the_sweep(pool):
    base, experts = pool
    live = {n: torch.empty(t.shape, dtype=torch.bfloat16) for n, t in base.items()}
    mg = _merger("dare", {}, base, experts)
    out = mg.merge(["e1", "e4"], "x", out=live)
    assert out is live
    ref = M.merge_state_dicts("dare", base, [experts["e1"], experts["e4"]], {}, seed=5, subset_id="x")
    assert all(torch.equal(live[n], ref[n].to(torch.bfloat16)) for n in ref)


def test_reuse_order_walks_subsets_in_cheap_steps():
    """A step from P to Q costs min(|P xor Q|, |Q|) expert-sized additions (a change or a fresh
    sum): all 512 subsets of 9 in about one addition each, a sample at a third of the direct cost."""
    import random

    keys = [f"d{i}" for i in range(9)]
    subsets = _all_subsets(keys)

    def costs(subs):
        order = M.reuse_order(subs)
        assert sorted(order) == list(range(len(subs)))
        return [min(len(set(subs[a]) ^ set(subs[b])), len(subs[b])) for a, b in zip(order, order[1:])]

    c = costs(subsets)
    assert max(c) <= 2 and sum(c) <= 1.05 * (len(subsets) - 1)
    rng = random.Random(0)
    sample = [s for s in subsets if rng.random() < 0.15]
    assert sum(costs(sample)) < 0.5 * sum(len(s) for s in sample)


def test_memory_estimate_counts_what_is_held(pool):
    base, experts = pool
    numel = sum(t.numel() for t in base.values())
    for mode, reuse in [("memory", True), ("memory", False), ("stream", True)]:
        mg = _merger("average", {}, base, experts, mode, reuse=reuse)
        mg.merge(["e0", "e1"])
        est = M.merge_memory_estimate(numel, max(t.numel() for t in base.values()), len(experts), mode=mode,
                                      reuse=reuse)
        assert mg.held_bytes() == est["total"] - est["working"]


# ---- exact O(n) selection ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "discrete", "nan", "constant"])
def test_kth_smallest_equals_kthvalue(kind):
    g = torch.Generator().manual_seed(1)
    n = 300_001
    x = {"normal": lambda: torch.randn(n, generator=g),
         "discrete": lambda: torch.randint(-3, 4, (n,), generator=g).float(),
         "nan": lambda: torch.where(torch.rand(n, generator=g) < 0.01, float("nan"), torch.randn(n, generator=g)),
         "constant": lambda: torch.full((n,), 0.5)}[kind]()
    for r in [1, 2, 17, n // 10, n // 2, n - n // 7, n - 3000, n - 1, n]:
        for absolute in (False, True):
            t, n_lt, n_eq = M.kth_smallest(x, r, absolute=absolute)
            a = x.abs() if absolute else x
            ref = torch.kthvalue(a, r).values
            assert torch.equal(t, ref) or (torch.isnan(t) and torch.isnan(ref)), (kind, r, absolute)
            assert n_lt == int((a < ref).sum()) and n_eq == int((a == ref).sum())


def _ref_trim(deltas, density):
    """The previous implementation: full kthvalue + tie quota in flat order."""
    out = torch.empty_like(deltas)
    for i, v in enumerate(deltas):
        absv = v.abs()
        n = absv.numel()
        n_keep = M.ties_keep_count(density, n)
        t = torch.kthvalue(absv.reshape(-1), n - n_keep + 1).values
        keep, equal = absv > t, absv == t
        quota = n_keep - int(keep.sum())
        if quota >= int(equal.sum()):
            mask = keep | equal
        elif quota <= 0:
            mask = keep
        else:
            flat = equal.reshape(-1)
            mask = keep | (flat & (flat.cumsum(0) <= quota)).reshape(equal.shape)
        out[i] = torch.where(mask, v, 0.0)
    return out


def _ref_ties(deltas, density, zero_sign="positive", scale=1.0):
    trimmed = _ref_trim(deltas, density) if density < 1 else deltas
    elected = torch.sign(trimmed.sum(0))
    fill = 1.0 if zero_sign == "positive" else (-1.0 if float(elected.sum()) < 0 else 1.0)
    elected = torch.where(elected == 0, torch.full_like(elected, fill), elected)
    total, count = torch.zeros_like(elected), torch.zeros_like(elected)
    for t in trimmed:
        agree = t * elected > 0
        total += torch.where(agree, t, 0.0)
        count += agree
    return total / count.clamp_min(1) * scale


def _ref_breadcrumbs(v, density, gamma):
    flat = v.reshape(-1)
    n = flat.numel()
    n_keep, n_top = M.breadcrumbs_counts(n, density, gamma)
    order = torch.sort(flat.abs(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n - n_top - n_keep:n - n_top]] = True
    return torch.where(keep.reshape(v.shape), v, 0.0)


@pytest.fixture(params=[False, True], ids=["whole", "small-blocks"])
def blocks(request, monkeypatch):
    """Run the blockwise fast paths with their real sizes, and with tiny blocks and a tiny
    selection threshold so that small tensors cross many block boundaries."""
    if request.param:
        monkeypatch.setattr(S, "BLOCK", 97)
        monkeypatch.setattr(S, "SELECT_MIN", 64)
        monkeypatch.setattr(S, "SELECT_SAMPLE", 32)


@pytest.mark.parametrize("discrete", [False, True])
def test_fast_ties_and_breadcrumbs_bit_identical_to_reference(blocks, discrete):
    g = torch.Generator().manual_seed(7)
    for k, shape in [(3, (70_001,)), (5, (300, 257)), (1, (5000,))]:
        if discrete:  # many ties in |v| and exact cancellations in the sums
            d = torch.randint(-3, 4, (k, *shape), generator=g).float() * 0.01
        else:
            d = torch.randn((k, *shape), generator=g) * 0.01
        for density in (0.2, 0.5, 0.9):
            assert torch.equal(M.trim(d, density, None, None), _ref_trim(d, density))
            for zs in ("positive", "majority"):
                got = M.merge_deltas("ties", d, {"density": density, "zero_sign": zs, "scale": 0.7})
                assert torch.equal(got, _ref_ties(d, density, zs, 0.7)), (k, shape, density, zs)
            for gamma in (0.0, 0.01, 0.1):
                got = M.sparsify_breadcrumbs(d, density, gamma)
                for i in range(k):
                    assert torch.equal(got[i], _ref_breadcrumbs(d[i], density, gamma)), (density, gamma)
        w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25][:k])
        for consensus in (True, False):
            for normalize in (True, False):
                got = M.combine_deltas(d, w, consensus=consensus, normalize=normalize)
                ref = _ref_combine(d, w, consensus, normalize)
                assert torch.equal(got, ref)


def _ref_combine(sparse, w, consensus, normalize):
    k = sparse.shape[0]
    if consensus:
        elected = torch.where(sum(sparse[i] * w[i] for i in range(k)) >= 0, 1.0, -1.0)
        total, div = torch.zeros_like(sparse[0]), torch.zeros_like(sparse[0])
        for i in range(k):
            u = sparse[i] * w[i]
            agree = torch.sign(u) == elected
            total += torch.where(agree, u, 0.0)
            div += agree * w[i]
        return total / torch.where(div == 0, torch.ones_like(div), div) if normalize else total
    total = torch.zeros_like(sparse[0])
    for i in range(k):
        total += sparse[i] * w[i]
    d = float(w.sum())
    return total / (1.0 if abs(d) < 1e-8 else d) if normalize else total


# ---- the sweep: memory budget, streaming, equal tables -------------------------------------------

DOMS = ["code", "quotes", "algebra"]


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    from mergelaws import config

    work = tmp_path_factory.mktemp("engine")
    xs = ROOT / "data" / "bases" / "xs"
    dirs = noise_experts(work, DOMS, 200, 0.01)
    raw = {
        "results": str(work / "results"),
        "domains": domain_specs(DOMS),
        "bases": {"xs": {"model": str(xs)}},
        "methods": {"average": {}, "ties": {"density": 0.5}, "task_arithmetic": {}},
        "sweep": {"k": "all", "subsets_per_k": 3, "chunk": 2, "device": "cpu"},
        "eval": {"max_examples": 6, "max_len": 64},
    }
    return work, config.validate(raw), dirs


@pytest.mark.parametrize("method", ["average", "ties"])
def test_sweep_streams_under_a_small_budget_and_gives_the_same_table(sweep_setup, method):
    from mergelaws.sweep import run_sweep

    work, cfg, dirs = sweep_setup
    base = _state("xs")
    live = sum(t.numel() * 4 for t in base.values())
    numel, largest = sum(t.numel() for t in base.values()), max(t.numel() for t in base.values())

    def need(mode, reuse):
        return (live + M.merge_memory_estimate(numel, largest, len(DOMS), mode=mode, reuse=reuse)["total"]) / 1e9

    assert need("stream", True) < need("memory", True)
    tables, logs = {}, {}
    for label, budget in [("memory", None), ("stream", (need("stream", True) + need("memory", True)) / 2),
                          ("stream-nosum", 1e-6)]:
        c = copy.deepcopy(cfg)
        c["sweep"]["max_memory_gb"] = budget
        logs[label] = []
        tables[label] = run_sweep(c, "xs", method, work / f"{method}-{label}.parquet", expert_dirs=dirs,
                                  log=logs[label].append)
    text = {k: "\n".join(v) for k, v in logs.items()}
    assert "merging in memory" in text["memory"]
    assert "streaming tensor by tensor from the safetensors files" in text["stream"]
    assert "GB read" in text["stream"] or "GB of weights read" in text["stream"]
    if method == "average":
        assert "running sum held" in text["stream"] and "sums reused across subsets" in text["stream"]
        assert "running sum held" not in text["stream-nosum"]
        assert "WARNING" in text["stream-nosum"]
    ref = tables["memory"]
    for label in ("stream", "stream-nosum"):
        got = tables[label]
        exact = method != "average" or label == "stream"  # the direct average differs by fp32 rounding
        if exact:
            pd.testing.assert_frame_equal(got, ref)
        else:
            pd.testing.assert_frame_equal(got.drop(columns="loss"), ref.drop(columns="loss"))
            assert (got["loss"] - ref["loss"]).abs().max() < 1e-5


def test_sweep_sum_reuse_matches_the_direct_merge_losses(sweep_setup):
    """average through the running sum (reordered walk) vs every subset merged directly with
    merge_state_dicts and evaluated the same way."""
    from mergelaws import data as D
    from mergelaws import grid, models
    from mergelaws.evaluate import evaluate_examples
    from mergelaws.sweep import run_sweep

    work, cfg, dirs = sweep_setup
    table = run_sweep(copy.deepcopy(cfg), "xs", "task_arithmetic", work / "ta.parquet", expert_dirs=dirs,
                      log=lambda *_: None)
    model = models.load_model(ROOT / "data" / "bases" / "xs")
    tok = models.load_tokenizer(ROOT / "data" / "bases" / "xs")
    live = models.float_state(model)
    base = {n: p.detach().clone() for n, p in live.items()}
    experts = {d: {n: p.detach().clone() for n, p in models.float_state(models.load_model(dirs[d])).items()}
               for d in DOMS}
    for s in grid.subsets(cfg):
        merged = M.merge_state_dicts("task_arithmetic", base, [experts[m] for m in s.members], {}) if s.k else base
        with torch.no_grad():
            for n, p in live.items():
                p.copy_(merged[n])
        for d in DOMS:
            enc = D.load_domain(cfg, d, "eval", tok, cfg["eval"]["max_len"], limit=cfg["eval"]["max_examples"])
            res = evaluate_examples(model, enc.examples, pad_id=tok.pad_token_id)
            row = table[(table.subset == s.id) & (table.eval_domain == d)]
            assert len(row) == 1
            assert math.isclose(float(row["loss"].iloc[0]), res.loss, rel_tol=1e-5)
            assert int(row["tokens"].iloc[0]) == res.tokens


def test_incompatible_expert_is_refused_in_stream_mode(sweep_setup, tmp_path):
    from mergelaws import models
    from mergelaws.sweep import run_sweep

    work, cfg, dirs = sweep_setup
    c = copy.deepcopy(cfg)
    c["sweep"]["max_memory_gb"] = 1e-6
    bad = dict(dirs, quotes=str(ROOT / "data" / "bases" / "s"))
    with pytest.raises(models.ModelError, match="was it fine-tuned from this base"):
        run_sweep(c, "xs", "average", tmp_path / "x.parquet", expert_dirs=bad, log=lambda *_: None)


def test_della_rank_order_equals_stable_argsort():
    g = torch.Generator().manual_seed(3)
    for shape in [(257, 300), (5000,), (40, 3, 7)]:
        for kind in ("normal", "discrete", "nan"):
            v = torch.randn(shape, generator=g)
            if kind == "discrete":
                v = torch.randint(-3, 4, shape, generator=g).float()
            if kind == "nan":
                v.view(-1)[::97] = float("nan")
            rows = v.reshape(1, -1) if v.dim() < 2 else v.reshape(v.shape[0], -1)
            assert torch.equal(S.stable_abs_order(rows), torch.argsort(rows.abs(), dim=1, stable=True))


def test_all_finite_and_where0_are_exact():
    x = torch.randn(1000)
    assert S.all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[500] = bad
        assert not S.all_finite(y)
    big = torch.full((10,), 3e38)  # finite entries whose sum overflows
    assert S.all_finite(big)
    v = torch.tensor([1.5, -0.0, float("nan"), -2.0, float("inf"), 0.0])
    mask = torch.tensor([True, True, True, False, False, True])
    ref = torch.where(mask, v, 0.0)
    got = S.where0(mask, v)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


# ---- sweep.dtype auto and storage rounding --------------------------------------------------------

def _bf16_pool(work: Path, scale: float, n: int = 3) -> tuple[str, dict[str, str]]:
    """The xs base stored in bf16 (tokenizer files copied) and n bf16 experts: base + seeded
    N(0, scale^2) noise, rounded to bf16 as a saved checkpoint would be."""
    import shutil

    from mergelaws import models

    xs = ROOT / "data" / "bases" / "xs"
    base_dir = work / f"bf16-base-{scale:g}"
    m = models.load_model(xs).to(torch.bfloat16)
    m.save_pretrained(base_dir)
    for f in xs.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, base_dir / f.name)
    dirs = {}
    for j, d in enumerate(DOMS[:n]):
        e = models.load_model(base_dir, "float32")
        g = torch.Generator().manual_seed(300 + j)
        with torch.no_grad():
            for p in models.float_state(e).values():
                p.add_(scale * torch.randn(p.shape, generator=g))
        e.to(torch.bfloat16).save_pretrained(work / f"bf16-{scale:g}-{d}")
        dirs[d] = str(work / f"bf16-{scale:g}-{d}")
    return str(base_dir), dirs


def test_auto_dtype_keeps_merges_in_float32_when_bf16_would_round_the_delta_away(tmp_path):
    """Task vectors below bf16's resolution (SmolLM2's short fine-tuning): the average of the
    experts, stored in bf16, loses most of its delta, so `auto` stores merges in float32 and says
    why; an explicit bfloat16 is kept with a warning; large task vectors keep bf16 silently; an
    fp32 base needs no check."""
    from mergelaws import sweep

    small_base, small = _bf16_pool(tmp_path, 2e-4)
    large_base, large = _bf16_pool(tmp_path, 2e-2)
    loss_small = sweep.merge_rounding_loss(small_base, tuple(small.values()), "bfloat16")
    loss_large = sweep.merge_rounding_loss(large_base, tuple(large.values()), "bfloat16")
    assert loss_small > 0.3 and loss_large < 0.05, (loss_small, loss_large)

    logs: list[str] = []
    auto, bf16 = {"sweep": {"dtype": "auto"}}, {"sweep": {"dtype": "bfloat16"}}
    assert sweep.sweep_dtype(auto, small_base, small, logs.append) == "float32"
    assert sweep.sweep_dtype(auto, small_base, small, logs.append) == "float32"
    assert len(logs) == 1 and "merges are stored in float32" in logs[0] and f"{loss_small:.0%}" in logs[0], logs
    assert sweep.sweep_dtype(auto, small_base) == "bfloat16"  # without the experts: the base's dtype
    assert sweep.sweep_dtype(bf16, small_base, small, logs.append) == "bfloat16"
    assert len(logs) == 2 and logs[1].startswith("warning: sweep.dtype bfloat16"), logs
    assert sweep.sweep_dtype(auto, large_base, large, logs.append) == "bfloat16"
    assert sweep.sweep_dtype(auto, ROOT / "data" / "bases" / "xs", small, logs.append) == "float32"
    assert len(logs) == 2


def test_auto_dtype_sweep_measures_the_merge_not_the_rounding(tmp_path):
    """The sweep itself: with task vectors below bf16's resolution, `auto` gives the float32 sweep's
    table bit for bit, and the bf16 sweep differs at k = 3 (its merge is rounded back to the base)."""
    from mergelaws import config
    from mergelaws.sweep import run_sweep

    base, dirs = _bf16_pool(tmp_path, 2e-4)
    raw = {"results": str(tmp_path / "results"), "domains": domain_specs(DOMS[:3]),
           "bases": {"b": {"model": base}}, "methods": {"average": {}},
           "sweep": {"k": [0, 3], "device": "cpu"}, "eval": {"max_examples": 4, "max_len": 64}}
    tables, logs = {}, []
    for dtype in ("auto", "float32", "bfloat16"):
        c = config.validate({**raw, "sweep": {**raw["sweep"], "dtype": dtype}})
        tables[dtype] = run_sweep(c, "b", "average", tmp_path / f"{dtype}.parquet", expert_dirs=dirs, log=logs.append)
    assert any("sweep.dtype auto:" in line and "float32" in line for line in logs), logs
    pd.testing.assert_frame_equal(tables["auto"], tables["float32"])
    k3 = {d: t[t["k"] == 3]["loss"].to_numpy() for d, t in tables.items()}
    assert (abs(k3["bfloat16"] - k3["float32"]) > 1e-4).any(), k3
