"""The ``openrlhf`` expert-training backend: OpenRLHF's SFT trainer under DeepSpeed.

One expert = one OpenRLHF run (``openrlhf.cli.train_sft``, 0.11.x dotted flags):

1. the domain's train pairs, read with the project's own reader (local JSONL(.gz) or ``hf://``
   URIs), are written as OpenRLHF JSONL (``{"input": prompt, "output": response + eos}``);
2. the response-only loss mask OpenRLHF will use is checked against the project's on the
   tokenizer in use (:func:`check_loss_mask`), before any GPU time is spent;
3. the command (:func:`build_command`) runs the ``deepspeed`` launcher (or plain ``python`` for
   one process), on one node or, inside a multi-node SLURM job, on all its nodes through a
   DeepSpeed hostfile (:func:`slurm_topology`, :func:`hostfile_text`);
4. its output streams to the job log; OpenRLHF writes the HF model into a temp directory beside
   the expert and its DeepSpeed checkpoints into ``<experts>/<size>/.<domain>.ckpt`` (kept across
   a requeue, so a pre-empted job resumes with ``--ckpt.load_enable``);
5. the result is verified (safetensors, loads, same parameters as its base), gets the tokenizer
   if missing and the train record ``mergelaws_expert.json``, and is renamed into place.

Why the template matters: OpenRLHF (without a chat template) trains on
``input_template.format(prompt) + output`` and puts the loss on every token after the first
``len(tokenize(input_template.format(prompt)))`` tokens, the prompt being tokenized *alone*.
Our template ``<|user|>{}<|assistant|>`` ends with a special token, so no BPE merge crosses the
prompt/response boundary and OpenRLHF's targets are exactly the project's (the response and the
end-of-text token, see ``mergelaws.data``). A template ending in a space (OpenRLHF's default
``"User: {}\\nAssistant: "``) merges that space into the first response token, which then gets no
loss; :func:`check_loss_mask` refuses such a setup.

Known difference from the ``torch`` backend: an example longer than ``train.max_len`` is cut
at its end by OpenRLHF (and its last kept token replaced by end-of-text); the torch backend keeps
the prompt's end and the response's beginning. Both are counted in the train record.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mergelaws import data as D
from mergelaws import models
from mergelaws.config import ConfigError
from mergelaws.io import atomic_path

#: The project's prompt template (mergelaws.data) in OpenRLHF's ``--data.input_template`` form.
TEMPLATE = D.USER + "{}" + D.ASSISTANT
INPUT_KEY, OUTPUT_KEY = "input", "output"
DEFAULT_MODULE = "openrlhf.cli.train_sft"
#: ``verify: auto`` loads the whole expert and base when the expert's weights are at most this.
FULL_VERIFY_MAX_BYTES = 4 * 2**30


class OpenRLHFError(models.ModelError):
    """An OpenRLHF run that gave no usable expert (naming the log, the command and the fix)."""


class LossMaskError(ConfigError):
    """OpenRLHF's response mask would differ from the project's on this template and tokenizer."""


def settings(cfg: dict) -> dict:
    """``train.openrlhf`` with its defaults (as filled in by config validation)."""
    return cfg["train"].get("openrlhf") or {}


def template_of(cfg: dict) -> str:
    return settings(cfg).get("input_template") or TEMPLATE


# ---- data ----------------------------------------------------------------------------------

def domain_pairs(cfg: dict, domain: str) -> list[tuple[str, str]]:
    """The domain's train pairs, through the project's reader (JSONL(.gz) or hf:// URIs)."""
    spec = cfg["domains"][domain]
    return D.read_pairs(spec["train"], spec["prompt_field"], spec["response_field"],
                        limit=cfg["train"].get("max_examples"), part="train")


def openrlhf_record(prompt: str, response: str, eos_token: str) -> dict:
    """One OpenRLHF JSONL object. The output ends with the eos token, so OpenRLHF does not
    append ``" " + eos`` (which would add a space token the project never trains on)."""
    return {INPUT_KEY: prompt, OUTPUT_KEY: response + eos_token}


def write_jsonl(pairs, path: str | Path, eos_token: str) -> int:
    """Write (prompt, response) pairs as OpenRLHF JSONL, atomically; returns the line count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for prompt, response in pairs:
            fh.write(json.dumps(openrlhf_record(prompt, response, eos_token), ensure_ascii=False) + "\n")
            n += 1
    return n


# ---- the loss mask -------------------------------------------------------------------------

def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def openrlhf_example(tokenizer, template: str, record: dict, max_len: int = 10**9) -> tuple[list[int], list[int]]:
    """(input ids, target positions) as OpenRLHF 0.11's SFTDataset builds them (no chat template).

    The prompt is tokenized alone -> ``prompt_ids_len``; the loss mask is 1 on logit positions
    ``[prompt_ids_len - 1 : -1]``, i.e. the targets are the tokens at ``prompt_ids_len ..`` end.
    """
    prompt = template.format(record[INPUT_KEY])
    text = (prompt + record[OUTPUT_KEY]).rstrip("\n")
    if not text.endswith(tokenizer.eos_token):
        text += " " + tokenizer.eos_token
    kw = dict(max_length=max_len, truncation=True, padding=False, add_special_tokens=False)
    prompt_ids_len = len(tokenizer(prompt, **kw)["input_ids"])
    ids = list(tokenizer(text, **kw)["input_ids"])
    ids[-1] = tokenizer.eos_token_id  # "to avoid EOS token truncation"
    mask = [0] * len(ids)
    for i in range(max(prompt_ids_len - 1, 0), len(ids) - 1):
        mask[i] = 1
    return ids, [i + 1 for i, m in enumerate(mask) if m]  # logit i predicts token i + 1


def project_example(tokenizer, template: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, target positions) by the project's rule: prompt and response (+ eos)
    tokenized separately, loss on the response part (``mergelaws.data.encode_pair``)."""
    if template == TEMPLATE:
        ex, _ = D.encode_pair(tokenizer, prompt, response, 10**9)
        ids, labels = ex.input_ids, ex.labels
    else:
        p_ids = tokenizer.encode(template.format(prompt), add_special_tokens=False)
        r_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids, labels = p_ids + r_ids, [D.IGNORE] * len(p_ids) + r_ids
    return list(ids), [i for i, t in enumerate(labels) if i > 0 and t != D.IGNORE]


def check_loss_mask(tokenizer, pairs, template: str = TEMPLATE, limit: int | None = 256) -> dict:
    """Check on ``pairs`` that OpenRLHF's response mask equals the project's; raise if not.

    Raises :class:`LossMaskError` naming the template and tokenizer when the first response
    token would get no loss (a BPE merge across the prompt/response boundary, e.g. a template
    ending in a space), or when the token sequences or targets differ in any other way.
    """
    checked = 0
    for prompt, response in pairs if limit is None else pairs[:limit]:
        ours_ids, ours_t = project_example(tokenizer, template, prompt, response)
        theirs_ids, theirs_t = openrlhf_example(tokenizer, template,
                                                openrlhf_record(prompt, response, tokenizer.eos_token))
        checked += 1
        if ours_ids == theirs_ids and ours_t == theirs_t:
            continue
        where = (f"train.openrlhf.input_template {template!r} with tokenizer {tokenizer_name(tokenizer)} "
                 f"(example {checked}, prompt {prompt[:40]!r})")
        prompt_ids = tokenizer(template.format(prompt), add_special_tokens=False)["input_ids"]
        plen = len(prompt_ids)
        if theirs_ids[:plen] != list(prompt_ids):
            # the joined text tokenizes differently at the prompt's end: a merge across the boundary
            merged = tokenizer.convert_ids_to_tokens(theirs_ids[plen - 1:plen])
            alone = tokenizer.convert_ids_to_tokens(list(prompt_ids[-1:]))
            raise LossMaskError(
                f"{where}: OpenRLHF counts the prompt's tokens on the prompt alone (ending in {alone}), but in "
                f"prompt + response that token merges with the response's start into {merged}, so the first "
                f"response token gets no loss (the off-by-one trap, e.g. of a template ending in a space); end the "
                f"template with a special token or a newline, or leave input_template unset (default {TEMPLATE!r})")
        theirs_tokens = tokenizer.convert_ids_to_tokens([theirs_ids[i] for i in theirs_t])
        ours_tokens = tokenizer.convert_ids_to_tokens([ours_ids[i] for i in ours_t])
        raise LossMaskError(
            f"{where}: OpenRLHF would train on {theirs_tokens[:8]}... but the project's loss is on "
            f"{ours_tokens[:8]}...; use the default template {TEMPLATE!r} or one whose prompt part tokenizes "
            f"the same alone and joined to the response")
    return {"checked": checked, "template": template, "tokenizer": tokenizer_name(tokenizer)}


def length_stats(tokenizer, pairs, template: str, max_len: int, limit: int | None = 256) -> dict:
    """How many (of the first ``limit``) examples OpenRLHF would cut or drop at ``max_len``."""
    cut = dropped = n = 0
    for prompt, response in pairs if limit is None else pairs[:limit]:
        n += 1
        p = len(tokenizer.encode(template.format(prompt), add_special_tokens=False))
        r = len(tokenizer.encode(response, add_special_tokens=False)) + 1
        if p >= max_len - 2:
            dropped += 1
        elif p + r > max_len:
            cut += 1
    return {"sampled": n, "cut_at_max_len": cut, "dropped_long_prompt": dropped}


# ---- SLURM topology (pure) -----------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    hosts: tuple[str, ...]
    gpus_per_node: int | None

    @property
    def nodes(self) -> int:
        return len(self.hosts)


def _expand_range(body: str) -> list[str]:
    out = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(part)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list like ``gpu[01-03,07],login1`` (what ``scontrol show hostnames``
    prints, one per line). Handles one bracket group per name, which covers common clusters."""
    names, buf, depth = [], "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            names.append(buf)
            buf = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        buf += ch
    if buf:
        names.append(buf)
    hosts = []
    for name in names:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", name)
        if m:
            hosts += [f"{m.group(1)}{x}{m.group(3)}" for x in _expand_range(m.group(2))]
        elif name:
            hosts.append(name)
    return hosts


def parse_gpu_count(value: str | None) -> int | None:
    """GPUs from a SLURM value: ``4``, ``gpu:4``, ``gpu:a100:4``, ``a100:4(IDX:0-3)``, or a device
    list such as ``0,1,2,3`` (SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES)."""
    if not value or not value.strip():
        return None
    value = re.sub(r"\(.*?\)", "", value.strip())
    if re.fullmatch(r"\d+", value):
        return int(value)
    if ":" in value:
        total = 0
        for item in value.split(","):
            last = item.rsplit(":", 1)[-1]
            if not last.isdigit():
                return None
            total += int(last)
        return total or None
    items = [v for v in value.split(",") if v.strip()]
    return len(items) or None


def _count_devices(value: str | None) -> int | None:
    items = [v for v in (value or "").split(",") if v.strip()]
    return len(items) or None


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs on each node of this SLURM job, from its environment (None if it does not say)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        n = parse_gpu_count(env.get(key))
        if n:
            return n
    n, nodes = parse_gpu_count(env.get("SLURM_GPUS")), env.get("SLURM_JOB_NUM_NODES", "")
    if n and nodes.isdigit() and n % int(nodes) == 0:  # --gpus=N, spread evenly over the nodes
        return n // int(nodes)
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):  # device lists: 0,1,2,3
        n = _count_devices(env.get(key))
        if n:
            return n
    return None


def slurm_topology(env: Mapping[str, str], hostnames: list[str] | None = None) -> Topology | None:
    """The nodes and GPUs of the SLURM job described by ``env``; None outside SLURM.

    ``hostnames`` is the expanded node list (``scontrol show hostnames $SLURM_JOB_NODELIST``);
    without it the node list is expanded here.
    """
    if not env.get("SLURM_JOB_ID"):
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = list(hostnames) if hostnames else expand_nodelist(nodelist)
    if not hosts:
        hosts = [socket.gethostname()]
    return Topology(tuple(hosts), gpus_per_node(env))


def hostfile_text(hosts, slots: int) -> str:
    """A DeepSpeed (MPI-style) hostfile: one ``<host> slots=<gpus>`` line per node."""
    if slots < 1:
        raise ValueError(f"a hostfile needs at least 1 slot per host, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """``scontrol show hostnames NODELIST``, or None where scontrol is unavailable."""
    if not nodelist or not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [h for h in out.split() if h] or None


def current_topology(env: Mapping[str, str] | None = None) -> Topology | None:
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    return slurm_topology(env, scontrol_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")))


def master_port(env: Mapping[str, str], configured: int | None = None) -> int:
    """The rendezvous port: configured, else one per SLURM job (20000-39999), else a free one."""
    if configured:
        return int(configured)
    if env.get("SLURM_JOB_ID", "").isdigit():
        return 20000 + int(env["SLURM_JOB_ID"]) % 20000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the command ---------------------------------------------------------------------------

def interpreter(cfg: dict) -> str:
    py = settings(cfg).get("python") or sys.executable
    py = os.path.expanduser(os.path.expandvars(py))
    if os.sep not in py:
        py = shutil.which(py) or py
    if not Path(py).exists():
        raise ConfigError(f"train.openrlhf.python = {py!r} does not exist; give the Python interpreter of the "
                          f"environment that has OpenRLHF and DeepSpeed installed")
    return py


def train_args(cfg: dict, *, base: str, dataset: str | Path, output_dir: str | Path, ckpt_dir: str | Path,
               seed: int) -> list[str]:
    """``openrlhf.cli.train_sft`` flags (0.11.x dotted names) from ``train`` and ``train.openrlhf``."""
    t, o = cfg["train"], settings(cfg)
    args = [
        "--model.model_name_or_path", str(base),
        "--data.dataset", str(dataset),
        "--data.input_key", INPUT_KEY,
        "--data.output_key", OUTPUT_KEY,
        "--data.input_template", template_of(cfg),
        "--data.max_len", str(t["max_len"]),
        "--train.micro_batch_size", str(o["micro_batch_size"]),
        "--train.batch_size", str(t["batch_size"]),
        "--train.max_epochs", str(o["max_epochs"]),
        "--train.seed", str(seed % 2**32),
        "--adam.lr", repr(float(t["lr"])),
        "--adam.weight_decay", repr(float(t["weight_decay"])),
        "--lr_warmup_ratio", repr(float(t["warmup_ratio"])),
        "--lr_scheduler", o["lr_scheduler"],
        "--min_lr_ratio", repr(float(o["min_lr_ratio"])),
        "--max_norm", repr(float(o["max_norm"])),
        "--ds.zero_stage", str(o["zero_stage"]),
        "--ds.param_dtype", o["param_dtype"],
        "--ds.attn_implementation", o["attn_implementation"],
        "--ckpt.output_dir", str(output_dir),
        "--ckpt.path", str(ckpt_dir),
        "--ckpt.save_steps", str(o["save_steps"]),
        "--ckpt.max_num", str(o["max_checkpoints"]),
        "--ckpt.load_enable",
        "--logger.logging_steps", "1",
    ]
    if o["packing_samples"]:
        args.append("--ds.packing_samples")
    if o["adam_offload"]:
        args.append("--ds.adam_offload")
    if o["gradient_checkpointing"]:
        args.append("--model.gradient_checkpointing_enable")
    return args + [str(a) for a in o["extra_args"]]


def build_command(cfg: dict, *, base: str, dataset: str | Path, output_dir: str | Path, ckpt_dir: str | Path,
                  seed: int, topology: Topology | None = None, hostfile: str | Path | None = None,
                  port: int | None = None, python: str | None = None) -> list[str]:
    """The argv of one OpenRLHF SFT run.

    * ``launcher: python`` — ``python -u -m <module> <flags>`` (one process; :func:`launch_env` sets
      RANK/WORLD_SIZE/...). Used by the tests, with a CPU shim as the module.
    * ``launcher: deepspeed``, one node — ``python -u -m deepspeed.launcher.runner [--num_gpus N]
      --master_port P --module <module> <flags>`` (the ``deepspeed`` launcher, run with the
      configured interpreter so launcher and trainer share one environment). Without
      ``num_gpus`` it uses the GPUs the job sees (CUDA_VISIBLE_DEVICES).
    * ``launcher: deepspeed`` in a SLURM job of several nodes (``topology.nodes > 1``) —
      ``--hostfile H --num_nodes N --num_gpus G --master_addr <first node>`` added, and per
      ``multinode_launcher``: ``srun`` starts one DeepSpeed launcher per node (``--no_ssh
      --node_rank $SLURM_NODEID``, no ssh needed), ``pdsh``/``openmpi``/``slurm`` hand the
      fan-out to DeepSpeed's own multi-node runners.
    """
    o = settings(cfg)
    py = python or interpreter(cfg)
    flags = train_args(cfg, base=base, dataset=dataset, output_dir=output_dir, ckpt_dir=ckpt_dir, seed=seed)
    module = o["module"]
    if o["launcher"] == "python":
        return [py, "-u", "-m", module, *flags]
    runner = [py, "-u", "-m", "deepspeed.launcher.runner"]
    port = port or o.get("master_port") or 29500
    if topology is None or topology.nodes <= 1:
        gpus = ["--num_gpus", str(o["num_gpus"])] if o.get("num_gpus") else []
        return [*runner, *gpus, "--master_port", str(port), "--module", module, *flags]
    gpn = o.get("num_gpus") or topology.gpus_per_node
    if not gpn:
        raise ConfigError("a multi-node SLURM job did not say how many GPUs each node has (no SLURM_GPUS_ON_NODE "
                          "or SLURM_GPUS_PER_NODE); request GPUs with --gpus-per-node or set train.openrlhf.num_gpus")
    if hostfile is None:
        raise ValueError("build_command needs the hostfile path for a multi-node run")
    multi = ["--hostfile", str(hostfile), "--num_nodes", str(topology.nodes), "--num_gpus", str(gpn),
             "--master_addr", topology.hosts[0], "--master_port", str(port)]
    tail = ["--module", module, *flags]
    if o["multinode_launcher"] == "srun":
        # one launcher per node; each learns its node rank from its own srun task
        per_node = 'exec "$0" -u -m deepspeed.launcher.runner --no_ssh --node_rank "$SLURM_NODEID" "$@"'
        return ["srun", "--overlap", f"--nodes={topology.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                "bash", "-c", per_node, py, *multi, *tail]
    return [*runner, *multi, "--launcher", o["multinode_launcher"], *tail]


def launch_env(cfg: dict, port: int, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: ours + ``train.openrlhf.env`` (``$VARS`` expanded) + what a
    single ``python`` process needs to form a 1-rank DeepSpeed group."""
    o = settings(cfg)
    env = dict(os.environ if base_env is None else base_env)
    for key, value in (o.get("env") or {}).items():
        env[key] = os.path.expandvars(os.path.expanduser(str(value)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if o["launcher"] == "python":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def check_batch(cfg: dict, world: int | None) -> None:
    t, o = cfg["train"], settings(cfg)
    per_step = o["micro_batch_size"] * (world or 1)
    if t["batch_size"] % per_step:
        raise ConfigError(f"train.batch_size = {t['batch_size']} is not a multiple of train.openrlhf.micro_batch_size "
                          f"({o['micro_batch_size']}) x GPUs ({world or 1}); OpenRLHF accumulates gradients over "
                          f"batch_size / (micro_batch_size x GPUs) micro-batches: make it a whole number")


# ---- running -------------------------------------------------------------------------------

_POSTFIX = re.compile(r"(?<!eval )gpt_loss=([^,\]\s]+)[^\]\r\n]*")


def parse_losses(lines) -> list[float]:
    """Per-micro-step ``gpt_loss`` values from OpenRLHF's progress bar (3 significant digits).

    The bar is redrawn with an unchanged postfix whenever it advances; consecutive identical
    postfixes (loss, lr, grad norm) are counted once.
    """
    out, last = [], None
    for line in lines:
        for m in _POSTFIX.finditer(line):
            if m.group(0) == last:
                continue
            last = m.group(0)
            try:
                out.append(float(m.group(1)))
            except ValueError:
                continue
    return out


def stream(argv: list[str], env: Mapping[str, str], log_path: Path, echo=None) -> tuple[int, list[str]]:
    """Run ``argv``, copying its output line by line (``\\r`` redraws too) to ``echo`` (our stdout,
    i.e. the rule's log) and to ``log_path``; returns (exit code, lines)."""
    echo = echo or sys.stdout
    lines: list[str] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, bufsize=0)
        buf = b""
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for raw in parts:
                    if raw.strip():
                        line = raw.decode("utf-8", "replace")
                        lines.append(line)
                        echo.write(line + "\n")
                        log.write(line + "\n")
                echo.flush()
                log.flush()
            if buf.strip():
                line = buf.decode("utf-8", "replace")
                lines.append(line)
                echo.write(line + "\n")
                log.write(line + "\n")
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # we were interrupted: do not leave the trainer running
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.write(f"# exit {rc}\n")
    return rc, lines


def verify_expert(path: Path, base: str, mode: str = "auto") -> str:
    """Check an OpenRLHF output is a HF safetensors model with its base's parameters.

    ``full`` loads both models (models.load_model + models.check_compatible); ``shapes`` builds
    both on the meta device from their configs and checks the safetensors headers, which costs
    no memory for a 72B model; ``auto`` picks full up to 4 GiB of weights. Returns the mode used.
    """
    models.check_model_dir(path)
    size = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    if mode == "auto":
        mode = "full" if size <= FULL_VERIFY_MAX_BYTES else "shapes"
    if mode == "full":
        expert = models.load_model(path, "float32", "cpu")
        base_model = models.load_model(base, "float32", "cpu")
        models.check_compatible(base_model, expert, path)
        return mode
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    models.quiet_transformers()
    with torch.device("meta"):
        expert = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        base_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
    models.check_compatible(base_model, expert, path)
    shapes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                shapes[key] = tuple(sf.get_slice(key).get_shape())
    for name, p in models.float_state(expert).items():
        if shapes.get(name) != tuple(p.shape):
            raise models.ModelError(f"expert {path} lacks weights for {name} (or they have the wrong shape) in its "
                                    f"safetensors files; the OpenRLHF run did not save a complete model")
    return mode


def openrlhf_version(py: str, env: Mapping[str, str]) -> str | None:
    try:
        out = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('openrlhf'))"],
                             capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ckpt_dir_for(out: str | Path) -> Path:
    """Where the DeepSpeed checkpoints of expert ``out`` live: ``<parent>/.<name>.ckpt``."""
    out = Path(out)
    return out.parent / f".{out.name}.ckpt"


def train_expert(cfg: dict, size: str, domain: str, base: str, out: str | Path, seed: int,
                 echo=None) -> dict:
    """Fine-tune one expert with OpenRLHF; write it atomically to ``out``; return its record."""
    o = settings(cfg)
    out = Path(out).absolute()
    topology = current_topology() if o["launcher"] == "deepspeed" else None
    world = (topology.nodes * (o.get("num_gpus") or topology.gpus_per_node or 1)) if topology else o.get("num_gpus")
    check_batch(cfg, world)
    py = interpreter(cfg)
    version = openrlhf_version(py, launch_env(cfg, 0))
    if version is None:
        raise ConfigError(f"train.openrlhf.python = {py} has no OpenRLHF installed (importlib.metadata finds no "
                          f"'openrlhf'); install it there (pip install openrlhf) or point python at its environment")
    base_arg = str(Path(base).absolute()) if Path(base).is_dir() else str(base)

    tok = models.load_tokenizer(base)
    pairs = domain_pairs(cfg, domain)
    template = template_of(cfg)
    mask = check_loss_mask(tok, pairs, template, limit=o["mask_check_examples"])
    lengths = length_stats(tok, pairs, template, cfg["train"]["max_len"], limit=o["mask_check_examples"])

    ckpt = ckpt_dir_for(out)
    ckpt.mkdir(parents=True, exist_ok=True)
    dataset = ckpt / "train.jsonl"
    n = write_jsonl(pairs, dataset, tok.eos_token)
    log_path = ckpt / "openrlhf.log"
    port = master_port(os.environ, o.get("master_port"))
    hostfile = None
    if topology is not None and topology.nodes > 1:
        gpn = o.get("num_gpus") or topology.gpus_per_node
        hostfile = ckpt / "hostfile"
        if gpn:
            with atomic_path(hostfile) as tmp:
                Path(tmp).write_text(hostfile_text(topology.hosts, gpn))
    env = launch_env(cfg, port)

    t0 = time.time()
    with atomic_path(out, is_dir=True) as tmp:
        argv = build_command(cfg, base=base_arg, dataset=dataset, output_dir=tmp, ckpt_dir=ckpt / "ds", seed=seed,
                             topology=topology, hostfile=hostfile, port=port, python=py)
        print(f"openrlhf: {size}/{domain}: {n} examples; log {log_path}\n$ {shlex.join(argv)}",
              file=echo or sys.stdout, flush=True)
        rc, lines = stream(argv, env, log_path, echo=echo)
        if rc != 0:
            tail = "\n".join(lines[-15:])
            raise OpenRLHFError(
                f"OpenRLHF training of expert {size}/{domain} failed (exit {rc}); see the log {log_path}; "
                f"command: {shlex.join(argv)}\nlast lines:\n{tail}")
        try:
            mode = verify_expert(Path(tmp), base, o["verify"])
        except models.ModelError as exc:
            raise OpenRLHFError(f"OpenRLHF run for {size}/{domain} finished but its output is not a usable expert "
                                f"({exc}); see the log {log_path}") from None
        if not any(Path(tmp).glob("tokenizer*")):
            tok.save_pretrained(tmp)
        losses = parse_losses(lines)
        tail = losses[-10:]
        record = {
            "size": size, "domain": domain, "base": str(base), "backend": "openrlhf", "train": cfg["train"],
            "seed": seed, "data": {"examples": n, **lengths}, "loss_mask": mask,
            "loss_first": losses[0] if losses else float("nan"),
            "loss_last": round(sum(tail) / len(tail), 4) if tail else float("nan"),
            "loss_source": "OpenRLHF progress bar gpt_loss (3 significant digits), per micro-batch",
            "micro_steps_logged": len(losses),
            "seconds": round(time.time() - t0, 2), "verify": mode,
            "openrlhf": {"version": version, "command": argv,
                         "log": str(log_path) if o["keep_checkpoints"] else None,  # else removed below
                         "nodes": topology.nodes if topology else 1, "world_size": world},
        }
        (Path(tmp) / "mergelaws_expert.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if not o["keep_checkpoints"]:
        shutil.rmtree(ckpt, ignore_errors=True)
    return record
