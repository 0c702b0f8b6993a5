"""The `openrlhf` training backend (mergelaws.openrlhf).

Unit tests (always run, no OpenRLHF needed): the command builder, SLURM node lists and the
DeepSpeed hostfile, the JSONL writer on the shipped domains, the loss-mask check on the shipped
tokenizer, the config section, failure handling and verification of a result.

Integration tests (need an OpenRLHF environment, built by `.ci/openrlhf-env.sh VENV`, named by
MERGELAWS_OPENRLHF_PYTHON=VENV/bin/python): OpenRLHF's real `train_sft` trains an expert of the
tiny shipped base on CPU, through the same command builder, with the test-only CPU shim in
tests/openrlhf_shim (launcher `python`, module `cpu_sft_main`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mergelaws import config as C
from mergelaws import data as D
from mergelaws import models
from mergelaws import openrlhf as O

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "openrlhf_shim"
OPENRLHF_PYTHON = os.environ.get("MERGELAWS_OPENRLHF_PYTHON")
TRAP_TEMPLATE = "User: {}\nAssistant: "  # OpenRLHF's default input_template


def flags_of(argv: list[str]) -> dict[str, str | bool]:
    """train_sft's flags after ``--module <name>`` (or ``-m <name>``) as {flag: value or True}."""
    i = argv.index("--module") + 2 if "--module" in argv else argv.index("-m") + 2
    out, rest = {}, argv[i:]
    for j, a in enumerate(rest):
        if a.startswith("--"):
            nxt = rest[j + 1] if j + 1 < len(rest) else None
            out[a] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


@pytest.fixture
def paper_cfg(monkeypatch):
    monkeypatch.chdir(ROOT)
    return C.load(ROOT / "config" / "paper.yaml")


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return models.load_tokenizer(ROOT / "data" / "tokenizer")


def with_openrlhf(cfg: dict, **settings) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["train"]["backend"] = "openrlhf"
    cfg["train"]["openrlhf"] = {**cfg["train"].get("openrlhf", {}), **settings}
    return C.validate(cfg)


# ---- the command -------------------------------------------------------------------------

def test_command_from_paper_config_uses_table2_values_and_dotted_flags(paper_cfg):
    argv = O.build_command(paper_cfg, base="Qwen/Qwen2.5-0.5B", dataset="/d/train.jsonl", output_dir="/o/tmp",
                           ckpt_dir="/o/.algebra.ckpt/ds", seed=1234, port=29611)
    assert argv[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert argv[argv.index("--module") + 1] == "openrlhf.cli.train_sft"
    assert argv[argv.index("--master_port") + 1] == "29611"
    f = flags_of(argv)
    assert f["--model.model_name_or_path"] == "Qwen/Qwen2.5-0.5B"
    assert f["--data.dataset"] == "/d/train.jsonl"
    assert (f["--data.input_key"], f["--data.output_key"]) == ("input", "output")
    assert f["--data.input_template"] == "<|user|>{}<|assistant|>" == O.TEMPLATE
    # Table 2: batch 16, lr 1e-5, warmup 0.05, 2 epochs, max_len 16,384, ZeRO-3, bf16,
    # Adam offload, gradient checkpointing
    assert f["--train.batch_size"] == "16" and f["--train.micro_batch_size"] == "1"
    assert float(f["--adam.lr"]) == 1e-5 and float(f["--lr_warmup_ratio"]) == 0.05
    assert f["--train.max_epochs"] == "2" and f["--data.max_len"] == "16384"
    assert f["--ds.zero_stage"] == "3" and f["--ds.param_dtype"] == "bf16"
    assert f["--ds.adam_offload"] is True and f["--model.gradient_checkpointing_enable"] is True
    assert f["--ds.attn_implementation"] == "flash_attention_2" and f["--ds.packing_samples"] is True
    assert f["--ckpt.output_dir"] == "/o/tmp" and f["--ckpt.path"] == "/o/.algebra.ckpt/ds"
    assert f["--ckpt.save_steps"] == "200" and f["--ckpt.load_enable"] is True
    assert f["--train.seed"] == "1234"
    # 0.11.x names only: the pre-0.11 flags are "unrecognized arguments" there
    assert not {"--pretrain", "--save_path", "--bf16", "--zero_stage", "--max_len"} & set(f)
    assert all(k.count(".") == 1 or k in ("--lr_warmup_ratio", "--lr_scheduler", "--min_lr_ratio", "--max_norm")
               for k in f), sorted(f)


def test_seed_fits_numpy_and_extra_args_are_appended(cfg):
    c = with_openrlhf(cfg, extra_args=["--ds.ring_attn_size", "2"], num_gpus=4)
    argv = O.build_command(c, base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=2**40 + 5, port=1)
    f = flags_of(argv)
    assert f["--train.seed"] == str((2**40 + 5) % 2**32)
    assert argv[-2:] == ["--ds.ring_attn_size", "2"]
    assert argv[argv.index("--num_gpus") + 1] == "4"
    assert "--hostfile" not in argv  # one node: no hostfile


def test_single_node_without_num_gpus_leaves_device_choice_to_the_job(cfg):
    argv = O.build_command(with_openrlhf(cfg), base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0, port=1)
    assert "--num_gpus" not in argv and "--hostfile" not in argv


def test_python_launcher_for_a_shim_module(cfg, monkeypatch):
    monkeypatch.setenv("SHIM_HOME", str(SHIM))
    c = with_openrlhf(cfg, launcher="python", module="cpu_sft_main", python=sys.executable,
                      env={"PYTHONPATH": "$SHIM_HOME", "DS_ACCELERATOR": "cpu"})
    argv = O.build_command(c, base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0, port=1)
    assert argv[:4] == [sys.executable, "-u", "-m", "cpu_sft_main"]
    env = O.launch_env(c, 29612, base_env={"PATH": "/bin"})
    assert env["PYTHONPATH"] == str(SHIM) and env["DS_ACCELERATOR"] == "cpu" and env["PATH"] == "/bin"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("0", "1", "0", "29612")


def test_interpreter_must_exist(cfg):
    c = with_openrlhf(cfg, python="/nonexistent/bin/python")
    with pytest.raises(C.ConfigError, match="train.openrlhf.python"):
        O.build_command(c, base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0)


def test_batch_must_divide_into_micro_batches(cfg):
    c = with_openrlhf(cfg, micro_batch_size=3)
    with pytest.raises(C.ConfigError, match="train.batch_size = 8 is not a multiple"):
        O.check_batch(c, world=1)
    O.check_batch(with_openrlhf(cfg, micro_batch_size=2), world=4)
    with pytest.raises(C.ConfigError, match=r"x GPUs \(8\)"):
        O.check_batch(with_openrlhf(cfg, micro_batch_size=2), world=8)


# ---- SLURM: node lists, GPUs, hostfile -------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("node1,node2", ["node1", "node2"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("x-[1-2]-ib", ["x-1-ib", "x-2-ib"]),
    ("single", ["single"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert O.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "h100:2(IDX:0-1)"}, 2),
    ({"SLURM_GPUS": "16", "SLURM_JOB_NUM_NODES": "2"}, 8),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "3"}, 1),
    ({}, None),
])
def test_gpus_per_node(env, n):
    assert O.gpus_per_node(env) == n


def test_topology_and_hostfile_from_a_slurm_environment():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "8"}
    topo = O.slurm_topology(env)
    assert topo == O.Topology(("gpu07", "gpu08"), 8) and topo.nodes == 2
    # scontrol's expansion wins where given
    assert O.slurm_topology(env, ["n1", "n2", "n3"]).hosts == ("n1", "n2", "n3")
    text = O.hostfile_text(topo.hosts, topo.gpus_per_node)
    assert text == "gpu07 slots=8\ngpu08 slots=8\n"
    assert all(re.fullmatch(r"\S+ slots=\d+", line) for line in text.splitlines())  # DeepSpeed's format
    assert O.slurm_topology({"SLURM_JOB_NODELIST": "gpu01"}) is None  # not inside a job
    with pytest.raises(ValueError):
        O.hostfile_text(["a"], 0)
    assert O.master_port(env) == 20000 + 4242
    assert O.master_port(env, 31000) == 31000
    assert 1024 < O.master_port({}) < 65536


def test_multinode_command_srun_and_deepspeed_launchers(cfg, tmp_path):
    topo = O.Topology(("gpu07", "gpu08"), 8)
    hostfile = tmp_path / "hostfile"
    kw = dict(base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0, topology=topo, hostfile=hostfile,
              port=24242)
    argv = O.build_command(with_openrlhf(cfg), **kw)
    assert argv[0] == "srun" and "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    script = argv[argv.index("-c") + 1]
    assert '--node_rank "$SLURM_NODEID"' in script and "--no_ssh" in script
    assert argv[argv.index("-c") + 2] == sys.executable
    for flag, value in (("--hostfile", str(hostfile)), ("--num_nodes", "2"), ("--num_gpus", "8"),
                        ("--master_addr", "gpu07"), ("--master_port", "24242")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--module") + 1] == "openrlhf.cli.train_sft"
    pdsh = O.build_command(with_openrlhf(cfg, multinode_launcher="pdsh"), **kw)
    assert pdsh[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert pdsh[pdsh.index("--launcher") + 1] == "pdsh" and pdsh[pdsh.index("--hostfile") + 1] == str(hostfile)
    with pytest.raises(C.ConfigError, match="GPUs each node"):
        O.build_command(with_openrlhf(cfg), **{**kw, "topology": O.Topology(("a", "b"), None)})


# ---- data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["arithmetic", "code", "quotes"])
def test_jsonl_from_shipped_domain(cfg, tmp_path, shipped_tokenizer, domain):
    pairs = O.domain_pairs(cfg, domain)
    path = tmp_path / "train.jsonl"
    n = O.write_jsonl(pairs, path, shipped_tokenizer.eos_token)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == len(pairs) == len(D.read_pairs(cfg["domains"][domain]["train"]))
    assert all(set(r) == {"input", "output"} and r["output"].endswith("<|endoftext|>") for r in rows)
    assert [(r["input"], r["output"][: -len("<|endoftext|>")]) for r in rows] == pairs
    # OpenRLHF's text is template.format(input) + output: the project's template, exactly
    first = rows[0]
    assert O.TEMPLATE.format(first["input"]) + first["output"] == \
        f"{D.USER}{pairs[0][0]}{D.ASSISTANT}{pairs[0][1]}{shipped_tokenizer.eos_token}"
    assert not list(tmp_path.glob(".train.jsonl.tmp-*"))


def test_max_examples_and_hub_uris_use_the_project_reader(cfg, tmp_path):
    c = copy.deepcopy(cfg)
    c["train"]["max_examples"] = 5
    assert len(O.domain_pairs(c, "algebra")) == 5
    d = tmp_path / "hub"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(6)) + "\n")
    c["domains"]["algebra"]["train"] = f"hf://{d}?prompt=q&response=a&holdout=2"
    assert len(O.domain_pairs(c, "algebra")) == 4 and all(p.startswith("q") for p, _ in O.domain_pairs(c, "algebra"))


# ---- the loss mask ---------------------------------------------------------------------------

def test_loss_mask_matches_project_on_shipped_tokenizer(cfg, shipped_tokenizer):
    tok = shipped_tokenizer
    for domain in cfg["domains"]:
        rep = O.check_loss_mask(tok, O.domain_pairs(cfg, domain), limit=64)
        assert rep["checked"] == 64 and rep["template"] == O.TEMPLATE
    # by hand: OpenRLHF's targets are exactly the response tokens + eos, as in data.encode_pair
    prompt, response = O.domain_pairs(cfg, "thesaurus")[0]
    ids, targets = O.openrlhf_example(tok, O.TEMPLATE, O.openrlhf_record(prompt, response, tok.eos_token))
    ex, _ = D.encode_pair(tok, prompt, response, 10**6)
    assert ids == ex.input_ids
    assert [ids[i] for i in targets] == [t for t in ex.labels if t != D.IGNORE]
    assert [ids[i] for i in targets] == tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]


def test_loss_mask_trap_template_ending_in_a_space_is_refused(cfg, shipped_tokenizer):
    tok = shipped_tokenizer
    pairs = O.domain_pairs(cfg, "thesaurus")  # responses start "1. synonyms: ..." -> "Ġ1" merges
    with pytest.raises(O.LossMaskError) as err:
        O.check_loss_mask(tok, pairs, TRAP_TEMPLATE)
    msg = str(err.value)
    assert "first response token gets no loss" in msg and repr(TRAP_TEMPLATE) in msg and "data/tokenizer" in msg
    assert isinstance(err.value, C.ConfigError)  # the CLI reports it as a one-line config error
    # what happens, reproduced: the first response token ("1") is not among OpenRLHF's targets
    prompt, response = pairs[0]
    ids, targets = O.openrlhf_example(tok, TRAP_TEMPLATE, O.openrlhf_record(prompt, response, tok.eos_token))
    trained = tok.decode([ids[i] for i in targets])
    assert response.startswith("1") and not trained.startswith("1") and trained.startswith(response[1:10])
    # a template ending in a newline is safe here
    O.check_loss_mask(tok, pairs, "User: {}\nAssistant:\n")


def test_output_without_eos_would_train_an_extra_space(shipped_tokenizer):
    """Why the writer appends eos: OpenRLHF otherwise appends " " + eos (a token we never train)."""
    tok = shipped_tokenizer
    ids, targets = O.openrlhf_example(tok, O.TEMPLATE, {"input": "2 + 2", "output": "4"})
    assert tok.convert_ids_to_tokens([ids[i] for i in targets])[-2:] == ["Ġ", "<|endoftext|>"]
    ids, targets = O.openrlhf_example(tok, O.TEMPLATE, O.openrlhf_record("2 + 2", "4", tok.eos_token))
    assert tok.convert_ids_to_tokens([ids[i] for i in targets]) == ["4", "<|endoftext|>"]


# ---- config --------------------------------------------------------------------------------

def test_config_section_defaults_and_errors(default_cfg_raw):
    cfg = C.validate(copy.deepcopy(default_cfg_raw))
    o = cfg["train"]["openrlhf"]
    assert o["launcher"] == "deepspeed" and o["module"] == "openrlhf.cli.train_sft" and o["zero_stage"] == 2
    assert o["input_template"] is None and o["env"] == {} and o["save_steps"] == -1

    def bad(**settings):
        raw = copy.deepcopy(default_cfg_raw)
        raw["train"]["openrlhf"] = settings
        with pytest.raises(C.ConfigError) as err:
            C.validate(raw)
        return str(err.value)

    assert "train.openrlhf.zero_stage" in bad(zero_stage=4)
    assert "train.openrlhf.launcher" in bad(launcher="torchrun")
    assert "train.openrlhf.param_dtype" in bad(param_dtype="fp32")
    assert "epochs" in bad(epochs=2) and "max_epochs" in bad(epochs=2)  # unknown key, allowed keys listed
    assert "train.openrlhf.env.X" in bad(env={"X": 1})


def test_paper_config_validates_with_openrlhf(paper_cfg):
    assert paper_cfg["train"]["backend"] == "openrlhf"
    o = paper_cfg["train"]["openrlhf"]
    assert (o["max_epochs"], o["zero_stage"], o["adam_offload"], o["gradient_checkpointing"]) == (2, 3, True, True)


# ---- running: progress parsing, failures, verification ------------------------------------

def test_parse_losses_counts_each_step_once():
    lines = [
        "Train step of epoch 0:  12%| | 1/8 [00:01<00:08, 1.21s/it, gpt_loss=2.13, lr=0.001, grad_norm=4.4]",
        "Train step of epoch 0:  25%| | 2/8 [00:01<00:03, 1.63it/s, gpt_loss=2.13, lr=0.001, grad_norm=4.4]",
        "Train step of epoch 0:  25%| | 2/8 [00:02<00:03, 1.05s/it, gpt_loss=2.11, lr=0.000955, grad_norm=3.88]",
        "Eval stage of steps 2: 100%| | 1/1 [00:00<00:00, eval gpt_loss=2.5]",
        "Train step of epoch 0:  38%| | 3/8 [00:03<00:03, 1.05s/it, gpt_loss=1.9e+00, lr=0.0009, grad_norm=3]",
    ]
    assert O.parse_losses(lines) == [2.13, 2.11, 1.9]


def test_failed_run_names_log_and_command_and_leaves_no_expert(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(O, "openrlhf_version", lambda py, env: "0.11.2")  # this env has no OpenRLHF
    c = with_openrlhf(cfg, launcher="python", module="mergelaws_no_such_module", python=sys.executable)
    c["train"]["max_examples"] = 16
    out = tmp_path / "experts" / "xs" / "arithmetic"
    with pytest.raises(O.OpenRLHFError) as err, open(os.devnull, "w") as quiet:
        O.train_expert(c, "xs", "arithmetic", str(ROOT / "data" / "bases" / "xs"), out, seed=1, echo=quiet)
    msg = str(err.value)
    ckpt = tmp_path / "experts" / "xs" / ".arithmetic.ckpt"
    assert f"see the log {ckpt / 'openrlhf.log'}" in msg and "mergelaws_no_such_module" in msg and "exit 1" in msg
    assert isinstance(err.value, models.ModelError)  # the CLI reports it as a one-line error
    assert not out.exists() and not list(out.parent.glob(".arithmetic.tmp-*"))
    assert (ckpt / "train.jsonl").exists()  # kept for the retry
    assert "No module named mergelaws_no_such_module" in (ckpt / "openrlhf.log").read_text()


def test_interpreter_without_openrlhf_is_a_config_error(cfg, tmp_path):
    c = with_openrlhf(cfg, launcher="python", python=sys.executable)
    try:
        import importlib.metadata as md

        md.version("openrlhf")
        pytest.skip("this environment has OpenRLHF installed")
    except md.PackageNotFoundError:
        pass
    with pytest.raises(C.ConfigError, match="has no OpenRLHF installed"):
        O.train_expert(c, "xs", "arithmetic", "data/bases/xs", tmp_path / "e", seed=0)


def test_verify_expert_full_and_shapes(tmp_path):
    xs, s = ROOT / "data" / "bases" / "xs", ROOT / "data" / "bases" / "s"
    assert O.verify_expert(xs, str(xs), "full") == "full"
    assert O.verify_expert(xs, str(xs), "shapes") == "shapes"
    assert O.verify_expert(xs, str(xs), "auto") == "full"  # a few MB
    for mode in ("full", "shapes"):
        with pytest.raises(models.ModelError, match="fine-tuned from this base"):
            O.verify_expert(xs, str(s), mode)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((xs / "config.json").read_text())
    with pytest.raises(models.ModelError, match="safetensors"):
        O.verify_expert(broken, str(xs), "auto")


# ---- integration: OpenRLHF's real train_sft on CPU ---------------------------------------------

needs_openrlhf = pytest.mark.skipif(
    not OPENRLHF_PYTHON,
    reason="set MERGELAWS_OPENRLHF_PYTHON to an OpenRLHF environment's python (build one with "
           ".ci/openrlhf-env.sh VENV_DIR) to run OpenRLHF's train_sft on CPU")


def shim_settings() -> dict:
    venv = Path(OPENRLHF_PYTHON).parent.parent
    return dict(launcher="python", module="cpu_sft_main", python=OPENRLHF_PYTHON,
                env={"PYTHONPATH": str(SHIM), "DS_ACCELERATOR": "cpu",
                     # DeepSpeed JIT-builds C++ ops (~1.5 min) once per environment; cache them there
                     "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions")),
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))})


@needs_openrlhf
def test_openrlhf_flags_are_known_to_train_sft(cfg):
    """Every flag the builder emits is one of train_sft's own (its --help, through the shim)."""
    c = with_openrlhf(cfg, **shim_settings())
    env = O.launch_env(c, O.master_port({}))
    help_text = subprocess.run([OPENRLHF_PYTHON, "-m", "cpu_sft_main", "--help"], env=env, capture_output=True,
                               text=True, timeout=300).stdout
    known = set(re.findall(r"(--[\w.]+)", help_text))
    paper = C.load(ROOT / "config" / "paper.yaml")
    for c2 in (c, paper):
        argv = O.build_command(c2, base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0, port=1,
                               python=OPENRLHF_PYTHON)
        assert set(flags_of(argv)) <= known, set(flags_of(argv)) - known


@needs_openrlhf
def test_flash_attn_shim_pads_and_unpads():
    code = """
import torch
from flash_attn.bert_padding import pad_input, unpad_input, index_first_axis, rearrange
x = torch.randn(3, 5, 4, requires_grad=True)
mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
rows, idx, cu, mx, used = unpad_input(x, mask)
assert rows.shape == (9, 4) and cu.tolist() == [0, 3, 8, 9] and mx == 5 and used.tolist() == [3, 5, 1]
back = pad_input(rows, idx, 3, 5)
assert torch.equal(back * mask[..., None], x * mask[..., None]) and (back[0, 3:] == 0).all()
back.sum().backward()
assert torch.equal(x.grad[..., 0], mask.float())
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(SHIM)}
    res = subprocess.run([OPENRLHF_PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


class _RecordingPopen(subprocess.Popen):
    started: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordingPopen.started.append(self)


def _preempt_after_checkpoint(ckpt: Path, stop: threading.Event) -> None:
    """Like a SLURM pre-emption: SIGTERM the trainer once its first DeepSpeed checkpoint is complete."""
    while not stop.is_set():
        if (ckpt / "ds" / "latest").exists():
            for proc in _RecordingPopen.started:
                if proc.poll() is None and "cpu_sft_main" in proc.args:
                    proc.terminate()
                    return
        time.sleep(0.2)


@pytest.mark.slow
@needs_openrlhf
def test_openrlhf_trains_resumes_and_evaluates(cfg, tmp_path, capsys, monkeypatch):
    """OpenRLHF's real train_sft (CPU shim) on one shipped domain: pre-empted after its first
    DeepSpeed checkpoint, requeued, resumed, finished; the expert is complete, loads, is
    compatible with its base and has a lower eval loss than the base (the project's evaluation)."""
    from mergelaws import sweep, train
    from mergelaws.evaluate import evaluate_examples

    domain, n_examples, batch = "arithmetic", 256, 8
    steps = n_examples // batch
    raw = copy.deepcopy(cfg)
    raw["results"] = str(tmp_path / "results")
    raw["train"].update(backend="openrlhf", batch_size=batch, max_len=128, lr=1e-3, warmup_ratio=0.05,
                        max_examples=n_examples)
    raw["train"]["openrlhf"] = dict(shim_settings(), micro_batch_size=batch, zero_stage=2, param_dtype="bf16",
                                    attn_implementation="eager", max_epochs=1, save_steps=steps // 2)
    raw["eval"]["max_examples"] = 64
    c = C.validate(raw)
    out = Path(c["results"]) / "experts" / "xs" / domain
    ckpt = O.ckpt_dir_for(out)
    t0 = time.time()

    # 1. pre-empted half way, after the DeepSpeed checkpoint of step 16
    monkeypatch.setattr(O.subprocess, "Popen", _RecordingPopen)
    stop = threading.Event()
    watcher = threading.Thread(target=_preempt_after_checkpoint, args=(ckpt, stop), daemon=True)
    watcher.start()
    with pytest.raises(O.OpenRLHFError, match="failed") as err:
        train.train_expert(c, "xs", domain, str(out))
    stop.set()
    assert str(ckpt / "openrlhf.log") in str(err.value) and "cpu_sft_main" in str(err.value)
    assert not out.exists() and (ckpt / "ds" / "latest").exists()
    first_run = capsys.readouterr().out

    # 2. requeued: resumes from the checkpoint and finishes the epoch
    rec = train.train_expert(c, "xs", domain, str(out))
    seconds = time.time() - t0
    second_run = capsys.readouterr().out
    assert f"Loaded the checkpoint: {ckpt / 'ds'}, consumed_samples: {n_examples // 2}" in second_run
    assert rec["micro_steps_logged"] == steps // 2  # only the steps after the checkpoint
    losses = O.parse_losses((first_run + second_run).splitlines())
    done_before = len(O.parse_losses(first_run.splitlines()))
    assert steps // 2 <= done_before < steps and len(losses) == done_before + steps // 2
    loss_first, loss_last = losses[0], sum(losses[-10:]) / 10
    assert math.isfinite(loss_first) and loss_last < loss_first - 0.05, losses
    assert rec["backend"] == "openrlhf" and rec["openrlhf"]["version"].startswith("0.11")
    assert rec["data"]["examples"] == n_examples and rec["loss_mask"]["checked"] == 256

    # a complete, loadable expert, compatible with its base; nothing half-written beside it
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "mergelaws_expert.json"} <= names, names
    assert json.loads((out / "mergelaws_expert.json").read_text())["domain"] == domain
    assert sorted(p.name for p in out.parent.iterdir()) == [domain]  # no temp dir, checkpoints removed
    base = models.load_model(ROOT / "data" / "bases" / "xs")
    expert = models.load_model(out)
    models.check_compatible(base, expert, out)

    # the project's evaluation: lower response loss than the base on the domain's eval split
    tok = models.load_tokenizer(out)
    ev = sweep.load_eval_sets(c, tok, log=lambda *a: None)[domain].examples
    base_loss = evaluate_examples(base, ev, pad_id=tok.pad_token_id).loss
    expert_loss = evaluate_examples(expert, ev, pad_id=tok.pad_token_id).loss
    assert math.isfinite(expert_loss) and expert_loss < base_loss - 0.05, (base_loss, expert_loss)
    with capsys.disabled():
        print(f"\n[openrlhf e2e] OpenRLHF {rec['openrlhf']['version']}: {steps} steps of {batch} "
              f"({done_before} before the pre-emption, {steps // 2} after resuming at step {steps // 2}); "
              f"gpt_loss {loss_first:.3f} -> {loss_last:.3f} (mean of last 10); eval loss on {domain}: "
              f"base {base_loss:.4f} -> expert {expert_loss:.4f}; both runs {seconds:.1f}s")


@pytest.mark.slow
@needs_openrlhf
def test_openrlhf_through_the_deepspeed_launcher(cfg, tmp_path, capsys):
    """The product launcher (``python -m deepspeed.launcher.runner --module ...``, one node):
    DeepSpeed's runner starts the (shimmed) trainer with --local_rank; two optimizer steps."""
    from mergelaws import train

    raw = copy.deepcopy(cfg)
    raw["results"] = str(tmp_path / "results")
    raw["train"].update(backend="openrlhf", batch_size=8, max_len=128, max_examples=16)
    raw["train"]["openrlhf"] = dict(shim_settings(), launcher="deepspeed", micro_batch_size=4,
                                    attn_implementation="sdpa", zero_stage=3)
    c = C.validate(raw)
    out = Path(c["results"]) / "experts" / "xs" / "quotes"
    rec = train.train_expert(c, "xs", "quotes", str(out))
    log = capsys.readouterr().out
    assert "deepspeed.launcher.runner" in rec["openrlhf"]["command"]
    assert "deepspeed.launcher.launch" in log and "--local_rank=0" in log
    assert rec["micro_steps_logged"] == 4  # 16 examples / micro-batch 4, accumulated 2 per step
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "mergelaws_expert.json"}
    models.check_compatible(models.load_model(ROOT / "data" / "bases" / "xs"), models.load_model(out), out)
