"""Sparsify and selection helpers shared by the merge methods and the mergekit front end.

TIES's keep count and trim (:func:`trim`), the O(n) exact selection :func:`kth_smallest`, DARE's
random masks (:func:`sparsify_dare`), Model Breadcrumbs' magnitude band
(:func:`sparsify_breadcrumbs`), DELLA's keep probabilities (:func:`sparsify_della`), and the
blockwise elementwise tools they run on (:func:`blocks`, :func:`where0`, :func:`all_finite`).
Every fast path is bit-identical to its plain torch formulation (the tests compare them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["TIES_KEEP_ROUNDING", "ties_keep_count", "BLOCK", "blocks", "all_finite", "where0", "SELECT_MIN",
           "SELECT_SAMPLE", "kth_smallest", "trim", "RESCALE_CHOICES", "rescale_kept", "sparsify_dare",
           "breadcrumbs_counts", "sparsify_breadcrumbs", "della_keep_probs", "stable_abs_order", "sparsify_della"]


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
# blocks of BLOCK entries whose temporaries the allocator recycles and the caches hold. Only
# elementwise operations (and sequential per-entry sums) are blocked, so every entry is computed
# by exactly the same operations as on the whole tensor: results are bit-identical.
BLOCK = 1 << 18


def blocks(n: int, block: int | None = None):
    block = block or BLOCK
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


def all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()``: a finite sum proves it (a NaN or inf entry makes the sum
    non-finite) at ~0.2 ns an entry, where isfinite(...).all() takes ~6; only a non-finite sum
    (a non-finite entry, or an overflow) pays for the exact check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def where0(mask: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
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
SELECT_MIN = 1 << 16  # below this, kthvalue directly
SELECT_SAMPLE = 1 << 16


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
    if n >= SELECT_MIN:
        # sample ~8 sqrt(n) entries (4k..64k): the sort stays small and so does the bracket
        step = max(1, n // min(SELECT_SAMPLE, max(4096, int(8 * math.sqrt(n)))))
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
            buf = torch.empty(min(n, BLOCK), dtype=flat.dtype, device=flat.device) if absolute else None
            for sl in blocks(n):
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
    buf = torch.empty(min(n, BLOCK), dtype=vf.dtype, device=vf.device)
    for sl in blocks(n):
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
            where0(mask, vf[sl], out=of[sl])
    return out


def _keep_gt_and_first_ties(v: Tensor, out: Tensor, t: Tensor, n_keep: int,
                            n_lt_eq: tuple[int, int] | None = None) -> Tensor:
    """``out = torch.where(_keep_mask(|v|, t, n_keep), v, 0.0)``, blockwise; ``n_lt_eq``: the
    counts of |v| < t and == t (from kth_smallest), which give the count > t when v has no NaN."""
    vf, of = v.reshape(-1), out.view(-1)
    n = vf.numel()
    buf = torch.empty(min(n, BLOCK), dtype=vf.dtype, device=vf.device)
    if n_lt_eq is not None and not math.isnan(float(vf.sum())):  # no NaN: every entry is <, == or > t
        n_gt = n - n_lt_eq[0] - n_lt_eq[1]
    else:
        n_gt = 0
        for sl in blocks(n):
            n_gt += int(torch.count_nonzero(torch.abs(vf[sl], out=buf[:sl.stop - sl.start]) > t))
    left = n_keep - n_gt
    for sl in blocks(n):
        a = torch.abs(vf[sl], out=buf[:sl.stop - sl.start])
        mask = a > t
        if left > 0:
            first = torch.nonzero(a == t).reshape(-1)[:left]
            mask[first] = True
            left -= first.numel()
        where0(mask, vf[sl], out=of[sl])
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


def trim(deltas: Tensor, density: float, thresholds: Tensor | None, tie_keep: Tensor | None,
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


RESCALE_CHOICES = ("inverse", "l1", "none")
_L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def rescale_kept(v: Tensor, keep: Tensor, keep_prob: Tensor | float, rescale: str) -> Tensor:
    """Masked task vector ``keep * v`` rescaled.

    'inverse': divide by the keep probability (DARE / DELLA papers: unbiased in
    expectation); 'l1': multiply by ||v||_1 / ||keep * v||_1 (mergekit's
    ``rescale: true``; skipped when either norm is < 1e-7, as mergekit does);
    'none': no rescaling.
    """
    masked = where0(keep, v)
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
        out[i] = rescale_kept(v, keep, 1.0 - rates[i], rescale)
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
        out[i] = rescale_kept(v, keep.reshape(v.shape), 1.0, "none" if rescale == "none" else "l1")
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
    order = stable_abs_order(rows)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=v.device).expand_as(order))  # 0-based
    # divide by a tensor on v's device, not a Python number: CUDA computes x / (CPU scalar) as
    # x * (1 / scalar), up to an ulp off the CPU's division, which would move q and flip masks
    # (u < q) against the CPU; tensor / tensor is IEEE division on both (same values on the CPU)
    rho = ranks.to(v.dtype) / torch.tensor(n - 1, dtype=v.dtype, device=v.device) if n > 1 \
        else torch.full_like(rows, 0.5)
    return (density - epsilon + 2.0 * epsilon * rho).reshape(v.shape)


def stable_abs_order(rows: Tensor) -> Tensor:
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
        out[i] = rescale_kept(v, u < q, q, rescale)
    return out


def _check_della(density: float, epsilon: float) -> None:
    if density - epsilon <= 0.0 or density + epsilon > 1.0:
        raise ValueError(
            f"della: density - epsilon and density + epsilon must lie in (0, 1], got "
            f"density = {density!r}, epsilon = {epsilon!r}"
        )
