"""`mergelaws merge CONFIG.yml OUT_DIR` (mergekit-format YAML) on real checkpoints.

Experts: data/bases/xs perturbed deterministically (seeded Gaussian noise, different scales).
The mergekit cross-check runs only where mergekit can be used: `import mergekit` works in this
interpreter, or MERGELAWS_MERGEKIT_YAML names a `mergekit-yaml` executable (e.g. from a separate
venv); it skips otherwise.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergelaws import merge as M
from mergelaws import mergeyaml as MY
from mergelaws import models

ROOT = Path(__file__).resolve().parents[1]
XS = ROOT / "data" / "bases" / "xs"
SCALES = (0.01, 0.02, 0.005)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    paths = []
    for j, scale in enumerate(SCALES):
        m = models.load_model(XS)
        g = torch.Generator().manual_seed(100 + j)
        with torch.no_grad():
            for _, p in models.float_state(m).items():
                p.add_(scale * torch.randn(p.shape, generator=g))
        models.save_model(m, d / f"e{j}", tokenizer_from=XS)
        paths.append(str(d / f"e{j}"))
    return paths


def _state(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in models.float_state(models.load_model(path)).items()}


@pytest.fixture(scope="module")
def states(experts):
    return _state(XS), [_state(p) for p in experts]


def _yaml(method, experts, model_params=None, params=None, base=True, **top):
    cfg = {"merge_method": method}
    if base:
        cfg["base_model"] = str(XS)
    cfg["models"] = [{"model": p, "parameters": dict((model_params or [{}] * len(experts))[j])}
                     for j, p in enumerate(experts)]
    if params:
        cfg["parameters"] = params
    cfg.update(top)
    return cfg


def _write(tmp_path, cfg, name="merge.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _load_out(out) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    return {n: p.detach().float() for n, p in models.float_state(model).items()}


W1 = [{"weight": 1.0}] * 3

# (mergekit YAML pieces) -> (registry method, params): equal weights, so the semantics coincide
EQUIVALENT = [
    ("linear", W1, None, "average", {}),
    ("average", W1, None, "average", {}),
    ("task_arithmetic", W1, {"lambda": 0.3}, "task_arithmetic", {"combine": "sum", "scale": 0.3}),
    ("ties", [{"weight": 1.0, "density": 0.5}] * 3, None, "ties", {"density": 0.5}),
    ("ties", [{"weight": 0.7, "density": 0.2}] * 3, {"lambda": 0.5}, "ties", {"density": 0.2, "scale": 0.5}),
    ("dare_linear", [{"weight": 1.0, "density": 0.7}] * 3, {"rescale": False, "normalize": True},
     "dare", {"drop_rate": 0.3, "rescale": "none"}),
    ("dare_ties", [{"weight": 1.0, "density": 0.7}] * 3, {"normalize": True}, "dare_ties",
     {"drop_rate": 0.3, "rescale": "l1"}),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 3, {"normalize": True}, "breadcrumbs",
     {"density": 0.8, "gamma": 0.05}),
    ("della", [{"weight": 1.0, "density": 0.6, "epsilon": 0.2}] * 3, None, "della",
     {"density": 0.6, "epsilon": 0.2, "rescale": "l1"}),
    ("model_stock", [{}] * 3, None, "model_stock", {}),
    ("model_stock", [{}] * 3, {"filter_wise": True}, "model_stock", {"filter_wise": True}),
]


@pytest.mark.parametrize("method,mparams,params,reg,reg_params", EQUIVALENT,
                         ids=[f"{e[0]}-{i}" for i, e in enumerate(EQUIVALENT)])
def test_yaml_merge_equals_registry(tmp_path, experts, states, method, mparams, params, reg, reg_params):
    cfg = _yaml(method, experts, mparams, params, base=method not in ("linear", "average"), dtype="float32")
    out = tmp_path / "out"
    MY.run_merge(_write(tmp_path, cfg), out, seed=7, log=lambda *_: None)
    got = _load_out(out)
    base, ex = states
    if reg == "dare" or reg == "dare_ties":  # mergekit density 0.7 -> drop_rate 1 - 0.7, not the literal 0.3
        reg_params = {**reg_params, "drop_rate": 1.0 - 0.7}
    ref = M.merge_state_dicts(reg, base, ex, reg_params, seed=7, subset_id="")
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=2e-7, msg=n)
    assert (out / "tokenizer.json").exists() and (out / "mergelaws_merge.json").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_weighted_task_arithmetic_and_linear(tmp_path, experts, states):
    base, ex = states
    w = [1.0, 0.5, 2.0]
    mp = [{"weight": x} for x in w]
    for method, params, expect in [
        ("task_arithmetic", {"lambda": 0.4}, lambda n: base[n] + 0.4 * sum(wi * (e[n] - base[n]) for wi, e in zip(w, ex))),
        ("task_arithmetic", {"normalize": True}, lambda n: base[n] + sum(wi * (e[n] - base[n]) for wi, e in zip(w, ex)) / 3.5),
        ("linear", None, lambda n: sum(wi * e[n] for wi, e in zip(w, ex)) / 3.5),
        ("linear", {"normalize": False}, lambda n: sum(wi * e[n] for wi, e in zip(w, ex))),
    ]:
        out = tmp_path / f"{method}-{bool(params and params.get('normalize') is not None)}"
        MY.run_merge(_yaml(method, experts, mp, params, base=method != "linear"), out, log=lambda *_: None)
        got = _load_out(out)
        for n in base:
            torch.testing.assert_close(got[n], expect(n), rtol=1e-5, atol=1e-6, msg=f"{method} {params} {n}")


def test_weighted_ties_is_weighted_disjoint_mean(tmp_path, experts, states):
    base, ex = states
    w = [1.0, 0.5, 2.0]
    out = tmp_path / "ties_w"
    MY.run_merge(_yaml("ties", experts, [{"weight": x, "density": 1.0} for x in w]), out, log=lambda *_: None)
    got = _load_out(out)
    n = "model.layers.0.mlp.down_proj.weight"
    v = np.stack([(e[n] - base[n]).double().numpy() for e in ex])
    u = v * np.array(w).reshape(-1, 1, 1)
    E = np.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(u) == E
    ref = (u * agree).sum(0) / np.maximum((np.array(w).reshape(-1, 1, 1) * agree).sum(0), 1e-30)
    np.testing.assert_allclose(got[n].double().numpy(), base[n].double().numpy() + ref, rtol=1e-5, atol=1e-6)


def test_cli_parser_bf16_output_and_seed(tmp_path, experts):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    from mergelaws import mergecli

    mergecli.add_parser(sub)
    path = _write(tmp_path, _yaml("dare_ties", experts, [{"weight": 1.0, "density": 0.5}] * 3, out_dtype="bfloat16"))
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        args = ap.parse_args(["merge", str(path), str(tmp_path / out), "--seed", seed])
        args.fn(args)
    from safetensors.torch import load_file

    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "a"))) == len(AutoTokenizer.from_pretrained(str(XS)))


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.update(slices=[]), "'slices'"),
    (lambda c: c.update(merge_method="slerp"), "merge_method = 'slerp' is not supported"),
    (lambda c: c["models"][1]["parameters"].pop("weight"), "models[1].parameters.weight is missing"),
    (lambda c: c["models"][0]["parameters"].update(density=0.5), "task_arithmetic does not sparsify"),
    (lambda c: c["models"][0]["parameters"].update(gamma=0.5), "models[0].parameters.gamma is not supported"),
    (lambda c: c["models"][0]["parameters"].update(weight=[0, 1]), "per-tensor filters and gradients"),
    (lambda c: c.update(parameters={"int9": 1}), "parameters.int9 is not supported"),
    (lambda c: c.update(tokenizer_source="union"), "tokenizer_source = 'union'"),
    (lambda c: c.pop("base_model"), "base_model is required"),
    (lambda c: c.update(dtype="float8"), "dtype = 'float8'"),
    (lambda c: c["models"][0].update(model="a+b"), "LoRA"),
])
def test_unsupported_keys_rejected_by_name(experts, mutate, fragment):
    cfg = _yaml("task_arithmetic", experts, W1)
    mutate(cfg)
    with pytest.raises(MY.MergeYamlError) as e:
        MY.parse_config(cfg)
    assert fragment in str(e.value)


def test_linear_base_model_is_a_member_as_in_mergekit(tmp_path, experts, states):
    with pytest.raises(MY.MergeYamlError, match="needs its weight"):
        MY.parse_config(_yaml("linear", experts, W1))
    plan = MY.parse_config(_yaml("linear", experts, W1, {"weight": 3.0}))
    assert plan.models[-1] == str(XS) and plan.weights == [1.0, 1.0, 1.0, 3.0]


def test_della_epsilon_and_model_stock_count_checked(experts):
    with pytest.raises(MY.MergeYamlError, match="density \\+- epsilon"):
        MY.parse_config(_yaml("della", experts, [{"weight": 1, "density": 0.9, "epsilon": 0.15}] * 3))
    with pytest.raises(MY.MergeYamlError, match="at least 2"):
        MY.parse_config(_yaml("model_stock", experts[:1], [{}]))
    with pytest.raises(MY.MergeYamlError, match="per-model keys: \\(none\\)"):
        MY.parse_config(_yaml("model_stock", experts, W1))


# ---------------------------------------------------------------- mergekit cross-check

def _mergekit_cmd() -> list[str] | None:
    exe = os.environ.get("MERGELAWS_MERGEKIT_YAML")
    if exe and Path(exe).exists():
        return [exe]
    if importlib.util.find_spec("mergekit") is not None:
        return [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    return None


MK_CASES = [
    ("linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}], None, 2e-7),
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}], {"lambda": 0.5}, 2e-7),
    ("ties", [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}, {"weight": 2.0, "density": 1.0}],
     None, 2e-7),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}, {"weight": 2.0, "density": 0.5}],
     {"lambda": 0.8}, 2e-7),  # even numels: floor == round-half-up
    ("breadcrumbs", [{"weight": 1.0, "density": 0.5, "gamma": 0.1}] * 3, None, 2e-7),
    ("model_stock", [{}] * 3, None, 2e-7),
]


@pytest.mark.parametrize("method,mparams,params,tol", MK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(MK_CASES)])
def test_matches_mergekit(tmp_path, experts, method, mparams, params, tol):
    cmd = _mergekit_cmd()
    if cmd is None:
        pytest.skip("mergekit not importable and MERGELAWS_MERGEKIT_YAML not set")
    from safetensors.torch import load_file

    path = _write(tmp_path, _yaml(method, experts, mparams, params, base=method != "linear", dtype="float32"))
    subprocess.run([*cmd, str(path), str(tmp_path / "mk"), "--allow-crimes"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    MY.run_merge(path, tmp_path / "ours", log=lambda *_: None)
    mk, ours = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) <= set(mk)
    diff = max(float((mk[n].float() - ours[n].float()).abs().max()) for n in ours)
    print(f"mergekit {method}: max abs diff {diff:.3g}")
    assert diff <= tol


# ---------------------------------------------------------------- streaming, tensor by tensor

STREAM_CASES = [
    ("linear", W1, None),
    ("task_arithmetic", W1, {"lambda": 0.3}),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}, {"weight": 2.0, "density": 0.7}],
     None),
    ("dare_ties", [{"weight": 1.0, "density": 0.7}] * 3, None),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 3, {"rescale": True}),
    ("della", [{"weight": 1.0, "density": 0.6, "epsilon": 0.2}] * 3, None),
    ("model_stock", [{}] * 3, None),
]


@pytest.mark.parametrize("method,mparams,params", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_streaming_merge_equals_whole_model_merge(tmp_path, experts, method, mparams, params):
    """run_merge reads and writes tensor by tensor; the whole-model path (every model loaded through
    transformers, merge_states) gives the same tensors bit for bit, and the log states the memory."""
    cfg = _yaml(method, experts, mparams, params, base=method != "linear", dtype="float32")
    logs = []
    plan = MY.run_merge(_write(tmp_path, cfg), tmp_path / "stream", seed=3, log=logs.append)
    MY._run_merge_in_memory(plan, tmp_path / "whole", seed=3, device="cpu", allow_bin=False, log=lambda *_: None,
                            t0=0.0)
    from safetensors.torch import load_file

    got, ref = load_file(tmp_path / "stream" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    assert "tensor by tensor" in logs[-1] and "Peak memory" in logs[-1]
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "stream" / "tokenizer.json").exists()


def test_streaming_merge_peak_memory_is_about_one_tensor_per_input(tmp_path):
    """A 4-expert merge of ~64 MB checkpoints in a child process: its resident memory grows by
    about (2k + 4) tensors of 8 MB, not by the 320 MB of the inputs (generous bound)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(1024, 2048, generator=g) for i in range(8)}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    paths = []
    for j in range(5):
        d = tmp_path / f"m{j}"
        d.mkdir()
        state = base if j == 0 else {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        paths.append(str(d))
    yml = _write(tmp_path, {"merge_method": "ties", "base_model": paths[0],
                            "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]]})
    code = f"""
import re, torch, resource
from mergelaws import mergeyaml
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
torch.zeros(1) + 1
before = status("VmRSS")
mergeyaml.run_merge({str(yml)!r}, {str(tmp_path / 'out')!r}, log=lambda *_: None)
print(status("VmHWM") - before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(proc.stdout.strip().splitlines()[-1])
    inputs = sum((Path(p) / "model.safetensors").stat().st_size for p in paths)
    print(f"\npeak RSS growth {grown / 1e6:.0f} MB for {inputs / 1e6:.0f} MB of inputs")
    assert grown < 0.5 * inputs
