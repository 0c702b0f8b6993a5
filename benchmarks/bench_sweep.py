"""Time the sweep's merge engine (merging.SubsetMerger) against merging one subset at a time.

Usage (from the repo root, venv active)::

    python benchmarks/bench_sweep.py                          # data/bases/xs, all 511 non-empty subsets of 9
    python benchmarks/bench_sweep.py --size m                 # data/bases/m (1.7M params)
    python benchmarks/bench_sweep.py --size m --sample 64     # a seeded sample of 64 subsets
    python benchmarks/bench_sweep.py --ties-density 0.2       # ties with trimming (config default: 1.0)
    python benchmarks/bench_sweep.py --device cuda            # merges on a GPU

Nine experts are made by deterministic perturbation of the base (seeded N(0, 0.01^2) noise, one seed
per expert) and saved as safetensors model directories in a temporary directory. For each method:

(a) one at a time: for every subset, ``safetensors.torch.load_file`` the base and the subset's k
    experts, then ``merging.merge_state_dicts`` (what a loop over single merges costs);
(b) fused, direct: load the base and the nine experts once, then ``merge_state_dicts`` for every
    subset in memory (the sweep's engine before sum reuse);
(c) SubsetMerger in memory, as ``mergelaws.sweep.run_sweep`` uses it when the budget allows: task
    vectors held, subsets in ``merging.reuse_order``; average/task_arithmetic move a running sum from
    subset to subset (add the experts that join, subtract those that leave), other methods merge
    directly;
(d) SubsetMerger streaming from the safetensors files (the small-budget mode): nothing held but
    the running sum; each merge reads what it needs, tensor by tensor.

Merges only -- no evaluation and no checkpoint written. Bytes read are the sizes of the safetensors
files each approach opens ((a), (b), (c)) or the tensor bytes it reads ((d)). (b)-(d) are checked
against (a): bit-identical for every method but average (fp32 rounding, max abs diff printed). The
OS page cache serves repeated reads, so (a)'s and (d)'s wall times understate what they cost on a
cold or network disk. Methods take their parameters from config.yaml (ties density 1.0, the paper's
Table 1) unless --ties-density is given. Threads: --threads (default 1). The machine is shared: read
the ratios, not the seconds. Prints a markdown table.

``--device cuda``: every approach merges on the GPU ((a) loads each file straight to it, (b) holds
the base and experts there, (c)/(d) are SubsetMergers with device cuda, reading from the CPU-side
files/memory maps as the sweep does); the clock is read after torch.cuda.synchronize(), and the
checks compare results on the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_experts(base_dir: Path, tmp: Path, names: list[str]) -> list[Path]:
    from mergelaws import models

    model = models.load_model(base_dir)
    base = {n: p.detach().clone() for n, p in models.float_state(model).items()}
    dirs = []
    for j, name in enumerate(names):
        g = torch.Generator().manual_seed(100 + j)
        with torch.no_grad():
            for n, p in models.float_state(model).items():
                p.copy_(base[n] + 0.01 * torch.randn(p.shape, generator=g))
        models.save_model(model, tmp / name, tokenizer_from=base_dir)
        dirs.append(tmp / name)
    return dirs


def weights_file(d: Path) -> Path:
    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, f"{d}: expected one safetensors file, found {files}"
    return files[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="xs", help="base name under data/bases")
    ap.add_argument("--sample", type=int, default=None,
                    help="time a seeded sample of this many non-empty subsets (default: all 2^9 - 1 = 511)")
    ap.add_argument("--methods", nargs="+", default=["average", "ties"])
    ap.add_argument("--ties-density", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu): where the merges run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {dev}: torch.cuda.is_available() is False")

    def clock() -> float:
        """perf_counter after the GPU's queued work is done (on cuda)."""
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    from safetensors.torch import load_file

    from mergelaws import merging, models

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    seed = cfg["seed"]
    names = sorted(cfg["domains"])  # nine
    subsets = [c for k in range(1, len(names) + 1) for c in itertools.combinations(range(len(names)), k)]
    n_all = len(subsets)
    if args.sample and args.sample < n_all:
        subsets = sorted(random.Random(seed).sample(subsets, args.sample), key=lambda c: (len(c), c))
    base_dir = ROOT / "data" / "bases" / args.size

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as td:
        dirs = make_experts(base_dir, Path(td), names)
        base_file, expert_files = weights_file(base_dir), [weights_file(d) for d in dirs]
        size_of = {p: p.stat().st_size for p in [base_file, *expert_files]}
        all_bytes = size_of[base_file] + sum(size_of[f] for f in expert_files)
        n_params = None
        for method in args.methods:
            params = dict(cfg["methods"].get(method, {}))
            if method == "ties" and args.ties_density is not None:
                params["density"] = args.ties_density
            merging.resolve_params(method, params)
            sid = {s: "-".join(names[i] for i in s) for s in subsets}
            res = {}

            # (a) one merge at a time, each re-reading base and experts from disk
            t0 = clock()
            ref, a_bytes = {}, 0
            for j, s in enumerate(subsets):
                b = load_file(str(base_file), device=dev)
                es = [load_file(str(expert_files[i]), device=dev) for i in s]
                a_bytes += size_of[base_file] + sum(size_of[expert_files[i]] for i in s)
                out = merging.merge_state_dicts(method, b, es, params, seed=seed, subset_id=sid[s])
                if j % max(1, len(subsets) // 8) == 0:
                    ref[s] = out
            res["a"] = (0.0, clock() - t0, a_bytes, None)

            # (b) fused, direct: load once, merge_state_dicts per subset
            t0 = clock()
            model = models.load_model(base_dir, "float32", dev)
            base_state = {n: p.detach().float().clone() for n, p in models.float_state(model).items()}
            experts = []
            for d in dirs:
                em = models.load_model(d, "float32", dev)
                experts.append({n: p.detach().float() for n, p in models.float_state(em).items()})
                del em
            t_load = clock() - t0
            n_params = models.count_params(model)
            t1 = clock()
            diff = 0.0
            for s in subsets:
                out = merging.merge_state_dicts(method, base_state, [experts[i] for i in s], params, seed=seed,
                                                subset_id=sid[s])
                if s in ref:
                    diff = max(diff, check(ref[s], out, exact=True))
            res["b"] = (t_load, clock() - t1, all_bytes, None)

            # (c), (d): the SubsetMerger, in memory and streaming
            order = merging.reuse_order([[names[i] for i in s] for s in subsets])
            for label, mode in (("c", "memory"), ("d", "stream")):
                t0 = clock()
                base_src = merging.SafetensorsSource(base_dir)
                merger = merging.SubsetMerger(method, params, base_src, seed=seed, mode=mode,
                                              names=list(base_state), device=dev)
                for name, d in zip(names, dirs):
                    merger.add_expert(name, merging.SafetensorsSource(d))
                t_load = clock() - t0
                t1 = clock()
                err = 0.0
                for i in order:
                    s = subsets[i]
                    out = merger.merge([names[j] for j in s], sid[s])
                    if s in ref:
                        err = max(err, check(ref[s], out, exact=not merger.reuses_sums))
                c = merger.cost
                res[label] = (t_load, clock() - t1,
                              all_bytes if mode == "memory" else merger.bytes_read(), (c, err))
            rows.append((method, params, len(subsets), res))
            print(f"{method}: done", file=sys.stderr, flush=True)

    sample = f"a seeded sample of {len(subsets)} of the {n_all}" if len(subsets) < n_all else f"all {n_all}"
    print(f"\n### Sweep merges, {len(names)} experts of data/bases/{args.size} ({n_params / 1e6:.2f}M params), "
          f"{sample} non-empty subsets, {args.threads} thread(s){', ' + dev if dev != 'cpu' else ''}, merges only\n")
    print("| method | approach | load s (once) | s/merge | vs one-at-a-time | vs fused direct | MB read "
          "| expert-sized steps | max abs diff vs (a) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    what = {"a": "(a) one at a time", "b": "(b) fused, direct", "c": "(c) SubsetMerger, in memory",
            "d": "(d) SubsetMerger, streaming"}
    for method, params, n, res in rows:
        ta, tb = res["a"][1] / n, res["b"][1] / n
        for label in "abcd":
            tl, tm, nbytes, extra = res[label]
            per = tm / n
            if extra is None:
                steps = f"sum of k = {sum(len(s) for s in subsets)}"
                err = "(reference)" if label == "a" else "0 (bit-identical)"
            else:
                c, e = extra
                steps = (f"{c.updates} add/sub + {c.anchors} fresh sums" if c.anchors or c.updates
                         else f"sum of k = {sum(len(s) for s in subsets)}")
                err = f"{e:.1e}" if e else "0 (bit-identical)"
            print(f"| {method} {params or ''} | {what[label]} | {tl:.2f} | {per:.4f} | {ta / per:.1f}x "
                  f"| {tb / per:.2f}x | {nbytes / 1e6:.1f} | {steps} | {err} |")


def check(ref: dict, out: dict, exact: bool) -> float:
    """Max abs difference of two merged state dicts; asserts equality when ``exact``."""
    assert set(out) >= set(ref), sorted(set(ref) - set(out))[:3]
    diff = max(float((ref[n].float() - out[n].float()).abs().max()) for n in ref)
    if exact:
        bad = [n for n in ref if not torch.equal(ref[n], out[n])]
        assert not bad, f"merges differ at {bad[:3]}"
    else:
        assert diff < 1e-5, diff
    return diff


if __name__ == "__main__":
    sys.exit(main())
