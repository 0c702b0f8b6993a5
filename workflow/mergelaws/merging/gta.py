"""mergekit-style methods (its "generalized task arithmetic"): dare_ties, breadcrumbs, della.

Each is "sparsify every task vector, then combine". The two steps are separate helpers so that
the mergekit YAML front end (:mod:`mergelaws.merging.mergekit`) can apply mergekit's per-model
weights and ``normalize`` switch with exactly the same sparsification (the sparsifiers are in
:mod:`mergelaws.merging.sparsify`)::

    combine_deltas(sparse, weights=None, consensus=..., normalize=True)

with weights = None (all 1) is what the registered methods compute.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mergelaws.merging.registry import SCALE_DOC, MergekitForm, Param, register
from mergelaws.merging.sparsify import (RESCALE_CHOICES, all_finite, blocks, sparsify_breadcrumbs, sparsify_dare,
                                        sparsify_della, where0)

__all__ = ["combine_deltas"]


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
    for sl in blocks(rows.shape[1]):
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
    if all_finite(total):  # every u finite: float-only arithmetic, same result
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
        total += where0(agree, us[i])
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
        Param("scale", float, 1.0, SCALE_DOC + " applied to the disjoint mean", low=0.0, low_open=True),
    ],
    doc="DARE-TIES: s_i = rescale(m_i * v_i), m_i ~ Bernoulli(1-p) drawn exactly as "
    "dare's masks (same seed -> same masks); elected sign = sign(sum_i s_i) "
    "(0 -> +1); theta_0 + scale * (sum of the s_i agreeing with it) / (their "
    "count, clamped >= 1). mergekit's dare_ties with normalize: true.",
    stochastic=True,
    mergekit=MergekitForm(sparsify="random", consensus=True, normalize=False, rescale=True,
                          model_keys=("weight", "density")),
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
        Param("scale", float, 1.0, SCALE_DOC, low=0.0, low_open=True),
    ],
    doc="Model Breadcrumbs (Davari & Belilovsky 2023; mergekit's magnitude_outliers "
    "sparsification): per model and tensor, sort |v| ascending (ties by flat "
    "index), drop the top floor(gamma*n), keep the next floor(density*n), zero "
    "the rest; theta_0 + scale * mean_i(s_i). mergekit's breadcrumbs sums "
    "instead (normalize: false); mergelaws.merging.mergekit maps that.",
    mergekit=MergekitForm(sparsify="outliers", consensus=False, normalize=False, rescale=False,
                          model_keys=("weight", "density", "gamma")),
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
        Param("scale", float, 1.0, SCALE_DOC + " applied to the disjoint mean", low=0.0, low_open=True),
    ],
    doc="DELLA (Deep et al. 2024; mergekit's della): per model and row "
    "(dim 0; 1-D tensors are one row), rank |v| ascending r = 1..n, keep "
    "probability q = density - epsilon + 2*epsilon*(r-1)/(n-1); m ~ Bernoulli(q) "
    "from a CPU generator seeded with `seed`; s_i = rescale(m_i * v_i); TIES sign "
    "election (0 -> +1) and disjoint mean, times scale (mergekit's della: "
    "normalize: true).",
    stochastic=True,
    mergekit=MergekitForm(sparsify="della", consensus=True, normalize=True, rescale=True,
                          model_keys=("weight", "density", "epsilon")),
)
def _della(deltas: Tensor, *, density: float, epsilon: float, rescale: str, scale: float, seed: int = 0,
           **_: Any) -> Tensor:
    sparse = sparsify_della(deltas, density, epsilon, rescale, seed)
    return combine_deltas(sparse, consensus=True, normalize=True) * scale
