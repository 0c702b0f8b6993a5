"""FR-Merging and FREE-Merging: a frequency-domain filter on each task vector, then TIES's sign
election and a weighted SUM; FREE-Merging adds the evaluated task's own lightweight expert.

Read from the official LLM code (the FREE-Merging repository's ``merge_llm/``, its mergekit
fork: ``merge_methods/generalized_task_arithmetic.py`` method ``fourier`` = FR-Merging,
``merge_methods/fourier_merging.py`` method ``FREE``), with task vectors in fp32 here as for every
method. For one tensor and the k merged experts, ``v_t = theta_t - theta_0``:

1. Filter (2-D tensors only; 1-D and >2-D tensors pass unchanged)::

       F   = fft2(v_t)                      (no fftshift: F[0, 0] is the DC component)
       d   = dist((i, j), (H // 2, W // 2))  (float32 sqrt of the integer squared distance)
       M   = [d <= r0] + [r0 <= d <= R],    r0 = min(H, W) // 10,  R = ratio * min(H, W)
       v~t = Re(ifft2(F * M))

   The disk is centred on the middle of the UNshifted grid, i.e. on the highest frequencies, so
   the filter keeps the high frequencies and removes the region around DC (the corners of the
   grid): a high-pass filter. The released code computes M as a low-pass part (d <= r0) plus a
   band-pass part (r0 <= d <= R) whose inverse transforms it adds, so the frequencies at exactly
   d = r0 count twice (``double_ring``; false gives the plain disk ``[d <= R]``). At ratio 0.9 the
   disk holds a whole square spectrum (its corners are at sqrt(2)/2 * n < 0.9 n): the filter is
   the identity there but for that ring. On a rectangular matrix (MLP, embedding) it removes a
   large part of the spectrum, DC included (:func:`spectrum_kept`). The FFT runs in float32 on the
   CPU whatever the device, as the released code does (``delta.float().cpu()``): the sign election
   below must not depend on a device's FFT rounding.

2. Combine (mergekit's consensus, :func:`mergelaws.merging.combine_deltas`)::

       u_t      = w * v~t
       elected  = +1 where sum_t u_t >= 0, else -1
       merged   = theta_0 + scale * sum_t u_t [sign(u_t) == elected]    (zeros never agree)

   a SUM (the released ``normalize`` default is false); ``normalize: true`` divides by
   sum_t w [agree_t] (0 -> 1).

FREE-Merging's lightweight expert (:func:`free_expert`): the task's RAW task vector kept at its
top floor(expert_density * numel) entries by |v| (per tensor, 1-D tensors too; stable ascending
order, the largest ranks kept, as breadcrumbs), added unscaled: ``theta = (theta_0 + scale *
merged) + e``. In the sweep and in ``mergelaws downstream`` the eval domain selects its own
expert (oracle routing), see :meth:`mergelaws.merging.SubsetMerger.task_expert`; ``mergelaws
merge --task DOMAIN`` (``merge_method: free_merging``) saves the merge with DOMAIN's expert added
(:func:`mergelaws.merging.mergekit.merge_task_vectors`, ``task=``), and refuses to run without it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from mergelaws.merging.gta import combine_deltas
from mergelaws.merging.registry import SCALE_DOC, MergekitForm, Param, register
from mergelaws.merging.sparsify import sparsify_breadcrumbs

__all__ = ["RELEASED_RATIO", "frequency_mask", "spectrum_kept", "frequency_filter", "fr_filter_all", "free_expert",
           "fr_combine"]

RELEASED_RATIO = 0.9  # the released code's high_ratio (hard-coded there)


@lru_cache(maxsize=64)
def _mask(h: int, w: int, ratio: float, double_ring: bool) -> tuple[Tensor, bool]:
    """(mask [h, w] float32 on the CPU, whether it is all ones)."""
    rows = torch.arange(h, dtype=torch.int64).reshape(-1, 1) - h // 2
    cols = torch.arange(w, dtype=torch.int64).reshape(1, -1) - w // 2
    dist = torch.sqrt((rows * rows + cols * cols).to(torch.float32))
    radius = min(h, w) * ratio  # compared in float32, as the released code's float tensor <= Python float
    disk = dist <= radius
    if double_ring:
        r0 = min(h, w) // 10
        mask = (dist <= r0).to(torch.float32) + ((dist >= r0) & disk).to(torch.float32)
    else:
        mask = disk.to(torch.float32)
    return mask, bool((mask == 1).all())


def frequency_mask(shape: tuple[int, int], ratio: float = RELEASED_RATIO, double_ring: bool = True) -> Tensor:
    """The filter's mask M [H, W] (float32, CPU; values 0, 1, 2) on the unshifted fft2 grid."""
    h, w = shape
    return _mask(int(h), int(w), float(ratio), bool(double_ring))[0].clone()


def spectrum_kept(shape: tuple[int, int], ratio: float = RELEASED_RATIO) -> float:
    """Fraction of the fft2 grid of an [H, W] matrix inside the kept disk (d <= R)."""
    h, w = shape
    return float(_mask(int(h), int(w), float(ratio), False)[0].mean())


def frequency_filter(v: Tensor, ratio: float = RELEASED_RATIO, double_ring: bool = True) -> Tensor:
    """FR-Merging's filter of ONE task vector (fp32, same device): Re(ifft2(fft2(v) * M)) for a
    2-D ``v`` (computed on the CPU), ``v`` itself otherwise and where M is all ones (only with
    ``double_ring`` false and the disk covering the grid: exactly the identity)."""
    if v.dim() != 2 or v.numel() == 0:
        return v
    mask, full = _mask(v.shape[0], v.shape[1], float(ratio), bool(double_ring))
    if full:
        return v
    spec = torch.fft.fft2(v.detach().to("cpu", torch.float32))
    spec.mul_(mask)
    return torch.fft.ifft2(spec).real.to(v.device)


def fr_filter_all(deltas: Tensor, ratio: float, double_ring: bool) -> Tensor:
    """:func:`frequency_filter` of each model's task vector in ``deltas`` [k, ...], one at a time
    (a model's filtered vector does not depend on the others or on k)."""
    if deltas.dim() != 3:
        return deltas
    out = torch.empty_like(deltas)
    for i in range(deltas.shape[0]):
        out[i] = frequency_filter(deltas[i], ratio, double_ring)
    return out


def fr_combine(filtered: Tensor, weight: float, scale: float, normalize: bool) -> Tensor:
    """scale * (sum, or weighted mean, of the w * v~t agreeing with the elected sign)."""
    k = filtered.shape[0]
    mixed = combine_deltas(filtered, torch.full((k,), float(weight)), consensus=True, normalize=normalize)
    return mixed if scale == 1.0 else mixed * scale


def free_expert(v: Tensor, *, expert_density: float, **_: Any) -> Tensor:
    """FREE-Merging's lightweight expert of ONE raw task vector (one tensor): its top
    floor(expert_density * numel) entries by |v| (stable ascending order, the largest ranks
    kept), zeros elsewhere; nothing kept where that count is 0 (small 1-D tensors)."""
    return sparsify_breadcrumbs(v.float().unsqueeze(0), expert_density, 0.0)[0]


_PARAMS = [
    Param(
        "ratio", float, RELEASED_RATIO,
        "radius R of the kept disk of frequencies, as a fraction of min(H, W), centred on the "
        "unshifted fft2 grid's middle (the highest frequencies): frequencies farther than R, "
        "around DC, are removed. 0.9 = the released code's high_ratio (identity on square "
        "matrices, up to the double_ring)",
        low=0.0, low_open=True,
    ),
    Param(
        "weight", float, 0.8,
        "per-model weight w multiplying every filtered task vector before the sign election "
        "(the released README command: --weights 0.8)",
        low=0.0, low_open=True,
    ),
    Param(
        "scale", float, 1.1,
        SCALE_DOC + ", here the sum of the agreeing entries (the released README command: "
        "--lambda_factor 1.1)",
        low=0.0, low_open=True,
    ),
    Param(
        "normalize", bool, False,
        "false (the released default): the agreeing w * v~ are summed; true: divided by the sum "
        "of their weights (a disjoint mean)",
    ),
    Param(
        "double_ring", bool, True,
        "true (the released code): the mask is low-pass (d <= min(H,W)//10) + band-pass "
        "(min(H,W)//10 <= d <= R), so frequencies at exactly d = min(H,W)//10 count twice; "
        "false: the plain disk d <= R",
    ),
]

_FR_DOC = (
    "FR-Merging (the released code's 'fourier'): per expert and 2-D tensor, v~ = Re(ifft2(fft2(v) "
    "* M)) with M a disk of radius ratio * min(H, W) around the unshifted grid's centre (a high-pass "
    "filter: DC and its neighbourhood removed; identity on square matrices at ratio 0.9 but for "
    "the double_ring); 1-D tensors unchanged. Then u = weight * v~, elected sign = +1 where "
    "sum(u) >= 0 else -1, theta_0 + scale * SUM of the u agreeing with it (zeros never agree; "
    "normalize: true divides by their weights). Defaults = the released README command "
    "(weight 0.8, lambda 1.1, ratio 0.9, normalize false). Deterministic; FFT on the CPU."
)


@register(
    "fr_merging",
    params=_PARAMS,
    doc=_FR_DOC,
    mergekit=MergekitForm(sparsify="fourier", consensus=True, normalize=False, rescale=False,
                          model_keys=("weight",)),
)
def _fr_merging(deltas: Tensor, *, ratio: float, weight: float, scale: float, normalize: bool, double_ring: bool,
                **_: Any) -> Tensor:
    return fr_combine(fr_filter_all(deltas, ratio, double_ring), weight, scale, normalize)


@register(
    "free_merging",
    params=[
        *_PARAMS,
        Param(
            "expert_density", float, 0.01,
            "fraction of the evaluated task's RAW task vector kept as its lightweight expert, "
            "per tensor: the top floor(expert_density * numel) entries by |v|, added unscaled "
            "(the released code's density 0.01)",
            low=0.0, high=1.0, low_open=True,
        ),
    ],
    doc="FREE-Merging: FR-Merging (same parameters, same merge) plus, when the sweep evaluates "
    "domain d and d's expert is in the merged subset, d's lightweight expert e_d (its raw task "
    "vector's top expert_density entries by |v|, per tensor, unscaled) added to the merged "
    "weights: theta = (theta_0 + merge) + e_d (oracle routing by the eval domain). Cross-domain "
    "rows are exactly FR-Merging's; `mergelaws merge --task DOMAIN` saves the merge with DOMAIN's "
    "expert added (without --task it stops); merge_state_dicts knows no task and gives FR-Merging. "
    "The released code (method 'FREE') computes exactly FR-Merging: its expert "
    "sparsify is magnitude_outliers(density=0.01, gamma=0), whose slice indices[n_bot:-n_top] "
    "with n_top = 0 is empty, so e = 0 (and its task model is fixed by a hard-coded "
    "task_name='lm', the --task_name flag unread); mergelaws implements the intended design.",
    expert=free_expert,
    # `mergelaws merge`: FR-Merging's form; the task's expert is added there with --task (mergekit.py)
    mergekit=MergekitForm(sparsify="fourier", consensus=True, normalize=False, rescale=False,
                          model_keys=("weight",)),
)
def _free_merging(deltas: Tensor, *, ratio: float, weight: float, scale: float, normalize: bool, double_ring: bool,
                  **_: Any) -> Tensor:
    return fr_combine(fr_filter_all(deltas, ratio, double_ring), weight, scale, normalize)
