"""Linear merges: average and task arithmetic, theta_0 + c * (mean or sum of the task vectors)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mergelaws.merging.registry import SCALE_DOC, MergekitForm, Param, register


@register(
    "average",
    params=[Param("scale", float, 1.0, SCALE_DOC + " (Table 1: c = 1)", low=0.0, low_open=True)],
    doc="Average: theta_0 + c * mean_i(v_i). With c = 1 this equals the mean of the "
    "expert weights (the official average_merging).",
    mergekit=MergekitForm(sparsify=None, consensus=False, normalize=True, rescale=False,
                          model_keys=("weight",)),  # mergekit's linear
)
def _average(deltas: Tensor, *, scale: float, **_: Any) -> Tensor:
    return deltas.mean(0) * scale


@register(
    "task_arithmetic",
    params=[
        Param(
            "scale", float, 0.8,
            SCALE_DOC + " (Table 1 / Sec 3.3.4: c = 0.8 with alpha = 1/k)",
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
    mergekit=MergekitForm(sparsify=None, consensus=False, normalize=False, rescale=False,
                          model_keys=("weight", "density")),
)
def _task_arithmetic(deltas: Tensor, *, scale: float, combine: str, **_: Any) -> Tensor:
    combined = deltas.mean(0) if combine == "mean" else deltas.sum(0)
    return combined * scale
