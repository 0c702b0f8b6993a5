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
    "merge_deltas",
    "merge_state_dicts",
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


def ties_keep_count(density: float, numel: int) -> int:
    """Entries TIES keeps per model: round-half-up(density * numel), in [1, numel].

    Round-half-up rather than ceil so that float noise (0.2 * 10 =
    2.0000000000000004) cannot add an entry.
    """
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def _keep_mask(absv: Tensor, threshold: Tensor, n_keep: int | None, tie_keep: int | None = None) -> Tensor:
    """Entries |v| > threshold, plus entries == threshold in flat-index order until
    ``n_keep`` are kept in all (per tensor), or the first ``tie_keep`` of them (global)."""
    keep = absv > threshold
    equal = absv == threshold
    quota = n_keep - int(keep.sum()) if tie_keep is None else tie_keep
    if quota >= int(equal.sum()):
        return keep | equal
    if quota <= 0:
        return keep
    flat = equal.reshape(-1)
    dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    first = flat & (flat.cumsum(0, dtype=dtype) <= quota)
    return keep | first.reshape(equal.shape)


def _trim(deltas: Tensor, density: float, thresholds: Tensor | None, tie_keep: Tensor | None) -> Tensor:
    """Zero all but the top-``density`` entries by |v|, per model (row of ``deltas``).

    Per tensor (thresholds is None): keeps exactly ties_keep_count(density, numel)
    entries, found with an O(n) ``torch.kthvalue`` selection; entries tied at
    the threshold are kept in flat-index order until the count is reached.
    Global (thresholds given): keep |v| > thresholds[i] plus the first
    tie_keep[i] entries equal to it, as precomputed over all tensors by
    :func:`merge_state_dicts`.
    """
    if thresholds is None and density >= 1.0:
        return deltas
    trimmed = torch.empty_like(deltas)
    for i, v in enumerate(deltas):
        absv = v.abs()
        if thresholds is None:
            n = absv.numel()
            n_keep = ties_keep_count(density, n)
            t = torch.kthvalue(absv.reshape(-1), n - n_keep + 1).values  # n_keep-th largest
            mask = _keep_mask(absv, t, n_keep)
        else:
            t = thresholds[i].to(absv.device, absv.dtype)
            mask = _keep_mask(absv, t, None, int(tie_keep[i]) if tie_keep is not None else absv.numel())
        trimmed[i] = torch.where(mask, v, 0.0)
    return trimmed


def _elect(trimmed: Tensor, zero_sign: str, majority_sign: float | None) -> Tensor:
    """Elected sign per entry: sign(sum_i trimmed_i); entries whose sum is 0 get
    +1 ('positive') or the sign most entries elected ('majority', ties -> +1)."""
    elected = torch.sign(trimmed.sum(0))
    if zero_sign == "positive":
        fill = 1.0
    elif majority_sign is not None:
        fill = majority_sign
    else:
        fill = _majority(elected)
    return torch.where(elected == 0, torch.full_like(elected, fill), elected)


def _majority(elected: Tensor) -> float:
    """+1 or -1: the sign held by most entries of ``elected``; +1 on a tie."""
    return -1.0 if float(elected.sum()) < 0 else 1.0


def _disjoint_mean(trimmed: Tensor, elected: Tensor) -> Tensor:
    """Mean over the models whose (nonzero) entry agrees with the elected sign."""
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for t in trimmed:  # one model at a time: less memory than [k, ...] masks
        agree = t * elected > 0  # elected is +-1, so this is "same sign and nonzero"
        total += torch.where(agree, t, 0.0)
        count += agree
    return total / count.clamp_min(1)


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
    elected = _elect(trimmed, zero_sign, majority_sign)
    return _disjoint_mean(trimmed, elected) * scale


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
    masked = torch.where(keep, v, 0.0)
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
    found with an O(n) ``torch.kthvalue`` selection instead of a sort."""
    n = absv.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=absv.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=absv.device)
    t = torch.kthvalue(absv, m).values  # m-th smallest
    below = absv < t
    equal = absv == t
    quota = m - int(below.sum())
    dtype = torch.int32 if n < 2**31 else torch.int64
    return below | (equal & (equal.cumsum(0, dtype=dtype) <= quota))


def sparsify_breadcrumbs(deltas: Tensor, density: float | Sequence[float], gamma: float | Sequence[float],
                         rescale: str = "none") -> Tensor:
    """Per model: rank |v| ascending (stable: ties by flat index), zero the n_top
    largest and keep the next n_keep (see :func:`breadcrumbs_counts`), zero the rest
    (the two cut-offs are O(n) kthvalue selections, not a sort);
    rescale 'l1' or 'none' (mergekit's rescale). A model with density >= 1 is kept
    whole (mergekit returns the tensor unchanged). Parameters may be per model."""
    k = deltas.shape[0]
    dens, gams = _per_model(density, k, "density"), _per_model(gamma, k, "gamma")
    out = torch.empty_like(deltas)
    for i, v in enumerate(deltas):
        if dens[i] >= 1.0:
            out[i] = v
            continue
        flat = v.reshape(-1)
        n = flat.numel()
        n_keep, n_top = breadcrumbs_counts(n, dens[i], gams[i])
        absv = flat.abs()
        hi = n - n_top  # keep ascending (stable) ranks [hi - n_keep, hi)
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
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=v.device).expand_as(order))  # 0-based
    rho = ranks.to(v.dtype) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon + 2.0 * epsilon * rho).reshape(v.shape)


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
      disjoint mean (exactly ``ties``'s _elect('positive') + _disjoint_mean).
    no consensus: merged = sum_i u_i, divided (normalize) by sum_i w_i (|.| < 1e-8 -> 1).
    """
    k = sparse.shape[0]
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {tuple(w.shape)}")
    w = w.to(sparse.device, sparse.dtype)
    if consensus:
        elected = torch.where(
            sum(sparse[i] * w[i] for i in range(k)) >= 0, 1.0, -1.0
        ).to(sparse.dtype)
        total = torch.zeros_like(sparse[0])
        div = torch.zeros_like(sparse[0])
        for i in range(k):
            u = sparse[i] * w[i]
            agree = torch.sign(u) == elected
            total += torch.where(agree, u, 0.0)
            div += agree * w[i]
        if not normalize:
            return total
        return total / torch.where(div == 0, torch.ones_like(div), div)
    total = torch.zeros_like(sparse[0])
    for i in range(k):
        total += sparse[i] * w[i]
    if not normalize:
        return total
    d = float(w.sum())
    return total / (1.0 if abs(d) < 1e-8 else d)


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
    names = _float_names(base)
    k = len(experts)
    thresholds = torch.empty(k)
    remaining = []
    for i, e in enumerate(experts):
        absv = torch.cat(
            [(e[n].float().to(base[n].device) - base[n].float()).abs().reshape(-1).cpu() for n in names]
        )
        n_keep = ties_keep_count(params["density"], absv.numel())
        thresholds[i] = torch.kthvalue(absv, absv.numel() - n_keep + 1).values
        remaining.append(n_keep - int((absv > thresholds[i]).sum()))
        del absv
    tie_keep: dict[str, Tensor] = {}
    sign_total = 0.0
    for n in names:
        absv = _deltas(base, experts, n).abs()
        quota = torch.zeros(k, dtype=torch.int64)
        for i in range(k):
            equal = int((absv[i] == thresholds[i].to(absv.device)).sum())
            quota[i] = min(remaining[i], equal)
            remaining[i] -= int(quota[i])
        tie_keep[n] = quota
        if params["zero_sign"] == "majority":
            trimmed = _trim(_deltas(base, experts, n), 1.0, thresholds, quota)
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
