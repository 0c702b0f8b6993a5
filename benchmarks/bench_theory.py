"""`mergelaws predict`'s sampled variant against the sweep it predicts, timed in one process.

Usage (from the repo root, venv active; the config's base and experts must exist)::

    python benchmarks/bench_theory.py --config config/smollm2-theory.yaml --size smol --seeds 0 1 2
    python benchmarks/bench_theory.py --config config.yaml --size m --seeds 0 --merges 4
    python benchmarks/bench_theory.py ... --per-batch-gradient   # also the gradient's two weight-gradient paths

The base, the task vectors and the eval sets are loaded once (``theory.run.load_inputs``, as
`mergelaws predict` loads them). Then, alternating so that a machine whose speed drifts (a shared
CPU) slows both alike: ``--merges`` of the sweep's own merges evaluated the way the sweep evaluates
them (the merge written into the model's weights, then ``evaluate_examples`` per eval domain), the
sampled variant at the config's ``theory`` settings for one seed, the merges again, the next seed, ...
The sweep's time is estimated as the mean seconds per baseline merge times the design's merges
(``grid.subsets``); the merge engine's own time (running sums, small) is left out, so the share is
an upper bound. The share in forward passes (fe) is the variant's own count over the design's
merges; each seed's share is also given against the baseline merges run just before and just after
it, which follow a drifting machine more closely. ``--per-batch-gradient``: the sampled variant's gradient (its gradient sample, bf16 backward
where auto picks it) with the linear weights' gradients formed per batch and once per domain
(``gradient_at(deferred=...)``), each twice, alternating.

Prints a markdown table; nothing is asserted on the timings.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def baseline_merges(cfg: dict, inp, subsets, log) -> list[float]:
    """Seconds of each of ``subsets``' merges evaluated as the sweep does (fp32 weights)."""
    from mergelaws.evaluate import evaluate_examples
    from mergelaws.theory import predict as P
    from mergelaws.theory.quantities import set_point

    live = dict(inp.model.named_parameters())
    saved = {n: live[n].detach().clone() for n in inp.base}
    params = cfg["methods"].get("average", {})
    out = []
    for s in subsets:
        t = time.perf_counter()
        beta = P.subset_beta(s.members, inp.experts, P.coefficient("average", params, s.k) if s.k else 0.0)
        set_point(live, inp.base, inp.vectors, beta)
        for examples in inp.evalsets.values():
            evaluate_examples(inp.model, examples, pad_id=inp.pad_id, batch_tokens=cfg["eval"]["batch_tokens"])
        out.append(time.perf_counter() - t)
        log(f"baseline merge {s.id} ({s.label}): {out[-1]:.1f}s")
    with torch.no_grad():
        for n, w in saved.items():
            live[n].copy_(w)
    return out


def main() -> int:
    from mergelaws.errors import MergelawsError, one_line

    try:
        return run()
    except MergelawsError as exc:  # bad input: one line, exit 2
        print(f"bench_theory: error: {one_line(exc, 2000)}", file=sys.stderr)
        return 2


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/smollm2-theory.yaml")
    ap.add_argument("--size", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--merges", type=int, default=2, help="baseline merges before each seed and after the last")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-batch-gradient", action="store_true")
    args = ap.parse_args()
    if args.merges < 1 or args.threads < 1 or min(args.seeds) < 0:
        ap.error("--merges and --threads must be at least 1 and --seeds non-negative")
    torch.set_num_threads(args.threads)
    from mergelaws import config as C
    from mergelaws import grid
    from mergelaws.theory import predict as P
    from mergelaws.theory import run as R
    from mergelaws.theory.quantities import (
        gradient_at,
        resolve_backward_dtype,
        subsample,
    )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cfg = C.load(args.config)
    inp = R.load_inputs(cfg, args.size, log=lambda *a: None)
    design = grid.subsets(cfg, args.size)
    method = "average" if "average" in cfg["methods"] else R.linear_methods(cfg, None)[0][0]
    step = max(1, len(design) // (args.merges * (len(args.seeds) + 1)))
    picks = iter(design[::step] * 2)
    merge_s, runs = [], []
    for seed in args.seeds:
        merge_s += baseline_merges(cfg, inp, [next(picks) for _ in range(args.merges)], log)
        sample = R.sample_settings(cfg, seed=seed)
        res = R.compute_variants(cfg, inp, [method], ["sampled"], log=log, sample=sample)[0]
        runs.append((seed, res))
    merge_s += baseline_merges(cfg, inp, [next(picks) for _ in range(args.merges)], log)
    per_merge = float(np.mean(merge_s))
    sweep_s = per_merge * len(design)

    th = R.sample_settings(cfg)
    print(f"\n### `sampled` ({method}) vs the sweep, {args.config} size {args.size}: {inp.n_params / 1e6:.1f}M "
          f"params, {len(inp.experts)} experts, {len(design)} merges; eval fraction {th['eval_fraction']:g}, "
          f"gradient fraction {th['gradient_fraction']:g}, backward {runs[0][1].sample['backward_dtype']}; "
          f"{args.threads} thread(s)\n")
    print(f"Baseline: {len(merge_s)} merges evaluated as the sweep does, {per_merge:.1f} s each "
          f"(min {min(merge_s):.1f}, max {max(merge_s):.1f}), so the sweep ~ {sweep_s:.0f} s.\n")
    print("| seed | seconds | share of the sweep's time | share against its adjacent merges | fe | share in forward "
          "passes | gradient s | center rest s | single-expert s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for j, (seed, r) in enumerate(runs):
        it = r.sample["seconds_by_item"]
        near = float(np.mean(merge_s[j * args.merges:(j + 2) * args.merges])) * len(design)  # the merges just before and after
        print(f"| {seed} | {r.seconds:.1f} | {r.seconds / sweep_s:.2%} | {r.seconds / near:.2%} | "
              f"{r.forward_equivalents:.2f} | {r.forward_equivalents / len(design):.2%} | "
              f"{it['gradient_and_gram']:.1f} | {it.get('center_loss_rest', 0):.1f} | {it['single_expert_losses']:.1f} |")
    print(f"\nPeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB.")

    if args.per_batch_gradient:
        M = len(inp.experts)
        beta_c = P.center_beta(method, cfg["methods"][method], M)
        sub = subsample(inp.evalsets, th["gradient_fraction"], th["sample_seed"])
        low = resolve_backward_dtype(th["backward_dtype"], "cpu", inp.n_params)
        times, a = {True: [], False: []}, {}
        for deferred in (False, True, False, True):
            t = time.perf_counter()
            x = gradient_at(inp.model, inp.base, inp.vectors, sub, pad_id=inp.pad_id, beta0=beta_c,
                            batch_tokens=cfg["eval"]["batch_tokens"], backward_dtype=low, deferred=deferred)
            times[deferred].append(time.perf_counter() - t)
            a[deferred] = np.array([x.domains[d].a for d in inp.evalsets])
        rel = float(np.max(np.abs(a[True] - a[False]).max(1) / np.abs(a[False]).max(1)))
        print(f"\nGradient on the {th['gradient_fraction']:g} sample ({low} backward), seconds per run: weight "
              f"gradients per batch {', '.join(f'{t:.1f}' for t in times[False])}; once per domain "
              f"{', '.join(f'{t:.1f}' for t in times[True])}; ratio {np.mean(times[True]) / np.mean(times[False]):.2f}x. "
              f"g^T v_i differ by at most {rel:.1e} of a domain's largest.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
