"""Many merges of one pool of experts (the fused sweep): :class:`SubsetMerger`, the subset order
that reuses running sums (:func:`reuse_order`), and its cost and memory accounting."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from mergelaws.merging.checkpoint import RowCutSource, as_source
from mergelaws.merging.model import global_trim_state_from, merge_deltas, tensor_seed
from mergelaws.merging.registry import get_method, resolve_params
from mergelaws.merging.sparsify import all_finite

__all__ = ["SUM_METHODS", "sum_coefficient", "reuse_order", "MergeCost", "SubsetMerger", "merge_memory_estimate"]


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

    A task-aware method (free_merging; registry ``expert=``) gets each expert's sparse
    lightweight expert at :meth:`add_expert` (flat indices and values per tensor, ~1% of a
    model); every merge keeps the fp32 values ``merged + e`` at those indices for its members,
    and :meth:`task_expert` writes them into the live weights for one eval domain and restores
    the saved entries afterwards (by index: bit for bit).
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
        self._base_src = as_source(base)
        if names is None:
            names = [n for n in self._base_src.keys() if self._base_src.dtype(n).is_floating_point]
        self.names = list(names)
        self.shapes = {n: tuple(self._base_src.shape(n)) for n in self.names}
        self.reuses_sums = reuse and name in SUM_METHODS
        self._expert_fn = get_method(name).expert
        self.task_aware = self._expert_fn is not None
        self._patches: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # key -> tensor -> (flat idx, e values)
        self._patched: dict[str, dict[str, Tensor]] = {}  # key -> tensor -> fp32 merged + e at idx (last merge)
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
        src = as_source(expert)
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
            self._add_patches(key)
            return
        flat = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        before = getattr(src, "bytes_read", 0)
        for n in self.names:
            torch.sub(src.get(n).to(self.device).float(), self._view(self._base_flat, n), out=self._view(flat, n))
            src.release(n)
        self._setup_read += getattr(src, "bytes_read", 0) - before
        self._experts[key] = flat
        self._add_patches(key)

    def _add_patches(self, key: str) -> None:
        """Task-aware methods: expert ``key``'s sparse lightweight expert, per tensor."""
        if not self.task_aware:
            return
        patches = {}
        for n in self.names:
            e = self._expert_fn(self._delta(key, n), **self.params).reshape(-1)
            idx = torch.nonzero(e).reshape(-1)  # a kept exact zero changes nothing
            if idx.numel():
                patches[n] = (idx, e[idx].clone())
            self._release(n)
        self._patches[key] = patches

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
        flats += [t for p in self._patches.values() for pair in p.values() for t in pair]
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
        self._patched = {m: {} for m in members if m in self._patches}

        def emit(n: str, value: Tensor, scratch: bool = False) -> None:
            """Store one merged tensor; ``scratch``: ``value`` lives in a reused buffer."""
            for m, vals in self._patched.items():  # task-aware: (theta_0 + merge) + e, in fp32
                if n in self._patches[m]:
                    idx, e = self._patches[m][n]
                    vals[n] = value.reshape(-1)[idx] + e
            if out is None:
                result[n] = value.clone() if scratch else value
            else:
                out[n].copy_(value)
            if not all_finite(result[n]):
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

    @contextmanager
    def task_expert(self, key: str, out: dict[str, Tensor]) -> Iterator[bool]:
        """While inside: the last merge (written into ``out``) with expert ``key``'s lightweight
        expert added, for a task-aware method whose last merged subset holds ``key``; yields
        whether anything changed. The entries it overwrites are saved and written back on exit,
        so ``out`` is the plain merge again, bit for bit."""
        vals = self._patched.get(key)
        if not vals:
            yield False
            return
        saved: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for n, v in vals.items():
                    flat = out[n].view(-1)
                    idx = self._patches[key][n][0].to(flat.device)
                    saved[n] = flat[idx]  # advanced indexing: a copy
                    flat[idx] = v.to(flat.device, flat.dtype)
            yield True
        finally:
            with torch.no_grad():
                for n, old in saved.items():
                    flat = out[n].view(-1)
                    flat[self._patches[key][n][0].to(flat.device)] = old

    def _merge_direct(self, members: list[str], subset_id: str, emit) -> None:
        self.cost.direct += 1
        k = len(members)
        extra_state = None
        if self.name == "ties" and self.params["trim_scope"] == "global":
            names = sorted(self.names)
            extra_state = global_trim_state_from(
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
