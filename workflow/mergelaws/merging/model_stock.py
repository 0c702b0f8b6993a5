"""Model Stock: theta_0 + t * mean of the task vectors, t from their mean pairwise cosine."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mergelaws.merging.registry import MergekitForm, Param, register

__all__ = ["model_stock_ratio"]


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
    mergekit=MergekitForm(sparsify=None, consensus=False, normalize=False, rescale=False,
                          model_keys=()),
)
def _model_stock(deltas: Tensor, *, filter_wise: bool, **_: Any) -> Tensor:
    t = model_stock_ratio(deltas, filter_wise)
    mean = deltas.mean(0)
    if t.numel() == 1:
        return mean * t.reshape(())
    return mean * t.reshape(-1, *([1] * (mean.dim() - 1)))
