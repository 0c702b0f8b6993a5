"""TIES: trim each task vector to its top entries by magnitude, elect a sign, take the disjoint mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mergelaws.merging.registry import SCALE_DOC, MergekitForm, Param, register
from mergelaws.merging.sparsify import all_finite, blocks, trim, where0


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
    for sl in blocks(n):
        elected = torch.sign(sums[sl])
        elected = torch.add(elected, elected == 0, alpha=fill)  # = where(elected == 0, fill, elected)
        total = torch.zeros_like(elected)
        count = torch.zeros_like(elected)
        if all_finite(sums[sl]):  # every entry finite: float-only arithmetic, same result
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
                total += where0(agree, t)
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
            SCALE_DOC + " applied to the disjoint mean (Table 1: 1; the paper also "
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
    mergekit=MergekitForm(sparsify="magnitude", consensus=True, normalize=True, rescale=False,
                          model_keys=("weight", "density")),
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
    trimmed = trim(deltas, density, thresholds, tie_keep)
    return _elect_and_mean(trimmed, zero_sign, majority_sign, scale)
