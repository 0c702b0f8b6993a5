"""The merge-method registry: every method's name, parameters, defaults and allowed ranges.

The registry is the single source of truth for the method names, their parameters, defaults and
allowed ranges, and (:class:`MergekitForm`) how mergekit computes each. The CLI, the config schema
(:func:`params_json_schema`), the Snakefile, the mergekit YAML front end and the tests all read it.

A method is one pure tensor function, registered once with :func:`register` in the module of its
family (:mod:`~mergelaws.merging.linear`, :mod:`~mergelaws.merging.ties`,
:mod:`~mergelaws.merging.dare`, :mod:`~mergelaws.merging.gta`,
:mod:`~mergelaws.merging.model_stock`, :mod:`~mergelaws.merging.fourier`); :mod:`mergelaws.merging`
imports them in that order, which is the order of :func:`method_names`.

A *task-aware* method (``expert=`` in :func:`register`, e.g. free_merging) also names a function
``expert(v, **params)`` turning ONE expert's raw task vector of one tensor into a sparse
lightweight expert (zeros elsewhere): the sweep adds the eval domain's own one to the merged
weights while it evaluates that domain, when that domain's expert is in the merged subset
(:meth:`mergelaws.merging.SubsetMerger.task_expert`). The merge itself (``fn``) knows no task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from mergelaws.errors import MethodError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["SCALE_DOC", "Param", "MergekitForm", "MergeMethod", "UnknownMethodError", "REGISTRY", "METHODS",
           "register", "method_names", "get_method", "resolve_params", "params_json_schema"]

# The doc of every method's ``scale`` parameter, completed per method.
SCALE_DOC = "overall coefficient c (lambda) multiplying the combined task vector"


@dataclass(frozen=True)
class Param:
    """One method parameter: type, default, allowed range or choices."""

    name: str
    kind: type  # float | int | str | bool
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value > low; False: value >= low
    high_open: bool = False  # True: value < high; False: value <= high
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        kind = "integer" if self.kind is int else "number"
        if self.low is None and self.high is None:
            return f"any {kind}"
        parts = []
        if self.low is not None:
            parts.append(f"{_fmt(self.low)} {'<' if self.low_open else '<='} ")
        parts.append(self.name)
        if self.high is not None:
            parts.append(f" {'<' if self.high_open else '<='} {_fmt(self.high)}")
        return "".join(parts)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class MergekitForm:
    """How mergekit 0.1.5 computes a method (``mergelaws merge``, :mod:`mergelaws.merging.mergekit`):
    per model ``s_i = sparsify(v_i)``, then ``combine_deltas(s, w, consensus=, normalize=)`` with
    mergekit's per-model weights ``w_i``. A YAML's ``merge_method`` is a registry name or one of
    mergekit's names in :data:`mergelaws.merging.mergekit_config.ALIASES`, which may change
    ``consensus`` and ``normalize``."""

    sparsify: str | None  # None | "magnitude" | "random" | "outliers" | "della" | "fourier"
    consensus: bool  # TIES's sign election before the (weighted) sum
    normalize: bool  # the default of mergekit's ``normalize``
    rescale: bool  # the default of mergekit's ``rescale`` (its L1 rescale)
    model_keys: tuple[str, ...]  # the per-model parameters (weight, density, gamma, epsilon)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]
    params: dict[str, Param]
    doc: str
    stochastic: bool
    mergekit: MergekitForm | None = None  # None: not offered by the mergekit YAML front end
    # task-aware methods: expert(v [one expert's task vector of one tensor], **params) -> sparse expert
    expert: Callable[..., Tensor] | None = None

    @property
    def task_aware(self) -> bool:
        return self.expert is not None


class UnknownMethodError(MethodError):
    """A merge method name the registry does not know (the message lists the known ones)."""


REGISTRY: dict[str, MergeMethod] = {}
METHODS = REGISTRY  # the same dict, under the name callers of mergelaws.merging look up


def register(name: str, params: list[Param] | tuple[Param, ...], doc: str, stochastic: bool = False,
             mergekit: MergekitForm | None = None, expert: Callable[..., Tensor] | None = None):
    """Decorator registering ``fn(deltas, *, seed, **params) -> merged delta``; ``mergekit``: the
    method's form in mergekit's YAML (see :class:`MergekitForm`); ``expert``: makes the method
    task-aware (see the module doc)."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        table = {p.name: p for p in params}
        if len(table) != len(params):
            raise ValueError(f"merge method {name!r}: duplicate parameter names")
        for p in params:  # the defaults must pass their own validation
            _check_value(name, p, p.default)
        REGISTRY[name] = MergeMethod(name, fn, table, doc, stochastic, mergekit, expert)
        return fn

    return deco


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown merge method {name!r}; valid methods: {', '.join(method_names())}"
        ) from None


def _check_value(method: str, p: Param, value: Any) -> Any:
    """Return ``value`` converted to ``p.kind``; raise ValueError if not allowed."""
    where = f"{method}.{p.name} = {value!r}"
    if p.kind is bool:
        ok = isinstance(value, bool)
    elif p.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif p.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, p.kind)
    if not ok:
        raise ValueError(
            f"{where} has the wrong type ({type(value).__name__}, expected "
            f"{p.kind.__name__}); allowed: {p.allowed()}"
        )
    if p.kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where} is not finite; allowed: {p.allowed()}")
    if p.choices is not None and value not in p.choices:
        raise ValueError(f"{where} is not a valid choice; allowed: {p.allowed()}")
    if p.low is not None and (value <= p.low if p.low_open else value < p.low):
        raise ValueError(f"{where} is out of range; allowed: {p.allowed()}")
    if p.high is not None and (value >= p.high if p.high_open else value > p.high):
        raise ValueError(f"{where} is out of range; allowed: {p.allowed()}")
    return value


def resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``params`` for method ``name`` and fill in the defaults.

    Unknown parameters, wrong types and out-of-range values raise ValueError
    naming the method, the parameter, the value and what is allowed.
    """
    method = get_method(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(method.params) or '(none)'}"
        )
    return {
        p.name: _check_value(name, p, params.get(p.name, p.default))
        for p in method.params.values()
    }


def params_json_schema(name: str) -> dict[str, Any]:
    """JSON-schema fragment (an object) for the parameters of method ``name``."""
    method = get_method(name)
    props: dict[str, Any] = {}
    for p in method.params.values():
        s: dict[str, Any] = {"description": p.doc, "default": p.default}
        if p.choices is not None:
            s["type"] = "string"
            s["enum"] = list(p.choices)
        elif p.kind is bool:
            s["type"] = "boolean"
        elif p.kind is str:
            s["type"] = "string"
        else:
            s["type"] = "integer" if p.kind is int else "number"
            if p.low is not None:
                s["exclusiveMinimum" if p.low_open else "minimum"] = p.low
            if p.high is not None:
                s["exclusiveMaximum" if p.high_open else "maximum"] = p.high
        props[p.name] = s
    return {
        "type": "object",
        "description": method.doc,
        "properties": props,
        "additionalProperties": False,
    }
