"""`mergelaws merge` against `mergekit-yaml` 0.1.5 on a ~150M-parameter Llama-shaped checkpoint.

Usage (from the repo root, venv active)::

    python benchmarks/bench_mergekit.py --mergekit /tmp/mk/bin/mergekit-yaml     # all methods, 1 thread
    python benchmarks/bench_mergekit.py --methods linear ties --repeat 2         # ours only, best of 2
    python benchmarks/bench_mergekit.py --device cuda --mergekit /tmp/mk/bin/mergekit-yaml   # on a GPU

The checkpoint (hidden 768, 12 layers, intermediate 2560, vocab 32000, untied head: 148.3M
parameters, fp32, 593 MB) is random-initialised (N(0, 0.02^2), norms 1) and written with four
experts (base + seeded N(0, 0.002^2) noise) under --workdir (default /tmp/mergelaws_bench150m,
~3 GB; never in the repository), once. The project tokenizer is copied in because mergekit
copies the base's tokenizer.

Each method's YAML is run by ``python -m mergelaws.cli merge`` and by ``mergekit-yaml`` (its own
venv: mergekit is not a project dependency), both as subprocesses with --threads / OMP_NUM_THREADS
= --threads, so both figures are end-to-end: interpreter start-up, imports, reading, merging,
writing. Ours also logs its merge time (everything but start-up and writing); mergekit
interleaves loading, merging and writing in its task graph, so it has no separable merge time.
Peak resident memory (ru_maxrss of the child) is reported for both. The machine is shared: read
the ratios, not the seconds. Nothing is asserted on timings. Prints a markdown table.

``--device cuda``: ours runs with ``--device cuda`` (each tensor's task vectors merged on the GPU)
and mergekit with ``--cuda``. The figures stay end-to-end wall times of the child processes, which
exit only when the GPU work is done, so no explicit synchronisation is needed; peak RSS is host
memory only (GPU memory is not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _llama import llama_state  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

# mergekit YAML cases: method, per-model params, shared params
CASES = [
    ("linear", {"weight": 1.0}, None),
    ("task_arithmetic", {"weight": 1.0}, {"lambda": 0.8}),
    ("ties", {"weight": 1.0, "density": 0.5}, None),
    ("dare_ties", {"weight": 1.0, "density": 0.8}, None),
    ("breadcrumbs", {"weight": 1.0, "density": 0.9, "gamma": 0.01}, None),
    ("della", {"weight": 1.0, "density": 0.8, "epsilon": 0.1}, None),
    ("model_stock", {}, None),
]
SHAPE = {"hidden": 768, "layers": 12, "intermediate": 2560, "vocab": 32000}


def make_checkpoints(work: Path, n_experts: int = 4) -> list[Path]:
    """Base + experts under ``work`` (skipped when already there)."""
    import torch
    from safetensors.torch import save_file

    dirs = [work / "base"] + [work / f"e{j}" for j in range(n_experts)]
    if all((d / "model.safetensors").exists() for d in dirs):
        return dirs
    h, inter, vocab, layers = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"], SHAPE["layers"]
    sd = llama_state(h, inter, vocab, layers, seed=0, lm_head=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 12,
              "num_key_value_heads": 12, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "float32"}
    for j, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        if j == 0:
            state = sd
        else:
            ge = torch.Generator().manual_seed(100 + j)
            state = {n: t + 0.002 * torch.randn(t.shape, generator=ge) for n, t in sd.items()}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (ROOT / "data" / "bases" / "xs" / f).exists():
                shutil.copy2(ROOT / "data" / "bases" / "xs" / f, d / f)
        print(f"wrote {d}", file=sys.stderr, flush=True)
    return dirs


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and output of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/mergelaws_bench150m")
    ap.add_argument("--mergekit", default=None, help="path of a mergekit-yaml executable (separate venv)")
    ap.add_argument("--methods", nargs="+", default=[c[0] for c in CASES])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu): ours gets --device, mergekit --cuda")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.generate_only:
        make_checkpoints(work)
        return
    # generated in a child: this process stays small (no torch), so a forked child's peak RSS is its own
    subprocess.run([sys.executable, __file__, "--workdir", str(work), "--generate-only"], check=True)
    base, *experts = [work / "base"] + [work / f"e{j}" for j in range(4)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    mk_cuda = ["--cuda"] if args.device.startswith("cuda") else []
    rows = []
    for method, mp, shared in CASES:
        if method not in args.methods:
            continue
        cfg = {"merge_method": method}
        if method != "linear":
            cfg["base_model"] = str(base)
        cfg["models"] = [{"model": str(p), "parameters": dict(mp)} for p in experts]
        if shared:
            cfg["parameters"] = shared
        cfg["dtype"] = "float32"
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        ours = []
        for _ in range(args.repeat):
            out = work / f"ours_{method}"
            wall, rss, log = run([sys.executable, "-m", "mergelaws.cli", "merge", str(path), str(out),
                                  "--threads", str(args.threads), "--device", args.device], env)
            m = re.search(r"merge (\d+\.\d+)s", log)
            ours.append((wall, float(m.group(1)) if m else float("nan"), rss))
            shutil.rmtree(out, ignore_errors=True)
        mk = None
        if args.mergekit:
            runs = []
            for _ in range(args.repeat):
                out = work / f"mk_{method}"
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, _ = run([args.mergekit, str(path), str(out), "--allow-crimes", *mk_cuda], env)
                runs.append((wall, rss))
                shutil.rmtree(out, ignore_errors=True)
            mk = min(runs)
        rows.append((method, mp, min(ours), mk))
        print(f"{method}: ours {min(ours)[0]:.1f}s" + (f", mergekit {mk[0]:.1f}s" if mk else ""), file=sys.stderr,
              flush=True)

    lin = next((r[2][0] for r in rows if r[0] == "linear"), None)
    lin_merge = next((r[2][1] for r in rows if r[0] == "linear"), None)
    print(f"\n### `mergelaws merge` vs `mergekit-yaml` 0.1.5, 4 experts x 148.3M params (fp32), "
          f"{args.threads} thread(s){', ' + args.device if args.device != 'cpu' else ''}, best of {args.repeat}\n")
    print("| method | ours end-to-end s | ours merge s | ours peak RSS GB | mergekit end-to-end s "
          "| mergekit peak RSS GB | mergekit / ours | ours / our linear (end-to-end) | ours / our linear (merge) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, mp, (wall, merge_s, rss), mk in rows:
        mk_s = f"{mk[0]:.1f} | {mk[1] / 1e9:.2f} | {mk[0] / wall:.1f}x" if mk else "- | - | -"
        vs = f"{wall / lin:.2f}x | {merge_s / lin_merge:.2f}x" if lin else "- | -"
        label = method + (f" ({', '.join(f'{k} {v}' for k, v in mp.items() if k != 'weight')})"
                          if any(k != "weight" for k in mp) else "")
        print(f"| {label} | {wall:.1f} | {merge_s:.1f} | {rss / 1e9:.2f} | {mk_s} | {vs} |")


if __name__ == "__main__":
    sys.exit(main())
