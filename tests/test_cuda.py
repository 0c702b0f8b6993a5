"""CUDA against the CPU (issue #4): with ``device: cuda`` the same code gives the same results.

Every test compares a run on ``DEVICE`` with the same run on the CPU, on the shipped tiny bases
(data/bases/xs and data/bases/m) and seeded perturbed experts (the helpers and fixtures of
tests/test_sweep_engine.py, tests/test_merge.py and tests/test_mergekit.py):

(a) every registered merge method: merged tensors equal to fp32 tolerance; the random masks of
    dare, dare_ties and della identical (the CPU generator's draws, DELLA's keep probabilities bit
    for bit); TIES's trim keeps exactly the same entries, and so the same count; the sweep's merge
    engine (merging.SubsetMerger, in memory and streaming) equal too;
(b) ``evaluate_examples`` (and ``mergelaws eval``'s run_eval): the same tokens, loss to 1e-5 relative;
(c) a sweep (``mergelaws.sweep.run_sweep``, ``sweep.device``): the same table, loss to 1e-5 relative;
(d) ``mergelaws merge`` (merging.mergekit, ``--device``): written tensors equal to fp32 tolerance.

TIES's sign election sums the k task vectors with one ``sum(0)``, whose order of additions is
torch's (on the CPU it changes from k >= 5): the experts here are k <= 4, so an entry whose sum
cancels cannot be elected differently on the two devices. With k >= 5 a rare such entry may
differ by more than the tolerance (the other entries do not).

All tests are skipped unless ``torch.cuda.is_available()``. The environment variable
``MERGELAWS_TEST_DEVICE`` (default ``cuda``) names the device compared with the CPU: set
``MERGELAWS_TEST_DEVICE=cpu`` to run every comparison CPU against CPU, which checks the tests
themselves on a machine without a GPU (the results must then agree trivially); ``cuda:1`` picks
another GPU.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from mergelaws import merging as M
from mergelaws import models

DEVICE = os.environ.get("MERGELAWS_TEST_DEVICE", "cuda")


def _device_available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cpu":
        return True
    return kind == "cuda" and torch.cuda.is_available()


pytestmark = pytest.mark.skipif(
    not _device_available(DEVICE),
    reason=f"no CUDA GPU: torch.cuda.is_available() is False (MERGELAWS_TEST_DEVICE={DEVICE}; "
           f"set MERGELAWS_TEST_DEVICE=cpu to dry-run the comparisons CPU against CPU)")

# helpers and fixtures of the CPU tests, reused (tests/ is on sys.path, as for tests/synthetic.py)
from test_merge import _experts as _merge_experts  # noqa: E402
from test_mergekit import STREAM_CASES, _write, _yaml  # noqa: E402
from test_mergekit import experts  # noqa: E402,F401  (fixture: 3 perturbed xs experts on disk)
from test_sweep_engine import DOMS, _perturb, _state  # noqa: E402
from test_sweep_engine import sweep_setup  # noqa: E402,F401  (fixture: 3 experts + a validated config)

ROOT = Path(__file__).resolve().parents[1]
XS = ROOT / "data" / "bases" / "xs"
RTOL, ATOL = 1e-5, 1e-6  # fp32 tolerance on merged weights (|theta| <~ 1, |v| ~ 0.01)
LOSS_RTOL = 1e-5
K = 3  # experts per merge (<= 4: see the module doc)

# every registered method, at a setting that sparsifies; a method added to the registry must be added here
CASES = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"combine": "sum", "scale": 0.3}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "trim_scope": "global", "zero_sign": "majority"}),
    ("dare", {"drop_rate": 0.3}),
    ("dare_ties", {}),
    ("dare_ties", {"rescale": "l1"}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("della", {}),
    ("della", {"density": 0.6, "epsilon": 0.2, "rescale": "l1"}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("fr_merging", {}),  # its FFT runs on the CPU whatever the device (fourier.py)
    ("free_merging", {"ratio": 0.5, "normalize": True}),
]
CASE_IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]


def _to(state: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {n: t.to(device) for n, t in state.items()}


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.device.type == torch.device(DEVICE).type, (what, got.device)
    torch.testing.assert_close(got.cpu(), ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", params=["xs", "m"])
def pool(request):
    """A shipped base and K seeded experts (base + noise of different scales), on the CPU."""
    base = _state(request.param)
    return request.param, base, [_perturb(base, 100 + j, 0.003 * (j + 1)) for j in range(K)]


# ---- (a) merge methods ---------------------------------------------------------------------------

def test_every_registered_method_is_covered():
    assert {m for m, _ in CASES} == set(M.method_names())


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
def test_merge_state_dicts_same_on_device(pool, method, params):
    size, base, experts = pool
    ref = M.merge_state_dicts(method, base, experts, params, seed=5, subset_id="s")
    got = M.merge_state_dicts(method, _to(base, DEVICE), [_to(e, DEVICE) for e in experts], params, seed=5,
                              subset_id="s")
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype
        _close(got[n], ref[n], f"{size} {method} {params} {n}")


def _mask_pairs(base, experts):
    """(name, [K, ...] task vectors on the CPU) for every tensor."""
    return [(n, torch.stack([e[n] - b for e in experts])) for n, b in base.items()]


@pytest.mark.parametrize("drop_rate", [0.3, [0.1, 0.5, 0.9]])
def test_dare_masks_identical(pool, drop_rate):
    """The CPU generator's draws, moved to the device: the same entries dropped (values exact)."""
    size, base, experts = pool
    for n, d in _mask_pairs(base, experts):
        seed = M.tensor_seed(5, "s", n)
        ref = M.sparsify_dare(d, drop_rate, "none", seed)
        got = M.sparsify_dare(d.to(DEVICE), drop_rate, "none", seed)
        assert torch.equal((got != 0).cpu(), ref != 0), (size, n)
        assert torch.equal(got.cpu(), ref), (size, n)


@pytest.mark.parametrize("method", ["dare", "dare_ties", "della"])
def test_registered_random_methods_draw_the_same_masks(pool, method):
    """One expert: the merged delta is the kept entries (rescaled), zero elsewhere; its zero
    pattern is the mask, identical on both devices."""
    size, base, experts = pool
    params = {"rescale": "none"}
    for n, d in _mask_pairs(base, experts[:1]):
        seed = M.tensor_seed(5, "s", n)
        ref = M.merge_deltas(method, d, params, seed=seed)
        got = M.merge_deltas(method, d.to(DEVICE), params, seed=seed)
        assert torch.equal((got != 0).cpu(), ref != 0), (size, method, n)
        _close(got, ref, f"{size} {method} {n}")


def test_della_keep_probabilities_and_masks_identical(pool):
    """DELLA's rank-based keep probabilities bit for bit (a division by a Python number would be a
    multiplication by its reciprocal on CUDA, an ulp off, and flip masks), then the same masks."""
    size, base, experts = pool
    for n, d in _mask_pairs(base, experts):
        for v in d:
            ref = M.della_keep_probs(v, 0.8, 0.1)
            got = M.della_keep_probs(v.to(DEVICE), 0.8, 0.1)
            assert torch.equal(got.cpu(), ref), (size, n)
        seed = M.tensor_seed(5, "s", n)
        for rescale in ("none", "inverse"):
            ref = M.sparsify_della(d, [0.8, 0.6, 0.7], [0.1, 0.2, 0.15], rescale, seed)
            got = M.sparsify_della(d.to(DEVICE), [0.8, 0.6, 0.7], [0.1, 0.2, 0.15], rescale, seed)
            assert torch.equal((got != 0).cpu(), ref != 0), (size, n, rescale)
            assert torch.equal(got.cpu(), ref), (size, n, rescale)


@pytest.mark.parametrize("discrete", [False, True], ids=["gaussian", "many-ties"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_trim_keeps_the_same_entries(pool, discrete, density):
    """The O(n) selection (kth_smallest) and the tie rule on the device: exactly
    ties_keep_count(density, numel) entries per model, the same ones, the same values."""
    size, base, _ = pool
    experts = _merge_experts(base, K, discrete=discrete)
    for n, d in _mask_pairs(base, experts):
        ref = M.trim(d, density, None, None)
        got = M.trim(d.to(DEVICE), density, None, None)
        keep = M.ties_keep_count(density, d[0].numel())
        counts = [int(torch.count_nonzero(g)) for g in got]
        assert counts == [int(torch.count_nonzero(r)) for r in ref], (size, n)
        assert all(c <= keep for c in counts), (size, n, counts, keep)  # == keep but where v itself is 0
        assert torch.equal(got.cpu(), ref), (size, n)


def test_kth_smallest_same_on_device(pool):
    """The sampled bracket and the fallback give torch.kthvalue's value and the same counts."""
    size, base, experts = pool
    for n, d in _mask_pairs(base, experts):
        v = d[0].reshape(-1)
        for r in sorted({1, max(1, v.numel() // 3), max(1, v.numel() - 7), v.numel()}):
            for absolute in (False, True):
                t, lt, eq = M.kth_smallest(v, r, absolute=absolute)
                tg, ltg, eqg = M.kth_smallest(v.to(DEVICE), r, absolute=absolute)
                assert (float(tg), ltg, eqg) == (float(t), lt, eq), (size, n, r, absolute)


ENGINE_CASES = [("average", {}), ("task_arithmetic", {"combine": "sum", "scale": 0.3}), ("ties", {"density": 0.3}),
                ("dare", {"drop_rate": 0.3}), ("della", {})]


@pytest.mark.parametrize("method,params", ENGINE_CASES, ids=[m for m, _ in ENGINE_CASES])
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_subset_merger_same_on_device(method, params, mode):
    """The sweep's engine, in memory and streaming from the safetensors file, written into live
    tensors on the device (as the sweep does): the CPU engine's merges, to fp32 tolerance."""
    base = _state("xs")
    experts = {f"e{j}": _perturb(base, 100 + j, 0.003 * (j + 1)) for j in range(4)}
    mergers = {}
    for dev in ("cpu", DEVICE):
        src = M.SafetensorsSource(XS) if mode == "stream" else _to(base, dev)
        mg = M.SubsetMerger(method, params, src, seed=5, mode=mode, device=dev, names=list(base))
        for key, e in experts.items():
            mg.add_expert(key, e)
        mergers[dev] = mg
    live = {n: torch.empty_like(t, device=DEVICE) for n, t in base.items()}
    subsets = [[], ["e0"], ["e0", "e2"], ["e1", "e2", "e3"], ["e0", "e1", "e2", "e3"], ["e3"]]
    for s in M.reuse_order(subsets):
        members, sid = subsets[s], "sub-" + "".join(subsets[s])
        ref = mergers["cpu"].merge(members, sid)
        out = mergers[DEVICE].merge(members, sid, out=live)
        assert out is live and mergers[DEVICE].last_nonfinite == []
        for n in ref:
            _close(live[n], ref[n], f"{method} {mode} {members} {n}")


# ---- (b) evaluation ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["xs", "m"])
def test_evaluate_examples_same_on_device(cfg, size):
    from mergelaws import data as D
    from mergelaws.evaluate import evaluate_examples

    path = ROOT / "data" / "bases" / size
    tok = models.load_tokenizer(path)
    on_cpu = models.load_model(path, "float32", "cpu")
    on_dev = models.load_model(path, "float32", DEVICE)
    assert next(on_dev.parameters()).device.type == torch.device(DEVICE).type
    for domain in ("code", "quotes", "arithmetic"):
        enc = D.load_domain(cfg, domain, "eval", tok, 128, limit=24)
        ref = evaluate_examples(on_cpu, enc.examples, pad_id=tok.pad_token_id, batch_tokens=700)
        got = evaluate_examples(on_dev, enc.examples, pad_id=tok.pad_token_id, batch_tokens=700, device=DEVICE)
        assert isinstance(got.nll, float) and got.tokens == ref.tokens, (size, domain)
        assert math.isclose(got.loss, ref.loss, rel_tol=LOSS_RTOL), (size, domain, got.loss, ref.loss)


def test_run_eval_same_on_device(tmp_path):
    """`mergelaws eval --device`: the same record but for the loss (to 1e-5) and the time."""
    from mergelaws.evaluate import evaluate_files as run_eval

    files = [str(ROOT / "data" / "domains" / d / "eval.jsonl.gz") for d in ("arithmetic", "code")]
    recs = {dev: run_eval(XS, files, str(tmp_path / f"{i}.json"), max_len=96, batch_tokens=1024, max_examples=12,
                          device=dev, log=lambda *_: None) for i, dev in enumerate(("cpu", DEVICE))}
    ref, got = recs["cpu"]["results"], recs[DEVICE]["results"]
    assert set(got) == set(ref)
    for f in ref:
        assert {k: v for k, v in got[f].items() if k != "loss"} == {k: v for k, v in ref[f].items() if k != "loss"}
        assert math.isclose(got[f]["loss"], ref[f]["loss"], rel_tol=LOSS_RTOL), (f, got[f], ref[f])


# ---- (c) the sweep -------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [None, 1e-6], ids=["memory", "stream"])
@pytest.mark.parametrize("method", ["average", "ties", "dare"])
def test_sweep_table_same_on_device(sweep_setup, method, budget):  # noqa: F811
    from mergelaws.sweep import run_sweep

    work, cfg, dirs = sweep_setup
    tables, logs = {}, {}
    for dev in ("cpu", DEVICE):
        c = copy.deepcopy(cfg)
        c["methods"]["dare"] = {"drop_rate": 0.3}
        c["sweep"]["device"] = dev
        c["sweep"]["max_memory_gb"] = budget
        logs[dev] = []
        label = f"{method}-{'mem' if budget is None else 'stream'}-{dev.replace(':', '')}"
        out = work / f"cuda-{label}.parquet"
        tables[dev] = run_sweep(c, "xs", method, out, expert_dirs=dirs, log=logs[dev].append)
        assert out.exists()
    ref, got = tables["cpu"], tables[DEVICE]
    text = "\n".join(logs[DEVICE])
    assert ("streaming tensor by tensor" in text) == (budget is not None), text
    assert len(got) == len(ref) and (got["status"] == "ok").all()
    assert set(got["eval_domain"]) == set(DOMS)
    pd.testing.assert_frame_equal(got.drop(columns="loss"), ref.drop(columns="loss"))
    rel = ((got["loss"] - ref["loss"]).abs() / ref["loss"].abs()).max()
    assert rel < LOSS_RTOL, (method, budget, rel)


# ---- (d) mergelaws merge -------------------------------------------------------------------------

def _load(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(out) / "model.safetensors")


def _same_files(got_dir, ref_dir, what: str) -> None:
    got, ref = _load(got_dir), _load(ref_dir)
    assert set(got) == set(ref), what
    for n in ref:
        assert got[n].dtype == ref[n].dtype and got[n].shape == ref[n].shape, (what, n)
        torch.testing.assert_close(got[n].float(), ref[n].float(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what} {n}: {m}")


@pytest.mark.parametrize("method,mparams,params", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_yaml_merge_same_on_device(tmp_path, experts, method, mparams, params):  # noqa: F811
    """run_merge tensor by tensor (the task vectors moved to the device per tensor)."""
    from mergelaws.merging import mergekit as MY

    path = _write(tmp_path, _yaml(method, experts, mparams, params, base=method != "linear", dtype="float32"))
    for dev in ("cpu", DEVICE):
        MY.run_merge(path, tmp_path / f"out-{dev.replace(':', '')}", seed=3, device=dev, log=lambda *_: None)
    _same_files(tmp_path / f"out-{DEVICE.replace(':', '')}", tmp_path / "out-cpu", method)


def test_yaml_merge_in_memory_same_on_device(tmp_path, experts):  # noqa: F811
    """The whole-model path (base loaded on the device through transformers)."""
    from mergelaws.merging import mergekit as MY

    plan = MY.parse_config(_yaml("della", experts, [{"weight": 1.0, "density": 0.6, "epsilon": 0.2}] * 3))
    for dev in ("cpu", DEVICE):
        MY.run_merge_in_memory(plan, tmp_path / f"whole-{dev.replace(':', '')}", seed=3, device=dev,
                               allow_bin=False, log=lambda *_: None, t0=0.0)
    _same_files(tmp_path / f"whole-{DEVICE.replace(':', '')}", tmp_path / "whole-cpu", "della in memory")


def test_merge_cli_device_flag(tmp_path, experts):  # noqa: F811
    """`mergelaws merge CONFIG OUT --device DEVICE` against `--device cpu`, bf16 output included."""
    from mergelaws.cli import build_parser

    ap = build_parser()
    for method, mparams, out_dtype in (("dare_ties", [{"weight": 1.0, "density": 0.5}] * 3, "float32"),
                                       ("ties", [{"weight": 1.0, "density": 0.3}] * 3, "bfloat16")):
        path = _write(tmp_path, _yaml(method, experts, mparams, out_dtype=out_dtype), name=f"{method}.yml")
        for dev in ("cpu", DEVICE):
            args = ap.parse_args(["merge", str(path), str(tmp_path / f"{method}-{dev.replace(':', '')}"),
                                  "--seed", "1", "--device", dev])
            args.fn(args)
        got, ref = tmp_path / f"{method}-{DEVICE.replace(':', '')}", tmp_path / f"{method}-cpu"
        if out_dtype == "bfloat16":  # one bf16 rounding of fp32-close values: equal, or one bf16 ulp apart
            g, r = _load(got), _load(ref)
            assert set(g) == set(r)
            for n in r:
                assert g[n].dtype == torch.bfloat16
                torch.testing.assert_close(g[n].float(), r[n].float(), rtol=2 ** -7, atol=1e-6)
        else:
            _same_files(got, ref, method)


# ---- (e) OpenRLHF's train_sft on the GPU -----------------------------------------------------------

OPENRLHF_PYTHON = os.environ.get("MERGELAWS_OPENRLHF_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not OPENRLHF_PYTHON or torch.device(DEVICE).type != "cuda",
                    reason="needs a CUDA device and MERGELAWS_OPENRLHF_PYTHON (an environment with OpenRLHF "
                           "0.11 and DeepSpeed; flash-attn optional)")
def test_openrlhf_trains_an_expert_on_cuda(cfg, tmp_path, capsys):
    """The product path on a GPU: DeepSpeed's launcher starts OpenRLHF's own
    ``openrlhf.cli.train_sft`` (no CPU shim: DeepSpeed's CUDA accelerator, NCCL, its fused Adam
    built for the GPU), ZeRO-2, bf16, sdpa attention, on the tiny xs base and the arithmetic
    domain with the chat template and the system prompt. Where flash-attn is not installed, only
    its pure-PyTorch stand-in (tests/openrlhf_shim/flash_attn) is put on PYTHONPATH for
    OpenRLHF's module-level imports. The expert is complete, compatible with its base, and has a
    lower eval loss than the base (the project's evaluation, on the GPU)."""
    import json
    import time

    from mergelaws import config as C
    from mergelaws import openrlhf as O
    from mergelaws import sweep, train
    from mergelaws.evaluate import evaluate_examples

    domain, n_examples, batch = "arithmetic", 256, 8
    steps = n_examples // batch
    raw = copy.deepcopy(cfg)
    raw["results"] = str(tmp_path / "results")
    raw["system_prompt"] = "You are a helpful assistant."
    raw["train"].update(backend="openrlhf", batch_size=batch, max_len=128, lr=1e-3, warmup_ratio=0.05,
                        max_examples=n_examples)
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))}
    has_flash = subprocess_has_module(OPENRLHF_PYTHON, "flash_attn")
    if not has_flash:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests" / "openrlhf_shim"),
                                                        os.environ.get("PYTHONPATH")) if p)
    raw["train"]["openrlhf"] = dict(python=OPENRLHF_PYTHON, launcher="deepspeed", num_gpus=1, micro_batch_size=batch,
                                    zero_stage=2, param_dtype="bf16", attn_implementation="sdpa", max_epochs=1,
                                    env=env)
    raw["eval"]["max_examples"] = 64
    c = C.validate(raw)
    out = Path(c["results"]) / "experts" / "xs" / domain
    t0 = time.time()
    rec = train.train_expert(c, "xs", domain, str(out))
    seconds = time.time() - t0
    log = capsys.readouterr().out
    assert "deepspeed.launcher.runner" in rec["openrlhf"]["command"]
    assert "openrlhf.cli.train_sft" in rec["openrlhf"]["command"] and "cpu_sft_main" not in rec["openrlhf"]["command"]
    losses = O.parse_losses(log.splitlines())
    assert len(losses) == steps, (len(losses), steps)
    loss_first, loss_last = losses[0], sum(losses[-10:]) / 10
    assert math.isfinite(loss_first) and loss_last < loss_first - 0.05, losses
    assert rec["loss_mask"]["identical"] == rec["loss_mask"]["checked"]
    assert json.loads((out / "mergelaws_expert.json").read_text())["domain"] == domain
    base = models.load_model(XS, "float32", DEVICE)
    expert = models.load_model(out, "float32", DEVICE)
    models.check_compatible(base, expert, out)
    tok = models.load_tokenizer(out)
    ev = sweep.load_eval_sets(c, tok, log=lambda *a: None)[domain].examples
    base_loss = evaluate_examples(base, ev, pad_id=tok.pad_token_id, device=DEVICE).loss
    expert_loss = evaluate_examples(expert, ev, pad_id=tok.pad_token_id, device=DEVICE).loss
    assert expert_loss < base_loss - 0.05, (base_loss, expert_loss)
    with capsys.disabled():
        print(f"\n[openrlhf cuda] OpenRLHF {rec['openrlhf']['version']} on {torch.cuda.get_device_name()}, "
              f"flash-attn {'real' if has_flash else 'stand-in'}: {steps} steps of {batch}; gpt_loss "
              f"{loss_first:.3f} -> {loss_last:.3f} (mean of last 10); eval loss on {domain}: base "
              f"{base_loss:.4f} -> expert {expert_loss:.4f}; {seconds:.1f}s incl. launcher and JIT builds")


def subprocess_has_module(python: str, name: str) -> bool:
    import subprocess

    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0
