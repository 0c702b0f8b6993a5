"""Load and validate config.yaml against the JSON schema, with defaults and clear errors."""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mergelaws.errors import ConfigError, one_line  # noqa: F401  (raised here and re-exported; one base for the CLI)

SCHEMA_FILE = "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
    text = resources.files("mergelaws.schemas").joinpath(SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


def schema_path() -> Path:
    return Path(str(resources.files("mergelaws.schemas").joinpath(SCHEMA_FILE)))


METHOD_DEFS_HEADER = "  # Method parameters: must equal mergelaws.merging.params_json_schema(<name>)"


def regenerate_method_defs() -> Path:
    """Rewrite the schema's method_* definitions from the merge registry (`mergelaws schema`)."""
    from mergelaws import merging as merge

    path = schema_path()
    text = path.read_text()
    head = text[: text.index(METHOD_DEFS_HEADER)]
    defs = {f"method_{n}": merge.params_json_schema(n) for n in merge.method_names()}
    body = yaml.safe_dump(defs, sort_keys=False, width=100)
    body = "\n".join("  " + line if line else line for line in body.splitlines())
    path.write_text(f"{head}{METHOD_DEFS_HEADER}\n  # (regenerate with `mergelaws schema`; tests/test_config.py checks).\n{body}\n")
    schema.cache_clear()
    return path


def _with_defaults(validator_class):
    """A validator that fills in `default` values (as snakemake.utils.validate does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


#: Keys that older versions took, with what replaces them (named in the unknown-key message).
REMOVED_KEYS = {
    "input_template": "it was removed: every example is rendered by the base tokenizer's own chat template "
                      "(system_prompt sets its system turn); delete it",
}


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into one sentence naming the key and what is allowed."""
    key = _key(error)
    sch = error.schema if isinstance(error.schema, dict) else {}
    v = error.validator
    if v == "additionalProperties":
        allowed = sorted(sch.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        where = "the top level" if key == "(top level)" else f"'{key}'"
        hints = [f"{e}: {REMOVED_KEYS[e]}" for e in extra if e in REMOVED_KEYS]
        if hints:
            return f"unknown key {', '.join(repr(e) for e in extra)} under {where}; " + "; ".join(hints)
        return (f"unknown key {', '.join(repr(e) for e in extra)} under {where}; "
                f"allowed keys: {', '.join(allowed)}")
    if v == "enum":
        return f"{key} = {error.instance!r} is not allowed; choose one of {sch['enum']}"
    if v == "required":
        return f"{key}: {error.message}; add it to the config"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bounds = []
        for name, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                         ("maximum", "<="), ("exclusiveMaximum", "<")):
            if name in sch:
                bounds.append(f"{op} {sch[name]}")
        return f"{key} = {error.instance!r} is out of range; allowed: {' and '.join(bounds)}"
    if v == "type":
        return f"{key} = {error.instance!r} has the wrong type; expected {sch.get('type')}"
    if v == "propertyNames":
        return f"{key}: name {error.instance!r} is not allowed ({error.message})"
    if v in ("oneOf", "anyOf"):
        return f"{key} = {error.instance!r} does not match any allowed form: {error.message}"
    return f"{key}: {error.message}"


def validate(cfg: dict, *, resolve_methods: bool = True) -> dict:
    """Validate (in place, filling defaults) and run the semantic checks; return cfg."""
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        # the deepest, most specific error first is usually best; report all briefly
        best = jsonschema.exceptions.best_match(errors)
        others = [_describe(e) for e in errors if e is not best]
        msg = "invalid config: " + _describe(best)
        if others:
            msg += "\n  also: " + "\n  also: ".join(others[:5])
        raise ConfigError(msg)
    _semantic_checks(cfg, resolve_methods)
    return cfg


def _check_adaptive(cfg: dict) -> None:
    """sampler: adaptive decides from all the rows of a k, which one sweep job must hold."""
    for size, spec in cfg["bases"].items():
        sweep = {**cfg["sweep"], **(spec.get("sweep") or {})}
        if sweep.get("sampler") == "adaptive" and int(sweep.get("shards", 1)) > 1:
            where = f"bases.{size}.sweep" if (spec.get("sweep") or {}).keys() & {"sampler", "shards"} else "sweep"
            raise ConfigError(f"{where}.sampler = adaptive needs one sweep job per (size, method) but "
                              f"{where}.shards = {sweep['shards']}; set shards: 1 or use sampler: uniform")


def _semantic_checks(cfg: dict, resolve_methods: bool = True) -> None:
    n_domains = len(cfg["domains"])
    ks = cfg["sweep"]["k"]
    if ks != "all":
        too_big = [k for k in ks if k > n_domains]
        if too_big:
            raise ConfigError(
                f"sweep.k = {too_big} is larger than the number of domains ({n_domains}); "
                f"use values 0..{n_domains} or 'all'")
    _check_adaptive(cfg)
    _check_own_experts(cfg)
    if not resolve_methods:  # fit, figures, plan: method names only, no torch (envs/fit.yaml)
        return
    from mergelaws import merging as merge

    for name, params in cfg["methods"].items():
        try:
            cfg["methods"][name] = merge.resolve_params(name, params or {})
        except ValueError as exc:
            raise ConfigError(f"methods.{name}: {exc}") from None


def _check_own_experts(cfg: dict) -> None:
    """bases.<size>.experts: every domain is one of `domains:`; a local path exists and is a model
    directory (an ``org/name`` string with no such directory is a hub id, not checked here)."""
    from mergelaws import grid

    for size, spec in cfg["bases"].items():
        for domain, path in (spec.get("experts") or {}).items():
            key = f"bases.{size}.experts.{domain}"
            if domain not in cfg["domains"]:
                raise ConfigError(f"{key}: '{domain}' is not one of the domains ({', '.join(cfg['domains'])}); "
                                  f"add it under `domains:` (with its train/eval data) or remove this entry")
            if grid.looks_like_hub_id(path):
                continue
            p = Path(path)
            if not p.is_dir():
                what = "is not a directory" if p.exists() else "does not exist"
                raise ConfigError(f"{key} = {path!r} {what}; give a local Hugging Face model directory or a "
                                  f"hub id 'org/name'")
            if not (p / "config.json").is_file():
                raise ConfigError(f"{key} = {path!r} has no config.json; give a Hugging Face model directory "
                                  f"(save_pretrained output) or a hub id 'org/name'")
            trained = Path(grid.results_dir(cfg)) / "experts" / size / domain
            if p.resolve() == trained.resolve():
                raise ConfigError(f"{key} = {path!r} is where rule train writes this expert; move your model "
                                  f"elsewhere and point the entry there")


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _strict_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in the same "
                              f"mapping (first on line {seen[key]}); every key, domain and size must be unique")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: str | Path) -> dict:
    """Parse a config file strictly (duplicate keys are errors), naming the file in errors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass the path of your config.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file (a directory?); pass the path of your config.yaml")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is YAML text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or one_line(exc)
        raise ConfigError(f"{path} is not valid YAML{where} ({what}); fix the file's syntax") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of keys at the top level")
    return cfg


def load(path: str | Path, overrides: dict | None = None, *, resolve_methods: bool = True) -> dict:
    """Read a YAML config file, apply overrides (dotted keys), validate and fill defaults."""
    path = Path(path)
    cfg = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        return validate(cfg, resolve_methods=resolve_methods)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


RULE_OVERRIDES = ("train", "sweep", "pretrain")


def base_resources(cfg: dict, rule: str, size: str | None = None) -> dict[str, Any]:
    """Resources for a rule: resources.default < resources.<rule> < bases.<size>.resources <
    bases.<size>.resources.<rule> (so a 72B expert can ask for nodes its sweep does not need)."""
    def flat(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if k not in RULE_OVERRIDES}

    res = flat(cfg["resources"].get("default", {}))
    res.update(flat(cfg["resources"].get(rule, {})))
    if size is not None:
        per_size = cfg["bases"][size].get("resources", {})
        res.update(flat(per_size))
        res.update(flat(per_size.get(rule, {})))
    return res


GROWING_RESOURCES = ("mem_mb", "runtime")


def resource(cfg: dict, rule: str, size: str | None, key: str, default: Any, attempt: int = 1) -> Any:
    """One resource of a rule's job at a given Snakemake attempt.

    Memory and time grow linearly with the attempt (a job that ran out of either gets twice as
    much on its first retry, three times on its second ...), capped by ``max_mem_mb`` /
    ``max_runtime`` when set; other resources stay as configured.
    """
    spec = base_resources(cfg, rule, size)
    value = spec.get(key, default)
    if key in GROWING_RESOURCES:
        grown = value * max(1, int(attempt))
        return min(grown, spec.get(f"max_{key}", grown))
    return value
