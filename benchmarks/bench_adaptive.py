"""Adaptive subset sampling (``sweep.sampler: adaptive``, issue #15) against the full design.

Usage (from the repo root, venv active, after the default study has run: results/losses.parquet,
results/fits/fits.json and results/experts/{xs,s,m}/ exist)::

    python benchmarks/bench_adaptive.py                     # emulate a grid of targets, run the chosen one
    python benchmarks/bench_adaptive.py --no-run            # emulation only (seconds)
    python benchmarks/bench_adaptive.py --run-target 0.01 --run-min 2
    # against the paper's design, every subset (511 per size; results/adaptive_full.md):
    python benchmarks/bench_adaptive.py --config full.yaml --losses full.parquet --fits full/fits.json \
        --k-sets all --out benchmarks/results/adaptive_full.md --note "..."
    (full.yaml: config.yaml with sweep.subsets_per_k 126, so every C(9, k) subset is swept.)

What it does, for method ``average`` and the fit view (cross_domain):

1. **Emulation** of the adaptive sampler from the full table, for each (target_sem, min_per_k) of a
   grid: at each size and k, walk ``grid.adaptive_orders`` and apply ``sweep.adaptive_decision`` to
   the per-subset values already in results/losses.parquet. This is exact because at the cap
   (``subsets_per_k`` = 9 of the default) the adaptive order visits the uniform sampler's subsets,
   so every subset it may pick is in the full table (checked).
2. **The fits**: the per-size law (L_inf, A, b) and the unified law on the adaptive rows
   (``laws.fit_all``, no bootstrap), compared with the full design's 95% intervals: per size from
   ``laws.bootstrap_draws`` / ``summarise_draws`` on the full table (parametric, 200 replicates,
   fit seed 0, as the fit step), unified from results/fits/fits.json.
3. **A real run** of the chosen setting: ``mergelaws.sweep.run_sweep`` with ``sampler: adaptive``
   for xs, s and m (wall time; its subsets must equal the emulation's, its losses the full table's to
   fp32 rounding: the running sum visits the subsets in another order). The full design's wall time
   is read from its sweep logs (results/logs/sweep/<size>/average) and, with ``--rerun-full``,
   measured again now for a same-load comparison.

Writes benchmarks/results/adaptive.md (and prints it).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from mergelaws import config as C  # noqa: E402
from mergelaws import grid, laws  # noqa: E402
from mergelaws.sweep import adaptive_decision  # noqa: E402

METHOD, VIEW = "average", "cross_domain"
SIZES = ["xs", "s", "m"]


def emulate(cfg: dict, values: pd.DataFrame, target: float, min_per_k: int) -> dict[str, list[str]]:
    """size -> the subset ids the adaptive sweep evaluates, from the full table's view values."""
    out = {}
    M = len(cfg["domains"])
    for size in SIZES:
        v = dict(zip(values.loc[values["size"] == size, "subset"], values.loc[values["size"] == size, "value"]))
        chosen = []
        for k, seq in grid.adaptive_orders(cfg, size).items():
            i = 0
            while True:
                missing = [s.id for s in seq[:i] if s.id not in v]
                if missing:
                    raise SystemExit(f"subset {missing[0]} (k={k}) of the adaptive order is not in the full table; "
                                     f"emulation impossible, run the sweep")
                d = adaptive_decision([v[s.id] for s in seq[:i]], math.comb(M, k), target, min_per_k, len(seq))
                if d.stop:
                    break
                i += 1
            chosen += [s.id for s in seq[:i]]
        out[size] = chosen
    return out


def full_intervals(full: pd.DataFrame, fitcfg: dict) -> pd.DataFrame:
    pts, draws = laws.bootstrap_draws(full, VIEW, n_boot=fitcfg["n_boot"], seed=fitcfg["seed"],
                                      weights=fitcfg["weights"], loss=fitcfg["loss"], f_scale=fitcfg["f_scale"],
                                      interval=fitcfg["interval"])
    return laws.summarise_draws(pts, draws)


def compare(fits, per_size_ci: pd.DataFrame, unified_ci: dict) -> dict:
    """Which adaptive estimates lie inside the full design's 95% intervals."""
    rows, inside_all = [], True
    for f in fits.per_size:
        if f.view != VIEW or f.method != METHOD:
            continue
        for p in ("L_inf", "A", "b"):
            r = per_size_ci[(per_size_ci["size"] == f.size) & (per_size_ci["parameter"] == p)].iloc[0]
            val = getattr(f, p)
            ok = bool(r["lo"] - 1e-12 <= val <= r["hi"] + 1e-12)
            if p != "b":
                inside_all &= ok
            rows.append((f"{f.size}: {p}", val, r["estimate"], r["lo"], r["hi"], ok))
    u = next((u for u in fits.unified if u.view == VIEW and u.method == METHOD), None)
    for p, ci in unified_ci.items() if u is not None else ():
        val = getattr(u, p)
        ok = bool(ci["lo"] - 1e-12 <= val <= ci["hi"] + 1e-12)
        rows.append((f"unified: {p}", val, None, ci["lo"], ci["hi"], ok))
    return {"rows": rows, "per_size_L_A_inside": inside_all,
            "unified_inside": all(r[5] for r in rows if r[0].startswith("unified")),
            "n_inside": sum(r[5] for r in rows), "n": len(rows)}


def full_wall_from_logs(pattern: str = "results/logs/sweep/{size}/average/*") -> dict[str, float]:
    out = {}
    for size in SIZES:
        for log in ROOT.glob(pattern.format(size=size)) if not pattern.startswith("/") else \
                Path("/").glob(pattern.format(size=size).lstrip("/")):
            m = re.search(r"merges evaluated \(\d+ in the table\) in ([\d.]+)s", log.read_text())
            if m:
                out[size] = float(m.group(1))
    return out


def run_real(cfg: dict, target: float, min_per_k: int, work: Path, sampler: str = "adaptive"):
    from mergelaws.sweep import run_sweep

    c = copy.deepcopy(cfg)
    c["sweep"].update(sampler=sampler, target_sem=target, min_per_k=min_per_k)
    tables, walls, logs = {}, {}, {}
    for size in SIZES:
        logs[size] = []
        t0 = time.perf_counter()
        tables[size] = run_sweep(c, size, METHOD, work / f"{sampler}-{size}.parquet", log=logs[size].append)
        walls[size] = time.perf_counter() - t0
        print(f"  {sampler} {size}: {tables[size]['subset'].nunique()} subsets in {walls[size]:.1f}s", flush=True)
    return tables, walls, logs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--losses", default=str(ROOT / "results" / "losses.parquet"))
    ap.add_argument("--fits", default=str(ROOT / "results" / "fits" / "fits.json"))
    ap.add_argument("--targets", default="0.001,0.002,0.003,0.005,0.0075,0.01,0.015,0.02,0.05")
    ap.add_argument("--mins", default="2,3")
    ap.add_argument("--k-sets", default="all;0,1,2,3,5,9;0,1,2,4,9;0,1,3,9",
                    help="';'-separated sweep.k values to emulate (which k to run; 'all' = 0..M)")
    ap.add_argument("--no-run", action="store_true", help="emulation only")
    ap.add_argument("--run-target", type=float, help="target_sem of the real run (default: the cheapest "
                                                     "emulated setting whose fit stays inside the intervals)")
    ap.add_argument("--run-min", type=int)
    ap.add_argument("--run-k", help="sweep.k of the real run, e.g. 0,1,2,3,5,9 (default: the chosen setting's)")
    ap.add_argument("--rerun-full", action="store_true", help="also time the full (uniform) sweeps now")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptive.md"))
    ap.add_argument("--full-logs", default="results/logs/sweep/{size}/average/*",
                    help="the full design's sweep logs ({size} filled in), for its wall time")
    ap.add_argument("--n-boot", type=int, help="replicates of the full design's per-size intervals "
                                               "(default: the config's fit.n_boot)")
    ap.add_argument("--note", default="", help="a paragraph under the title: how the full table was made")
    a = ap.parse_args(argv)

    import os
    os.chdir(ROOT)
    cfg = C.load(a.config)
    fitcfg = dict(cfg["fit"])
    if a.n_boot:
        fitcfg["n_boot"] = a.n_boot  # the full design's intervals need replicates (SmolLM2's config fits with 0)
    losses = pd.read_parquet(a.losses)
    full = losses[losses["method"] == METHOD].reset_index(drop=True)
    n_full = full.groupby("size")["subset"].nunique().to_dict()
    values = laws.per_subset_values(full, VIEW)
    fits_json = laws.load_fits(a.fits)
    global SIZES
    SIZES = sorted(full["size"].unique(), key=lambda z: full.loc[full["size"] == z, "params"].iat[0])
    uni = [u for u in fits_json.unified if u.view == VIEW and u.method == METHOD]  # none for one size
    unified_ci = {p: {"lo": v.lo, "hi": v.hi} for p, v in ((uni[0].ci or {}).items() if uni else ())
                  if p in ("A0", "b", "beta", "B", "gamma", "L_star")}
    print("bootstrapping the full design's per-size intervals ...", flush=True)
    per_size_ci = full_intervals(full, fitcfg)

    # 1-2: emulation grid
    grid_rows, chosen_sets = [], {}
    base_cfg = cfg
    for ks in a.k_sets.split(";"):
      cfg = copy.deepcopy(base_cfg)
      cfg["sweep"]["k"] = "all" if ks == "all" else [int(x) for x in ks.split(",")]
      for mn in [int(x) for x in a.mins.split(",")]:
        for t in [float(x) for x in a.targets.split(",")]:
            chosen = emulate(cfg, values, t, mn)
            chosen_sets[(t, mn, ks)] = chosen
            sub = full[full.apply(lambda r: r["subset"] in set(chosen[r["size"]]), axis=1)]
            fits = laws.fit_all(sub, views=VIEW, weights=fitcfg["weights"], loss=fitcfg["loss"],
                                f_scale=fitcfg["f_scale"], n_boot=0)
            cmp_ = compare(fits, per_size_ci, unified_ci)
            merges = sum(len(v) for v in chosen.values())
            grid_rows.append({"k": ks, "target_sem": t, "min_per_k": mn, "merges": merges, "full": sum(n_full.values()),
                              "frac": merges / sum(n_full.values()), **cmp_})
    ok = [r for r in grid_rows if r["per_size_L_A_inside"] and r["unified_inside"]]
    best = min(ok, key=lambda r: (r["merges"], -r["target_sem"])) if ok else None
    print(f"emulated {len(grid_rows)} settings; cheapest inside the intervals: "
          f"{(best['k'], best['target_sem'], best['min_per_k'], best['merges']) if best else None}", flush=True)
    best_all = [r for r in ok if r["k"] == "all"]
    best_all = min(best_all, key=lambda r: (r["merges"], -r["target_sem"])) if best_all else None

    # 3: real run
    run_t = a.run_target if a.run_target is not None else (best["target_sem"] if best else None)
    run_m = a.run_min if a.run_min is not None else (best["min_per_k"] if best else 3)
    run_k = a.run_k if a.run_k is not None else (best["k"] if best else "all")
    cfg = copy.deepcopy(base_cfg)
    cfg["sweep"]["k"] = "all" if run_k == "all" else [int(x) for x in run_k.split(",")]
    real = None
    if not a.no_run and run_t is not None:
        print(f"running the adaptive sweep (k {run_k}, target_sem {run_t}, min_per_k {run_m}) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            tables, walls, logs = run_real(cfg, run_t, run_m, Path(tmp))
            full_walls = {}
            if a.rerun_full:
                _, full_walls, _ = run_real(cfg, run_t, run_m, Path(tmp), sampler="uniform")
        emu = chosen_sets.get((run_t, run_m, run_k)) or emulate(cfg, values, run_t, run_m)
        same = {s: sorted(tables[s]["subset"].unique()) == sorted(emu[s]) for s in SIZES}
        diffs = {}
        for s in SIZES:
            m = tables[s].merge(full[full["size"] == s][["subset", "eval_domain", "loss"]],
                                on=["subset", "eval_domain"], suffixes=("", "_full"))
            diffs[s] = float((m["loss"] - m["loss_full"]).abs().max())
        stops = {s: [line.split(": ", 1)[1] for line in logs[s] if ": k=" in line] for s in SIZES}
        real = {"walls": walls, "full_walls_now": full_walls, "same": same, "diffs": diffs, "stops": stops,
                "n": {s: tables[s]["subset"].nunique() for s in SIZES}}

    text = render(grid_rows, best, best_all, real, (run_k, run_t, run_m), n_full, full_wall_from_logs(a.full_logs),
                  a.note, a.fits)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


def _g(x, nd=4):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}g}"


def _best_block(best, label) -> list[str]:
    if not best:
        return [f"No setting ({label}) kept every parameter inside the full intervals.", ""]
    out = [f"Cheapest setting ({label}) with every per-size L∞, A and every unified parameter inside the full "
           f"intervals: **sweep.k {best['k']}, target_sem {best['target_sem']:g}, min_per_k {best['min_per_k']}: "
           f"{best['merges']} merges = {100 * best['frac']:.0f}% of the full design** "
           f"({'meets' if best['frac'] <= 0.25 else 'misses'} the ≤ 25% goal).", "",
           "| parameter | adaptive | full estimate | full 95% interval | inside |", "|---|---:|---:|---|:---:|"]
    for name, val, est, lo, hi, ok in best["rows"]:
        out.append(f"| {name} | {_g(val)} | {_g(est)} | [{_g(lo)}, {_g(hi)}] | {'yes' if ok else 'no'} |")
    return out + [""]


def render(grid_rows, best, best_all, real, run, n_full, full_logs, note: str = "",
           fits: str = "results/fits/fits.json") -> str:
    run_k, run_t, run_m = run
    total = sum(n_full.values())
    out = ["# Adaptive subset sampling vs the full design (method average, cross_domain view)", "",
           "Produced by `python benchmarks/bench_adaptive.py` on the default study (9 domains, sizes xs, s, m; "
           f"full design: {', '.join(f'{s} {n}' for s, n in n_full.items())} subsets = {total} merges). "
           "Intervals: the full design's 95% intervals (per size: parametric bootstrap, 200 replicates, "
           f"as the fit step; unified: {fits}). 'L∞, A inside' = every size's L∞ and A of the "
           "adaptive fit inside the full fit's intervals; 'unified inside' = every unified parameter inside.",
           *(["", note] if note else []),
           "", "## Emulated grid (exact: every subset the adaptive order reaches is in the full table)", "",
           "| sweep.k | target_sem | min_per_k | merges | of full | per-size L∞, A inside | unified inside | "
           "estimates inside |",
           "|---|---:|---:|---:|---:|:---:|:---:|---:|"]
    for r in grid_rows:
        out.append(f"| {r['k']} | {r['target_sem']:g} | {r['min_per_k']} | {r['merges']} | {100 * r['frac']:.0f}% | "
                   f"{'yes' if r['per_size_L_A_inside'] else 'no'} | {'yes' if r['unified_inside'] else 'no'} | "
                   f"{r['n_inside']}/{r['n']} |")
    out.append("")
    out += _best_block(best_all, "every k, 0..9")
    out += _best_block(best, "any k set of the grid")
    if real:
        out += [f"## Real run: `sampler: adaptive`, sweep.k {run_k}, target_sem {run_t:g}, min_per_k {run_m}", "",
                "| size | merges adaptive | merges full | wall adaptive (s) | wall full, its log (s) | "
                "wall full, now (s) | subsets = emulation | max |Δloss| vs full table |",
                "|---|---:|---:|---:|---:|---:|:---:|---:|"]
        for s in SIZES:
            out.append(f"| {s} | {real['n'][s]} | {n_full[s]} | {real['walls'][s]:.1f} | {_g(full_logs.get(s))} | "
                       f"{_g(real['full_walls_now'].get(s))} | {'yes' if real['same'][s] else 'NO'} | "
                       f"{real['diffs'][s]:.1e} |")
        tw = sum(real["walls"].values())
        out += ["", f"Total: {sum(real['n'].values())} merges in {tw:.0f} s (full design: {total} merges; "
                    f"{sum(full_logs.values()):.0f} s in its logs"
                + (f", {sum(real['full_walls_now'].values()):.0f} s now" if real["full_walls_now"] else "")
                + "). Wall times include loading the base, experts and eval sets (~5 s per size); the "
                  "machine is shared, so read the ratios.", "", "Why each k stopped (the sweep's log):", ""]
        for s in SIZES:
            out.append(f"* {s}: " + "; ".join(real["stops"][s]))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
