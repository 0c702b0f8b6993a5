"""Memory and time of the sweep's merge engine in its two modes, on the ~150M-parameter checkpoint.

Usage (from the repo root, venv active; make the checkpoint first with bench_mergekit.py)::

    python benchmarks/bench_sweep_memory.py                              # /tmp/mergelaws_bench150m, 4 experts
    python benchmarks/bench_sweep_memory.py --workdir DIR --methods average ties

For each method and mode (``memory``: base + every task vector held in fp32, plus the running sum
for average; ``stream``: read tensor by tensor from the safetensors files, running sum held) a
child process builds a ``merging.SubsetMerger`` over the base and the four experts and merges every
non-empty subset (15) in ``merging.reuse_order``, writing into a preallocated fp32 "live model" as
the sweep does. Reported: the growth of the child's peak resident memory over its start (VmHWM -
VmRSS after the live model is allocated), the merger's own estimate (merging.merge_memory_estimate),
set-up seconds, seconds per merge and the bytes read. One thread. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, re, sys, time, itertools, torch
torch.set_num_threads(1)
from mergelaws import merging as M
work, method, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base = M.SafetensorsSource(f"{work}/base")
names = [n for n in base.keys() if base.dtype(n).is_floating_point]
live = {n: torch.zeros(base.shape(n)) for n in names}
before = status("VmRSS")
t0 = time.perf_counter()
mg = M.SubsetMerger(method, {}, base, mode=mode, names=names)
keys = [f"e{j}" for j in range(4)]
for k in keys:
    mg.add_expert(k, M.SafetensorsSource(f"{work}/{k}"))
t_setup = time.perf_counter() - t0
read0 = mg.bytes_read()
subsets = [list(c) for r in range(1, 5) for c in itertools.combinations(keys, r)]
order = M.reuse_order(subsets) if mg.reuses_sums else range(len(subsets))
t0 = time.perf_counter()
for i in order:
    mg.merge(subsets[i], "s" + "".join(subsets[i]), out=live)
t_merge = (time.perf_counter() - t0) / len(subsets)
numel = sum(live[n].numel() for n in names)
est = M.merge_memory_estimate(numel, max(live[n].numel() for n in names), 4, mode=mode, reuse=mg.reuses_sums)
print(json.dumps({"grown": status("VmHWM") - before, "held": mg.held_bytes(), "est": est["total"],
                  "setup": t_setup, "per_merge": t_merge, "read_setup": read0, "read_merges": mg.bytes_read() - read0,
                  "merges": len(subsets), "numel": numel, "cost": vars(mg.cost)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/mergelaws_bench150m")
    ap.add_argument("--methods", nargs="+", default=["average", "ties"])
    args = ap.parse_args()
    if not (Path(args.workdir) / "e3" / "model.safetensors").exists():
        sys.exit(f"{args.workdir}: no checkpoint; run benchmarks/bench_mergekit.py first (it writes one)")
    rows = []
    for method in args.methods:
        for mode in ("memory", "stream"):
            proc = subprocess.run([sys.executable, "-c", CHILD, args.workdir, method, mode], capture_output=True,
                                  text=True, check=True)
            rows.append((method, mode, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"{method} {mode}: done", file=sys.stderr, flush=True)
    numel = rows[0][2]["numel"]
    print(f"\n### SubsetMerger modes, 4 experts x {numel / 1e6:.1f}M params (fp32), all 15 non-empty subsets, "
          f"1 thread\n")
    print("| method | mode | peak RSS growth GB | estimate GB | set-up s | s/merge | GB read at set-up "
          "| GB read per merge | expert-sized steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, mode, r in rows:
        c = r["cost"]
        steps = f"{c['updates']} add/sub + {c['anchors']} fresh" if c["anchors"] else f"{c['direct']} direct"
        print(f"| {method} | {mode} | {r['grown'] / 1e9:.2f} | {r['est'] / 1e9:.2f} | {r['setup']:.1f} "
              f"| {r['per_merge']:.2f} | {r['read_setup'] / 1e9:.2f} | {r['read_merges'] / r['merges'] / 1e9:.2f} "
              f"| {steps} |")


if __name__ == "__main__":
    sys.exit(main())
