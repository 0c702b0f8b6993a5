"""The fused sweep: for one (size, method), load the base and the experts once, then for every
subset build the merged weights in memory, evaluate them on every domain, and emit one row per
(subset, eval domain). No merged checkpoint is written.

The merges come from a merging.SubsetMerger: in memory (base + every task vector, fp32) when that fits
``sweep.max_memory_gb``, else streamed tensor by tensor from the safetensors files; average and
task_arithmetic carry a running sum from subset to subset (subsets in merging.reuse_order).
A task-aware method (free_merging) has the eval domain's own sparse expert added to the merge
while that domain is evaluated, when its expert is in the subset (SubsetMerger.task_expert).

``sweep.sampler: adaptive`` walks k by k through each k's seeded order (grid.adaptive_orders)
and stops adding subsets at a k once ``adaptive_decision`` says so: a pure function of the
rows already evaluated at that k, so a resumed run (PartialResults) takes the same decisions
and gives the same rows. Why each k stopped is logged and written beside the table
(``<out stem>.adaptive.json``, ``adaptive_state_path``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from mergelaws import data as D
from mergelaws import grid, merging, models
from mergelaws.evaluate import evaluate_examples
from mergelaws.io import atomic_path, write_text
from mergelaws.progress import Progress

COLUMNS = ["size", "params", "method", "k", "subset", "members", "eval_domain", "in_domain", "loss", "tokens",
           "examples", "skipped", "status"]


def load_eval_sets(cfg: dict, tokenizer, log=print) -> dict[str, D.Encoded]:
    """Each domain's tokenized eval set; examples left with no response token after truncation
    are skipped, counted, logged here and carried into the sweep table's ``skipped`` column."""
    e = cfg["eval"]
    out = {}
    for d in grid.domains(cfg):
        enc = D.load_domain(cfg, d, "eval", tokenizer, e["max_len"], limit=e["max_examples"])
        if enc.skipped or enc.truncated:
            log(f"eval set {d}: {enc.truncated} examples truncated to eval.max_len={e['max_len']} tokens, "
                f"{enc.skipped} skipped (no response token left); counted in the table's 'skipped' column")
        out[d] = enc
    return out


def run_sweep(cfg: dict, size: str, method: str, out: str | Path, expert_dirs: dict[str, str] | None = None,
              log=print, shard: str = "1of1") -> pd.DataFrame:
    params = cfg["methods"][method]
    device = models.resolve_device(cfg["sweep"]["device"])
    doms = grid.domains(cfg)
    base_path = grid.base_dir(cfg, size)
    expert_dirs = expert_dirs or {d: grid.expert_dir(cfg, size, d) for d in doms}
    subsets = grid.shard_subsets(cfg, size, shard)
    tag = f"{size}/{method}" + ("" if shard == "1of1" else f" shard {shard}")
    t0 = time.time()

    tok = models.load_tokenizer(base_path)
    allow_bin = cfg["allow_bin_checkpoints"]
    dtype = sweep_dtype(cfg, base_path, expert_dirs, log)
    log(f"sweep {tag}: merges stored in {dtype} (sweep.dtype: {cfg['sweep']['dtype']}), arithmetic in float32")
    model = models.load_model(base_path, dtype, device, allow_bin=allow_bin)
    n_params = models.count_params(model)
    live = models.float_state(model)
    merger = build_merger(cfg, method, params, model, live, base_path, expert_dirs, doms, device, tag, log)
    encoded = load_eval_sets(cfg, tok, log)
    evalsets = {d: enc.examples for d, enc in encoded.items()}
    log(f"sweep {tag}: {n_params:,} params, {len(doms)} experts, {len(subsets)} subsets x "
        f"{len(doms)} eval domains; loaded in {time.time() - t0:.1f}s")

    index = {d: i for i, d in enumerate(doms)}
    progress = PartialResults(out, fingerprint(cfg, size, method, base_path, expert_dirs, subsets))
    done = progress.done_ids()
    adaptive = grid.sweep_settings(cfg, size)["sampler"] == "adaptive"
    if adaptive:
        if shard != "1of1":
            raise ValueError(f"sweep.sampler = adaptive runs as one job per (size, method), not shard {shard!r}; "
                             f"set sweep.shards: 1")
        return _run_adaptive(cfg, size, method, out, log, tag, t0, model, tok, live, merger, encoded, evalsets,
                             n_params, subsets, progress, done, index, device)
    order = list(subsets)
    if merger.reuses_sums:  # consecutive subsets differ in few experts: cheap running-sum steps
        order = [subsets[i] for i in merging.reuse_order([s.members for s in subsets])]
    todo = [s for s in order if s.id not in done]
    if done:
        log(f"sweep {tag}: resuming, {len(subsets) - len(todo)} of {len(subsets)} subsets "
            f"already done (kept in {progress.dir})")
    # A resumed sweep with running sums takes the uninterrupted run's steps: the sums of subsets
    # done before the kill are replayed (merged again, not evaluated), so every later merge gets
    # the same float rounding and the table is bit for bit the uninterrupted run's.
    position = {s.id: i for i, s in enumerate(order)}
    cursor = replayed = 0
    prog = Progress(len(subsets), f"sweep {tag}")
    prog.update(len(subsets) - len(todo))
    chunk = cfg["sweep"]["chunk"]
    for start in range(0, len(todo), chunk):
        rows = []
        for s in todo[start:start + chunk]:
            with torch.no_grad():  # written straight into the live model's parameters
                if merger.reuses_sums:
                    for r in order[cursor:position[s.id]]:
                        merger.merge(r.members, r.id, out=live)
                        replayed += 1
                    cursor = position[s.id] + 1
                merger.merge(s.members, s.id, out=live)
            rows += _evaluate_subset(s, cfg, size, method, n_params, model, tok, live, merger, encoded,
                                     evalsets, device, tag, log)
            prog.update()
        progress.add(pd.DataFrame(rows, columns=COLUMNS))  # persisted before the next chunk starts
    prog.close()
    order = {s.id: i for i, s in enumerate(subsets)}
    table = progress.table()
    table = table.iloc[sorted(range(len(table)), key=lambda i: (order[table["subset"].iat[i]],
                                                                index[table["eval_domain"].iat[i]]))]
    table = table.reset_index(drop=True)
    write_table(table, out)
    progress.clear()
    c = merger.cost
    log(f"sweep {tag}: merge engine ({merger.mode}{', sum reuse' if merger.reuses_sums else ''}): "
        f"{c.merges} merges, " + (f"{c.anchors} sums from scratch + {c.updates} expert add/subtract steps, "
                                 if merger.reuses_sums else f"{c.direct} direct, ")
        + f"{merger.bytes_read() / 1e9:.3f} GB of weights read")
    if replayed:
        log(f"sweep {tag}: {replayed} running sums of subsets done before the resume replayed (not evaluated)")
    log(f"sweep {tag}: {len(todo)} merges evaluated ({len(subsets)} in the table) in "
        f"{time.time() - t0:.1f}s -> {out}")
    return table


def _evaluate_subset(s, cfg, size, method, n_params, model, tok, live, merger, encoded, evalsets, device, tag,
                     log) -> list[tuple]:
    """Merge one subset into the live model (already done by the caller) and evaluate it on every
    domain: its rows, as the uniform loop writes them."""
    rows = []
    bad = merger.last_nonfinite
    if bad:
        log(f"sweep {tag}: merge of subset {s.id} ({s.label}) has non-finite weights in "
            f"{bad[:3]}; recorded as failed (loss NaN), excluded from means and fits")
    for d in encoded:
        counts = (len(evalsets[d]), encoded[d].skipped)
        if bad:
            rows.append((size, n_params, method, s.k, s.id, s.label, d, d in s.members, float("nan"), 0,
                         *counts, "failed: non-finite weights"))
            continue
        with merger.task_expert(d, live):  # task-aware methods: d's own sparse expert, then undone
            res = evaluate_examples(model, evalsets[d], pad_id=tok.pad_token_id,
                                    batch_tokens=cfg["eval"]["batch_tokens"], device=device)
        status = "ok" if math.isfinite(res.loss) else "failed: non-finite loss"
        if status != "ok":
            log(f"sweep {tag}: subset {s.id} ({s.label}) gives a non-finite loss on {d}; recorded as failed")
        rows.append((size, n_params, method, s.k, s.id, s.label, d, d in s.members, res.loss, res.tokens,
                     *counts, status))
    return rows


# ---- sampler: adaptive ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptiveDecision:
    """Whether the adaptive sampler stops adding subsets at a k, after ``n`` evaluated there."""
    stop: bool
    n: int                 # subsets evaluated at this k
    n_pool: int            # N_k = C(M, k), the k-subsets there are
    sem: float             # finite-pool corrected standard error of the k's mean (NaN below 2 values)
    mean: float
    reason: str


def finite_pool_sem(values, n_pool: int) -> float:
    """Standard error of the mean of ``values`` (a sample without replacement from ``n_pool``
    subsets): s/sqrt(n) x sqrt(1 - n/N), s the sample sd (ddof = 1, which estimates the pool's
    S^2 = sum (y - Y)^2/(N - 1); the same as sigma/sqrt(n) x sqrt((N - n)/(N - 1)) with the
    pool's sigma^2 = sum (y - Y)^2/N); 0 when every subset is in; NaN with fewer than 2 values."""
    v = [float(x) for x in values if math.isfinite(x)]
    n = len(v)
    if n < 2:
        return float("nan")
    if n >= n_pool:
        return 0.0
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return sd / math.sqrt(n) * math.sqrt((n_pool - n) / n_pool)


def adaptive_decision(values, n_pool: int, target_sem: float, min_per_k: int, cap: int) -> AdaptiveDecision:
    """The adaptive sampler's rule at one k, from the view values of the subsets evaluated there
    so far (in its seeded order; NaN = a failed merge, counted as evaluated, not in the SEM):
    stop when every candidate is in (``cap`` = min(subsets_per_k, C(M, k))), else keep going
    until at least ``min_per_k`` finite values, then stop once the finite-pool corrected SEM
    is below ``target_sem``. Pure: the same values give the same decision (resumes)."""
    vals = [float(x) for x in values]
    n = len(vals)
    finite = [x for x in vals if math.isfinite(x)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    sem = finite_pool_sem(finite, n_pool)
    if n >= cap:
        why = (f"all C(M,k) = {n_pool} subsets evaluated" if cap >= n_pool
               else f"cap reached (sweep.subsets_per_k = {cap})") + (f", SEM {sem:.4g}" if math.isfinite(sem) else "")
        return AdaptiveDecision(True, n, n_pool, sem, mean, why)
    if len(finite) < min_per_k or not math.isfinite(sem):
        return AdaptiveDecision(False, n, n_pool, sem, mean, f"{len(finite)} < sweep.min_per_k = {min_per_k} values")
    if sem < target_sem:
        return AdaptiveDecision(True, n, n_pool, sem, mean, f"SEM {sem:.4g} < target {target_sem:g}")
    return AdaptiveDecision(False, n, n_pool, sem, mean, f"SEM {sem:.4g} >= target {target_sem:g}")


def subset_view_values(rows: pd.DataFrame, view: str) -> dict[str, float]:
    """subset id -> its value of a fit view (``in_domain``, ``cross_domain``, ``held_out``; as
    mergelaws.laws.views computes them: macro means over eval domains), from sweep rows; NaN
    for a failed merge (any non-finite loss) or a view with no domain (in_domain at k = 0)."""
    out = {}
    for sid, g in rows.groupby("subset", sort=False):
        loss = g["loss"].astype(float)
        if not loss.map(math.isfinite).all():
            out[sid] = float("nan")
            continue
        inside = g["in_domain"].astype(bool)
        part = loss[inside] if view == "in_domain" else loss[~inside] if view == "held_out" else loss
        out[sid] = float(part.mean()) if len(part) else float("nan")
    return out


def adaptive_state_path(out: str | Path) -> Path:
    """Where an adaptive sweep writes its sampler state: beside the table, ``<stem>.adaptive.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".adaptive.json")


def _run_adaptive(cfg, size, method, out, log, tag, t0, model, tok, live, merger, encoded, evalsets, n_params,
                  candidates, progress, done, index, device) -> pd.DataFrame:
    """The sweep loop of ``sampler: adaptive``: k by k, each k's seeded order, stopping per
    ``adaptive_decision``. The merges follow the evaluated sequence (k ascending, then the
    seeded order), so with running sums a resumed run replays the merges of the subsets done
    before the kill and gets the same float rounding."""
    settings = grid.sweep_settings(cfg, size)
    target, min_n, cap = float(settings["target_sem"]), int(settings["min_per_k"]), int(settings["subsets_per_k"])
    view = (cfg.get("fit") or {}).get("view", "cross_domain")
    M = len(encoded)
    prior = progress.table() if done else pd.DataFrame(columns=COLUMNS)
    values = subset_view_values(prior, view) if len(prior) else {}
    if done:
        log(f"sweep {tag}: resuming the adaptive sampler with {len(done)} subsets already done "
            f"(kept in {progress.dir})")
    log(f"sweep {tag}: sampler adaptive: view {view}, target SEM {target:g} nats, {min_n} to {cap} subsets per k")
    state = {"sampler": "adaptive", "view": view, "target_sem": target, "min_per_k": min_n, "cap": cap,
             "seed": cfg["seed"], "M": M, "k": {}}
    pending, n_pending, evaluated, replayed = [], 0, 0, 0
    chunk = cfg["sweep"]["chunk"]
    prog = Progress(len(candidates), f"sweep {tag}")
    for k, seq in grid.adaptive_orders(cfg, size).items():
        i = 0
        while True:
            dec = adaptive_decision([values[s.id] for s in seq[:i]], math.comb(M, k), target, min_n, len(seq))
            if dec.stop:
                break
            s = seq[i]
            with torch.no_grad():
                if s.id in done:
                    if merger.reuses_sums:  # replay the sum so later merges round as uninterrupted
                        merger.merge(s.members, s.id, out=live)
                        replayed += 1
                else:
                    merger.merge(s.members, s.id, out=live)
            if s.id not in done:
                rows = _evaluate_subset(s, cfg, size, method, n_params, model, tok, live, merger, encoded,
                                        evalsets, device, tag, log)
                frame = pd.DataFrame(rows, columns=COLUMNS)
                values.update(subset_view_values(frame, view))
                pending.extend(rows)
                n_pending += 1
                evaluated += 1
                if n_pending >= chunk:  # persisted before the next chunk starts
                    progress.add(pd.DataFrame(pending, columns=COLUMNS))
                    pending, n_pending = [], 0
            prog.update()
            i += 1
        log(f"sweep {tag}: k={k}: stopped after {dec.n} subset{'s' if dec.n != 1 else ''}: {dec.reason}")
        state["k"][str(k)] = {**asdict(dec), "subsets": [s.id for s in seq[:dec.n]]}
    progress.add(pd.DataFrame(pending, columns=COLUMNS))
    prog.close()
    order = {s.id: i for i, s in enumerate(candidates)}
    table = progress.table() if progress.chunks() else pd.DataFrame(columns=COLUMNS)
    table = table.iloc[sorted(range(len(table)), key=lambda i: (order[table["subset"].iat[i]],
                                                                index[table["eval_domain"].iat[i]]))]
    table = table.reset_index(drop=True)
    n_rows = sum(v["n"] for v in state["k"].values())
    state["evaluated"], state["candidates"] = n_rows, len(candidates)
    write_text(adaptive_state_path(out), json.dumps(state, indent=1, default=float) + "\n")
    write_table(table, out)
    progress.clear()
    if replayed:
        log(f"sweep {tag}: {replayed} running sums of subsets done before the resume replayed (not evaluated)")
    log(f"sweep {tag}: sampler adaptive: {n_rows} of {len(candidates)} candidate subsets in the table "
        f"({evaluated} merges evaluated in this run) in {time.time() - t0:.1f}s -> {out}; "
        f"sampler state in {adaptive_state_path(out)}")
    return table


ROUNDING_LIMIT = 0.05  # the share of the merged delta that sweep.dtype auto lets storage rounding lose
_LOW_PRECISION = ("bfloat16", "float16")


def sweep_dtype(cfg: dict, base_path, expert_dirs: dict[str, str] | None = None, log=None) -> str:
    """The dtype merged models are stored in during the sweep: sweep.dtype, where ``auto`` is the
    base's storage dtype (so a bf16 base gives bf16 merges, like the checkpoints a user would save),
    unless rounding to it would lose more than ``ROUNDING_LIMIT`` of the merged delta: then float32.

    Short fine-tuning leaves task vectors below bf16's resolution of the weights (SmolLM2's experts,
    24 steps at lr 1e-4: rounding the nine-expert average to bf16 loses 65% of its delta, and the
    sweep measured the rounding, not the merge). With ``expert_dirs`` (local safetensors), ``auto``
    measures that loss on the merge of all of them (:func:`merge_rounding_loss`) and keeps the
    low-precision dtype only when it is small; an explicit low-precision ``sweep.dtype`` is kept and
    the loss logged as a warning. ``log`` gets one line, once per process and setting."""
    setting = cfg["sweep"]["dtype"]
    store = models.storage_dtype(base_path)
    dtype = store if setting == "auto" else setting
    if dtype not in _LOW_PRECISION or not expert_dirs:
        return dtype
    loss = merge_rounding_loss(str(base_path), tuple(str(expert_dirs[d]) for d in sorted(expert_dirs)), dtype)
    if loss is None or loss <= ROUNDING_LIMIT:
        return dtype
    key = (str(base_path), tuple(sorted(map(str, expert_dirs.values()))), setting)
    said = key in _ROUNDING_SAID
    _ROUNDING_SAID.add(key)
    what = (f"storing the merge of all {len(expert_dirs)} experts in {dtype} loses {loss:.0%} of its delta "
            f"from the base (limit {ROUNDING_LIMIT:.0%}): the experts' task vectors are below {dtype}'s "
            f"resolution of the weights")
    if setting == "auto":
        if log and not said:
            log(f"sweep.dtype auto: {what}; merges are stored in float32 (set sweep.dtype: {dtype} to keep "
                f"{dtype} anyway)")
        return "float32"
    if log and not said:
        log(f"warning: sweep.dtype {setting}: {what}; the losses measure that rounding as much as the merge "
            f"(sweep.dtype: float32 or auto avoids it)")
    return dtype


_ROUNDING_SAID: set = set()


def merge_rounding_loss(base_path: str, expert_paths: tuple[str, ...], dtype: str) -> float | None:
    """‖round(θ0 + μ) − (θ0 + μ)‖ / ‖μ‖ over every floating-point tensor, with μ the mean of the
    experts' task vectors and round() a cast to ``dtype`` and back: the share of the merged delta
    that storing the merge of all the experts in ``dtype`` loses. Read tensor by tensor through
    memory maps (the base's and the experts' safetensors), on every step-th block of 4096
    entries (about 2^23 in all); tensors whose shapes differ from the base's (a grown vocabulary) are left out. None if any model is not a local safetensors
    directory, or if μ is zero. Cached per process, keyed by the files' sizes and times."""
    def stamp(path: str):
        return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(path).glob("*.safetensors")))

    return _rounding_loss(base_path, expert_paths, dtype, tuple(stamp(p) for p in (base_path, *expert_paths)))


@functools.lru_cache(maxsize=16)
def _rounding_loss(base_path: str, expert_paths: tuple[str, ...], dtype: str, _stamps) -> float | None:
    base = _open(base_path)
    experts = [_open(p) for p in expert_paths]
    if base is None or not experts or any(e is None for e in experts):
        return None
    low = models.resolve_dtype(dtype)
    names = [n for n in _float_keys(base)
             if all(n in e and tuple(e.shape(n)) == tuple(base.shape(n)) for e in experts)]
    # every step-th block of 4096 entries of each tensor (about 2^23 entries in all): the ratio to a
    # fraction of a percent, reading a small share of each file's pages
    step = max(1, sum(math.prod(base.shape(n)) for n in names) >> 23)

    def sample(t: torch.Tensor) -> torch.Tensor:
        flat, block = t.reshape(-1), 4096
        if step == 1 or flat.numel() < block * step:
            return flat.float()
        nb = flat.numel() // block
        return flat[:nb * block].view(nb, block)[::step].float().reshape(-1)

    err = delta = 0.0
    for name in names:
        theta0 = sample(base.get(name))
        mu = torch.zeros_like(theta0)
        for e in experts:
            mu += sample(e.get(name))
        mu = mu.div_(len(experts)).sub_(theta0)
        merged = theta0 + mu
        err += float(torch.linalg.vector_norm(merged.to(low).float().sub_(merged))) ** 2
        delta += float(torch.linalg.vector_norm(mu)) ** 2
    return math.sqrt(err / delta) if delta > 0 else None


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes this process can still allocate: MemAvailable (or the cgroup's limit, if lower) for
    the CPU; the free device memory for a GPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # cgroup v2 limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def choose_merge_mode(cfg: dict, live: dict, n_experts: int, reuse: bool, device, tag: str, log=print
                      ) -> tuple[str, bool]:
    """``(mode, sum reuse)`` of the sweep's SubsetMerger under ``sweep.max_memory_gb``: in memory
    (base and every task vector in fp32, plus the running sum) when that fits, else streaming
    tensor by tensor from the safetensors files with the running sum, else without it.
    Budget null = the live model plus 80% of the memory available now."""
    numel = sum(p.numel() for p in live.values())
    largest = max(p.numel() for p in live.values())
    live_bytes = sum(p.numel() * p.element_size() for p in live.values())
    limit = cfg["sweep"].get("max_memory_gb")
    if limit is None:
        avail = available_memory(device)
        budget = live_bytes + 0.8 * avail
        why = f"sweep.max_memory_gb null: the live model + 80% of the {avail / 1e9:.2f} GB available"
    else:
        budget = float(limit) * 1e9
        why = f"sweep.max_memory_gb = {limit}"
    options = [("memory", reuse), ("stream", reuse)] + ([("stream", False)] if reuse else [])
    need = {o: live_bytes + merging.merge_memory_estimate(numel, largest, n_experts, mode=o[0], reuse=o[1])["total"]
            for o in options}
    chosen = next((o for o in options if need[o] <= budget), options[-1])
    what = {("memory", True): f"in memory (base + {n_experts} task vectors + running sum, fp32)",
            ("memory", False): f"in memory (base + {n_experts} task vectors, fp32)",
            ("stream", True): "streaming tensor by tensor from the safetensors files (mmap; running sum held)",
            ("stream", False): "streaming tensor by tensor from the safetensors files (mmap)"}[chosen]
    log(f"sweep {tag}: merging {what}{', sums reused across subsets' if chosen[1] else ''}; est. "
        f"{need[chosen] / 1e9:.3f} GB incl. the live model ({live_bytes / 1e9:.3f} GB), in memory would be "
        f"{need[options[0]] / 1e9:.3f} GB; budget {budget / 1e9:.3f} GB ({why})")
    if need[chosen] > budget:
        log(f"sweep {tag}: WARNING: even streaming needs about {need[chosen] / 1e9:.3f} GB, over the budget; "
            f"going on (raise sweep.max_memory_gb or give the job more memory if it is killed)")
    return chosen


def _open(path) -> merging.SafetensorsSource | None:
    """A memory-mapped reader of a local model directory's safetensors files, else None."""
    p = Path(path)
    if not p.is_dir() or not any(p.glob("*.safetensors")):
        return None
    try:
        return merging.SafetensorsSource(p)
    except merging.CheckpointError as exc:
        raise models.ModelError(f"model directory {p} could not be read ({exc}); its weights are truncated or "
                                f"corrupt: copy it again or delete it so the workflow rebuilds it") from None


def _float_keys(src) -> set[str]:
    return {k for k in src.keys() if src.dtype(k).is_floating_point}


def build_merger(cfg: dict, method: str, params: dict, model, live: dict, base_path, expert_dirs: dict,
                 doms: list[str], device, tag: str, log=print) -> merging.SubsetMerger:
    """The sweep's SubsetMerger over the loaded base (``live``) and the experts, in memory or
    streaming as ``sweep.max_memory_gb`` allows. Experts whose safetensors hold the model's
    tensor names are checked from their config.json and safetensors headers
    (models.check_expert_files) and read through memory maps (no transformers model built);
    others are loaded through transformers and checked with models.check_compatible (memory
    mode). An expert whose vocabulary grew has its embedding rows beyond the base's cut, as
    mergekit does (see mergelaws.models), logged once per expert."""
    allow_bin = cfg["allow_bin_checkpoints"]
    names = list(live)
    mode, reuse = choose_merge_mode(cfg, live, len(doms), method in merging.SUM_METHODS, device, tag, log)
    base_src = _open(base_path)
    if base_src is not None and not all(n in base_src for n in names):
        base_src = None  # stored under other names than the model's: only transformers maps them
    if mode == "stream" and base_src is None:
        log(f"sweep {tag}: the base {base_path} is not a local safetensors directory holding the model's tensor "
            f"names, which streaming needs; merging in memory instead")
        mode = "memory"
    if mode == "stream":
        merger = merging.SubsetMerger(method, params, base_src, seed=cfg["seed"], mode="stream", device=device,
                                      base_dtype=models.resolve_dtype(sweep_dtype(cfg, base_path, expert_dirs)), names=names,
                                      reuse=reuse)
    else:
        merger = merging.SubsetMerger(method, params, {n: p.detach() for n, p in live.items()}, seed=cfg["seed"],
                                      mode="memory", device=device, names=names, reuse=reuse)
    # Every expert is checked against the base before anything is merged (models.check_compatible:
    # architecture, tied embeddings, tensor names and shapes): from its config.json and safetensors
    # headers where its files hold the model's tensor names (then read through memory maps), else
    # after loading it through transformers (memory mode only: hub ids, other names, .bin).
    # Embedding rows beyond the base's vocabulary are cut (logged once per expert).
    base_keys = _float_keys(base_src) if base_src is not None else set()
    srcs, cuts = {}, {}
    for d in doms:
        path = expert_dirs[d]
        src = _open(path)
        if src is not None and not all(n in src for n in names):
            if mode == "stream":
                missing = [n for n in names if n not in src][:3]
                raise models.ModelError(f"expert {path} does not match its base's parameters (missing {missing}); "
                                        f"was it fine-tuned from this base?")
            src = None  # stored under other names: transformers loads it and check_compatible judges
        if src is None and mode == "stream":
            raise models.ModelError(f"expert {path} is not a local safetensors model directory, which "
                                    f"streaming needs; convert it with save_pretrained, or raise "
                                    f"sweep.max_memory_gb so that the sweep loads it into memory")
        if src is not None:
            cuts[d] = models.check_expert_files(model, path, base_file_keys=base_keys)
        srcs[d] = src
    base_rows = {n: p.shape[0] for n, p in live.items() if p.dim()}
    for d in doms:
        path, src = expert_dirs[d], srcs[d]
        try:
            if src is None:
                em = models.load_model(path, "float32", "cpu", allow_bin=allow_bin)
                cuts[d] = models.check_compatible(model, em, path, allow_vocab_growth=True)
                src = {n: p.detach() for n, p in models.float_state(em).items()}
                del em
            if cuts[d]:
                log(f"sweep {tag}: " + models.vocab_cut_message(path, cuts[d], base_rows))
            merger.add_expert(d, src, vocab_cut=cuts[d])
        except models.ModelError:
            raise
        except ValueError as exc:
            raise models.ModelError(f"expert {path} does not match its base ({exc}); was it fine-tuned "
                                    f"from this base?") from None
    return merger


def fingerprint(cfg: dict, size: str, method: str, base: str, expert_dirs: dict[str, str], subsets) -> str:
    """What a sweep's results depend on; partial results with another fingerprint are discarded."""
    def stamp(path: str):
        p = Path(path)
        if not p.is_dir():
            return path
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                      if f.suffix in (".safetensors", ".json"))

    key = {"size": size, "method": method, "params": cfg["methods"][method], "seed": cfg["seed"],
           "eval": cfg["eval"], "dtype": sweep_dtype(cfg, base, expert_dirs), "domains": cfg["domains"],
           "system_prompt": cfg.get("system_prompt"),
           "subsets": [s.id for s in subsets], "base": stamp(base),
           "experts": {d: stamp(p) for d, p in sorted(expert_dirs.items())}}
    settings = grid.sweep_settings(cfg, size)
    if settings.get("sampler") == "adaptive":  # its decisions depend on these too
        key["adaptive"] = {"target_sem": settings["target_sem"], "min_per_k": settings["min_per_k"],
                           "view": (cfg.get("fit") or {}).get("view", "cross_domain")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class PartialResults:
    """Per-chunk progress of a sweep, next to its output: ``.<name>.partial/chunk-*.parquet``.

    Each chunk is written atomically once its subsets are evaluated, so a job killed at any
    point loses at most the chunk in flight; a rerun with the same fingerprint resumes.
    """

    def __init__(self, out: str | Path, key: str):
        out = Path(out)
        self.dir = out.parent / f".{out.name}.partial"
        self.key = key
        stamp = self.dir / "fingerprint"
        if self.dir.exists() and (not stamp.exists() or stamp.read_text() != key):
            shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            write_text(stamp, key)

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.parquet"))

    def done_ids(self) -> set[str]:
        return {sid for c in self.chunks() for sid in pd.read_parquet(c, columns=["subset"])["subset"]}

    def add(self, rows: pd.DataFrame) -> None:
        if len(rows):
            write_table(rows, self.dir / f"chunk-{len(self.chunks()):05d}.parquet")

    def table(self) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(c) for c in self.chunks()], ignore_index=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_table(table: pd.DataFrame, out: str | Path, csv: bool = False) -> None:
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    if csv:
        with atomic_path(Path(out).with_suffix(".csv")) as tmp:
            table.to_csv(tmp, index=False)


def aggregate(files: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate sweep tables into the one losses table (+ a CSV beside it)."""
    from mergelaws.io import read_table

    fix = "pass the sweep tables (results/sweeps/<size>/<method>/<shard>.parquet) that `mergelaws sweep` writes"
    table = pd.concat([read_table(f, "sweep table", COLUMNS, fix) for f in files], ignore_index=True)
    table = table.sort_values(["params", "size", "method", "k", "subset", "eval_domain"], kind="stable").reset_index(drop=True)
    write_table(table, out, csv=True)
    return table
