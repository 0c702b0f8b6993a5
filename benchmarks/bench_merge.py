"""Time every registered merge method against `average`, and `mergelaws merge` against mergekit.

Usage (from the repo root, venv active)::

    python benchmarks/bench_merge.py                       # data/bases/m, 4 experts, 1 thread
    python benchmarks/bench_merge.py --random-params 50e6  # a random Llama-shaped state dict instead
    python benchmarks/bench_merge.py --mergekit /tmp/mk/bin/mergekit-yaml   # + end-to-end vs mergekit
    python benchmarks/bench_merge.py --device cuda         # on a GPU (mergekit-yaml then gets --cuda)

Experts are the base plus seeded Gaussian noise (0.01). Part 1 times
``merging.merge_state_dicts`` in this process (best of --repeat), as a ratio to ``average``.
Part 2 (only with checkpoints on disk, i.e. not with --random-params) times whole YAML merges,
load + merge + save, of ``mergelaws.merging.mergekit.run_merge`` in this process and ``mergekit-yaml``
in a subprocess (its interpreter start-up included, so mergekit's figure carries ~3-5 s of
import overhead on a small model). Ratios, not absolute times, are the result: the machine is
shared. Prints markdown tables.

``--device cuda``: part 1 holds the base and the experts on the GPU and merges there; part 2 runs
``run_merge(..., device="cuda")`` (each tensor's task vectors moved to the GPU) and ``mergekit-yaml
--cuda``. Timings synchronize the GPU (torch.cuda.synchronize) before the clock is read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _llama import llama_state  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

# registry method -> params for part 1 (sparsifying methods at a sparsifying setting)
REGISTRY_CASES = {
    "average": {},
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare": {"drop_rate": 0.2},
    "dare_ties": {"drop_rate": 0.2},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.8, "epsilon": 0.1},
    "model_stock": {},
}
# mergekit YAML cases for part 2: method, per-model params, shared params
YAML_CASES = [
    ("linear", {"weight": 1.0}, None),
    ("task_arithmetic", {"weight": 1.0}, {"lambda": 0.8}),
    ("ties", {"weight": 1.0, "density": 0.5}, None),
    ("dare_ties", {"weight": 1.0, "density": 0.8}, None),
    ("breadcrumbs", {"weight": 1.0, "density": 0.9, "gamma": 0.01}, None),
    ("della", {"weight": 1.0, "density": 0.8, "epsilon": 0.1}, None),
    ("model_stock", {}, None),
]


def random_llama_state(n_params: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped float32 state dict of about n_params parameters (hidden 512, vocab 32000)."""
    h, inter, vocab = 512, 1376, 32000
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((n_params - vocab * h - h) / per_layer))
    return llama_state(h, inter, vocab, layers, seed=seed)


def perturb(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sd.items()}


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a timer read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeat: int, device: str = "cpu") -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def where(device: str) -> str:
    return f"{torch.get_num_threads()} thread(s)" if torch.device(device).type == "cpu" else \
        f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def part1(base, experts, repeat: int, device: str = "cpu") -> None:
    from mergelaws import merging as M

    base = {n: t.to(device) for n, t in base.items()}
    experts = [{n: t.to(device) for n, t in e.items()} for e in experts]
    n = sum(t.numel() for t in base.values())
    print(f"\n### In-process `merge_state_dicts`, {len(experts)} experts x {n / 1e6:.1f}M params, "
          f"{where(device)}, best of {repeat}\n")
    print("| method | seconds | ratio to average |")
    print("|---|---:|---:|")
    M.merge_state_dicts("average", base, experts, {})  # warm-up: first-touch allocation would bill average
    ref = None
    for name, params in REGISTRY_CASES.items():
        s = best_of(lambda: M.merge_state_dicts(name, base, experts, params, seed=0, subset_id="b"), repeat, device)
        ref = ref or s
        print(f"| {name} {params or ''} | {s:.3f} | {s / ref:.2f} |")


def part2(base_dir: Path, expert_dirs: list[str], tmp: Path, mergekit: str | None, repeat: int,
          device: str = "cpu") -> None:
    from mergelaws.merging import mergekit

    print(f"\n### End-to-end YAML merge (load + merge + save), {len(expert_dirs)} experts of {base_dir.name}, "
          f"{where(device)}, best of {repeat}\n")
    head = "| merge_method | mergelaws merge s | ratio to linear |"
    sep = "|---|---:|---:|"
    if mergekit:
        head += " mergekit-yaml s | mergekit / mergelaws |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    ref = None
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for method, mp, shared in YAML_CASES:
        cfg = {"merge_method": method}
        if method != "linear":
            cfg["base_model"] = str(base_dir)
        cfg["models"] = [{"model": p, "parameters": dict(mp)} for p in expert_dirs]
        if shared:
            cfg["parameters"] = shared
        cfg["dtype"] = "float32"
        path = tmp / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        ours = best_of(lambda: mergekit.run_merge(path, tmp / f"ours_{method}", device=device, log=lambda *_: None),
                       repeat, device)
        ref = ref or ours
        row = f"| {method} | {ours:.2f} | {ours / ref:.2f} |"
        if mergekit:
            def run_mk():
                shutil.rmtree(tmp / f"mk_{method}", ignore_errors=True)
                cuda = ["--cuda"] if torch.device(device).type == "cuda" else []
                subprocess.run([mergekit, str(path), str(tmp / f"mk_{method}"), "--allow-crimes", *cuda], check=True,
                               capture_output=True, env=env)
            mk = best_of(run_mk, repeat)
            row += f" {mk:.2f} | {mk / ours:.2f} |"
        print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / "data" / "bases" / "m"), help="base model directory")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--random-params", type=float, default=None,
                    help="use a random Llama-shaped state dict of this many parameters (part 1 only)")
    ap.add_argument("--mergekit", default=None, help="path of a mergekit-yaml executable (separate venv)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-yaml", action="store_true", help="only part 1")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu): where the merges run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False")
    from mergelaws import models

    if args.random_params:
        base = random_llama_state(args.random_params)
        experts = [perturb(base, 100 + j) for j in range(args.experts)]
        part1(base, experts, args.repeat, args.device)
        return
    base_dir = Path(args.base)
    model = models.load_model(base_dir)
    base = {n: p.detach().float().clone() for n, p in models.float_state(model).items()}
    experts = [perturb(base, 100 + j) for j in range(args.experts)]
    part1(base, experts, args.repeat, args.device)
    if args.skip_yaml:
        return
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as td:
        tmp = Path(td)
        dirs = []
        for j, e in enumerate(experts):
            with torch.no_grad():
                for n, p in models.float_state(model).items():
                    p.copy_(e[n])
            models.save_model(model, tmp / f"e{j}", tokenizer_from=base_dir)
            dirs.append(str(tmp / f"e{j}"))
        part2(base_dir, dirs, tmp, args.mergekit, args.repeat, args.device)


if __name__ == "__main__":
    sys.exit(main())
