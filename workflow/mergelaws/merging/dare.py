"""DARE: drop each task-vector entry with probability p, rescale the rest, average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mergelaws.merging.registry import SCALE_DOC, MergekitForm, Param, register


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
        Param("scale", float, 1.0, SCALE_DOC + " (Table 1: c = 1)", low=0.0, low_open=True),
    ],
    doc="DARE: theta_0 + scale * mean_i(m_i * v_i / (1-p)), m_i ~ Bernoulli(1-p) "
    "per entry and model (the official mask_merging with average_merging). "
    "Masks come from a CPU torch.Generator seeded with `seed` (pass "
    "tensor_seed(...)), so reruns are bit-identical on any device and in any "
    "order; the official code is unseeded.",
    stochastic=True,
    mergekit=MergekitForm(sparsify="random", consensus=False, normalize=False, rescale=True,
                          model_keys=("weight", "density")),  # mergekit's dare_linear
)
def _dare(deltas: Tensor, *, drop_rate: float, rescale: str, scale: float, seed: int = 0, **_: Any) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    factor = 1.0 / (1.0 - drop_rate) if rescale == "inverse" else 1.0
    total = torch.zeros_like(deltas[0])
    for v in deltas:  # one model's mask at a time bounds the memory
        keep = torch.rand(v.shape, generator=gen) >= drop_rate  # P(keep) = 1 - p
        total += v * keep.to(v.device) * factor
    return total / deltas.shape[0] * scale
