"""`mergelaws merge CONFIG.yml OUT_DIR`: merge Hugging Face checkpoints from a mergekit-format YAML.

The YAML is mergekit's (https://github.com/arcee-ai/mergekit)::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/expert_b
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # shared; also defaults for per-model keys
    dtype: float32
    tokenizer_source: base      # optional: base | a model path (union: mergekit-yaml)
    chat_template: chatml       # optional: chatml | llama3 | alpaca | mistral | auto | Jinja text

and the semantics are mergekit 0.1.5's, computed with the sparsification and combine
helpers of :mod:`mergelaws.merge` (the ones its registered methods use), in float32 whatever
the storage dtype. For every floating parameter tensor, with task vectors v_i = theta_i -
theta_0 and per-model weights w_i::

    s_i   = sparsify_i(v_i)                               (per method, below)
    u_i   = w_i * s_i
    mixed = sum_i u_i                                     (no consensus)
          = sum_i u_i [sign(u_i) == E],  E = +1 where sum_i u_i >= 0 else -1   (consensus)
    mixed /= sum_i w_i  (resp. sum_i w_i [agree_i]; 0 -> 1)   if normalize
    theta = theta_0 + lambda * mixed

| mergekit name      | sparsify                                | consensus | normalize | rescale | registry equivalent (equal weights)              |
|--------------------|-----------------------------------------|-----------|-----------|---------|--------------------------------------------------|
| linear / average   | -                                       | -         | true      | -       | average (sum w_i theta_i / sum w_i)              |
| task_arithmetic    | -                                       | no        | false     | -       | task_arithmetic combine=sum, scale=lambda*w     |
| ties               | top int(d*n) by abs(v) (merge._trim)    | yes       | true      | false   | ties density=d, scale=lambda (rounds half up)  |
| dare_linear / dare | DARE masks, p = 1 - density             | no        | false     | true    | dare rescale=none (rescale: false, normalize)   |
| dare_ties          | DARE masks, p = 1 - density             | yes       | false     | true    | dare_ties rescale=l1 (normalize: true)          |
| breadcrumbs        | drop top gamma, keep next density       | no        | false     | false   | breadcrumbs (normalize: true)                   |
| breadcrumbs_ties   | same                                    | yes       | false     | false   | -                                                |
| della              | MagPrune keep probs (density, epsilon)  | yes       | true      | true    | della rescale=l1                                |
| della_linear       | same                                    | no        | false     | true    | -                                                |
| model_stock        | -  (theta_0 + t * mean v_i)             | -         | -         | -       | model_stock                                      |

mergekit's ``rescale: true`` is its L1 rescale (x ||v||_1 / ||m*v||_1 per model and tensor),
not DARE's 1/(1-p). ``linear`` with ``normalize: false`` gives sum_i w_i theta_i.

The TIES keep count is mergekit's ``int(density * numel)`` (its ``sparsify.magnitude``;
``merge._trim(..., keep_rounding="floor")``, where the registry's TIES rounds half up), at least
1 where mergekit stops with an assertion.

Tokenizer and embeddings, as mergekit's ``tokenizer/build.py`` and ``tokenizer/embed.py``:

* ``tokenizer_source`` absent: the base's tokenizer files are copied and every tensor must have
  the base's shape (mergekit: same).
* ``tokenizer_source: base``: the output vocabulary is the base tokenizer's, the output
  tokenizer the base's. Each model's embedding and output-head rows (``embed_tokens``,
  ``lm_head``, ... with the base's ``vocab_size`` rows) are gathered by token string from its
  own tokenizer before merging: an expert fine-tuned with added tokens has those rows cut; a
  base token the expert lacks takes the base's row. ``config.json`` gets ``vocab_size`` = the
  vocabulary's length (a base with padding rows beyond its tokenizer loses them, as in
  mergekit). A base tokenizer with tokens at ids >= its vocab_size (mergekit strips those from a
  BPE tokenizer) is rejected.
* ``tokenizer_source: PATH`` (a model directory or id): that tokenizer, as is, is the output's;
  rows are gathered the same way, and a token missing from a model takes mergekit's default:
  the one model that has it, else the base's row, else the mean over the models that have it
  (zero if none has it).
* ``tokenizer_source: union`` is rejected (it builds a new tokenizer with added tokens): run
  ``mergekit-yaml`` for union vocabularies. Explicit tokenizer_source needs a ``base_model``
  that is a local safetensors directory.

``chat_template`` (mergekit's ``_set_chat_template``): a name mergekit ships (``chatml``,
``llama3``, ``alpaca``, ``mistral``; written here as Jinja of our own that renders exactly as
mergekit's files; ``exaone`` is not built in), ``auto`` (the most common template, stripped,
among base_model and the models' tokenizers, ties to the first in YAML order, base first; none
found: the tokenizer is left as it is) or a literal Jinja template (>= 20 characters with a
``{``). It is written to ``chat_template.jinja`` and to ``tokenizer_config.json``, so
``AutoTokenizer.from_pretrained(OUT).chat_template`` returns it.

Deviations from mergekit (documented, small): entries tied
in |v| are ranked by flat index (mergekit: torch's unstable sort); mean rows for missing
tokens are summed base first, then in YAML order, and a tie in ``chat_template: auto`` goes to
the first (mergekit: set order); random masks come from a CPU
generator seeded per tensor with ``merge.tensor_seed(seed, "", name)`` (mergekit: torch's
global RNG, unseeded), so reruns are bit-identical. The base model is a merge member only if
it is also listed under ``models``, except with ``linear``, where (as in mergekit) a base_model
is one more member weighted by the shared ``parameters.weight`` (an error without one); linear
without base_model uses the first model as theta_0, the tokenizer and config source.

Not supported, rejected with an error naming the key: per-tensor parameter filters and
gradients (lists), slices, LoRA (``model+lora``), ``tokenizer_source: union`` and the
``tokenizer:`` mapping, the ``exaone`` template name, and any key not listed here.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergelaws import merge as M
from mergelaws.config import ConfigError
from mergelaws.io import atomic_path

__all__ = ["MergeYamlError", "MergePlan", "parse_config", "load_config", "merge_tensor", "run_merge",
           "METHODS"]


class MergeYamlError(ConfigError):
    """A mergekit YAML problem, naming the key and the fix."""


@dataclass(frozen=True)
class _Spec:
    sparsify: str | None  # None | magnitude | random | outliers | della
    consensus: bool
    normalize: bool
    rescale: bool
    model_keys: tuple[str, ...]  # allowed per-model parameters
    lam: bool = True  # lambda allowed


_GTA = ("weight", "density")
METHODS: dict[str, _Spec] = {
    "linear": _Spec(None, False, True, False, ("weight",), lam=False),
    "task_arithmetic": _Spec(None, False, False, False, _GTA),
    "ties": _Spec("magnitude", True, True, False, _GTA),
    "dare_linear": _Spec("random", False, False, True, _GTA),
    "dare_ties": _Spec("random", True, False, True, _GTA),
    "breadcrumbs": _Spec("outliers", False, False, False, _GTA + ("gamma",)),
    "breadcrumbs_ties": _Spec("outliers", True, False, False, _GTA + ("gamma",)),
    "della": _Spec("della", True, True, True, _GTA + ("epsilon",)),
    "della_linear": _Spec("della", False, False, True, _GTA + ("epsilon",)),
    "model_stock": _Spec(None, False, False, False, (), lam=False),
}
ALIASES = {"average": "linear", "dare": "dare_linear"}
PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "chat_template")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The chat templates mergekit ships (mergekit/_data/chat_templates/*.jinja), written anew: each
# renders exactly as mergekit's file under transformers' Jinja settings (trim_blocks,
# lstrip_blocks), including its quirks (llama3: a newline after every <|eot_id|>; alpaca: no
# blank line before a generation prompt; mistral: no generation prompt).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ ((system | last).content | trim if system else '') + '\n\n' }}"
        "{% set heads = {'user': '### Instruction:\n', 'assistant': '### Response:\n',"
        " 'user_context': '### Input:\n'} %}"
        "{% for message in messages %}"
        "{% if message['role'] in heads %}"
        "{{ heads[message['role']] + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\n\n' }}{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is defined %}"
        "{{ ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}
MERGEKIT_ONLY_TEMPLATES = ("exaone",)


@dataclass
class MergePlan:
    method: str  # canonical mergekit name
    base_model: str
    models: list[str]
    weights: list[float]
    per_model: dict[str, list[float]]  # density / gamma / epsilon per model
    normalize: bool
    rescale: bool
    lam: float
    filter_wise: bool = False
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # None | "base" | a model path or id
    chat_template: str | None = None  # None | "auto" | a CHAT_TEMPLATES name | Jinja text
    raw: dict = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"merge_method": self.method, "base_model": self.base_model, "models": self.models,
                "weights": self.weights, **self.per_model, "normalize": self.normalize,
                "rescale": self.rescale, "lambda": self.lam, "filter_wise": self.filter_wise,
                "out_dtype": self.out_dtype, "tokenizer_source": self.tokenizer_source,
                "chat_template": self.chat_template}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, (list, dict)):
            raise MergeYamlError(f"{where} = {value!r}: per-tensor filters and gradients (lists) are not "
                                 f"supported by mergelaws merge; give one number")
        raise MergeYamlError(f"{where} = {value!r} must be a number")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise MergeYamlError(f"{where} = {value!r} must be true or false")
    return value


def parse_config(raw: Any) -> MergePlan:
    """Validate a mergekit YAML (as a dict) and return the merge plan."""
    if not isinstance(raw, dict):
        raise MergeYamlError("the merge config must be a YAML mapping with merge_method, base_model and models")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        hint = " (slices are not supported: list whole models under models)" if "slices" in unknown else ""
        if "tokenizer" in unknown:
            hint = (" (the tokenizer: mapping, with tokens and pad_to_multiple_of, is not supported: give "
                    "tokenizer_source: base or a model path, or run mergekit-yaml)")
        raise MergeYamlError(f"unsupported key(s) {', '.join(map(repr, unknown))}{hint}; "
                             f"mergelaws merge understands {', '.join(TOP_KEYS)}")
    name = raw.get("merge_method")
    if not isinstance(name, str):
        raise MergeYamlError("merge_method is missing; one of " + ", ".join([*METHODS, *ALIASES]))
    method = ALIASES.get(name, name)
    if method not in METHODS:
        raise MergeYamlError(f"merge_method = {name!r} is not supported; supported: "
                             f"{', '.join([*METHODS, *ALIASES])}")
    spec = METHODS[method]
    tokenizer_source = _tokenizer_source(raw.get("tokenizer_source"))
    chat_template = _chat_template(raw.get("chat_template"))
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeYamlError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    shared = raw.get("parameters") or {}
    if not isinstance(shared, dict):
        raise MergeYamlError("parameters must be a mapping")
    shared_keys = {"normalize", "rescale", "lambda", "int8_mask"} if method != "model_stock" else {"filter_wise"}
    if method == "linear":
        shared_keys = {"normalize"}
    allowed_top = shared_keys | set(spec.model_keys)
    bad = [k for k in shared if k not in allowed_top]
    if bad:
        raise MergeYamlError(f"parameters.{bad[0]} is not supported for merge_method {name!r}; allowed: "
                             f"{', '.join(sorted(allowed_top)) or '(none)'}")

    base = raw.get("base_model")
    models, weights = [], []
    per_model: dict[str, list[float]] = {k: [] for k in spec.model_keys if k != "weight"}
    for j, entry in enumerate(models_raw):
        where = f"models[{j}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise MergeYamlError(f"{where} must be a mapping with a 'model' path")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise MergeYamlError(f"{where}.{extra[0]} is not supported; a model entry has model and parameters")
        path = entry["model"]
        if "+" in path and not Path(path).exists():
            raise MergeYamlError(f"{where}.model = {path!r}: LoRA (model+lora) is not supported; merge the adapter first")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeYamlError(f"{where}.parameters must be a mapping")
        bad = [k for k in params if k not in spec.model_keys]
        if bad:
            raise MergeYamlError(f"{where}.parameters.{bad[0]} is not supported for merge_method {name!r}; "
                                 f"per-model keys: {', '.join(spec.model_keys) or '(none)'}")
        if "weight" in spec.model_keys:
            if "weight" in params:
                w = _number(params["weight"], f"{where}.parameters.weight")
            elif "weight" in shared:
                w = _number(shared["weight"], "parameters.weight")
            else:
                raise MergeYamlError(f"{where}.parameters.weight is missing (mergekit requires a weight per model "
                                     f"for {name!r}); e.g. weight: 1.0")
            weights.append(w)
        else:
            weights.append(1.0)
        for k in per_model:
            src, val = (f"{where}.parameters.{k}", params[k]) if k in params else \
                (f"parameters.{k}", shared.get(k, PER_MODEL_DEFAULTS[k]))
            v = _number(val, src)
            if k == "density" and not 0.0 <= v <= 1.0:
                raise MergeYamlError(f"{src} = {v!r} must be in [0, 1]")
            if k == "density" and method == "task_arithmetic" and v != 1.0:
                raise MergeYamlError(f"{src} = {v!r}: task_arithmetic does not sparsify (mergekit ignores density); "
                                     f"use ties, dare_linear or breadcrumbs")
            if k in ("gamma", "epsilon") and not 0.0 <= v < 1.0:
                raise MergeYamlError(f"{src} = {v!r} must be in [0, 1)")
            per_model[k].append(v)
        models.append(path)
    if method == "linear" and base is None:
        base = models[0]
    elif method == "linear" and isinstance(base, str) and base not in models:
        # mergekit's linear merges base_model too, with the shared weight (else it stops)
        if "weight" not in shared:
            raise MergeYamlError("linear: mergekit merges base_model as one more member and needs its weight; "
                                 "give parameters.weight, list the base under models, or drop base_model")
        models.append(base)
        weights.append(_number(shared["weight"], "parameters.weight"))
    if not isinstance(base, str):
        raise MergeYamlError(f"base_model is required for merge_method {name!r} (the reference theta_0)")
    if tokenizer_source is not None and raw.get("base_model") is None:
        raise MergeYamlError(f"tokenizer_source = {tokenizer_source!r} needs base_model (whose rows fill tokens a "
                             f"model lacks); add base_model, or drop tokenizer_source to keep the first model's "
                             f"tokenizer")
    if method == "della":
        for j, (d, e) in enumerate(zip(per_model["density"], per_model["epsilon"])):
            if d < 1.0 and (d - e <= 0.0 or d + e >= 1.0):
                raise MergeYamlError(f"models[{j}]: density = {d!r}, epsilon = {e!r}: density +- epsilon must lie "
                                     f"in (0, 1) (as mergekit)")
    if "density" in per_model and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        for j, d in enumerate(per_model["density"]):
            if d <= 0.0:
                raise MergeYamlError(f"models[{j}] density = {d!r} keeps nothing; use a density in (0, 1]")
    if method == "model_stock" and len(models) < 2:
        raise MergeYamlError("model_stock needs at least 2 models besides the base (mergekit: 3 inputs)")

    def shared_bool(key: str, default: bool) -> bool:
        return _bool(shared[key], f"parameters.{key}") if key in shared else default

    out_dtype = raw.get("out_dtype", raw.get("dtype"))
    for key in ("dtype", "out_dtype"):
        if key in raw and raw[key] not in DTYPES:
            raise MergeYamlError(f"{key} = {raw[key]!r} is not supported; one of {', '.join(DTYPES)}")
    if "int8_mask" in shared:
        _bool(shared["int8_mask"], "parameters.int8_mask")  # no numeric effect
    return MergePlan(
        method=method, base_model=base, models=models, weights=weights, per_model=per_model,
        normalize=shared_bool("normalize", spec.normalize), rescale=shared_bool("rescale", spec.rescale),
        lam=_number(shared.get("lambda", 1.0), "parameters.lambda"),
        filter_wise=shared_bool("filter_wise", False), out_dtype=out_dtype,
        tokenizer_source=tokenizer_source, chat_template=chat_template, raw=raw,
    )


def _tokenizer_source(value: Any) -> str | None:
    """``tokenizer_source``: None (absent), "base", or a model path / id; union is rejected."""
    if value is None:
        return None
    if value == "union":
        raise MergeYamlError("tokenizer_source = 'union' is not supported by mergelaws merge (it builds a new "
                             "tokenizer from all the models' vocabularies); run mergekit-yaml for union "
                             "vocabularies, or use tokenizer_source: base or a model path")
    if not isinstance(value, str) or not value:
        raise MergeYamlError(f"tokenizer_source = {value!r} must be base, union or a model path")
    if "+" in value and not Path(value).exists():
        raise MergeYamlError(f"tokenizer_source = {value!r}: LoRA (model+lora) is not supported; merge the adapter "
                             f"first")
    return value


def _chat_template(value: Any) -> str | None:
    """``chat_template``, validated as mergekit does: a template name, "auto", or Jinja text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MergeYamlError(f"chat_template = {value!r} must be a template name or a Jinja template string")
    if value in MERGEKIT_ONLY_TEMPLATES:
        raise MergeYamlError(f"chat_template = {value!r} is not built into mergelaws merge; run mergekit-yaml, or "
                             f"give the template's Jinja text as chat_template (built in: "
                             f"{', '.join(CHAT_TEMPLATES)}, auto)")
    if value == "auto" or value in CHAT_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:  # mergekit: "Invalid chat template"
        raise MergeYamlError(f"chat_template = {value!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}, "
                             f"auto) nor a Jinja template string")
    return value


def load_config(path: str | Path) -> MergePlan:
    path = Path(path)
    if not path.exists():
        raise MergeYamlError(f"merge config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeYamlError(f"merge config {path} is not valid YAML ({exc})") from None
    return parse_config(raw)


def merge_tensor(plan: MergePlan, base: torch.Tensor, experts: list[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    """The merged float32 tensor for one parameter (``seed`` seeds the random masks)."""
    b = base.float()
    deltas = torch.empty((len(experts), *b.shape), dtype=torch.float32, device=b.device)
    for i, e in enumerate(experts):  # = torch.stack([e - b ...]) without the temporaries
        torch.sub(e.to(b.device).float(), b, out=deltas[i])
    return merge_task_vectors(plan, b, deltas, seed=seed)


def merge_task_vectors(plan: MergePlan, b: torch.Tensor, deltas: torch.Tensor, *, seed: int = 0,
                       inplace: bool = False) -> torch.Tensor:
    """The merged float32 tensor from the base tensor ``b`` (fp32) and the task vectors ``deltas``
    [k, ...] (fp32, contiguous); ``inplace``: ``deltas`` may be overwritten (sparsified in place)."""
    spec = METHODS[plan.method]
    if plan.method == "model_stock":
        return b + M.merge_deltas("model_stock", deltas, {"filter_wise": plan.filter_wise})
    rescale = "l1" if plan.rescale else "none"
    pm = plan.per_model
    k = deltas.shape[0]
    if spec.sparsify == "magnitude":
        sparse = deltas if inplace and rescale != "l1" else torch.empty_like(deltas)
        for i in range(k):  # the registry's per-tensor trim, one model at a time; mergekit's count
            M._trim(deltas[i:i + 1], pm["density"][i], None, None, out=sparse[i:i + 1], keep_rounding="floor")
            if rescale == "l1":
                sparse[i] = M._rescale_kept(deltas[i], sparse[i] != 0, 1.0, "l1")
    elif spec.sparsify == "random":
        sparse = M.sparsify_dare(deltas, [1.0 - d for d in pm["density"]], rescale, seed)
    elif spec.sparsify == "outliers":
        sparse = M.sparsify_breadcrumbs(deltas, pm["density"], pm["gamma"], rescale)
    elif spec.sparsify == "della":
        sparse = M.sparsify_della(deltas, pm["density"], pm["epsilon"], rescale, seed)
    else:
        sparse = deltas
    weights = torch.tensor(plan.weights, dtype=torch.float32)
    mixed = M.combine_deltas(sparse, weights, consensus=spec.consensus, normalize=plan.normalize)
    if plan.method == "linear":
        if plan.normalize:
            return b + mixed
        return b * float(weights.sum()) + mixed  # sum_i w_i theta_i
    if plan.lam != 1.0:
        mixed = mixed * plan.lam
    return b + mixed


def merge_states(plan: MergePlan, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], *,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge whole float32 state dicts by ``plan``; tensor n seeded with tensor_seed(seed, "", n)."""
    return {n: merge_tensor(plan, b, [e[n] for e in experts], seed=M.tensor_seed(seed, "", n))
            for n, b in base.items()}


def run_merge(config: str | Path | dict, out: str | Path, *, seed: int = 0, device: str = "cpu",
              allow_bin: bool = False, log=print) -> MergePlan:
    """Merge the checkpoints of a mergekit YAML into the Hugging Face directory ``out`` (atomically).

    Tensor by tensor: each input's tensor is read from its safetensors file into a buffer reused
    for every tensor (the k task vectors are formed in place), merged, and written straight into
    the output file (header first), so the peak memory is about one tensor per input plus the
    output tensor and the method's temporaries, (2k + 4) x the largest tensor, whatever the
    model size (logged). Inputs that are not local
    safetensors directories (hub ids, .bin with --allow-bin) are loaded whole through
    transformers first (logged).
    """
    from mergelaws import models

    t0 = time.time()
    plan = parse_config(config) if isinstance(config, dict) else load_config(config)
    device = models.resolve_device(device)
    base_dir = Path(plan.base_model)
    template = _resolve_chat_template(plan, log)
    if not (base_dir.is_dir() and any(base_dir.glob("*.safetensors"))):
        if plan.tokenizer_source is not None:
            raise MergeYamlError(f"tokenizer_source = {plan.tokenizer_source!r} needs base_model as a local "
                                 f"safetensors directory, and {plan.base_model} is not; download or convert it "
                                 f"first, or run mergekit-yaml")
        return _run_merge_in_memory(plan, out, seed=seed, device=device, allow_bin=allow_bin, log=log, t0=t0,
                                    template=template)
    paths = list(dict.fromkeys([plan.base_model, *plan.models]))
    sources = {p: _open_input(p, allow_bin, log) for p in paths}
    base = sources[plan.base_model]
    names = _merged_names(base_dir, base)
    vocab = _vocab_map(plan, paths, base, names, log) if plan.tokenizer_source is not None else None
    for path in plan.models:
        _check_same_tensors(path, sources[path], base, names, vocab)
    out_dtype = DTYPES[plan.out_dtype] if plan.out_dtype is not None else torch.float32
    others = [n for n in base.keys() if n not in names and not base.dtype(n).is_floating_point]
    layout = {n: (out_dtype, vocab.shape(n, base) if vocab and n in vocab.names else base.shape(n))
              for n in names}
    layout.update({n: (base.dtype(n), base.shape(n)) for n in others})
    k = len(plan.models)
    largest = max((math.prod(layout[n][1]) for n in names), default=0)
    # buffers reused for every tensor: the base tensor (fp32) and the k task vectors, read in place
    base_buf = torch.empty(largest, dtype=torch.float32)
    deltas_buf = torch.empty(k * largest, dtype=torch.float32)
    t_merge = t_io = 0.0
    with atomic_path(out, is_dir=True) as tmp:
        writer = _SafetensorsWriter(Path(tmp) / "model.safetensors", layout)
        for n in sorted(layout):
            t1 = time.perf_counter()
            if n in others:
                value = base.get(n)
            elif vocab is not None and n in vocab.names:  # rows gathered by token string, then merged
                deltas = deltas_buf[:k * math.prod(layout[n][1])].view(k, *layout[n][1])
                b = vocab.gather(n, sources, plan.models, deltas)
                if torch.device(device).type != "cpu":
                    b, deltas = b.to(device), deltas.to(device)
                value = merge_task_vectors(plan, b, deltas, seed=M.tensor_seed(seed, "", n), inplace=True)
                value = value.to(out_dtype)
            else:
                b = _read_f32(base, n, base_buf)
                deltas = deltas_buf[:k * b.numel()].view(k, *b.shape)
                for i, m in enumerate(plan.models):
                    src = sources[m]
                    if src.dtype(n) == torch.float32:  # e - b, as merge_tensor, without a copy of e
                        src.read(n, deltas[i]).sub_(b)
                    else:
                        torch.sub(src.get(n), b, out=deltas[i])
                if torch.device(device).type != "cpu":
                    b, deltas = b.to(device), deltas.to(device)
                value = merge_task_vectors(plan, b, deltas, seed=M.tensor_seed(seed, "", n), inplace=True)
                value = value.to(out_dtype)
            t2 = time.perf_counter()
            writer.write(n, value.cpu())
            for src in sources.values():
                src.release(n)
            t_merge += t2 - t1
            t_io += time.perf_counter() - t2
        writer.close()
        _write_model_files(base_dir, Path(tmp), out_dtype, vocab_size=vocab.size if vocab else None,
                           tokenizer_from=vocab.tokenizer if vocab else None)
        if template is not None:
            _write_chat_template(Path(tmp), template)
        record = {"mergelaws_merge": plan.describe(), "seed": seed, "config": plan.raw}
        (Path(tmp) / "mergelaws_merge.json").write_text(
            json.dumps(json.loads(json.dumps(record, default=str)), indent=2, sort_keys=True) + "\n")
    read = sum(src.bytes_read for src in sources.values())
    log(f"merge {plan.method}: {k} models -> {out} in {time.time() - t0:.1f}s, tensor by tensor (read "
        f"{read / 1e9:.2f} GB from the safetensors files, wrote {writer.nbytes / 1e9:.2f} GB): merge {t_merge:.1f}s "
        f"incl. reading, write {t_io:.1f}s. Peak memory: one tensor per input plus the output tensor and the "
        f"method's temporaries, about (2k + 4) x the largest tensor = {(2 * k + 4) * largest * 4 / 1e9:.2f} GB "
        f"(k = {k}, largest {largest * 4 / 1e6:.1f} MB in fp32), whatever the model size")
    return plan


def _read_f32(src, n: str, buf: torch.Tensor) -> torch.Tensor:
    """Tensor ``n`` of ``src`` as fp32, in ``buf`` when stored as fp32."""
    if src.dtype(n) == torch.float32:
        return src.read(n, buf)
    return src.get(n).float()


def _open_input(path: str, allow_bin: bool, log):
    """A memory-mapped reader for a local safetensors directory, else the model loaded through
    transformers (hub ids, .bin checkpoints) as a dict."""
    from mergelaws import models

    p = Path(path)
    if p.is_dir() and any(p.glob("*.safetensors")):
        try:
            return M.SafetensorsSource(p)
        except M.CheckpointError as exc:
            raise models.ModelError(f"model directory {p} could not be read ({exc}); its weights are truncated "
                                    f"or corrupt: copy it again") from None
    log(f"merge: {path} is not a local safetensors directory; loading it whole through transformers")
    model = models.load_model(path, "float32", "cpu", allow_bin=allow_bin)
    return M.DictSource({n: t.detach() for n, t in model.state_dict().items()})


def _merged_names(base_dir: Path, base) -> list[str]:
    """The base's floating tensors; an lm_head.weight stored beside the embeddings it is tied to
    (config.json tie_word_embeddings: true) is left out, as transformers' save_pretrained does."""
    names = [n for n in base.keys() if base.dtype(n).is_floating_point]
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    if cfg.get("tie_word_embeddings") is True and "lm_head.weight" in names and len(names) > 1:
        names.remove("lm_head.weight")
    return names


def _check_same_tensors(path: str, src, base, names: list[str], vocab: "_VocabMap | None" = None) -> None:
    from mergelaws import models

    missing = [n for n in names if n not in src]
    if missing:
        raise models.ModelError(f"model {path} does not match the base's parameters (no {missing[:3]}); was it "
                                f"fine-tuned from this base?")
    for n in names:
        if vocab is not None and n in vocab.names:
            vocab.check(path, n, src.shape(n), base.shape(n))
        elif tuple(src.shape(n)) != tuple(base.shape(n)):
            raise models.ModelError(f"model {path} has shape {tuple(src.shape(n))} for {n} but the base has "
                                    f"{tuple(base.shape(n))}; was it fine-tuned from this base?")


def _write_model_files(base_dir: Path, out: Path, dtype: torch.dtype, *, vocab_size: int | None = None,
                       tokenizer_from: str | None = None) -> None:
    """config.json (dtype set to the output's; ``vocab_size`` when given, as mergekit's
    _update_config_vocab), generation_config.json from the base, and the tokenizer: the base's
    files, or ``tokenizer_from``'s (a directory's files, else the tokenizer loaded and saved)."""
    from mergelaws import models

    cfg = json.loads((base_dir / "config.json").read_text())
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    if vocab_size is not None:
        target = cfg["text_config"] if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
        target["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").exists():
        (out / "generation_config.json").write_bytes((base_dir / "generation_config.json").read_bytes())
    if tokenizer_from is None or Path(tokenizer_from).resolve() == base_dir.resolve():
        models.copy_tokenizer(base_dir, out)
    elif Path(tokenizer_from).is_dir():
        models.copy_tokenizer(tokenizer_from, out)
    else:
        _load_tokenizer(tokenizer_from).save_pretrained(str(out))


# ---------------------------------------------------------------- tokenizer_source, chat_template

# Names of the tensors with one row per token (mergekit's architectures mark them is_embed).
EMBED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
                  "word_embeddings.weight", "tok_embeddings.weight", "output.weight", "shared.weight",
                  "lm_head.decoder.weight", "lm_head.linear.weight", "vocab_projector.weight",
                  "output_layer.weight", "backbone.embeddings.weight")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from mergelaws import models

    models.quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise models.ModelError(f"the tokenizer of {path} could not be loaded ({first}); give a model directory "
                                f"with tokenizer files") from None


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(f.name.startswith("tokenizer") for f in p.iterdir())


def _config_vocab_size(path: str) -> int | None:
    """The ``vocab_size`` of a model's config (a text_config's for multimodal ones), None if absent."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None
    size = getattr(cfg, "vocab_size", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = getattr(cfg.get_text_config(), "vocab_size", None)
    return int(size) if size is not None else None


@dataclass
class _VocabMap:
    """Embedding rows by token string, for an explicit ``tokenizer_source`` (mergekit's
    PermutedEmbeddings): ``index[path][t]`` is the row of output token ``t`` in that model's
    tensors, -1 where the model lacks the token."""

    size: int  # output vocabulary length = rows of every vocab tensor
    names: list[str]  # the tensors with one row per token
    index: dict[str, torch.Tensor]  # model path -> int64 [size]; the base first
    base: str
    tokenizer: str  # where the output tokenizer comes from

    def shape(self, n: str, base) -> tuple[int, ...]:
        return (self.size, *base.shape(n)[1:])

    def check(self, path: str, n: str, shape, base_shape) -> None:
        from mergelaws import models

        need = int(self.index[path].max()) + 1 if self.size else 0
        if len(shape) != len(base_shape) or tuple(shape[1:]) != tuple(base_shape[1:]) or shape[0] < need:
            raise models.ModelError(f"model {path} has shape {tuple(shape)} for {n} but its tokenizer needs >= {need} "
                                    f"rows of {tuple(base_shape[1:])} (the base: {tuple(base_shape)}); was it "
                                    f"fine-tuned from this base?")

    def gather(self, n: str, sources: dict, models: list[str], deltas: torch.Tensor) -> torch.Tensor:
        """Tensor ``n`` with one row per output token: returns the base's (fp32) and writes the
        task vectors of ``models`` into ``deltas`` [k, size, ...]. A model's row is its own where
        it has the token, else mergekit's default: the one model that has it, else the base's row,
        else the mean over the models that have it (zeros if none has it). The base lacks a
        token only when the default is not its own row, so its tensor is the default itself."""
        width = tuple(sources[self.base].shape(n)[1:])
        total = torch.zeros((self.size, *width), dtype=torch.float32)
        count = torch.zeros(self.size, dtype=torch.float32)
        for p, idx in self.index.items():  # the base first
            have = idx >= 0
            total[have] += sources[p].get(n)[idx[have]].float()
            count += have
        b = total.div_(count.clamp_min(1).view(-1, *([1] * len(width))))
        base_idx = self.index[self.base]
        has = base_idx >= 0
        b[has] = sources[self.base].get(n)[base_idx[has]].float()
        for i, m in enumerate(models):
            idx = self.index[m]
            have = idx >= 0
            deltas[i].copy_(b)
            deltas[i][have] = sources[m].get(n)[idx[have]].float()
            deltas[i].sub_(b)
        return b


def _vocab_map(plan: MergePlan, paths: list[str], base, names: list[str], log) -> _VocabMap:
    """The output vocabulary and every model's rows for it (mergekit's tokenizer/build.py)."""
    from mergelaws import models

    base_tok = _load_tokenizer(plan.base_model)
    base_vocab = dict(base_tok.get_vocab())
    base_size = _config_vocab_size(plan.base_model) or len(base_vocab)
    beyond = sum(1 for i in base_vocab.values() if i >= base_size)
    if beyond and plan.tokenizer_source == "base":  # for another source they are tokens the base lacks
        raise MergeYamlError(f"tokenizer_source = 'base': base_model {plan.base_model} has {beyond} tokenizer tokens "
                             f"at ids >= its vocab_size {base_size}; mergekit strips those from the tokenizer (run "
                             f"mergekit-yaml), or give a tokenizer_source whose tokenizer fits")
    if plan.tokenizer_source == "base":
        source, out_vocab = plan.base_model, base_vocab
    else:
        source = plan.tokenizer_source
        out_vocab = dict(_load_tokenizer(source).get_vocab())
    size = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(size)):
        raise MergeYamlError(f"tokenizer_source = {plan.tokenizer_source!r}: the tokenizer of {source} has ids "
                             f"that are not 0..{size - 1} (gaps or duplicates); give another tokenizer_source or "
                             f"run mergekit-yaml")
    tokens = [None] * size
    for tok, i in out_vocab.items():
        tokens[i] = tok
    vocab_names = [n for n in names if n.endswith(EMBED_SUFFIXES) and len(base.shape(n)) == 2
                   and base.shape(n)[0] == base_size]
    if not vocab_names:
        raise models.ModelError(f"tokenizer_source: no embedding tensor of base_model {plan.base_model} has its "
                                f"vocab_size {base_size} rows; drop tokenizer_source, or run mergekit-yaml")
    index = {}
    for p in paths:
        if p == plan.base_model:
            vocab, limit = base_vocab, base_size
        else:
            if _has_tokenizer(p) or not Path(p).is_dir():
                vocab = dict(_load_tokenizer(p).get_vocab())
            else:  # as mergekit: a model without a tokenizer is assumed to share the base's
                log(f"merge: {p} has no tokenizer; assuming the base's vocabulary for its embedding rows")
                vocab = base_vocab
            limit = _config_vocab_size(p) or len(vocab)
        index[p] = torch.tensor([i if (i := vocab.get(t, -1)) < limit else -1 for t in tokens], dtype=torch.int64)
    moved = [p for p in paths if not torch.equal(index[p], torch.arange(size))]
    log(f"merge: tokenizer_source {plan.tokenizer_source}: {size} tokens from {source}; rows of "
        f"{', '.join(vocab_names)} taken by token string ({len(moved)} of {len(paths)} models with tokens "
        f"reordered or missing, the others cut to the first {size} rows"
        f"{'' if size == base_size else f'; vocab_size {base_size} -> {size}'})")
    return _VocabMap(size=size, names=vocab_names, index=index, base=plan.base_model, tokenizer=source)


def _resolve_chat_template(plan: MergePlan, log) -> str | None:
    """The chat template text to write, or None (none asked, or ``auto`` found none)."""
    value = plan.chat_template
    if value is None:
        return None
    target = plan.tokenizer_source if plan.tokenizer_source not in (None, "base") else plan.base_model
    if Path(target).is_dir() and not _has_tokenizer(target):
        raise MergeYamlError(f"chat_template is set but {target} has no tokenizer files to carry it; add the "
                             f"tokenizer, set tokenizer_source, or drop chat_template")
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    found = []
    for p in dict.fromkeys([plan.base_model, *plan.models]):
        if Path(p).is_dir() and not _has_tokenizer(p):
            continue
        try:
            template = _load_tokenizer(p).chat_template
        except (OSError, ValueError):
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    if not found:
        log("merge: chat_template auto: no input has a chat template; the tokenizer is left as it is")
        return None
    counts = Counter(found)
    best = max(counts.values())
    chosen = next(t for t in found if counts[t] == best)  # ties: the first in YAML order, base first
    log(f"merge: chat_template auto: the template of {best} of {len(found)} inputs with one")
    return chosen


def _write_chat_template(out: Path, template: str) -> None:
    """``template`` as the output tokenizer's chat template: ``chat_template.jinja`` (which
    transformers >= 4.50 reads first) and the ``chat_template`` of tokenizer_config.json (older)."""
    (out / "chat_template.jinja").write_text(template)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class _SafetensorsWriter:
    """Writes a safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets)
    first, then each tensor's bytes as it is produced, so the whole state dict never exists."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order = sorted(layout)
        for n in self._order:
            dtype, shape = layout[n]
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[n] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self._header, self.nbytes = header, offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if name != self._order[self._next]:
            raise RuntimeError(f"tensor {name} written out of order (expected {self._order[self._next]})")
        info = self._header[name]
        if _ST_NAMES[t.dtype] != info["dtype"] or list(t.shape) != info["shape"]:
            raise RuntimeError(f"tensor {name}: {t.dtype} {tuple(t.shape)} does not match the header")
        if t.numel():
            self._fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} tensors were not written")
        self._fh.close()


def _run_merge_in_memory(plan: MergePlan, out, *, seed: int, device: str, allow_bin: bool, log, t0: float,
                         template: str | None = None) -> MergePlan:
    """The whole-model path, for a base that is not a local safetensors directory (a hub id or
    .bin weights): every model is loaded through transformers. ``template``: the chat template
    to write (from _resolve_chat_template)."""
    from mergelaws import models

    model = models.load_model(plan.base_model, "float32", device, allow_bin=allow_bin)
    live = models.float_state(model)
    base_state = {n: p.detach().float().clone() for n, p in live.items()}
    experts = []
    for path in plan.models:
        em = models.load_model(path, "float32", "cpu", allow_bin=allow_bin)
        models.check_compatible(model, em, path)
        experts.append({n: p.detach().float().to(device) for n, p in models.float_state(em).items()})
        del em
    merged = merge_states(plan, base_state, experts, seed=seed)
    with torch.no_grad():
        for n, p in live.items():
            p.copy_(merged[n])
    if plan.out_dtype is not None:
        model = model.to(DTYPES[plan.out_dtype])
    model = model.to("cpu")
    record = {"mergelaws_merge": plan.describe(), "seed": seed, "config": plan.raw}
    tokenizer = None
    if template is not None and not Path(plan.base_model).is_dir():  # a hub id: its tokenizer carries the template
        tokenizer = _load_tokenizer(plan.base_model)
        tokenizer.chat_template = template
    with atomic_path(out, is_dir=True) as tmp:  # as models.save_model, plus the chat template
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif Path(plan.base_model).is_dir():
            models.copy_tokenizer(plan.base_model, tmp)
            if template is not None:
                _write_chat_template(Path(tmp), template)
        (Path(tmp) / "mergelaws_merge.json").write_text(
            json.dumps(json.loads(json.dumps(record, default=str)), indent=2, sort_keys=True) + "\n")
    log(f"merge {plan.method}: {len(plan.models)} models -> {out} in {time.time() - t0:.1f}s (loaded whole: the "
        f"base is not a local safetensors directory; peak memory about {len(plan.models) + 2} models in fp32)")
    return plan


def cmd_merge(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_merge(args.config, args.out, seed=args.seed, device=args.device, allow_bin=args.allow_bin)
