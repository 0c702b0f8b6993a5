"""The mergekit YAML of ``mergelaws merge``, validated into a :class:`MergePlan`.

A ``merge_method`` is a registry method (:func:`mergelaws.merging.method_names`) that has a
mergekit form (:class:`mergelaws.merging.MergekitForm`, declared with the method), or one of
mergekit's own names in :data:`ALIASES`, the only table of names here. The semantics and the
supported keys are in :mod:`mergelaws.merging.mergekit`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergelaws.errors import ConfigError, one_line
from mergelaws.merging.registry import REGISTRY, MergekitForm

__all__ = ["MergeYamlError", "ALIASES", "merge_method_names", "mergekit_form", "MergePlan", "parse_config",
           "load_config", "CHAT_TEMPLATES", "DTYPES"]


class MergeYamlError(ConfigError):
    """A mergekit YAML problem, naming the key and the fix."""


# mergekit's merge_method names that are not the registry's: the registry method each names and
# what it changes in that method's mergekit form (average and dare are mergekit's names too)
ALIASES: dict[str, tuple[str, dict[str, bool]]] = {
    "linear": ("average", {}),
    "dare_linear": ("dare", {}),
    "breadcrumbs_ties": ("breadcrumbs", {"consensus": True}),
    "della_linear": ("della", {"consensus": False, "normalize": False}),
    "fourier": ("fr_merging", {}),  # the FREE-Merging repository's mergekit fork
}


def merge_method_names() -> list[str]:
    """Every accepted ``merge_method``: the registry's methods with a mergekit form, then ALIASES."""
    return [*(n for n, m in REGISTRY.items() if m.mergekit is not None), *ALIASES]


def mergekit_form(name: str) -> tuple[str, MergekitForm]:
    """The registry method that ``merge_method: name`` merges with, and its mergekit form."""
    method, changes = ALIASES.get(name, (name, {}))
    entry = REGISTRY.get(method)
    if entry is None or entry.mergekit is None:
        raise MergeYamlError(f"merge_method = {name!r} is not supported; supported: "
                             f"{', '.join(merge_method_names())}")
    return method, dataclasses.replace(entry.mergekit, **changes)


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
    method: str  # the registry method (a mergekit name resolved through ALIASES)
    base_model: str
    models: list[str]
    weights: list[float]
    per_model: dict[str, list[float]]  # density / gamma / epsilon per model
    normalize: bool
    rescale: bool
    consensus: bool  # sign consensus in the combine step (the method's, or the alias's)
    lam: float
    filter_wise: bool = False
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # None | "base" | a model path or id
    chat_template: str | None = None  # None | "auto" | a CHAT_TEMPLATES name | Jinja text
    raw: dict = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"merge_method": self.method, "base_model": self.base_model, "models": self.models,
                "weights": self.weights, **self.per_model, "normalize": self.normalize,
                "rescale": self.rescale, "consensus": self.consensus, "lambda": self.lam,
                "filter_wise": self.filter_wise, "out_dtype": self.out_dtype, "tokenizer_source": self.tokenizer_source,
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
        raise MergeYamlError("merge_method is missing; one of " + ", ".join(merge_method_names()))
    method, spec = mergekit_form(name)
    tokenizer_source = _tokenizer_source(raw.get("tokenizer_source"))
    chat_template = _chat_template(raw.get("chat_template"))
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeYamlError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    shared = raw.get("parameters") or {}
    if not isinstance(shared, dict):
        raise MergeYamlError("parameters must be a mapping")
    shared_keys = {"normalize", "rescale", "lambda", "int8_mask"} if method != "model_stock" else {"filter_wise"}
    if method == "average":  # mergekit's linear
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
    if method == "average" and base is None:
        base = models[0]
    elif method == "average" and isinstance(base, str) and base not in models:
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
    if name == "della":  # not della_linear: sparsify_della checks it as it merges (density + epsilon <= 1)
        for j, (d, e) in enumerate(zip(per_model["density"], per_model["epsilon"])):
            if d < 1.0 and (d - e <= 0.0 or d + e >= 1.0):
                raise MergeYamlError(f"models[{j}]: density = {d!r}, epsilon = {e!r}: density +- epsilon must lie "
                                     f"in (0, 1) (as mergekit)")
    if "density" in per_model and method in ("ties", "breadcrumbs"):  # breadcrumbs_ties too
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
        consensus=spec.consensus, lam=_number(shared.get("lambda", 1.0), "parameters.lambda"),
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
        raise MergeYamlError(f"merge config {path} does not exist; pass a mergekit-format YAML file")
    if not path.is_file():
        raise MergeYamlError(f"merge config {path} is not a file (a directory?); pass a mergekit-format YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MergeYamlError(f"merge config {path} is not a text file; pass a mergekit-format YAML file") from None
    except yaml.YAMLError as exc:
        raise MergeYamlError(f"merge config {path} is not valid YAML ({one_line(exc)})") from None
    return parse_config(raw)
