"""Merge methods: one pure tensor function per method, registered once.

The registry is the single source of truth for the method names, their
parameters, defaults and allowed ranges. The CLI, the config schema
(:func:`params_json_schema`), the Snakefile and the tests all read it.

Every method follows the paper's Eq. 2 and works on task vectors
``v_i = theta_i - theta_0`` of ONE tensor for the k merged experts::

    merged_delta = merge_deltas(name, deltas[k, *shape], params, seed=...)
    theta        = theta_0 + merged_delta

Arithmetic is float32 whatever the storage dtype (the official code forms task
vectors in bf16 and loses precision on small deltas; we do not copy that).

Where the paper (arXiv 2509.24244) and its code disagree, the choice is an
explicit named parameter whose doc says which source each value follows; see
``/work/shared/PAPER.md`` section 2 ("Merge methods") and section 5.2.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Param",
    "MergeMethod",
    "REGISTRY",
    "UnknownMethodError",
    "register",
    "method_names",
    "get_method",
    "resolve_params",
    "params_json_schema",
    "tensor_seed",
    "ties_keep_count",
    "kth_smallest",
    "merge_deltas",
    "merge_state_dicts",
    "CheckpointError",
    "SafetensorsSource",
    "DictSource",
    "RowCutSource",
    "SUM_METHODS",
    "sum_coefficient",
    "reuse_order",
    "MergeCost",
    "SubsetMerger",
    "merge_memory_estimate",
]


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


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
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]
    params: dict[str, Param]
    doc: str
    stochastic: bool


class UnknownMethodError(ValueError):
    pass


REGISTRY: dict[str, MergeMethod] = {}


def register(name: str, params: list[Param] | tuple[Param, ...], doc: str, stochastic: bool = False):
    """Decorator registering ``fn(deltas, *, seed, **params) -> merged delta``."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        table = {p.name: p for p in params}
        if len(table) != len(params):
            raise ValueError(f"merge method {name!r}: duplicate parameter names")
        for p in params:  # the defaults must pass their own validation
            _check_value(name, p, p.default)
        REGISTRY[name] = MergeMethod(name, fn, table, doc, stochastic)
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


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------


def tensor_seed(seed: int, subset_id: str, tensor_name: str) -> int:
    """Stable 63-bit seed for one tensor of one merged subset (sha256, not hash())."""
    key = f"{int(seed)}\x1f{subset_id}\x1f{tensor_name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2**63 - 1)


# --------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------

_SCALE_DOC = "overall coefficient c (lambda) multiplying the combined task vector"


@register(
    "average",
    params=[Param("scale", float, 1.0, _SCALE_DOC + " (Table 1: c = 1)", low=0.0, low_open=True)],
    doc="Average: theta_0 + c * mean_i(v_i). With c = 1 this equals the mean of the "
    "expert weights (the official average_merging).",
)
def _average(deltas: Tensor, *, scale: float, **_: Any) -> Tensor:
    return deltas.mean(0) * scale


@register(
    "task_arithmetic",
    params=[
        Param(
            "scale", float, 0.8,
            _SCALE_DOC + " (Table 1 / Sec 3.3.4: c = 0.8 with alpha = 1/k)",
            low=0.0, low_open=True,
        ),
        Param(
            "combine", str, "mean",
            "'mean': theta_0 + scale * mean(v) (the paper's text, Table 1); "
            "'sum': theta_0 + scale * sum(v) (the official code; pass scale = 0.8/k "
            "to match the paper)",
            choices=("mean", "sum"),
        ),
    ],
    doc="Task Arithmetic: theta_0 + scale * combine(v). Default = the paper's "
    "Table 1 (0.8 * mean); combine='sum' reproduces the official code.",
)
def _task_arithmetic(deltas: Tensor, *, scale: float, combine: str, **_: Any) -> Tensor:
    combined = deltas.mean(0) if combine == "mean" else deltas.sum(0)
    return combined * scale


TIES_KEEP_ROUNDING = ("half_up", "floor")


def ties_keep_count(density: float, numel: int, rounding: str = "half_up") -> int:
    """Entries TIES keeps per model, in [1, numel].

    ``rounding='half_up'`` (the registry's rule, the default): round-half-up(density * numel),
    rather than ceil so that float noise (0.2 * 10 = 2.0000000000000004) cannot add an entry.
    ``'floor'``: ``int(density * numel)``, the Python float product truncated, as mergekit's
    ``sparsify.magnitude`` (0.29 * 100 = 28.999999999999996 keeps 28); where that is 0
    mergekit stops with an assertion and this keeps 1.
    """
    if rounding == "half_up":
        return min(numel, max(1, math.floor(density * numel + 0.5)))
    if rounding == "floor":
        return min(numel, max(1, int(density * numel)))
    raise ValueError(f"TIES keep-count rounding {rounding!r}: one of {', '.join(TIES_KEEP_ROUNDING)}")


# Blockwise elementwise work. A fresh full-size temporary costs a page fault per 4 KiB on first
# touch (several times the arithmetic on a CPU); the fast paths below walk large tensors in
# blocks of _BLOCK entries whose temporaries the allocator recycles and the caches hold. Only
# elementwise operations (and sequential per-entry sums) are blocked, so every entry is computed
# by exactly the same operations as on the whole tensor: results are bit-identical.
_BLOCK = 1 << 18


def _blocks(n: int, block: int | None = None):
    block = block or _BLOCK
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


def _all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()``: a finite sum proves it (a NaN or inf entry makes the sum
    non-finite) at ~0.2 ns an entry, where isfinite(...).all() takes ~6; only a non-finite sum
    (a non-finite entry, or an overflow) pays for the exact check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _where0(mask: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.where(mask, v, 0.0)``, bit for bit (NaNs and signed zeros included), as an AND of
    ``v``'s bits with 0 / all-ones: ~0.3 ns an entry where torch.where takes ~5 on a CPU."""
    if not v.is_contiguous() or v.shape != mask.shape:
        res = torch.where(mask, v, 0.0)
        return res if out is None else out.copy_(res)
    it = _INT_VIEW[v.element_size()]
    bits = mask.to(it).neg_()  # 0 -> 0, 1 -> -1 (all bits set)
    if out is None:
        return torch.bitwise_and(v.view(it), bits).view(v.dtype)
    torch.bitwise_and(v.view(it), bits, out=out.view(it))
    return out


# Exact selection. torch.kthvalue copies its input and runs a quickselect, ~35 ns per entry on
# one CPU thread; a strided sample brackets the k-th value, one blockwise pass counts the
# entries below the bracket and gathers the few inside it, and kthvalue runs on those only.
# The value found is always exact (checked by the counts; otherwise the full kthvalue runs),
# so every method that uses it is bit-identical to the plain kthvalue.
_SELECT_MIN = 1 << 16  # below this, kthvalue directly
_SELECT_SAMPLE = 1 << 16


def kth_smallest(x: Tensor, r: int, *, absolute: bool = False) -> tuple[Tensor, int, int]:
    """``(t, n_lt, n_eq)``: ``t`` = the ``r``-th smallest entry (1-based) of ``x`` flattened (of
    ``|x|`` with ``absolute``), the value ``torch.kthvalue`` returns, and the counts of entries
    ``< t`` and ``== t``.

    O(n): a strided sample of ~65k entries gives a bracket [lo, hi] around rank ``r``; one
    blockwise pass counts the entries below ``lo`` and gathers those in [lo, hi]; ``kthvalue``
    runs on those. If they do not hold rank ``r`` (an unlucky sample, NaNs), it falls back to
    ``kthvalue`` on everything. NaNs rank last, as in ``kthvalue``.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if not 1 <= r <= n:
        raise ValueError(f"rank {r} out of range for {n} entries")
    if n >= _SELECT_MIN:
        # sample ~8 sqrt(n) entries (4k..64k): the sort stays small and so does the bracket
        step = max(1, n // min(_SELECT_SAMPLE, max(4096, int(8 * math.sqrt(n)))))
        sample = flat[::step]
        sample = torch.sort(sample.abs() if absolute else sample).values
        m = sample.numel()
        pos = (r - 0.5) / n * m
        margin = 5.0 * math.sqrt(max(m * (r / n) * (1.0 - r / n), 1.0)) + 2.0
        lo_i, hi_i = math.floor(pos - margin), math.ceil(pos + margin)
        lo = sample[lo_i] if lo_i >= 0 else None
        hi = sample[hi_i] if hi_i < m else None
        if lo is not None or hi is not None:
            n_below, parts = 0, []
            buf = torch.empty(min(n, _BLOCK), dtype=flat.dtype, device=flat.device) if absolute else None
            for sl in _blocks(n):
                a = torch.abs(flat[sl], out=buf[:sl.stop - sl.start]) if absolute else flat[sl]
                if lo is not None:
                    below = a < lo
                    n_below += int(torch.count_nonzero(below))
                    inside = below.logical_not_()
                    if hi is not None:
                        inside.logical_and_(a <= hi)
                    else:  # NaN >= lo is false: NaNs stay out, as when hi is given
                        inside.logical_and_(a == a)
                else:
                    inside = a <= hi
                parts.append(a[inside])
            cand = torch.cat(parts)
            if n_below < r <= n_below + cand.numel():
                t = torch.kthvalue(cand, r - n_below).values
                return t, n_below + int(torch.count_nonzero(cand < t)), int(torch.count_nonzero(cand == t))
    a = flat.abs() if absolute else flat
    t = torch.kthvalue(a, r).values
    return t, int(torch.count_nonzero(a < t)), int(torch.count_nonzero(a == t))


def _keep_by_abs(v: Tensor, out: Tensor, *, ge: Tensor | None = None, gt: Tensor | None = None,
                 le: Tensor | None = None, not_le: Tensor | None = None) -> Tensor:
    """``out = torch.where(mask, v, 0.0)`` with mask = (|v| >= ge) & (|v| > gt) & (|v| <= le)
    & ~(|v| <= not_le) (the bounds given; none: everything), computed blockwise; ``out`` must
    be contiguous."""
    if not out.is_contiguous():
        raise ValueError("_keep_by_abs needs a contiguous out")
    vf, of = v.reshape(-1), out.view(-1)
    n = vf.numel()
    buf = torch.empty(min(n, _BLOCK), dtype=vf.dtype, device=vf.device)
    for sl in _blocks(n):
        a = torch.abs(vf[sl], out=buf[:sl.stop - sl.start])
        mask = None
        for op, t in ((torch.ge, ge), (torch.gt, gt), (torch.le, le)):
            if t is not None:
                mask = op(a, t) if mask is None else mask.logical_and_(op(a, t))
        if not_le is not None:
            m = torch.le(a, not_le).logical_not_()
            mask = m if mask is None else mask.logical_and_(m)
        if mask is None:
            of[sl] = vf[sl]
        else:
            _where0(mask, vf[sl], out=of[sl])
    return out


def _keep_gt_and_first_ties(v: Tensor, out: Tensor, t: Tensor, n_keep: int,
                            n_lt_eq: tuple[int, int] | None = None) -> Tensor:
    """``out = torch.where(_keep_mask(|v|, t, n_keep), v, 0.0)``, blockwise; ``n_lt_eq``: the
    counts of |v| < t and == t (from kth_smallest), which give the count > t when v has no NaN."""
    vf, of = v.reshape(-1), out.view(-1)
    n = vf.numel()
    buf = torch.empty(min(n, _BLOCK), dtype=vf.dtype, device=vf.device)
    if n_lt_eq is not None and not math.isnan(float(vf.sum())):  # no NaN: every entry is <, == or > t
        n_gt = n - n_lt_eq[0] - n_lt_eq[1]
    else:
        n_gt = 0
        for sl in _blocks(n):
            n_gt += int(torch.count_nonzero(torch.abs(vf[sl], out=buf[:sl.stop - sl.start]) > t))
    left = n_keep - n_gt
    for sl in _blocks(n):
        a = torch.abs(vf[sl], out=buf[:sl.stop - sl.start])
        mask = a > t
        if left > 0:
            first = torch.nonzero(a == t).reshape(-1)[:left]
            mask[first] = True
            left -= first.numel()
        _where0(mask, vf[sl], out=of[sl])
    return out


def _keep_mask(absv: Tensor, threshold: Tensor, n_keep: int | None, tie_keep: int | None = None) -> Tensor:
    """Entries |v| > threshold, plus entries == threshold in flat-index order until
    ``n_keep`` are kept in all (per tensor), or the first ``tie_keep`` of them (global)."""
    keep = absv > threshold
    equal = absv == threshold
    quota = n_keep - int(torch.count_nonzero(keep)) if tie_keep is None else tie_keep
    if quota >= int(torch.count_nonzero(equal)):
        return keep | equal
    if quota <= 0:
        return keep
    flat = equal.reshape(-1)
    dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    first = flat & (flat.cumsum(0, dtype=dtype) <= quota)
    return keep | first.reshape(equal.shape)


def _trim(deltas: Tensor, density: float, thresholds: Tensor | None, tie_keep: Tensor | None,
          out: Tensor | None = None, keep_rounding: str = "half_up") -> Tensor:
    """Zero all but the top-``density`` entries by |v|, per model (row of ``deltas``).

    Per tensor (thresholds is None): keeps exactly ties_keep_count(density, numel,
    keep_rounding) entries (default round-half-up; 'floor' = mergekit's int(density * numel)),
    found with the O(n) selection :func:`kth_smallest`; entries tied at
    the threshold are kept in flat-index order until the count is reached.
    Global (thresholds given): keep |v| > thresholds[i] plus the first
    tie_keep[i] entries equal to it, as precomputed over all tensors by
    :func:`merge_state_dicts`. ``out`` (contiguous, may be ``deltas`` itself) receives the result.
    """
    if thresholds is None and density >= 1.0:
        return deltas if out is None or out is deltas else out.copy_(deltas)
    trimmed = torch.empty_like(deltas, memory_format=torch.contiguous_format) if out is None else out
    for i, v in enumerate(deltas):
        if thresholds is None:
            n = v.numel()
            n_keep = ties_keep_count(density, n, keep_rounding)
            t, n_lt, n_eq = kth_smallest(v, n - n_keep + 1, absolute=True)  # the n_keep-th largest
            if not torch.isnan(t):
                if n - n_lt == n_keep:  # no tie at t is cut: keep |v| >= t
                    _keep_by_abs(v, trimmed[i], ge=t)
                else:  # |v| > t, then entries == t in flat order up to the count
                    _keep_gt_and_first_ties(v, trimmed[i], t, n_keep, (n_lt, n_eq))
                continue
            absv = v.abs()
            mask = _keep_mask(absv, t, n_keep)
        else:
            absv = v.abs()
            t = thresholds[i].to(absv.device, absv.dtype)
            mask = _keep_mask(absv, t, None, int(tie_keep[i]) if tie_keep is not None else absv.numel())
        trimmed[i] = torch.where(mask, v, 0.0)
    return trimmed


def _majority(elected: Tensor) -> float:
    """+1 or -1: the sign held by most entries of ``elected``; +1 on a tie."""
    return -1.0 if float(elected.sum()) < 0 else 1.0


def _elect_and_mean(trimmed: Tensor, zero_sign: str, majority_sign: float | None, scale: float) -> Tensor:
    """TIES's sign election and disjoint mean, times ``scale``: elected = sign(sum_i trimmed_i),
    entries whose sum is 0 get +1 ('positive') or the sign most entries elected ('majority',
    ties -> +1); then the mean over the models whose (nonzero) entry agrees with it (count
    clamped >= 1). The elementwise part runs blockwise. The sum over models stays one whole-tensor
    ``trimmed.sum(0)``: torch's reduction order over k depends on the tensor's shape, and
    the elected sign of an entry whose sum cancels must not change."""
    total_sum = trimmed.sum(0)
    if zero_sign == "positive":
        fill = 1.0
    elif majority_sign is not None:
        fill = majority_sign
    else:
        fill = _majority(torch.sign(total_sum))
    k = trimmed.shape[0]
    sums, rows = total_sum.reshape(-1), trimmed.reshape(k, -1)
    out = torch.empty_like(sums)
    n = sums.numel()
    for sl in _blocks(n):
        elected = torch.sign(sums[sl])
        elected = torch.add(elected, elected == 0, alpha=fill)  # = where(elected == 0, fill, elected)
        total = torch.zeros_like(elected)
        count = torch.zeros_like(elected)
        if _all_finite(sums[sl]):  # every entry finite: float-only arithmetic, same result
            agree = torch.empty_like(elected)
            for i in range(k):
                t = rows[i, sl]
                torch.sign(t, out=agree).mul_(elected).clamp_(min=0.0)  # 1.0 where t * elected > 0, else 0
                total.addcmul_(t, agree)  # exact: t or a zero, as where(agree, t, 0)
                count += agree
        else:
            for i in range(k):
                t = rows[i, sl]
                agree = t * elected > 0
                total += _where0(agree, t)
                count += agree
        res = total / count.clamp_min(1)
        if scale != 1.0:  # x * 1.0 == x exactly
            res = res * scale
        out[sl] = res
    return out.reshape(total_sum.shape)


@register(
    "ties",
    params=[
        Param(
            "density", float, 1.0,
            "fraction of entries KEPT per model by |v| (trim step). Default 1.0 = the "
            "paper's Table 1 ('d = 1.0': no trimming, so TIES is sign election + "
            "disjoint mean); 0.2 = the official code's default mask_rate 0.8 (keep the "
            "top 20%). "
            "Count kept = round-half-up(density * numel), at least 1, ties at the "
            "threshold broken by lowest flat index (the code keeps all ties and "
            "numel - floor(0.8 numel) + 1 entries, one more)",
            low=0.0, high=1.0, low_open=True,
        ),
        Param(
            "scale", float, 1.0,
            _SCALE_DOC + " applied to the disjoint mean (Table 1: 1; the paper also "
            "reports TIES(0.5))",
            low=0.0, low_open=True,
        ),
        Param(
            "trim_scope", str, "tensor",
            "'tensor': top-density per tensor (the official ties_merging); 'global': "
            "top-density over all of a model's floating tensors (the original TIES "
            "paper; only through merge_state_dicts or with precomputed thresholds)",
            choices=("tensor", "global"),
        ),
        Param(
            "zero_sign", str, "positive",
            "elected sign where sum(trimmed) == 0: 'positive' = +1 (the official "
            "ties_merging); 'majority' = the sign elected by most entries in the "
            "trim scope (tensor or whole model; the original TIES code), +1 on a tie",
            choices=("positive", "majority"),
        ),
    ],
    doc="TIES: trim each v_i to its top-density entries by |v|, elect the sign "
    "sign(sum_i trimmed_i), take the disjoint mean of the entries agreeing with "
    "it (count clamped >= 1), multiply by scale. Defaults = the paper's Table 1 "
    "(d = 1.0, scale 1) with the official code's per-tensor trim scope and zero "
    "sign -> +1; the code's own default density is 0.2 (see density).",
)
def _ties(
    deltas: Tensor,
    *,
    density: float,
    scale: float,
    trim_scope: str,
    zero_sign: str,
    thresholds: Tensor | None = None,
    tie_keep: Tensor | None = None,
    majority_sign: float | None = None,
    **_: Any,
) -> Tensor:
    if trim_scope == "global" and thresholds is None:
        raise ValueError(
            "ties.trim_scope = 'global' needs all tensors of the model: use "
            "merge_state_dicts, or pass precomputed per-model thresholds to merge_deltas"
        )
    if trim_scope == "tensor" and thresholds is not None:
        raise ValueError("ties: thresholds given but trim_scope = 'tensor'")
    trimmed = _trim(deltas, density, thresholds, tie_keep)
    return _elect_and_mean(trimmed, zero_sign, majority_sign, scale)


@register(
    "dare",
    params=[
        Param(
            "drop_rate", float, 0.2,
            "probability p of dropping each delta entry, per model (Table 1: p = 0.2; "
            "Sec 3.3.4's 'density 0.2' would mean p = 0.8 - set drop_rate: 0.8 for that reading)",
            low=0.0, high=1.0, high_open=True,
        ),
        Param(
            "rescale", str, "inverse",
            "'inverse': multiply kept entries by 1/(1-p) (the paper and the official "
            "code); 'none': no rescaling",
            choices=("inverse", "none"),
        ),
        Param("scale", float, 1.0, _SCALE_DOC + " (Table 1: c = 1)", low=0.0, low_open=True),
    ],
    doc="DARE: theta_0 + scale * mean_i(m_i * v_i / (1-p)), m_i ~ Bernoulli(1-p) "
    "per entry and model (the official mask_merging with average_merging). "
    "Masks come from a CPU torch.Generator seeded with `seed` (pass "
    "tensor_seed(...)), so reruns are bit-identical on any device and in any "
    "order; the official code is unseeded.",
    stochastic=True,
)
def _dare(deltas: Tensor, *, drop_rate: float, rescale: str, scale: float, seed: int = 0, **_: Any) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    factor = 1.0 / (1.0 - drop_rate) if rescale == "inverse" else 1.0
    total = torch.zeros_like(deltas[0])
    for v in deltas:  # one model's mask at a time bounds the memory
        keep = torch.rand(v.shape, generator=gen) >= drop_rate  # P(keep) = 1 - p
        total += v * keep.to(v.device) * factor
    return total / deltas.shape[0] * scale


# --------------------------------------------------------------------------
# Extra methods (mergekit-style): dare_ties, breadcrumbs, della, model_stock
#
# Each is "sparsify every task vector, then combine". The two steps are
# separate helpers so that mergelaws.mergeyaml can apply mergekit's per-model
# weights and `normalize` switch with exactly the same sparsification:
#   combine_deltas(sparse, weights=None, consensus=..., normalize=True)
# with weights = None (all 1) is what the registered methods compute.
# --------------------------------------------------------------------------

RESCALE_CHOICES = ("inverse", "l1", "none")
_L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def _rescale_kept(v: Tensor, keep: Tensor, keep_prob: Tensor | float, rescale: str) -> Tensor:
    """Masked task vector ``keep * v`` rescaled.

    'inverse': divide by the keep probability (DARE / DELLA papers: unbiased in
    expectation); 'l1': multiply by ||v||_1 / ||keep * v||_1 (mergekit's
    ``rescale: true``; skipped when either norm is < 1e-7, as mergekit does);
    'none': no rescaling.
    """
    masked = _where0(keep, v)
    if rescale == "inverse":  # a scalar multiplies by 1/q exactly as dare does
        return masked * (1.0 / keep_prob) if isinstance(keep_prob, float) else masked / keep_prob
    if rescale == "l1":
        before, after = v.abs().sum(), masked.abs().sum()
        if before < _L1_EPS or after < _L1_EPS:
            return masked
        return masked * (before / after)
    return masked


def _per_model(value: float | Sequence[float], k: int, what: str) -> list[float]:
    """A scalar for every model, or one value per model."""
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(x) for x in value]
    if len(values) != k:
        raise ValueError(f"{what}: {len(values)} values for {k} models")
    return values


def sparsify_dare(deltas: Tensor, drop_rate: float | Sequence[float], rescale: str, seed: int) -> Tensor:
    """DARE masks: entry kept iff u >= drop_rate, u ~ U[0,1) from a CPU generator
    seeded with ``seed``, drawn model after model (the very stream of ``dare``,
    so dare and dare_ties drop the same entries for the same seed). ``drop_rate``
    may be one value per model."""
    rates = _per_model(drop_rate, deltas.shape[0], "drop_rate")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty_like(deltas)
    for i, v in enumerate(deltas):
        keep = (torch.rand(v.shape, generator=gen) >= rates[i]).to(v.device)
        out[i] = _rescale_kept(v, keep, 1.0 - rates[i], rescale)
    return out


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_keep, n_top) for one tensor, as mergekit's magnitude_outliers:
    n_keep = floor(density * numel); n_top = floor(gamma * numel), cut down to
    numel - n_keep when the two overlap."""
    n_keep = int(math.floor(density * numel))
    n_top = min(int(math.floor(gamma * numel)), numel - n_keep)
    return n_keep, n_top


def _smallest_mask(absv: Tensor, m: int) -> Tensor:
    """Mask of the ``m`` smallest entries of the 1-D ``absv`` in a stable ascending
    order (ties by flat index), i.e. the first ``m`` of ``torch.sort(absv, stable=True)``,
    found with the O(n) selection :func:`kth_smallest` instead of a sort."""
    n = absv.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=absv.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=absv.device)
    t, n_lt, n_eq = kth_smallest(absv, m)  # m-th smallest
    if not torch.isnan(t) and n_lt + n_eq == m:  # every entry tied at t is in: |v| <= t
        return absv <= t
    below = absv < t
    equal = absv == t
    quota = m - int(torch.count_nonzero(below))
    dtype = torch.int32 if n < 2**31 else torch.int64
    return below | (equal & (equal.cumsum(0, dtype=dtype) <= quota))


def _rank_bounds(v: Tensor, lo: int, hi: int) -> dict[str, Tensor | None] | None:
    """Bounds on |v| selecting the ascending stable ranks [lo, hi) of |v| (``_smallest_mask(hi)
    & ~_smallest_mask(lo)``) as ``{"gt": t_lo, "le": t_hi}`` when no tie at a cut-off is split
    (then rank order and value order agree), else None. A bound that cuts nothing is None; a
    missing upper bound keeps NaNs (``_smallest_mask(n)`` is everything), hence ``not_le``."""
    n = v.numel()
    if hi <= lo or hi <= 0:
        return None  # keeps nothing: leave it to the exact path
    bounds: dict[str, Tensor | None] = {}
    if hi < n:
        t, n_lt, n_eq = kth_smallest(v, hi, absolute=True)
        if torch.isnan(t) or n_lt + n_eq != hi:
            return None
        bounds["le"] = t
    if lo > 0:
        t, n_lt, n_eq = kth_smallest(v, lo, absolute=True)
        if torch.isnan(t) or n_lt + n_eq != lo:
            return None
        bounds["gt" if "le" in bounds else "not_le"] = t
    return bounds or None


def _mask_by_abs(absv: Tensor, *, ge: Tensor | None = None, gt: Tensor | None = None, le: Tensor | None = None,
                 not_le: Tensor | None = None) -> Tensor:
    mask = torch.ones(absv.shape, dtype=torch.bool, device=absv.device)
    for op, t in ((torch.ge, ge), (torch.gt, gt), (torch.le, le)):
        if t is not None:
            mask.logical_and_(op(absv, t))
    if not_le is not None:
        mask.logical_and_(~(absv <= not_le))
    return mask


def sparsify_breadcrumbs(deltas: Tensor, density: float | Sequence[float], gamma: float | Sequence[float],
                         rescale: str = "none") -> Tensor:
    """Per model: rank |v| ascending (stable: ties by flat index), zero the n_top
    largest and keep the next n_keep (see :func:`breadcrumbs_counts`), zero the rest
    (the two cut-offs are O(n) kthvalue selections, not a sort);
    rescale 'l1' or 'none' (mergekit's rescale). A model with density >= 1 is kept
    whole (mergekit returns the tensor unchanged). Parameters may be per model."""
    k = deltas.shape[0]
    dens, gams = _per_model(density, k, "density"), _per_model(gamma, k, "gamma")
    out = torch.empty_like(deltas, memory_format=torch.contiguous_format)
    for i, v in enumerate(deltas):
        if dens[i] >= 1.0:
            out[i] = v
            continue
        flat = v.reshape(-1)
        n = flat.numel()
        n_keep, n_top = breadcrumbs_counts(n, dens[i], gams[i])
        hi = n - n_top  # keep ascending (stable) ranks [hi - n_keep, hi)
        bounds = _rank_bounds(v, hi - n_keep, hi)
        if bounds is not None and rescale == "none":
            _keep_by_abs(v, out[i], **bounds)
            continue
        absv = flat.abs()
        if bounds is not None:  # the same mask, whole (the l1 rescale sums over the tensor)
            keep = _mask_by_abs(absv, **bounds)
        else:
            keep = _smallest_mask(absv, hi) & ~_smallest_mask(absv, hi - n_keep)
        out[i] = _rescale_kept(v, keep.reshape(v.shape), 1.0, "none" if rescale == "none" else "l1")
    return out


def della_keep_probs(v: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities for one task vector (mergekit's
    della_magprune): rows are dim 0 of a >= 2-D tensor (trailing dims flattened),
    a 1-D tensor is one row. In each row of n entries, r = rank of |v| ascending
    (1..n, stable: ties by index), rho = (r - 1) / (n - 1) (0.5 when n = 1), and
    keep probability q = density - epsilon + 2 * epsilon * rho: the smallest entry
    is kept with density - epsilon, the largest with density + epsilon."""
    rows = v.reshape(1, -1) if v.dim() < 2 else v.reshape(v.shape[0], -1)
    n = rows.shape[1]
    order = _stable_abs_order(rows)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=v.device).expand_as(order))  # 0-based
    # divide by a tensor on v's device, not a Python number: CUDA computes x / (CPU scalar) as
    # x * (1 / scalar), up to an ulp off the CPU's division, which would move q and flip masks
    # (u < q) against the CPU; tensor / tensor is IEEE division on both (same values on the CPU)
    rho = ranks.to(v.dtype) / torch.tensor(n - 1, dtype=v.dtype, device=v.device) if n > 1 \
        else torch.full_like(rows, 0.5)
    return (density - epsilon + 2.0 * epsilon * rho).reshape(v.shape)


def _stable_abs_order(rows: Tensor) -> Tensor:
    """``torch.argsort(rows.abs(), dim=1, stable=True)``. A rank needs a sort (DELLA's keep
    probability depends on every entry's rank, not on a cut-off, so no selection can replace
    it); for fp32 without NaNs it sorts the unique int64 keys (|v| bits << 32 | index), whose
    unstable sort is the stable order and ~2x faster than the stable float argsort."""
    n = rows.shape[1]
    absv = rows.abs()
    if absv.dtype != torch.float32 or n >= 2**31 or bool(torch.isnan(absv).any()):
        return torch.argsort(absv, dim=1, stable=True)
    key = absv.view(torch.int32).to(torch.int64).bitwise_left_shift_(32)  # |v| >= 0: bits order as values
    key.bitwise_or_(torch.arange(n, device=rows.device))
    return key.sort(dim=1).values.bitwise_and_(0xFFFFFFFF)


def sparsify_della(deltas: Tensor, density: float | Sequence[float], epsilon: float | Sequence[float],
                   rescale: str, seed: int) -> Tensor:
    """DELLA drop: entry kept iff u < q (q from :func:`della_keep_probs`), u ~ U[0,1)
    from a CPU generator seeded with ``seed``, model after model; then rescaled.
    A model with density >= 1 is kept whole but still draws its numbers (mergekit
    returns it unchanged). Parameters may be per model."""
    k = deltas.shape[0]
    dens, eps = _per_model(density, k, "density"), _per_model(epsilon, k, "epsilon")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty_like(deltas)
    for i, v in enumerate(deltas):
        u = torch.rand(v.shape, generator=gen).to(v.device)
        if dens[i] >= 1.0:
            out[i] = v
            continue
        _check_della(dens[i], eps[i])
        q = della_keep_probs(v, dens[i], eps[i])
        out[i] = _rescale_kept(v, u < q, q, rescale)
    return out


def combine_deltas(sparse: Tensor, weights: Tensor | None = None, *, consensus: bool, normalize: bool) -> Tensor:
    """mergekit's generalized task arithmetic combine step for one tensor.

    u_i = w_i * s_i (w = 1 when ``weights`` is None).
    consensus: elected = +1 where sum_i u_i >= 0 else -1; agree_i = sign(u_i) == elected
      (zeros never agree); merged = sum_i u_i [agree_i], divided (normalize) by
      sum_i w_i [agree_i] (0 -> 1). With w = 1 this is TIES's sign election and
      disjoint mean (exactly ``ties`` with zero_sign 'positive').
    no consensus: merged = sum_i u_i, divided (normalize) by sum_i w_i (|.| < 1e-8 -> 1).
    Entry by entry (the sums over models are sequential), so it runs blockwise.
    """
    k = sparse.shape[0]
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {tuple(w.shape)}")
    w = w.to(sparse.device, sparse.dtype)
    rows = sparse.reshape(k, -1)
    out = torch.empty(rows.shape[1], dtype=sparse.dtype, device=sparse.device)
    d = float(w.sum())
    for sl in _blocks(rows.shape[1]):
        block = rows[:, sl]
        if consensus:
            out[sl] = _combine_consensus(block, w, normalize)
            continue
        total = torch.zeros_like(block[0])
        for i in range(k):
            total += block[i] * w[i]
        if normalize:
            total = total / (1.0 if abs(d) < 1e-8 else d)
        out[sl] = total
    return out.reshape(sparse.shape[1:])


def _combine_consensus(sparse: Tensor, w: Tensor, normalize: bool) -> Tensor:
    """The consensus combine of one block, entry by entry; a weight of exactly 1 is not
    multiplied (x * 1.0 == x), and torch.where is replaced by exact equivalents."""
    k = sparse.shape[0]
    ones = [float(w[i]) == 1.0 for i in range(k)]
    us = [sparse[i] if ones[i] else sparse[i] * w[i] for i in range(k)]
    total = us[0] + 0  # as sum(): 0 + u_0 + u_1 + ...
    for u in us[1:]:
        total += u
    elected = (total >= 0).to(sparse.dtype).mul_(2.0).sub_(1.0)  # = where(sum >= 0, 1.0, -1.0)
    if _all_finite(total):  # every u finite: float-only arithmetic, same result
        total.zero_()
        div = torch.zeros_like(total)
        agree = torch.empty_like(total)
        for i in range(k):
            torch.sign(us[i], out=agree).mul_(elected).clamp_(min=0.0)  # 1.0 where sign(u) == elected, else 0
            total.addcmul_(us[i], agree)  # u * agree is exact (u or a zero), as where(agree, u, 0)
            if ones[i]:
                div += agree
            else:
                div.add_(agree * w[i])
        return total if not normalize else total / div.add_(div == 0)
    total = torch.zeros_like(sparse[0])
    div = torch.zeros_like(sparse[0])
    for i in range(k):
        agree = torch.sign(us[i]) == elected
        total += _where0(agree, us[i])
        if ones[i]:
            div += agree
        else:
            div += agree * w[i]
    if not normalize:
        return total
    return total / div.add_(div == 0)  # = where(div == 0, 1, div)


@register(
    "dare_ties",
    params=[
        Param(
            "drop_rate", float, 0.2,
            "probability p of dropping each delta entry, per model, as in dare "
            "(mergekit's density = 1 - p)",
            low=0.0, high=1.0, high_open=True,
        ),
        Param(
            "rescale", str, "inverse",
            "'inverse': kept entries x 1/(1-p) (DARE paper, same as dare); 'l1': "
            "x ||v||_1/||m*v||_1 per model and tensor (mergekit's rescale: true); "
            "'none': no rescaling",
            choices=RESCALE_CHOICES,
        ),
        Param("scale", float, 1.0, _SCALE_DOC + " applied to the disjoint mean", low=0.0, low_open=True),
    ],
    doc="DARE-TIES: s_i = rescale(m_i * v_i), m_i ~ Bernoulli(1-p) drawn exactly as "
    "dare's masks (same seed -> same masks); elected sign = sign(sum_i s_i) "
    "(0 -> +1); theta_0 + scale * (sum of the s_i agreeing with it) / (their "
    "count, clamped >= 1). mergekit's dare_ties with normalize: true.",
    stochastic=True,
)
def _dare_ties(deltas: Tensor, *, drop_rate: float, rescale: str, scale: float, seed: int = 0, **_: Any) -> Tensor:
    sparse = sparsify_dare(deltas, drop_rate, rescale, seed)
    return combine_deltas(sparse, consensus=True, normalize=True) * scale


@register(
    "breadcrumbs",
    params=[
        Param(
            "density", float, 0.9,
            "fraction of entries KEPT per model and tensor, after the gamma "
            "outliers: floor(density * numel) entries (mergekit's density)",
            low=0.0, high=1.0, low_open=True,
        ),
        Param(
            "gamma", float, 0.01,
            "fraction of the LARGEST |v| entries dropped first, floor(gamma * numel), "
            "cut to numel - kept when they overlap (mergekit's gamma, default 0.01)",
            low=0.0, high=1.0, high_open=True,
        ),
        Param("scale", float, 1.0, _SCALE_DOC, low=0.0, low_open=True),
    ],
    doc="Model Breadcrumbs (Davari & Belilovsky 2023; mergekit's magnitude_outliers "
    "sparsification): per model and tensor, sort |v| ascending (ties by flat "
    "index), drop the top floor(gamma*n), keep the next floor(density*n), zero "
    "the rest; theta_0 + scale * mean_i(s_i). mergekit's breadcrumbs sums "
    "instead (normalize: false); mergelaws.mergeyaml maps that.",
)
def _breadcrumbs(deltas: Tensor, *, density: float, gamma: float, scale: float, **_: Any) -> Tensor:
    sparse = sparsify_breadcrumbs(deltas, density, gamma)
    return combine_deltas(sparse, consensus=False, normalize=True) * scale


@register(
    "della",
    params=[
        Param(
            "density", float, 0.8,
            "mean keep probability per entry (mergekit's density); density +- epsilon "
            "must lie in (0, 1] unless density = 1 (no drop, as mergekit)",
            low=0.0, high=1.0, low_open=True,
        ),
        Param(
            "epsilon", float, 0.1,
            "keep-probability spread: from density - epsilon (smallest |v| of a row) "
            "to density + epsilon (largest), linear in the rank (mergekit default 0.15)",
            low=0.0, high=0.5,
        ),
        Param(
            "rescale", str, "inverse",
            "'inverse': kept entries x 1/q (their own keep probability; the DELLA "
            "paper); 'l1': x ||v||_1/||m*v||_1 (mergekit's rescale: true); 'none'",
            choices=RESCALE_CHOICES,
        ),
        Param("scale", float, 1.0, _SCALE_DOC + " applied to the disjoint mean", low=0.0, low_open=True),
    ],
    doc="DELLA (Deep et al. 2024; mergekit's della): per model and row "
    "(dim 0; 1-D tensors are one row), rank |v| ascending r = 1..n, keep "
    "probability q = density - epsilon + 2*epsilon*(r-1)/(n-1); m ~ Bernoulli(q) "
    "from a CPU generator seeded with `seed`; s_i = rescale(m_i * v_i); TIES sign "
    "election (0 -> +1) and disjoint mean, times scale (mergekit's della: "
    "normalize: true).",
    stochastic=True,
)
def _della(deltas: Tensor, *, density: float, epsilon: float, rescale: str, scale: float, seed: int = 0,
           **_: Any) -> Tensor:
    sparse = sparsify_della(deltas, density, epsilon, rescale, seed)
    return combine_deltas(sparse, consensus=True, normalize=True) * scale


def _check_della(density: float, epsilon: float) -> None:
    if density - epsilon <= 0.0 or density + epsilon > 1.0:
        raise ValueError(
            f"della: density - epsilon and density + epsilon must lie in (0, 1], got "
            f"density = {density!r}, epsilon = {epsilon!r}"
        )


def model_stock_ratio(deltas: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock's t = k cos / (1 + (k-1) cos), cos = mean over pairs i<j of
    <v_i, v_j> / max(||v_i|| ||v_j||, 1e-6), clamped to [-1, 1] (as mergekit).
    Scalar per tensor, or per row (dim 0) with ``filter_wise``; k = 1 gives t = 1."""
    k = deltas.shape[0]
    if filter_wise and deltas.dim() >= 3:
        flat = deltas.reshape(k, deltas.shape[1], -1)
    else:  # one row: the whole tensor, or a 1-D tensor with filter_wise (mergekit)
        flat = deltas.reshape(k, 1, -1)
    if k == 1:
        return torch.ones(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    norms = flat.norm(dim=-1)  # [k, rows]
    cos_sum = torch.zeros(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for i in range(k):
        for j in range(i + 1, k):
            dot = (flat[i] * flat[j]).sum(-1)
            cos_sum += (dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
    cos = cos_sum / (k * (k - 1) // 2)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6  # opposing updates: keep the base (mergekit 0.1.5)
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denom))


@register(
    "model_stock",
    params=[
        Param(
            "filter_wise", bool, False,
            "false: one ratio t per tensor (mergekit's default); true: one t per row "
            "(dim 0) of each matrix, 1-D tensors as one row",
        ),
    ],
    doc="Model Stock (Jang et al. 2024): theta_0 + t * mean_i(v_i), i.e. the "
    "interpolation t*mean(theta_i) + (1-t)*theta_0, t = k cos / (1 + (k-1) cos), cos "
    "the mean pairwise cosine of the task vectors (norm product clamped >= 1e-6, "
    "cos clamped to [-1, 1]; t = 0 where |1 + (k-1) cos| < 1e-6; as mergekit "
    "0.1.5). k = 1: t = 1 (the expert itself; mergekit refuses fewer than 2 experts).",
)
def _model_stock(deltas: Tensor, *, filter_wise: bool, **_: Any) -> Tensor:
    t = model_stock_ratio(deltas, filter_wise)
    mean = deltas.mean(0)
    if t.numel() == 1:
        return mean * t.reshape(())
    return mean * t.reshape(-1, *([1] * (mean.dim() - 1)))


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def merge_deltas(
    name: str,
    deltas: Tensor,
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    thresholds: Tensor | None = None,
    tie_keep: Tensor | None = None,
    majority_sign: float | None = None,
) -> Tensor:
    """Merge the task vectors of ONE tensor.

    deltas: [k, *shape] task vectors v_i = theta_i - theta_0 (computed in fp32).
    Returns the merged delta, float32 of shape ``shape``; add it to theta_0.
    ``seed`` seeds DARE's masks (pass :func:`tensor_seed`).
    ``thresholds`` [k], ``tie_keep`` [k] and ``majority_sign`` are TIES's
    precomputed global-trim state (trim_scope='global'), normally supplied by
    :func:`merge_state_dicts`.
    """
    method = get_method(name)
    resolved = resolve_params(name, params)
    if not torch.is_floating_point(deltas):
        raise TypeError(f"deltas must be a floating tensor, got {deltas.dtype}")
    if deltas.dim() < 1 or deltas.shape[0] < 1:
        raise ValueError(f"deltas must have shape [k >= 1, *shape], got {tuple(deltas.shape)}")
    extra = {
        k: v
        for k, v in (("thresholds", thresholds), ("tie_keep", tie_keep), ("majority_sign", majority_sign))
        if v is not None
    }
    if extra and name != "ties":
        raise ValueError(f"{name}: {', '.join(extra)} only apply to ties")
    return method.fn(deltas.float(), seed=seed, **resolved, **extra)


def _float_names(base: dict[str, Tensor]) -> list[str]:
    return sorted(n for n, t in base.items() if torch.is_floating_point(t))


def _deltas(base: dict[str, Tensor], experts: list[dict[str, Tensor]], name: str) -> Tensor:
    b = base[name].float()
    return torch.stack([e[name].to(b.device).float() - b for e in experts])


def _global_trim_state(
    base: dict[str, Tensor], experts: list[dict[str, Tensor]], params: dict[str, Any]
) -> tuple[Tensor, dict[str, Tensor], float | None]:
    """Per-model global thresholds, per-tensor tie quotas, and the global majority sign.

    Tensors are visited in sorted-name order, entries in flat-index order, so
    ties at a model's threshold are kept in that order until its count is met.
    """
    def delta_of(i: int, n: str) -> Tensor:
        return experts[i][n].float().to(base[n].device) - base[n].float()

    return _global_trim_state_from(_float_names(base), len(experts), delta_of,
                                   lambda n: _deltas(base, experts, n), params)


def _global_trim_state_from(names: list[str], k: int, delta_of: Callable[[int, str], Tensor],
                            deltas_of: Callable[[str], Tensor], params: dict[str, Any]
                            ) -> tuple[Tensor, dict[str, Tensor], float | None]:
    """:func:`_global_trim_state` over task vectors given by functions: ``delta_of(i, name)``
    (model i's, one tensor) and ``deltas_of(name)`` ([k, ...]); ``names`` sorted."""
    thresholds = torch.empty(k)
    remaining = []
    for i in range(k):
        absv = torch.cat([delta_of(i, n).abs().reshape(-1).cpu() for n in names])
        n_keep = ties_keep_count(params["density"], absv.numel())
        thresholds[i] = kth_smallest(absv, absv.numel() - n_keep + 1)[0]
        remaining.append(n_keep - int(torch.count_nonzero(absv > thresholds[i])))
        del absv
    tie_keep: dict[str, Tensor] = {}
    sign_total = 0.0
    for n in names:
        deltas = deltas_of(n)
        absv = deltas.abs()
        quota = torch.zeros(k, dtype=torch.int64)
        for i in range(k):
            equal = int(torch.count_nonzero(absv[i] == thresholds[i].to(absv.device)))
            quota[i] = min(remaining[i], equal)
            remaining[i] -= int(quota[i])
        tie_keep[n] = quota
        if params["zero_sign"] == "majority":
            trimmed = _trim(deltas, 1.0, thresholds, quota)
            sign_total += float(torch.sign(trimmed.sum(0)).sum())
    majority = (-1.0 if sign_total < 0 else 1.0) if params["zero_sign"] == "majority" else None
    return thresholds, tie_keep, majority


def merge_state_dicts(
    name: str,
    base: dict[str, Tensor],
    experts: list[dict[str, Tensor]],
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    subset_id: str = "",
) -> dict[str, Tensor]:
    """Merge whole state dicts: theta_0 + merge_deltas(...) for every floating tensor.

    Arithmetic in fp32 whatever the storage dtype; each output tensor is cast
    back to the base's dtype. Non-floating tensors are copied from ``base``.
    Tensor ``n`` uses seed ``tensor_seed(seed, subset_id, n)``, so the result
    does not depend on dict order. Every expert must hold exactly the base's
    tensor names and shapes.
    """
    resolved = resolve_params(name, params)
    if not experts:
        raise ValueError("merge_state_dicts needs at least one expert")
    for j, e in enumerate(experts):
        missing, extra = sorted(set(base) - set(e)), sorted(set(e) - set(base))
        if missing or extra:
            raise ValueError(f"expert {j}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
        for n, t in base.items():
            if e[n].shape != t.shape:
                raise ValueError(f"expert {j}: {n} has shape {tuple(e[n].shape)}, base {tuple(t.shape)}")

    global_state = None
    if name == "ties" and resolved["trim_scope"] == "global":
        global_state = _global_trim_state(base, experts, resolved)

    out: dict[str, Tensor] = {}
    for n, b in base.items():
        if not torch.is_floating_point(b):
            out[n] = b.clone()
            continue
        extra: dict[str, Any] = {}
        if global_state is not None:
            thresholds, tie_keep, majority = global_state
            extra = {"thresholds": thresholds, "tie_keep": tie_keep[n], "majority_sign": majority}
        delta = merge_deltas(
            name, _deltas(base, experts, n), resolved, seed=tensor_seed(seed, subset_id, n), **extra
        )
        out[n] = (b.float() + delta).to(b.dtype)
    return out


# --------------------------------------------------------------------------
# Checkpoints read one tensor at a time
# --------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


class CheckpointError(ValueError):
    """A safetensors checkpoint that cannot be read (names the file)."""


class SafetensorsSource:
    """The tensors of one checkpoint (a model directory's ``*.safetensors`` files, or one file),
    read one at a time through a memory map.

    ``get(name)`` is a zero-copy CPU tensor over the file's pages (a private copy-on-write map,
    never written back): holding a source costs no memory beyond the OS page cache, which the
    kernel reclaims under pressure, and reading a tensor costs its bytes only. ``bytes_read``
    counts the bytes of the tensors handed out. Treat the tensors as read-only.
    """

    def __init__(self, path: str | Path):
        import json
        import mmap
        import struct

        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights")
        self.path = path
        self.bytes_read = 0
        self._maps: list[Any] = []
        self._files: list[Path] = []
        self._fds: dict[int, int] = {}
        self._index: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                try:
                    (hlen,) = struct.unpack("<Q", fh.read(8))
                    if hlen > size - 8:
                        raise ValueError("header longer than the file")
                    header = json.loads(fh.read(hlen))
                except (struct.error, ValueError, UnicodeDecodeError) as exc:
                    raise CheckpointError(f"{f} is not a readable safetensors file ({exc}); copy it again") from None
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
            self._files.append(f)
            start = 8 + hlen
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                if start + b > size:
                    raise CheckpointError(f"{f} is truncated (tensor {name} ends past the end of the file); "
                                          f"copy it again")
                self._index[name] = (len(self._maps), _ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                                     start + a, start + b)
            self._maps.append(mm)

    def keys(self):
        return self._index.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._index[name][1]

    def get(self, name: str) -> Tensor:
        i, dtype, shape, a, b = self._index[name]
        self.bytes_read += b - a
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._maps[i], dtype=dtype, count=n, offset=a).view(shape)

    def read(self, name: str, out: Tensor) -> Tensor:
        """Tensor ``name`` read (copied) into the front of ``out`` (a contiguous CPU tensor of the
        tensor's dtype with at least its numel entries, e.g. a buffer reused across tensors):
        no page-mapping and no fresh allocation per tensor. Returns the view of ``out``."""
        import os

        i, dtype, shape, a, b = self._index[name]
        n = math.prod(shape)
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < n or out.device.type != "cpu":
            raise ValueError(f"read({name}): needs a contiguous CPU {dtype} buffer of >= {n} entries")
        view = out.reshape(-1)[:n]
        if n:
            if i not in self._fds:
                self._fds[i] = os.open(self._files[i], os.O_RDONLY)
            mv = memoryview(view.view(torch.uint8).numpy()).cast("B")
            done = 0
            while done < b - a:
                got = os.preadv(self._fds[i], [mv[done:]], a + done)
                if got <= 0:
                    raise CheckpointError(f"{self._files[i]}: short read of tensor {name}")
                done += got
        self.bytes_read += b - a
        return view.view(shape)

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def nbytes(self, names: Sequence[str] | None = None) -> int:
        names = self._index if names is None else names
        return sum(self._index[n][4] - self._index[n][3] for n in names)

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from this process (madvise DONTNEED): they stay in
        the page cache, the resident set shrinks, and a later access reads them again."""
        import mmap

        i, _, _, a, b = self._index[name]
        mm = self._maps[i]
        if mm is None or b <= a or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = a - a % page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, b - start)
        except (OSError, ValueError):
            pass


class DictSource:
    """A state dict behind the :class:`SafetensorsSource` interface (``bytes_read`` counts too)."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state
        self.bytes_read = 0

    def keys(self):
        return self.state.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> Tensor:
        t = self.state[name]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def release(self, name: str) -> None:
        pass

    def read(self, name: str, out: Tensor) -> Tensor:
        t = self.get(name)
        return out.reshape(-1)[:t.numel()].view(t.shape).copy_(t)


def _as_source(x: Any) -> Any:
    return DictSource(x) if isinstance(x, dict) else x


class RowCutSource:
    """A source whose tensors ``rows`` (name -> n) are cut to their first n rows (dim 0): an
    expert's embedding matrices cut to the base's vocabulary. Zero-copy over the inner source."""

    def __init__(self, inner: Any, rows: dict[str, int]):
        self.inner = inner
        self.rows = dict(rows)

    @property
    def bytes_read(self) -> int:
        return getattr(self.inner, "bytes_read", 0)

    def keys(self):
        return self.inner.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.inner.shape(name))
        return (self.rows[name], *shape[1:]) if name in self.rows else shape

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def get(self, name: str) -> Tensor:
        t = self.inner.get(name)
        return t[: self.rows[name]] if name in self.rows else t

    def read(self, name: str, out: Tensor) -> Tensor:
        t = self.get(name)
        return out.reshape(-1)[:t.numel()].view(t.shape).copy_(t)

    def release(self, name: str) -> None:
        self.inner.release(name)


# --------------------------------------------------------------------------
# Many merges of one pool of experts (the fused sweep)
# --------------------------------------------------------------------------

SUM_METHODS = ("average", "task_arithmetic")


def sum_coefficient(name: str, params: dict[str, Any], k: int) -> float | None:
    """``c`` with merge = theta_0 + c * sum_i v_i for the linear methods, else None."""
    if name == "average" or (name == "task_arithmetic" and params["combine"] == "mean"):
        return params["scale"] / k
    if name == "task_arithmetic":
        return params["scale"]
    return None


def reuse_order(member_sets: Sequence[Sequence[str]]) -> list[int]:
    """An order of the subsets (indices) in which consecutive ones differ in few members.

    A running sum goes from subset P to Q at the cost of min(|P xor Q|, |Q|) expert-sized
    additions; this greedy walk starts from the first subset and always goes to the cheapest
    subset not yet visited (ties: the earliest), O(n^2) over at most 64 distinct experts. All
    2^M subsets come out in a Gray-code-like walk (one expert changes per step). Above 20,000
    subsets, or with more than 64 experts, the order is left as is.
    """
    import numpy as np

    n = len(member_sets)
    keys = sorted({m for s in member_sets for m in s})
    if n <= 2 or n > 20_000 or len(keys) > 64:
        return list(range(n))
    bit = {m: 1 << i for i, m in enumerate(keys)}
    masks = np.array([sum(bit[m] for m in set(s)) for s in member_sets], dtype=np.uint64)
    sizes = np.array([len(set(s)) for s in member_sets], dtype=np.int64)
    left = np.ones(n, dtype=bool)
    order = [0]
    left[0] = False
    cur = masks[0]
    for _ in range(n - 1):
        cost = np.minimum(np.bitwise_count(masks ^ cur).astype(np.int64), sizes)
        cost[~left] = np.iinfo(np.int64).max
        j = int(np.argmin(cost))
        order.append(j)
        left[j] = False
        cur = masks[j]
    return order


@dataclass
class MergeCost:
    """What a :class:`SubsetMerger` did: expert-sized add/subtract steps, fresh sums, direct merges."""

    merges: int = 0
    updates: int = 0  # expert-sized add or subtract steps into a running sum
    anchors: int = 0  # running sums recomputed from scratch
    direct: int = 0  # merges through merge_deltas, tensor by tensor


class SubsetMerger:
    """Merges of many subsets of one pool of experts, for the fused sweep.

    ``base``: the base's tensors (a dict, or a :class:`SafetensorsSource`); ``names``: the
    floating tensors to merge (default: the base's floating tensors, in its order);
    ``base_dtype``: round the base through this dtype first (the sweep's live model dtype).
    Experts are added with :meth:`add_expert` (a dict or a source).

    mode ``"memory"``: the task vectors v_e = theta_e - theta_0 (fp32) of every expert are held,
    one flat buffer per expert, and the base once. mode ``"stream"``: nothing is held but the
    sources; each merge reads, tensor by tensor, the base and the experts it needs (a
    SafetensorsSource reads from a memory map: the page cache, not the heap).

    ``average`` and ``task_arithmetic`` reuse sums: theta = theta_0 + c * sum_{e in S} v_e, so a
    running sum (fp32, one model's size) of the previous subset is carried to the next by adding
    the experts that join and subtracting those that leave: O(params x |difference|) per merge
    instead of O(params x k) (see :func:`reuse_order`). Rounding drift is bounded: the sum is
    recomputed from scratch (sequentially, in sorted-member order) whenever a step would cost as
    much, after ``reanchor_every`` add/subtract steps, and for a tensor whose last merge was not
    finite. Between anchors every step adds at most half an ulp of the running sum, so the
    sum's error stays within (k + reanchor_every) * 2^-24 * max_t sum_e |v_e| of the exact
    sum: fp32 rounding, as the direct merge's own. Results equal merge_state_dicts to fp32
    tolerance (not bit for bit) and do not depend on the mode.

    Every other method merges directly, tensor by tensor, as :func:`merge_state_dicts` does:
    same task vectors, same per-(seed, subset, tensor) masks, bit-identical results.
    ``reuse=False`` sends average and task_arithmetic down that path too.
    """

    def __init__(self, name: str, params: dict[str, Any] | None, base: Any, *, seed: int = 0,
                 mode: str = "memory", device: str | torch.device = "cpu", base_dtype: torch.dtype | None = None,
                 names: Sequence[str] | None = None, reuse: bool = True, reanchor_every: int = 32):
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        self.name = name
        self.params = resolve_params(name, params)
        self.seed = seed
        self.mode = mode
        self.device = torch.device(device)
        self.base_dtype = base_dtype
        self.reanchor_every = int(reanchor_every)
        self._base_src = _as_source(base)
        if names is None:
            names = [n for n in self._base_src.keys() if self._base_src.dtype(n).is_floating_point]
        self.names = list(names)
        self.shapes = {n: tuple(self._base_src.shape(n)) for n in self.names}
        self.reuses_sums = reuse and name in SUM_METHODS
        self.cost = MergeCost()
        self.last_nonfinite: list[str] = []
        self._experts: dict[str, Any] = {}  # key -> source (stream) or flat task vector (memory)
        self._setup_read = 0
        offsets, o = {}, 0
        for n in self.names:
            offsets[n] = o
            o += math.prod(self.shapes[n])
        self._offsets, self.numel = offsets, o
        self._base_flat = None
        if mode == "memory":
            self._base_flat = torch.empty(self.numel, dtype=torch.float32, device=self.device)
            for n in self.names:
                self._view(self._base_flat, n).copy_(self._load_base(n))
                self._base_src.release(n)
        self._acc = None  # running sum: flat fp32
        self._acc_members: tuple[str, ...] | None = None
        self._acc_steps = 0
        self._dirty: set[str] = set()

    # ---- inputs ------------------------------------------------------------------------------

    def _view(self, flat: Tensor, n: str) -> Tensor:
        o = self._offsets[n]
        return flat[o:o + math.prod(self.shapes[n])].view(self.shapes[n])

    def _read_base(self, n: str) -> Tensor:
        if self._base_flat is not None:
            return self._view(self._base_flat, n)
        return self._load_base(n)

    def _load_base(self, n: str) -> Tensor:
        t = self._base_src.get(n).to(self.device)
        if self.base_dtype is not None:
            t = t.to(self.base_dtype)
        return t.float()

    def add_expert(self, key: str, expert: Any, vocab_cut: Sequence[str] | dict[str, int] = ()) -> None:
        """Register an expert (its weights: a dict or a source). Memory mode computes its task
        vector now, so the caller may free the weights afterwards.

        ``vocab_cut``: tensors (embed_tokens / lm_head) whose rows beyond the base's are dropped,
        for an expert whose vocabulary grew at fine-tuning (models.check_compatible finds them):
        the merge then keeps the base's vocabulary, as mergekit does (see the note in
        mergelaws.models). Only rows are cut; every other dim must match."""
        src = _as_source(expert)
        if vocab_cut:
            rows = {}
            for n in vocab_cut:
                shape, base = tuple(src.shape(n)), self.shapes[n]
                if len(shape) != len(base) or shape[1:] != base[1:] or shape[0] < base[0]:
                    raise ValueError(f"expert {key}: {n} has shape {shape}, base {base}: not the base's "
                                     f"vocabulary with rows appended")
                rows[n] = base[0]
            src = RowCutSource(src, rows)
        for n in self.names:
            if n not in src:
                raise ValueError(f"expert {key}: tensor {n} is missing")
            if tuple(src.shape(n)) != self.shapes[n]:
                raise ValueError(f"expert {key}: {n} has shape {tuple(src.shape(n))}, base {self.shapes[n]}")
        if self.mode == "stream":
            self._experts[key] = src
            return
        flat = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        before = getattr(src, "bytes_read", 0)
        for n in self.names:
            torch.sub(src.get(n).to(self.device).float(), self._view(self._base_flat, n), out=self._view(flat, n))
            src.release(n)
        self._setup_read += getattr(src, "bytes_read", 0) - before
        self._experts[key] = flat

    def _delta(self, key: str, n: str, b: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """Task vector of expert ``key`` for tensor ``n`` (fp32; ``b`` = the base tensor)."""
        e = self._experts[key]
        if self.mode == "memory":
            v = self._view(e, n)
            return v if out is None else out.copy_(v)
        b = self._read_base(n) if b is None else b
        w = e.get(n).to(self.device).float()
        return torch.sub(w, b) if out is None else torch.sub(w, b, out=out)

    def _release(self, n: str) -> None:
        """Stream mode: drop tensor ``n``'s mapped pages once merged (see SafetensorsSource.release)."""
        if self.mode == "stream":
            for src in [self._base_src, *self._experts.values()]:
                src.release(n)

    def bytes_read(self) -> int:
        """Bytes of weights read so far (setting up and merging)."""
        srcs = [self._base_src] + [e for e in self._experts.values() if not isinstance(e, Tensor)]
        return self._setup_read + sum(getattr(s, "bytes_read", 0) for s in srcs)

    def held_bytes(self) -> int:
        """Bytes of tensors this merger holds (base, task vectors, running sum)."""
        flats = [self._base_flat, self._acc] + [e for e in self._experts.values() if isinstance(e, Tensor)]
        return sum(t.numel() * t.element_size() for t in flats if t is not None)

    # ---- merging -----------------------------------------------------------------------------

    def merge(self, members: Sequence[str], subset_id: str = "",
              out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The merged weights of ``members`` (expert keys; their order is the order of the
        models for the seeded masks, as in merge_state_dicts). Written into ``out``'s tensors
        (cast to their dtype) when given, else returned as new fp32 tensors. The names of
        non-finite merged tensors are left in ``last_nonfinite``."""
        members = list(members)
        unknown = [m for m in members if m not in self._experts]
        if unknown:
            raise KeyError(f"unknown expert(s) {unknown}; added: {sorted(self._experts)}")
        if len(set(members)) != len(members):
            raise ValueError(f"repeated expert in {members}")
        self.cost.merges += 1
        result: dict[str, Tensor] = {} if out is None else out
        bad: list[str] = []

        def emit(n: str, value: Tensor, scratch: bool = False) -> None:
            """Store one merged tensor; ``scratch``: ``value`` lives in a reused buffer."""
            if out is None:
                result[n] = value.clone() if scratch else value
            else:
                out[n].copy_(value)
            if not _all_finite(result[n]):
                bad.append(n)

        if not members:
            for n in self.names:
                emit(n, self._read_base(n), scratch=True)
        elif self.reuses_sums:
            self._merge_sum(members, emit)
        else:
            self._merge_direct(members, subset_id, emit)
        self.last_nonfinite = bad
        if self.reuses_sums and members:
            self._dirty = set(bad)
        return result

    def _merge_direct(self, members: list[str], subset_id: str, emit) -> None:
        self.cost.direct += 1
        k = len(members)
        extra_state = None
        if self.name == "ties" and self.params["trim_scope"] == "global":
            names = sorted(self.names)
            extra_state = _global_trim_state_from(
                names, k, lambda i, n: self._delta(members[i], n), lambda n: self._stack(members, n), self.params)
        for n in self.names:
            b = self._read_base(n)
            extra: dict[str, Any] = {}
            if extra_state is not None:
                thresholds, tie_keep, majority = extra_state
                extra = {"thresholds": thresholds, "tie_keep": tie_keep[n], "majority_sign": majority}
            delta = merge_deltas(self.name, self._stack(members, n, b), self.params,
                                 seed=tensor_seed(self.seed, subset_id, n), **extra)
            emit(n, b + delta)
            self._release(n)

    def _stack(self, members: list[str], n: str, b: Tensor | None = None) -> Tensor:
        if self.mode == "stream" and b is None:
            b = self._read_base(n)
        deltas = torch.empty((len(members), *self.shapes[n]), dtype=torch.float32, device=self.device)
        for i, m in enumerate(members):
            self._delta(m, n, b, out=deltas[i])
        return deltas

    def _merge_sum(self, members: list[str], emit) -> None:
        k = len(members)
        c = sum_coefficient(self.name, self.params, k)
        if self._acc is None:
            self._acc = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        prev = self._acc_members
        new = tuple(sorted(members))
        if prev is None:
            add, rem = list(new), []
        else:
            add = [m for m in new if m not in prev]
            rem = [m for m in prev if m not in new]
        steps = len(add) + len(rem)
        fresh = prev is None or steps >= k or self._acc_steps + steps > self.reanchor_every
        if fresh:
            self.cost.anchors += 1
            self._acc_steps = 0
        else:
            self.cost.updates += steps
            self._acc_steps += steps
        whole = self.mode == "memory" and not fresh and not self._dirty
        if whole:  # one flat add/subtract per expert that joins or leaves
            for m in add:
                self._acc.add_(self._experts[m])
            for m in rem:
                self._acc.sub_(self._experts[m])
        tmp = None
        for n in self.names:
            acc = self._view(self._acc, n)
            b = self._read_base(n)
            if fresh or n in self._dirty:
                for i, m in enumerate(new):
                    if i == 0:
                        self._delta(m, n, b, out=acc)
                    else:
                        acc.add_(self._delta(m, n, b))
            elif not whole:
                for m in add:
                    acc.add_(self._delta(m, n, b))
                for m in rem:
                    acc.sub_(self._delta(m, n, b))
            if tmp is None or tmp.numel() < acc.numel():
                tmp = torch.empty(max(acc.numel(), 1 << 16), dtype=torch.float32, device=self.device)
            merged = tmp[:acc.numel()].view(acc.shape)
            emit(n, torch.add(b, acc, alpha=c, out=merged), scratch=True)
            self._release(n)
        self._acc_members = new


def merge_memory_estimate(numel: int, largest: int, n_experts: int, *, mode: str, reuse: bool) -> dict[str, int]:
    """Bytes a :class:`SubsetMerger` holds (and needs as scratch) for a model of ``numel`` merged
    floating parameters whose largest tensor has ``largest`` entries, with ``n_experts``
    experts: fp32 base and task vectors (memory mode), running sum (sum reuse), and the
    per-tensor working set (an upper bound: measured peaks on a 148M-parameter model were
    70-95% of it, benchmarks/bench_sweep_memory.py)."""
    f = 4
    held = {"base": numel * f if mode == "memory" else 0,
            "task_vectors": numel * f * n_experts if mode == "memory" else 0,
            "running_sum": numel * f if reuse else 0}
    # one tensor's working set: running-sum steps touch a few tensors (the base's, the experts'
    # being added or removed, a scratch output); a direct merge stacks k task vectors and the
    # method makes ~2k + 4 more of that size (trimmed/sparse copies, masks, sums)
    held["working"] = largest * f * ((n_experts + 4) if reuse else (3 * n_experts + 4))
    held["total"] = sum(held.values())
    return held
