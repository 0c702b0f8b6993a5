"""Merge methods against independent reference implementations (numpy, loops)."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from mergelaws import merging as M

ROOT = Path(__file__).resolve().parents[1]
K = 4


# --------------------------------------------------------------------------
# Fixtures: a real (small) model's weights as the base, seeded experts
# --------------------------------------------------------------------------


def _load_base() -> dict[str, torch.Tensor]:
    """A real small base model if one is on disk, else a seeded tiny Llama."""
    paths = sorted(glob.glob(str(ROOT / "data/bases/*/model.safetensors")))
    if paths:
        from safetensors.torch import load_file

        sd = load_file(paths[0])
        # keep the test fast: the small tensors plus a few matrices
        names = sorted(n for n, t in sd.items() if t.is_floating_point() and t.numel() <= 2**18)[:16]
        return {n: sd[n].float().clone() for n in names}
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    return {n: t.detach().float().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return _load_base()


def _experts(base, k=K, *, discrete=False, seed=100):
    out = []
    for j in range(k):
        g = torch.Generator().manual_seed(seed + j)
        e = {}
        for n, t in base.items():
            if discrete:  # deltas in {+-1,+-2,+-3} * 0.01: many ties in |v|
                mag = torch.randint(1, 4, t.shape, generator=g).float()
                sign = torch.randint(0, 2, t.shape, generator=g).float() * 2 - 1
                e[n] = t + 0.01 * mag * sign
            else:
                e[n] = t + 0.01 * torch.randn(t.shape, generator=g)
        out.append(e)
    return out


@pytest.fixture(scope="module")
def experts(base):
    return _experts(base)


def _np_deltas(base, experts, name) -> np.ndarray:
    b = base[name].float().numpy()
    return np.stack([e[name].float().numpy() - b for e in experts]).reshape(len(experts), -1)


# --------------------------------------------------------------------------
# Reference implementations, written independently of mergelaws.merging
# --------------------------------------------------------------------------


def ref_keep_count(density, n):
    return min(n, max(1, int(np.floor(density * n + 0.5))))


def ref_top_mask(absv: np.ndarray, n_keep: int) -> np.ndarray:
    """Top n_keep by |v|, ties -> lowest index (stable sort)."""
    order = np.argsort(-absv, kind="stable")
    mask = np.zeros(absv.shape, bool)
    mask[order[:n_keep]] = True
    return mask


def ref_elect_and_mean(trimmed: np.ndarray, fill_zero) -> np.ndarray:
    """Loop reference: sign election by mass, then disjoint mean. trimmed: [k, n]."""
    k, n = trimmed.shape
    out = np.zeros(n)
    for j in range(n):
        col = trimmed[:, j].astype(np.float64)
        s = np.sign(col.sum())
        if s == 0:
            s = fill_zero
        agree = [x for x in col if x != 0 and np.sign(x) == s]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out


def ref_majority(trimmed_list) -> float:
    total = sum(np.sign(t.astype(np.float64).sum(0)).sum() for t in trimmed_list)
    return -1.0 if total < 0 else 1.0


def ref_ties_tensor(d: np.ndarray, density, zero_sign="positive", scale=1.0) -> np.ndarray:
    n = d.shape[1]
    trimmed = np.stack([np.where(ref_top_mask(np.abs(v), ref_keep_count(density, n)), v, 0) for v in d])
    fill = 1.0 if zero_sign == "positive" else ref_majority([trimmed])
    return scale * ref_elect_and_mean(trimmed, fill)


def ref_ties_global(base, experts, density, zero_sign):
    names = sorted(base)
    deltas = {n: _np_deltas(base, experts, n) for n in names}
    sizes = [deltas[n].shape[1] for n in names]
    trimmed = {n: np.zeros_like(deltas[n]) for n in names}
    for i in range(len(experts)):
        flat = np.concatenate([deltas[n][i] for n in names])
        mask = ref_top_mask(np.abs(flat), ref_keep_count(density, flat.size))
        for n, m in zip(names, np.split(mask, np.cumsum(sizes)[:-1])):
            trimmed[n][i] = np.where(m, deltas[n][i], 0)
    fill = 1.0 if zero_sign == "positive" else ref_majority(trimmed.values())
    return {n: ref_elect_and_mean(trimmed[n], fill) for n in names}, trimmed


def _close(out: torch.Tensor, ref: np.ndarray, **kw):
    np.testing.assert_allclose(out.reshape(-1).double().numpy(), ref.reshape(-1), **({"rtol": 1e-5, "atol": 1e-6} | kw))


# --------------------------------------------------------------------------
# Deterministic methods
# --------------------------------------------------------------------------


def test_average_matches_reference(base, experts):
    out = M.merge_state_dicts("average", base, experts, {"scale": 0.7})
    for n in base:
        ref = base[n].numpy().reshape(-1) + 0.7 * _np_deltas(base, experts, n).astype(np.float64).mean(0)
        _close(out[n], ref)


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_task_arithmetic_mean_and_sum(base, experts, combine):
    out = M.merge_state_dicts("task_arithmetic", base, experts, {"combine": combine})
    for n in base:
        d = _np_deltas(base, experts, n).astype(np.float64)
        combined = d.mean(0) if combine == "mean" else d.sum(0)
        _close(out[n], base[n].numpy().reshape(-1) + 0.8 * combined)


def test_task_arithmetic_sum_with_scale_over_k_equals_mean(base, experts):
    name = sorted(base)[0]
    d = M.task_vectors(base, experts, name)
    a = M.merge_deltas("task_arithmetic", d, {"combine": "sum", "scale": 0.8 / K})
    b = M.merge_deltas("task_arithmetic", d, {})
    torch.testing.assert_close(a, b)


def test_ties_density_one_is_sign_elected_disjoint_mean(base, experts):
    for n in sorted(base):
        d = _np_deltas(base, experts, n)
        out = M.merge_deltas("ties", torch.from_numpy(d).reshape(K, *base[n].shape), {"density": 1.0, "scale": 0.5})
        assert out.dtype == torch.float32 and out.shape == base[n].shape
        _close(out, 0.5 * ref_elect_and_mean(d, 1.0))


@pytest.mark.parametrize("density", [0.2, 0.37])
def test_ties_trim_matches_reference(base, experts, density):
    out = M.merge_state_dicts("ties", base, experts, {"density": density})
    for n in base:
        ref = base[n].numpy().reshape(-1) + ref_ties_tensor(_np_deltas(base, experts, n), density)
        _close(out[n], ref)


@pytest.mark.parametrize("density", [1e-6, 0.1, 0.25, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("n", [7, 1000, 4096])
def test_ties_trim_keeps_exact_count_with_ties(density, n):
    g = torch.Generator().manual_seed(n)
    # magnitudes from {1,2,3}: the threshold almost always falls inside a tie
    v = (torch.randint(1, 4, (n,), generator=g) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).float()
    out = M.merge_deltas("ties", v[None], {"density": density})  # k = 1: output = trimmed v
    kept = (out != 0).numpy()
    n_keep = ref_keep_count(density, n)
    assert kept.sum() == n_keep
    np.testing.assert_array_equal(kept, ref_top_mask(np.abs(v.numpy()), n_keep))
    np.testing.assert_array_equal(out.numpy()[kept], v.numpy()[kept])


def test_ties_keep_count_rule():
    assert M.ties_keep_count(0.2, 10) == 2  # 0.2 * 10 = 2.0000000000000004 must not become 3
    assert M.ties_keep_count(0.05, 10) == 1  # 0.5 rounds up
    assert M.ties_keep_count(0.04, 10) == 1  # never zero
    assert M.ties_keep_count(0.3, 5) == 2  # 1.5 rounds up
    assert M.ties_keep_count(1.0, 10) == 10


def test_ties_zero_sign_rules():
    # entries 0-2 sum to zero; elected signs elsewhere: -, +, -  -> majority is -1
    v1 = [1.0, -1.0, 2.0, -3.0, 5.0, -2.0]
    v2 = [-1.0, 1.0, -2.0, -1.0, -1.0, -2.0]
    d = torch.tensor([v1, v2])
    pos = M.merge_deltas("ties", d, {"density": 1.0, "zero_sign": "positive"})
    maj = M.merge_deltas("ties", d, {"density": 1.0, "zero_sign": "majority"})
    assert pos.tolist() == [1.0, 1.0, 2.0, -2.0, 5.0, -2.0]
    assert maj.tolist() == [-1.0, -1.0, -2.0, -2.0, 5.0, -2.0]
    _close(maj, ref_ties_tensor(d.numpy(), 1.0, "majority"))
    # majority tie (elected signs sum to zero) falls back to +1
    d2 = torch.tensor([[1.0, -1.0, 3.0, -3.0], [-1.0, 1.0, 1.0, -1.0]])
    assert M.merge_deltas("ties", d2, {"density": 1.0, "zero_sign": "majority"}).tolist() == [1.0, 1.0, 2.0, -2.0]


@pytest.mark.parametrize("zero_sign", ["positive", "majority"])
def test_ties_global_trim_matches_reference(base, zero_sign):
    ex = _experts(base, 3, discrete=True, seed=7)
    density = 0.1
    out = M.merge_state_dicts("ties", base, ex, {"density": density, "trim_scope": "global", "zero_sign": zero_sign})
    ref, trimmed = ref_ties_global(base, ex, density, zero_sign)
    n_total = sum(t.numel() for t in base.values())
    for i in range(3):  # exactly n_keep entries per model over the whole model, ties included
        assert sum(int((trimmed[n][i] != 0).sum()) for n in base) == ref_keep_count(density, n_total)
    for n in base:
        _close(out[n], base[n].numpy().reshape(-1) + ref[n])


def test_ties_global_exact_count_k1(base):
    (ex,) = _experts(base, 1, discrete=True, seed=3)
    out = M.merge_state_dicts("ties", base, [ex], {"density": 0.05, "trim_scope": "global"})
    kept = sum(int((out[n] != base[n]).sum()) for n in base)
    assert kept == ref_keep_count(0.05, sum(t.numel() for t in base.values()))


def test_ties_global_needs_thresholds():
    with pytest.raises(ValueError, match="global"):
        M.merge_deltas("ties", torch.randn(2, 5), {"trim_scope": "global"})


# --------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------


def test_dare_p0_equals_average(base, experts):
    a = M.merge_state_dicts("average", base, experts, {"scale": 0.9})
    b = M.merge_state_dicts("dare", base, experts, {"drop_rate": 0.0, "scale": 0.9}, seed=5, subset_id="x")
    for n in base:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dare_mask_fraction(p):
    n = 200_000
    out = M.merge_deltas("dare", torch.ones(1, n), {"drop_rate": p, "rescale": "none"}, seed=11)
    dropped = float((out == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    out_inv = M.merge_deltas("dare", torch.ones(1, n), {"drop_rate": p}, seed=11)
    assert out_inv.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    torch.testing.assert_close(out_inv, out / (1 - p))  # same seed -> same mask


def test_dare_masks_independent_per_model():
    out = M.merge_deltas("dare", torch.ones(2, 10_000), {"drop_rate": 0.5, "rescale": "none"}, seed=1)
    # mean of two independent masks takes all of {0, 0.5, 1}
    assert set(out.unique().tolist()) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize("rescale,factor", [("inverse", 1.0), ("none", 0.6)])
def test_dare_expectation(rescale, factor):
    p, S = 0.4, 400
    d = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    est = torch.stack(
        [M.merge_deltas("dare", d, {"drop_rate": p, "rescale": rescale}, seed=s) for s in range(S)]
    ).double().mean(0)
    target = factor * d.double().mean(0)
    scale = 1 / (1 - p) if rescale == "inverse" else 1.0
    sd = torch.sqrt((d.double() ** 2).sum(0) * p * (1 - p) * scale**2 / 9 / S)
    assert float(((est - target).abs() / sd).max()) < 5
    wrong = (1.0 if rescale == "none" else 0.6) * d.double().mean(0)
    assert float(((est - wrong).abs() / sd).max()) > 5  # the test can tell the two apart


def test_dare_bit_identical_regardless_of_order(base, experts):
    params = {"drop_rate": 0.3}
    a = M.merge_state_dicts("dare", base, experts, params, seed=3, subset_id="1-2-3-4")
    rev_base = dict(reversed(list(base.items())))
    rev_experts = [dict(reversed(list(e.items()))) for e in experts]
    M.merge_deltas("dare", torch.randn(K, 50), params, seed=123)  # unrelated draw in between
    b = M.merge_state_dicts("dare", rev_base, rev_experts, params, seed=3, subset_id="1-2-3-4")
    assert list(b) == list(rev_base)
    for n in base:
        assert torch.equal(a[n], b[n]), n
    c = M.merge_state_dicts("dare", base, experts, params, seed=3, subset_id="1-2-3-5")
    d = M.merge_state_dicts("dare", base, experts, params, seed=4, subset_id="1-2-3-4")
    big = max(base, key=lambda n: base[n].numel())
    assert not torch.equal(a[big], c[big]) and not torch.equal(a[big], d[big])


def test_dare_different_tensor_names_give_different_masks():
    d = torch.ones(1, 5000)
    p = {"drop_rate": 0.5, "rescale": "none"}
    m1 = M.merge_deltas("dare", d, p, seed=M.tensor_seed(0, "s", "layers.0.q_proj.weight"))
    m2 = M.merge_deltas("dare", d, p, seed=M.tensor_seed(0, "s", "layers.0.k_proj.weight"))
    m1b = M.merge_deltas("dare", d, p, seed=M.tensor_seed(0, "s", "layers.0.q_proj.weight"))
    assert torch.equal(m1, m1b)
    assert float((m1 != m2).float().mean()) > 0.4  # independent masks differ on ~half


def test_tensor_seed_stable_across_processes():
    s = M.tensor_seed(3, "1-4-7", "model.embed_tokens.weight")
    assert 0 <= s < 2**63
    assert M.tensor_seed(3, "1-4-7", "model.embed_tokens.weight") == s
    assert len({s, M.tensor_seed(4, "1-4-7", "model.embed_tokens.weight"),
                M.tensor_seed(3, "1-4-8", "model.embed_tokens.weight"),
                M.tensor_seed(3, "1-4-7", "lm_head.weight")}) == 4
    code = "from mergelaws.merging import tensor_seed; print(tensor_seed(3, '1-4-7', 'model.embed_tokens.weight'))"
    for hs in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hs, PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(r.stdout) == s


# --------------------------------------------------------------------------
# Registry and parameters
# --------------------------------------------------------------------------


def test_registry_names_and_defaults():
    assert M.method_names() == ["average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "della",
                                "model_stock", "fr_merging", "free_merging"]
    assert M.resolve_params("average", None) == {"scale": 1.0}
    assert M.resolve_params("task_arithmetic", {}) == {"scale": 0.8, "combine": "mean"}
    assert M.resolve_params("ties", {}) == {"density": 1.0, "scale": 1.0, "trim_scope": "tensor", "zero_sign": "positive"}
    assert M.resolve_params("dare", {}) == {"drop_rate": 0.2, "rescale": "inverse", "scale": 1.0}
    assert [m for m in M.method_names() if M.get_method(m).stochastic] == ["dare", "dare_ties", "della"]
    assert M.resolve_params("ties", {"density": 1}) ["density"] == 1.0  # int accepted for float
    assert isinstance(M.resolve_params("ties", {"density": 1})["density"], float)


def test_unknown_method_lists_valid_names():
    with pytest.raises(M.UnknownMethodError) as e:
        M.get_method("tie")
    assert isinstance(e.value, ValueError)
    for name in M.method_names():
        assert name in str(e.value)
    with pytest.raises(ValueError, match="'tie'"):
        M.merge_deltas("tie", torch.zeros(1, 3), {})


def test_unknown_param_named():
    with pytest.raises(ValueError, match=r"ties.*'dropout'.*density"):
        M.resolve_params("ties", {"dropout": 0.1})


@pytest.mark.parametrize(
    "method,params,fragment",
    [
        ("ties", {"density": 1.5}, "ties.density = 1.5 is out of range; allowed: 0 < density <= 1"),
        ("ties", {"density": 0.0}, "ties.density = 0.0 is out of range; allowed: 0 < density <= 1"),
        ("dare", {"drop_rate": 1.0}, "dare.drop_rate = 1.0 is out of range; allowed: 0 <= drop_rate < 1"),
        ("dare", {"drop_rate": -0.1}, "dare.drop_rate = -0.1 is out of range"),
        ("average", {"scale": 0}, "average.scale = 0 is out of range; allowed: 0 < scale"),
        ("task_arithmetic", {"combine": "median"}, "task_arithmetic.combine = 'median'"),
        ("ties", {"density": "0.5"}, "ties.density = '0.5' has the wrong type"),
        ("ties", {"density": True}, "ties.density = True has the wrong type"),
        ("ties", {"density": float("nan")}, "ties.density = nan is not finite"),
    ],
)
def test_bad_param_values_named(method, params, fragment):
    with pytest.raises(ValueError) as e:
        M.resolve_params(method, params)
    assert fragment in str(e.value)


CANDIDATES = [-1, 0, 0.0, 1e-9, 0.2, 0.5, 0.999999, 1, 1.0, 1.5, 3, True, False, None, "0.5",
              "mean", "sum", "tensor", "global", "positive", "majority", "inverse", "l1", "none", "x"]


@pytest.mark.parametrize("method", M.method_names())
def test_json_schema_agrees_with_resolve_params(method):
    schema = M.params_json_schema(method)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid({}) and v.is_valid(M.resolve_params(method, {}))
    assert not v.is_valid({"no_such_param": 1})
    n_bad = 0
    for pname in M.get_method(method).params:
        for value in CANDIDATES:
            try:
                M.resolve_params(method, {pname: value})
                ok = True
            except ValueError:
                ok = False
            n_bad += not ok
            assert v.is_valid({pname: value}) == ok, (method, pname, value)
    assert n_bad > 0


def test_json_schema_examples():
    v = jsonschema.Draft202012Validator(M.params_json_schema("ties"))
    assert v.is_valid({"density": 1.0, "scale": 0.5, "trim_scope": "global", "zero_sign": "majority"})
    assert not v.is_valid({"density": 1.5})
    assert not v.is_valid({"density": 0})
    assert not v.is_valid({"trim_scope": "layer"})
    schema = M.params_json_schema("dare")["properties"]["drop_rate"]
    assert schema["minimum"] == 0 and schema["exclusiveMaximum"] == 1 and schema["default"] == 0.2


# --------------------------------------------------------------------------
# State dicts: dtypes, non-float tensors, mismatches
# --------------------------------------------------------------------------


def test_bf16_storage_computes_in_fp32(base, experts):
    b16 = {n: t.to(torch.bfloat16) for n, t in base.items()}
    e16 = [{n: t.to(torch.bfloat16) for n, t in e.items()} for e in experts]
    out = M.merge_state_dicts("task_arithmetic", b16, e16, {"scale": 0.8})
    differs = 0
    for n in base:
        assert out[n].dtype == torch.bfloat16
        d = np.stack([e[n].float().numpy() - b16[n].float().numpy() for e in e16]).astype(np.float64)
        ref = torch.from_numpy(b16[n].float().numpy() + 0.8 * d.mean(0)).float().to(torch.bfloat16)
        # fp32 arithmetic, one rounding to bf16 at the end: equal to the reference up to
        # one bf16 ulp where fp32 and fp64 round across a bf16 boundary
        diff = (out[n].float() - ref.float()).abs()
        ulp = ref.float().abs().clamp_min(1e-30) * 2**-7
        assert bool((diff <= ulp).all()), n
        assert float((diff > 0).float().mean()) < 1e-3
        naive = b16[n] + 0.8 * torch.stack([e[n] - b16[n] for e in e16]).mean(0)  # bf16 arithmetic
        differs += int((naive != ref).sum())
    assert differs > 0  # bf16 arithmetic would have been caught


def test_non_float_tensors_copied_and_keys_checked(base, experts):
    b = dict(base, **{"buf.step": torch.tensor([3, 4], dtype=torch.int64)})
    ex = [dict(e, **{"buf.step": torch.tensor([9, 9])}) for e in experts]
    out = M.merge_state_dicts("ties", b, ex, {})
    assert torch.equal(out["buf.step"], b["buf.step"]) and out["buf.step"] is not b["buf.step"]
    with pytest.raises(ValueError, match="missing"):
        M.merge_state_dicts("average", b, experts, {})
    with pytest.raises(ValueError, match="unknown"):
        M.merge_state_dicts("average", base, experts, {"density": 0.5})
    with pytest.raises(ValueError):
        M.merge_state_dicts("average", base, [], {})


def test_merge_deltas_output_dtype_and_shape(base, experts):
    n = max(base, key=lambda n: base[n].dim())
    d = M.task_vectors(base, experts, n).to(torch.bfloat16)
    for m in M.method_names():
        out = M.merge_deltas(m, d, {}, seed=1)
        assert out.dtype == torch.float32 and out.shape == base[n].shape
