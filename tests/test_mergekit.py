"""`mergelaws merge CONFIG.yml OUT_DIR` (mergekit-format YAML) on real checkpoints.

Experts: data/bases/xs perturbed deterministically (seeded Gaussian noise, different scales).
The mergekit cross-check runs only where mergekit can be used: `import mergekit` works in this
interpreter, or MERGELAWS_MERGEKIT_YAML names a `mergekit-yaml` executable (e.g. from a separate
venv); it skips otherwise.
"""

from __future__ import annotations

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

from mergelaws import merging as M
from mergelaws.merging import mergekit as MY
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
    # density * numel is whole for every xs tensor (48, 2304, 6144, 98304 entries): mergekit's
    # int(density * numel), which the YAML keeps, equals the registry's round-half-up there
    ("ties", [{"weight": 0.7, "density": 0.25}] * 3, {"lambda": 0.5}, "ties", {"density": 0.25, "scale": 0.5}),
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
    from mergelaws.cli import build_parser

    ap = build_parser()
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
    (lambda c: c.update(tokenizer_source="union"), "run mergekit-yaml for union vocabularies"),
    (lambda c: c.update(tokenizer_source=["a"]), "must be base, union or a model path"),
    (lambda c: c.update(tokenizer={"source": "union"}), "the tokenizer: mapping"),
    (lambda c: c.update(chat_template="exaone"), "chat_template = 'exaone' is not built into mergelaws merge; run "
                                                 "mergekit-yaml"),
    (lambda c: c.update(chat_template="vicuna"), "neither a template name"),
    (lambda c: c.update(merge_method="linear", tokenizer_source="base") or c.pop("base_model"),
     "needs base_model"),
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
     {"lambda": 0.8}, 2e-7),
    ("ties", [{"weight": 1.0, "density": 0.35}, {"weight": 0.5, "density": 0.35}, {"weight": 2.0, "density": 0.35}],
     None, 2e-7),  # 0.35 * 48 = 16.8: mergekit's int() keeps 16 where round-half-up keeps 17
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
    MY.run_merge_in_memory(plan, tmp_path / "whole", seed=3, device="cpu", allow_bin=False, log=lambda *_: None,
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
from mergelaws.merging import mergekit
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
torch.zeros(1) + 1
before = status("VmRSS")
mergekit.run_merge({str(yml)!r}, {str(tmp_path / 'out')!r}, log=lambda *_: None)
print(status("VmHWM") - before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(proc.stdout.strip().splitlines()[-1])
    inputs = sum((Path(p) / "model.safetensors").stat().st_size for p in paths)
    print(f"\npeak RSS growth {grown / 1e6:.0f} MB for {inputs / 1e6:.0f} MB of inputs")
    assert grown < 0.5 * inputs


# ---------------------------------------------------------------- TIES keep count = mergekit's

def test_ties_keep_count_floor_option_and_default_unchanged():
    assert M.ties_keep_count(0.35, 10) == 4 and M.ties_keep_count(0.35, 10, "floor") == 3
    assert 0.29 * 100 < 29 and M.ties_keep_count(0.29, 100, "floor") == 28 and M.ties_keep_count(0.29, 100) == 29
    assert M.ties_keep_count(0.01, 10, "floor") == 1  # int() gives 0: mergekit stops there, this keeps 1
    with pytest.raises(ValueError, match="rounding"):
        M.ties_keep_count(0.5, 10, "ceil")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 10, generator=g)
    assert [int(torch.count_nonzero(r)) for r in M.trim(d, 0.35, None, None)] == [4, 4]
    assert [int(torch.count_nonzero(r)) for r in M.trim(d, 0.35, None, None, keep_rounding="floor")] == [3, 3]


def test_yaml_ties_keeps_int_density_times_numel(tmp_path, experts):
    """merge_tensor (the YAML's TIES) keeps int(density * n) entries per model, as mergekit's
    sparsify.magnitude: against a direct reference, on a tensor where that differs from the
    registry's round-half-up (0.35 * 10 = 3.5: 3 vs 4)."""
    w, density = [1.0, 0.5, 2.0], 0.35
    plan = MY.parse_config(_yaml("ties", experts, [{"weight": x, "density": density} for x in w]))
    g = torch.Generator().manual_seed(5)
    base = torch.randn(10, generator=g)
    ex = [base + torch.randn(10, generator=g) for _ in w]
    got = MY.merge_tensor(plan, base, ex).double().numpy()

    def reference(n_keep):
        v = np.stack([(e - base).double().numpy() for e in ex])
        s = np.zeros_like(v)
        for i in range(len(w)):
            top = np.argsort(-np.abs(v[i]), kind="stable")[:n_keep]
            s[i, top] = v[i, top]
        u = s * np.array(w).reshape(-1, 1)
        E = np.where(u.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(u) == E
        div = (np.array(w).reshape(-1, 1) * agree).sum(0)
        return base.double().numpy() + (u * agree).sum(0) / np.where(div == 0, 1.0, div)

    assert int(density * 10) == 3
    np.testing.assert_allclose(got, reference(3), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, reference(4), rtol=1e-6, atol=1e-7)  # the registry's count would differ


# ---------------------------------------------------------------- chat_template, tokenizer_source

CONV = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": " Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
# CONV with add_generation_prompt, rendered by mergekit's own _data/chat_templates/*.jinja with the
# xs tokenizer's bos/eos (<|endoftext|>): ours must render the same
MERGEKIT_RENDERED = {
    "chatml": "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n Hi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>\n<|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n<|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "alpaca": "Be nice.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nBye### Response:\n",
    "mistral": "<|endoftext|> [INST] Be nice.\n\n Hi [/INST] Hello!<|endoftext|> [INST] Bye [/INST]",
}
LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("template", [LITERAL, *MERGEKIT_RENDERED])
def test_chat_template_written_and_read_back(tmp_path, experts, template):
    out = tmp_path / "out"
    MY.run_merge(_yaml("task_arithmetic", experts[:1], W1[:1], chat_template=template), out, log=lambda *_: None)
    tok = _tokenizer(out)
    expected = MY.CHAT_TEMPLATES.get(template, template)
    assert tok.chat_template == expected
    assert (out / "chat_template.jinja").read_text() == expected
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == expected
    rendered = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    if template == LITERAL:
        assert rendered == "[system] Be nice.\n[user]  Hi\n[assistant] Hello!\n[user] Bye\n"
    else:
        assert rendered == MERGEKIT_RENDERED[template]
    assert len(tok) == len(_tokenizer(XS))  # the base's tokenizer, template aside


def test_chat_template_auto_takes_the_most_common(tmp_path, experts):
    import shutil

    copies = []
    for j, p in enumerate(experts):
        shutil.copytree(p, tmp_path / f"e{j}")
        copies.append(str(tmp_path / f"e{j}"))
    base_template = _tokenizer(XS).chat_template
    assert base_template and base_template != MY.CHAT_TEMPLATES["chatml"]
    logs = []
    # every input carries the base's template: auto keeps it
    MY.run_merge(_yaml("task_arithmetic", copies, W1, chat_template="auto"), tmp_path / "same", log=logs.append)
    assert _tokenizer(tmp_path / "same").chat_template == base_template.strip()
    # three experts with chatml (two with trailing whitespace, stripped as mergekit does) vs the base's
    for j, c in enumerate(copies):
        (Path(c) / "chat_template.jinja").write_text(MY.CHAT_TEMPLATES["chatml"] + "\n" * j)
    MY.run_merge(_yaml("task_arithmetic", copies, W1, chat_template="auto"), tmp_path / "auto", log=logs.append)
    assert _tokenizer(tmp_path / "auto").chat_template == MY.CHAT_TEMPLATES["chatml"]
    assert any("3 of 4 inputs" in line for line in logs)


def _grown_expert(path, new_tokens=("<tool_a>", "<tool_b>", "<tool_c>"), seed=11) -> str:
    """An xs expert fine-tuned with added tokens: its tokenizer and embedding grow."""
    tok = _tokenizer(XS)
    tok.add_tokens(list(new_tokens))
    m = models.load_model(XS)
    m.resize_token_embeddings(len(tok))
    m.config.vocab_size = len(tok)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.float_state(m).values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


EMB = "model.embed_tokens.weight"


def test_tokenizer_source_base_cuts_grown_rows(tmp_path, experts, states):
    grown = _grown_expert(tmp_path / "grown")
    mp = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}]
    cfg = _yaml("ties", [grown, experts[1]], mp, dtype="float32")
    with pytest.raises(models.ModelError, match="has shape \\(2051, 48\\)"):  # mergekit without it: no merge
        MY.run_merge(cfg, tmp_path / "none", log=lambda *_: None)
    cfg["tokenizer_source"] = "base"
    out = tmp_path / "out"
    plan = MY.run_merge(cfg, out, log=lambda *_: None)
    got = _load_out(out)
    base, ex = states
    g = _state(grown)
    assert g[EMB].shape[0] == 2051 and got[EMB].shape == base[EMB].shape
    for n in base:
        rows = g[n][:2048] if n == EMB else g[n]  # mergekit's base vocabulary: the added rows are cut
        torch.testing.assert_close(got[n], MY.merge_tensor(plan, base[n], [rows, ex[1][n]]), rtol=0, atol=0, msg=n)
    assert len(_tokenizer(out)) == 2048
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 2048


def test_tokenizer_source_model_path_takes_its_vocabulary(tmp_path, experts, states):
    grown = _grown_expert(tmp_path / "grown")
    cfg = _yaml("task_arithmetic", [grown, experts[1]], [{"weight": 1.0}, {"weight": 0.5}], {"lambda": 0.7},
                tokenizer_source=grown, chat_template="chatml")
    out = tmp_path / "out"
    plan = MY.run_merge(cfg, out, log=lambda *_: None)
    got = _load_out(out)
    base, ex = states
    g = _state(grown)
    assert got[EMB].shape == (2051, 48)
    ref = MY.merge_tensor(plan, base[EMB], [g[EMB][:2048], ex[1][EMB]])
    torch.testing.assert_close(got[EMB][:2048], ref, rtol=0, atol=0)
    # tokens only the grown expert has: every model takes its rows (mergekit's donor), so they are its rows
    assert torch.equal(got[EMB][2048:], g[EMB][2048:])
    tok = _tokenizer(out)
    assert len(tok) == 2051 and tok.convert_tokens_to_ids("<tool_b>") == 2049
    assert tok.chat_template == MY.CHAT_TEMPLATES["chatml"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 2051


def _cli(tmp_path, cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergelaws.cli", "merge", str(_write(tmp_path, cfg)),
                           str(tmp_path / "out")], capture_output=True, text=True)


@pytest.mark.parametrize("key,value,fragment", [
    ("tokenizer_source", "union", "run mergekit-yaml for union vocabularies"),
    ("chat_template", "exaone", "run mergekit-yaml, or give the template's Jinja text"),
])
def test_cli_rejects_unsupported_value_in_one_line(tmp_path, experts, key, value, fragment):
    proc = _cli(tmp_path, _yaml("task_arithmetic", experts[:1], W1[:1], **{key: value}))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("mergelaws merge: error: ") and f"{key} = {value!r}" in lines[0] and fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_vocab_rows_for_missing_tokens_follow_mergekit_defaults():
    """VocabMap.gather on 4 output tokens: 0 in all models; 1 missing from expert a (base's row);
    2 only in expert a (its row, for everyone); 3 in both experts but not the base (their mean)."""
    t = {p: torch.arange(10 * j, 10 * j + 8, dtype=torch.float32).view(4, 2) for j, p in enumerate("bxy")}
    index = {"b": torch.tensor([0, 1, -1, -1]), "x": torch.tensor([2, -1, 0, 3]), "y": torch.tensor([0, 3, -1, 1])}
    vm = MY.VocabMap(size=4, names=["w"], index=index, base="b", tokenizer="b")
    deltas = torch.empty(2, 4, 2)
    b = vm.gather("w", {p: M.DictSource({"w": x}) for p, x in t.items()}, ["x", "y"], deltas)
    mean3 = (t["x"][3] + t["y"][1]) / 2
    torch.testing.assert_close(b, torch.stack([t["b"][0], t["b"][1], t["x"][0], mean3]), rtol=0, atol=0)
    torch.testing.assert_close(deltas[0] + b, torch.stack([t["x"][2], t["b"][1], t["x"][0], t["x"][3]]), rtol=0, atol=0)
    torch.testing.assert_close(deltas[1] + b, torch.stack([t["y"][0], t["y"][3], t["x"][0], t["y"][1]]), rtol=0, atol=0)
