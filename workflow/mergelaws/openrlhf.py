"""The ``openrlhf`` expert-training backend: OpenRLHF's SFT trainer under DeepSpeed.

One expert = one OpenRLHF run (``openrlhf.cli.train_sft``, 0.11.x dotted flags):

1. the domain's train pairs, read with the project's own reader (local JSONL(.gz) or ``hf://``
   URIs), are written as OpenRLHF JSONL (:func:`openrlhf_record`);
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

The training text is the project's one formatting path (``mergelaws.data``): the conversation
[system (config ``system_prompt``)], user = prompt, assistant = response, rendered by the base
tokenizer's own chat template, with the loss on the assistant turn through its end-of-turn token.
OpenRLHF renders it itself: each JSONL line is ``{"input": [system,] user message(s), "output":
[assistant message]}`` and the run gets ``--data.apply_chat_template --data.input_key input
--data.output_key output`` (no ``--data.input_template``, which that path ignores; not
``--data.multiturn``). OpenRLHF 0.11's ``SFTDataset`` then (reimplemented in
:func:`openrlhf_example`):

* prompt = ``apply_chat_template(input, add_generation_prompt=True)``, response = the text of
  ``apply_chat_template(input + output)`` after ``len(prompt)`` characters — the same two
  renderings as ``mergelaws.data.render``, so a system message, or the template's own default
  system turn when ``system_prompt`` is null, is in both;
* the example is ``(prompt + response).rstrip("\\n")``, plus ``" " + eos_token`` if that text
  does not end with the eos token, tokenized as one string; its last token is set to eos;
* the loss is on every token after the first ``len(tokenize(prompt))`` (the prompt tokenized
  alone).

Compared with the project's mask (``mergelaws.data.split_ids``: the generation prompt and the
rest of the conversation tokenized apart, the targets being the latter through its last special
token), checked on the real tokenizer and data before every run (:func:`check_loss_mask`; the
counts go into the train record's ``loss_mask``):

* Equal, token for token, as a rule: same input ids, targets = the response and the end-of-turn
  token. The trailing text after the end-of-turn token (ChatML's ``"\\n"`` after ``<|im_end|>``)
  is trained by neither: OpenRLHF strips trailing newlines before tokenizing.
* Documented difference 1, ``fused_whitespace``: OpenRLHF tokenizes prompt + response as one
  string. Where a response begins with whitespace (indented code) and the template's assistant
  header ends in a newline, a GPT-2-style pre-tokenizer (SmolLM2's; by its pattern not Qwen2's,
  which splits a newline from the spaces after it) makes the newline and the leading spaces one
  token (``"ĊĠĠĠ"``), which OpenRLHF counts as prompt: those spaces get no loss there, and the
  input ids hold the fused token instead of two; every later token is the same. The project
  tokenizes the parts apart and trains the spaces. With SmolLM2's tokenizer and the system prompt:
  2,006 of the 17,941 shipped training examples (all 2,000 of code, 6 of quotes; the other 15,935
  identical); the tiny bases' header ends in a special token: none of them (17,941 identical).
  Nothing in the JSONL can avoid it short of changing the response text.
* Documented difference 2, ``eos_after_turn``: where the eos token is *not* the template's
  end-of-turn token (a base model's tokenizer such as Qwen2.5's: eos ``<|endoftext|>``, turns
  closed by ``<|im_end|>``), OpenRLHF appends ``" " + eos`` after the end-of-turn token and trains
  on those two tokens too (the project's loss and every evaluation stop at the end-of-turn
  token). OpenRLHF always ends an example with its eos token, whatever the JSONL holds. Equal
  where eos is the end-of-turn token: the tiny bases' ``<|endoftext|>``, ``<|im_end|>`` of
  SmolLM2-Instruct and Qwen2.5-Instruct.
* Anything else is refused, in one line naming the tokenizer, the example and the first
  differing target, e.g. an assistant header ending in a space (``"Ġ"`` + ``"1"`` merge into
  ``"Ġ1"``: OpenRLHF's first target would be the response's second token), a turn closed by plain
  text instead of a special token, or a generation prompt that is not the start of the rendered
  conversation.

A tokenizer with no chat template gets the project's plain format (prompt, newline, response,
eos; no system prompt): ``{"input": prompt, "output": response + eos}`` with
``--data.input_template "{}\\n"``; the eos in the output stops OpenRLHF appending ``" " + eos``.
Difference 1 applies to the newline after the prompt in the same way.

Known difference from the ``torch`` backend: an example longer than ``train.max_len`` is cut
at its end by OpenRLHF (and its last kept token replaced by eos); one whose prompt alone has
``max_len - 2`` tokens or more is dropped; the torch backend keeps the prompt's end and the
response's beginning. Both are counted in the train record.
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
from mergelaws import grid, models
from mergelaws.config import ConfigError
from mergelaws.io import atomic_path

INPUT_KEY, OUTPUT_KEY = "input", "output"
#: ``--data.input_template`` for a tokenizer without a chat template: the project's plain format
#: (prompt, newline, response; ``mergelaws.data.split_ids``).
PLAIN_TEMPLATE = "{}\n"
DEFAULT_MODULE = "openrlhf.cli.train_sft"
#: ``verify: auto`` loads the whole expert and base when the expert's weights are at most this.
FULL_VERIFY_MAX_BYTES = 4 * 2**30


class OpenRLHFError(models.ModelError):
    """An OpenRLHF run that gave no usable expert (naming the log, the command and the fix)."""


class LossMaskError(ConfigError):
    """OpenRLHF's response mask would differ from the project's on this tokenizer and data."""


def settings(cfg: dict) -> dict:
    """``train.openrlhf`` with its defaults (as filled in by config validation)."""
    return cfg["train"].get("openrlhf") or {}


def system_prompt(cfg: dict, tokenizer) -> str | None:
    """The system prompt of every example: config ``system_prompt`` where the tokenizer has a
    chat template (None = the template's own default), else none (the plain format has no place
    for one, as in ``mergelaws.data.split_ids``)."""
    return cfg.get("system_prompt") if D.has_chat_template(tokenizer) else None


# ---- data ----------------------------------------------------------------------------------

def domain_pairs(cfg: dict, domain: str) -> list[tuple[str, str]]:
    """The domain's train pairs, through the project's reader (JSONL(.gz) or hf:// URIs)."""
    spec = cfg["domains"][domain]
    return D.read_pairs(spec["train"], spec["prompt_field"], spec["response_field"],
                        limit=cfg["train"].get("max_examples"), part="train")


def openrlhf_record(tokenizer, prompt: str, response: str, system: str | None = None) -> dict:
    """One OpenRLHF JSONL object.

    With a chat template: the conversation of ``mergelaws.data.conversation``, ``input`` =
    [system,] user and ``output`` = [assistant] (message lists, which OpenRLHF's chat-template
    path concatenates and renders). Without one: the plain prompt and ``response + eos``, so
    OpenRLHF does not append ``" " + eos`` (a space token the project never trains on).
    """
    if D.has_chat_template(tokenizer):
        msgs = D.conversation(prompt, response, system)
        return {INPUT_KEY: msgs[:-1], OUTPUT_KEY: msgs[-1:]}
    return {INPUT_KEY: prompt, OUTPUT_KEY: response + tokenizer.eos_token}


def write_jsonl(pairs, path: str | Path, tokenizer, system: str | None = None) -> int:
    """Write (prompt, response) pairs as OpenRLHF JSONL, atomically; returns the line count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for prompt, response in pairs:
            rec = openrlhf_record(tokenizer, prompt, response, system)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def data_args(chat_template: bool) -> list[str]:
    """train_sft's data flags for the JSONL of :func:`write_jsonl`."""
    keys = ["--data.input_key", INPUT_KEY, "--data.output_key", OUTPUT_KEY]
    if chat_template:
        return [*keys, "--data.apply_chat_template"]
    return [*keys, "--data.input_template", PLAIN_TEMPLATE]


# ---- the loss mask -------------------------------------------------------------------------

def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def openrlhf_texts(tokenizer, record: dict, apply_chat_template: bool = True,
                   input_template: str | None = PLAIN_TEMPLATE) -> tuple[str, str]:
    """(prompt, response) text as OpenRLHF 0.11's ``preprocess_data`` builds them."""
    if apply_chat_template:
        prompt_message, response_message = record[INPUT_KEY], record[OUTPUT_KEY]
        if isinstance(prompt_message, str) and isinstance(response_message, str):
            prompt_message = [{"role": "user", "content": prompt_message}]
            response_message = [{"role": "assistant", "content": response_message}]
        prompt = tokenizer.apply_chat_template(prompt_message, tokenize=False, add_generation_prompt=True)
        response = tokenizer.apply_chat_template(prompt_message + response_message, tokenize=False)[len(prompt):]
        return prompt, response
    prompt = record[INPUT_KEY]
    if input_template:
        prompt = input_template.format(prompt)
    return prompt, record[OUTPUT_KEY]


def openrlhf_text(tokenizer, prompt: str, response: str) -> str:
    """The one string OpenRLHF tokenizes for an example (``SFTDataset.__getitem__``)."""
    text = (prompt + response).rstrip("\n")
    if not text.endswith(tokenizer.eos_token):
        text += " " + tokenizer.eos_token
    return text


def openrlhf_example(tokenizer, record: dict, apply_chat_template: bool = True, max_len: int = 10**9,
                     input_template: str | None = PLAIN_TEMPLATE) -> tuple[list[int], list[int]] | None:
    """(input ids, target positions) as OpenRLHF 0.11's ``SFTDataset`` builds them, or None for
    an example it drops (empty prompt or response, or a prompt of ``max_len - 2`` tokens or more).

    The prompt is tokenized alone -> ``prompt_ids_len``; the whole text is tokenized, its last
    token set to eos; the loss mask is 1 on logit positions ``[prompt_ids_len - 1 : -1]``, i.e.
    the targets are the tokens at ``prompt_ids_len`` .. the end.
    """
    prompt, response = openrlhf_texts(tokenizer, record, apply_chat_template, input_template)
    kw = dict(max_length=max_len, truncation=True, padding=False, add_special_tokens=False)
    prompt_ids_len = len(tokenizer(prompt, **kw)["input_ids"])
    if not prompt or not response or prompt_ids_len >= max_len - 2:
        return None
    ids = list(tokenizer(openrlhf_text(tokenizer, prompt, response), **kw)["input_ids"])
    ids[-1] = tokenizer.eos_token_id  # "to avoid EOS_token truncation"
    mask = [0] * len(ids)
    span = range(len(ids))[prompt_ids_len - 1:-1]  # loss_mask[0, prompt_ids_len - 1 : -1] = 1
    for i in span:
        mask[i] = 1
    return ids, [i + 1 for i, m in enumerate(mask) if m]  # logit i predicts token i + 1


def project_example(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, target positions) by the project's rule (``mergelaws.data.encode_pair``, untruncated)."""
    ex, _ = D.encode_pair(tokenizer, prompt, response, 10**9, system)
    if ex is None:
        return [], []
    return list(ex.input_ids), [i for i, t in enumerate(ex.labels) if i > 0 and t != D.IGNORE]


def eos_tail(tokenizer) -> list[int]:
    """What OpenRLHF appends to a text that does not end with the eos token: ``" " + eos``."""
    return list(tokenizer(" " + tokenizer.eos_token, add_special_tokens=False)["input_ids"])


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def compare_example(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[str, ...]:
    """How OpenRLHF's example (:func:`openrlhf_example` on the JSONL record) relates to the
    project's (``mergelaws.data.encode_pair``): ``("identical",)``, or the documented differences
    it shows, ``"eos_after_turn"`` and/or ``"fused_whitespace"`` (module docstring). Raises
    :class:`LossMaskError` (one line: tokenizer, example, where they differ) on anything else."""
    chat = D.has_chat_template(tokenizer)
    system = system if chat else None
    where = f"openrlhf backend, tokenizer {tokenizer_name(tokenizer)} (prompt {prompt[:40]!r})"
    try:
        ours_ids, ours_t = project_example(tokenizer, prompt, response, system)
    except D.DataError as exc:
        raise LossMaskError(f"{where}: {exc}; OpenRLHF would train on the wrong text") from None
    theirs = openrlhf_example(tokenizer, openrlhf_record(tokenizer, prompt, response, system), chat)
    if theirs is None or not ours_t:
        raise LossMaskError(f"{where}: the example has no response to train on (OpenRLHF would drop it); remove it "
                            f"from the domain's data")
    theirs_ids, theirs_t = theirs
    kinds: list[str] = []
    tail, eos = eos_tail(tokenizer), tokenizer.eos_token_id
    k, n = len(tail), len(theirs_ids)
    if (chat and k and ours_ids[-1] != eos and ours_ids[-1] in D.special_ids(tokenizer)
            and theirs_ids[n - k:] == tail and theirs_t[-k:] == list(range(n - k, n))):
        # the turn is not closed by the eos token: OpenRLHF appends " " + eos and trains on it
        kinds.append("eos_after_turn")
        theirs_ids, theirs_t = theirs_ids[:n - k], theirs_t[:-k]
    if theirs_ids == ours_ids and theirs_t == ours_t:
        return tuple(kinds) or ("identical",)
    to, tt = [ours_ids[i] for i in ours_t], [theirs_ids[i] for i in theirs_t]
    r = 0  # the targets' common end
    while r < min(len(to), len(tt)) and to[-1 - r] == tt[-1 - r]:
        r += 1
    lead_ours, lead_theirs = _text(tokenizer, to[:len(to) - r]), _text(tokenizer, tt[:len(tt) - r])
    if (r and lead_ours.isspace() and lead_ours.endswith(lead_theirs) and len(lead_theirs) < len(lead_ours)
            and theirs_t == list(range(len(theirs_ids) - len(tt), len(theirs_ids)))
            and _text(tokenizer, theirs_ids) == _text(tokenizer, ours_ids)):
        # the response's leading whitespace merged into the prompt's last token (one-string tokenization)
        kinds.append("fused_whitespace")
        return tuple(kinds)
    at = next((i for i, (a, b) in enumerate(zip(tt, to)) if a != b), min(len(tt), len(to)))
    show = (lambda ids: tokenizer.convert_ids_to_tokens(ids[max(at - 2, 0):at + 6]))
    raise LossMaskError(
        f"{where}: OpenRLHF's loss would differ from the project's at target {at + 1} of {len(to)}: OpenRLHF "
        f"trains on {show(tt)}..., the project on {show(to)}...; use train.backend: torch for this base, or a "
        f"tokenizer whose chat template closes the assistant turn with a special token (ideally its eos token)")


def check_loss_mask(tokenizer, pairs, system: str | None = None, limit: int | None = 256) -> dict:
    """Check on (the first ``limit`` of) ``pairs`` that OpenRLHF's response mask is the project's
    up to the documented differences (:func:`compare_example`); raise :class:`LossMaskError` if
    not. Returns the counts, for the train record."""
    chat = D.has_chat_template(tokenizer)
    counts = {"identical": 0, "eos_after_turn": 0, "fused_whitespace": 0}
    checked = 0
    for prompt, response in pairs if limit is None else pairs[:limit]:
        checked += 1
        try:
            kinds = compare_example(tokenizer, prompt, response, system)
        except LossMaskError as exc:
            raise LossMaskError(str(exc).replace(" (prompt ", f" (example {checked}, prompt ", 1)) from None
        for kind in kinds:
            counts[kind] += 1
    return {"checked": checked, **counts, "tokenizer": tokenizer_name(tokenizer),
            "format": "chat_template" if chat else "plain", "system_prompt": system if chat else None,
            "extra_targets": tokenizer.convert_ids_to_tokens(eos_tail(tokenizer)) if counts["eos_after_turn"] else []}


def mask_summary(mask: dict) -> str:
    """One line about a :func:`check_loss_mask` result."""
    out = (f"loss mask ({mask['format']}) checked on {mask['checked']} examples: {mask['identical']} identical "
           f"to the project's")
    if mask["fused_whitespace"]:
        out += (f", {mask['fused_whitespace']} with the response's leading whitespace fused into the prompt "
                f"(not trained)")
    if mask["eos_after_turn"]:
        out += f", {mask['eos_after_turn']} with {mask['extra_targets']} trained after the end-of-turn token"
    return out


def length_stats(tokenizer, pairs, system: str | None, max_len: int, limit: int | None = 256) -> dict:
    """How many (of the first ``limit``) examples OpenRLHF would cut or drop at ``max_len``."""
    chat = D.has_chat_template(tokenizer)
    system = system if chat else None
    cut = dropped = n = 0
    for prompt, response in pairs if limit is None else pairs[:limit]:
        n += 1
        p_text, r_text = openrlhf_texts(tokenizer, openrlhf_record(tokenizer, prompt, response, system), chat)
        if len(tokenizer.encode(p_text, add_special_tokens=False)) >= max_len - 2:
            dropped += 1
        elif len(tokenizer.encode(openrlhf_text(tokenizer, p_text, r_text), add_special_tokens=False)) > max_len:
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
               seed: int, chat_template: bool = True) -> list[str]:
    """``openrlhf.cli.train_sft`` flags (0.11.x dotted names) from ``train`` and ``train.openrlhf``;
    ``chat_template``: whether the base's tokenizer has one (see :func:`data_args`)."""
    t, o = cfg["train"], settings(cfg)
    args = [
        "--model.model_name_or_path", str(base),
        "--data.dataset", str(dataset),
        *data_args(chat_template),
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
                  port: int | None = None, python: str | None = None, chat_template: bool = True) -> list[str]:
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
    flags = train_args(cfg, base=base, dataset=dataset, output_dir=output_dir, ckpt_dir=ckpt_dir, seed=seed,
                       chat_template=chat_template)
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


_ARCH_SUFFIX = re.compile(r"^(\d+\.\d+)[a-z]+((?:\+PTX)?)$", re.IGNORECASE)


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed's JIT builder can read it: the architecture-specific
    suffixes (``9.0a``, ``10.0f``) dropped, since DeepSpeed 0.19 parses each part as an integer
    (``int("0a")``, a ValueError when it builds its fused Adam on an H100/H200 whose image sets
    ``9.0a``). The plain ``9.0`` builds the same ops for the same GPU. A list with no suffix is
    returned as it is; ``train.openrlhf.env`` can still set the variable explicitly."""
    parts = value.replace(";", " ").split()
    if not any(_ARCH_SUFFIX.match(p) for p in parts):
        return value
    out: list[str] = []
    for p in parts:
        m = _ARCH_SUFFIX.match(p)
        q = m.group(1) + m.group(2) if m else p
        if q not in out:
            out.append(q)
    return ";".join(out)


def launch_env(cfg: dict, port: int, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: ours + ``train.openrlhf.env`` (``$VARS`` expanded) + what a
    single ``python`` process needs to form a 1-rank DeepSpeed group."""
    o = settings(cfg)
    env = dict(os.environ if base_env is None else base_env)
    if "TORCH_CUDA_ARCH_LIST" in env:
        env["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(env["TORCH_CUDA_ARCH_LIST"])
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
                 echo=None, domains: list[str] | None = None) -> dict:
    """Fine-tune one expert with OpenRLHF; write it atomically to ``out``; return its record.

    The size's own train settings (``bases.<size>.train``) apply, as in the torch backend.
    ``domains`` (``domain`` then a label such as "multitask"): train on the union of their train
    splits, for the same epochs as an expert (so as many examples as all their experts together)."""
    cfg = {**cfg, "train": grid.train_settings(cfg, size)}
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
    chat = D.has_chat_template(tok)
    system = system_prompt(cfg, tok)
    pairs = ([p for d in domains for p in domain_pairs(cfg, d)] if domains is not None
             else domain_pairs(cfg, domain))
    mask = check_loss_mask(tok, pairs, system, limit=o["mask_check_examples"])
    lengths = length_stats(tok, pairs, system, cfg["train"]["max_len"], limit=o["mask_check_examples"])

    ckpt = ckpt_dir_for(out)
    ckpt.mkdir(parents=True, exist_ok=True)
    dataset = ckpt / "train.jsonl"
    n = write_jsonl(pairs, dataset, tok, system)
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
                             topology=topology, hostfile=hostfile, port=port, python=py, chat_template=chat)
        print(f"openrlhf: {size}/{domain}: {n} examples; {mask_summary(mask)}; log {log_path}\n$ {shlex.join(argv)}",
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
            "system_prompt": system, "seed": seed, "data": {"examples": n, **lengths}, "loss_mask": mask,
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
