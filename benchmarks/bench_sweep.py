"""Time the fused sweep's merges against one-merge-at-a-time merges that re-read the experts.

Usage (from the repo root, venv active)::

    python benchmarks/bench_sweep.py                          # data/bases/xs, all 511 non-empty subsets of 9
    python benchmarks/bench_sweep.py --size m --sample 64     # data/bases/m, a seeded sample of 64 subsets
    python benchmarks/bench_sweep.py --ties-density 0.2       # ties with trimming (config default: 1.0)

Nine experts are made by deterministic perturbation of the base (seeded N(0, 0.01^2) noise, one seed
per expert) and saved as safetensors model directories in a temporary directory.

(a) fused, as ``mergelaws.sweep.run_sweep`` does it: load the base and the nine experts once
    (``models.load_model``), then ``merge.merge_state_dicts`` for every subset in memory;
(b) one merge at a time: for every subset, ``safetensors.torch.load_file`` the base and the
    subset's k experts, then the same ``merge_state_dicts``.

Merges only -- no evaluation and no checkpoint written, in either. Bytes read are the sizes of the
safetensors files each approach opens (the OS page cache serves repeated reads here, so (b)'s wall
time understates what it costs on a cold or network disk). The two merged state dicts are checked
bit-identical on a few subsets. Methods take their parameters from config.yaml (ties density 1.0,
as the paper's Table 1) unless --ties-density is given. Threads: --threads (default 1). The machine
is shared: read the ratios, not the seconds. Prints a markdown table.
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from mergelaws import merge, models

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
        n_params = None
        for method in args.methods:
            params = dict(cfg["methods"].get(method, {}))
            if method == "ties" and args.ties_density is not None:
                params["density"] = args.ties_density
            merge.resolve_params(method, params)

            # (a) fused: load once, merge every subset in memory
            t0 = time.perf_counter()
            model = models.load_model(base_dir, "float32", "cpu")
            base_state = {n: p.detach().float().clone() for n, p in models.float_state(model).items()}
            experts = []
            for d in dirs:
                em = models.load_model(d, "float32", "cpu")
                experts.append({n: p.detach().float() for n, p in models.float_state(em).items()})
                del em
            t_load = time.perf_counter() - t0
            n_params = models.count_params(model)
            fused_bytes = size_of[base_file] + sum(size_of[f] for f in expert_files)
            check = {}
            t1 = time.perf_counter()
            for j, s in enumerate(subsets):
                sid = "-".join(names[i] for i in s)
                out = merge.merge_state_dicts(method, base_state, [experts[i] for i in s], params, seed=seed,
                                              subset_id=sid)
                if j % max(1, len(subsets) // 4) == 0:
                    check[s] = out
            t_fused = time.perf_counter() - t0
            t_fused_merge = time.perf_counter() - t1

            # (b) one merge at a time, each re-reading base and experts from disk
            t0 = time.perf_counter()
            unfused_bytes = 0
            for s in subsets:
                sid = "-".join(names[i] for i in s)
                b = load_file(str(base_file))
                es = [load_file(str(expert_files[i])) for i in s]
                unfused_bytes += size_of[base_file] + sum(size_of[expert_files[i]] for i in s)
                out = merge.merge_state_dicts(method, b, es, params, seed=seed, subset_id=sid)
                if s in check:
                    ref = check[s]
                    assert set(out) >= set(ref), (sorted(set(ref) - set(out))[:3])
                    bad = [n for n in ref if not torch.equal(ref[n], out[n])]
                    assert not bad, f"{method} {sid}: fused and one-at-a-time merges differ at {bad[:3]}"
            t_unfused = time.perf_counter() - t0
            n = len(subsets)
            rows.append((method, params, n, t_load, t_fused_merge / n, t_fused / n, t_unfused / n,
                         fused_bytes, unfused_bytes))
            print(f"{method}: done", file=sys.stderr, flush=True)

    sample = f"a seeded sample of {len(subsets)} of the {n_all}" if len(subsets) < n_all else f"all {n_all}"
    print(f"\n### Sweep merges, {len(names)} experts of data/bases/{args.size} ({n_params / 1e6:.2f}M params), "
          f"{sample} non-empty subsets, {args.threads} thread(s), merges only\n")
    print("| method | subsets | fused load s (once) | fused s/merge (merge only) | fused s/merge (load amortised) "
          "| one-at-a-time s/merge | time ratio | fused MB read | one-at-a-time MB read | bytes ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (method, params, n, tl, tfm, tf, tu, bf, bu) in rows:
        print(f"| {method} {params or ''} | {n} | {tl:.2f} | {tfm:.4f} | {tf:.4f} | {tu:.4f} | {tu / tf:.1f}x "
              f"| {bf / 1e6:.1f} | {bu / 1e6:.1f} | {bu / bf:.1f}x |")


if __name__ == "__main__":
    sys.exit(main())
