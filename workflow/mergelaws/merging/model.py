"""Merging whole models: one tensor (:func:`merge_deltas`), or whole state dicts
(:func:`merge_state_dicts`), with per-tensor seeds (:func:`tensor_seed`).

Every method follows the paper's Eq. 2 and works on task vectors ``v_i = theta_i - theta_0`` of
ONE tensor for the k merged experts::

    merged_delta = merge_deltas(name, deltas[k, *shape], params, seed=...)
    theta        = theta_0 + merged_delta

Arithmetic is float32 whatever the storage dtype (the official code forms task vectors in bf16
and loses precision on small deltas; we do not copy that).

Where the paper (arXiv 2509.24244) and its code disagree, the choice is an explicit named
parameter whose doc says which source each value follows (the paper's Table 1 settings, or its
official code's behaviour; README, "Merge methods").
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch import Tensor

from mergelaws.merging.registry import get_method, resolve_params
from mergelaws.merging.sparsify import kth_smallest, ties_keep_count, trim

__all__ = ["tensor_seed", "merge_deltas", "task_vectors", "global_trim_state_from", "merge_state_dicts"]


def tensor_seed(seed: int, subset_id: str, tensor_name: str) -> int:
    """Stable 63-bit seed for one tensor of one merged subset (sha256, not hash())."""
    key = f"{int(seed)}\x1f{subset_id}\x1f{tensor_name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2**63 - 1)


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


def task_vectors(base: dict[str, Tensor], experts: list[dict[str, Tensor]], name: str) -> Tensor:
    """The task vectors ``[k, *shape]`` (fp32, on the base's device) of tensor ``name``."""
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

    return global_trim_state_from(_float_names(base), len(experts), delta_of,
                                  lambda n: task_vectors(base, experts, n), params)


def global_trim_state_from(names: list[str], k: int, delta_of: Callable[[int, str], Tensor],
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
            trimmed = trim(deltas, 1.0, thresholds, quota)
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
            name, task_vectors(base, experts, n), resolved, seed=tensor_seed(seed, subset_id, n), **extra
        )
        out[n] = (b.float() + delta).to(b.dtype)
    return out
