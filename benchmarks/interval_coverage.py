"""Coverage and width of the fit's 95% intervals, old (``subsets``) and new (``parametric``),
by simulation (issue #15).

Each simulated table is one curve family of the paper's Table 3 (Average; the domains in
turn, so every 9 tables cover the nine domains): per (size, k) cell, ``n`` subsets each
scored as the unified law + N(0, Var), Var from the paper's variance law (Table 6), at the
paper's 7 sizes (0.5B-72B) and k = 1..9 (tests/synthetic.py).  Two designs:

* ``A`` (``enumerated_design``, the paper's): every C(9, k) subset up to 7B, at most 15
  above; k = 9 holds one subset at every size;
* ``B`` (``sampled_design``): 15 sampled subsets per (size, k).

Every table is fitted as the fit step does (``fit_unified`` on the cell means, weights k),
then bootstrapped both ways with the same ``n_boot`` (``bootstrap.unified_draws``), and
the per-size law too (``bootstrap.bootstrap_draws``).  A parameter is covered when its true
value is in its 95% interval (to 1e-6: gamma and b sit at their bound 0 for most domains;
their intervals keep 0 only where the test of the bound does not reject it,
``intervals.boundary_intervals``).  Writes benchmarks/results/interval_coverage.{csv,md} and prints the markdown.

    nice -n 10 .venv/bin/python benchmarks/interval_coverage.py            # 207 tables per design
    .venv/bin/python benchmarks/interval_coverage.py --seeds 2 --n-boot 100  # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mergelaws.laws import UNIFIED_PARAMS, fit_unified
from mergelaws.laws.bootstrap import (
    bootstrap_draws,
    summarise_draws,
    summarise_unified,
    unified_draws,
)
from mergelaws.laws.views import aggregate_views, normalise_losses, subset_values
from synthetic import TABLE3, enumerated_design, sampled_design, synth_losses

DESIGNS = {"A": ("every subset up to 7B, <= 15 above (k = 9: one subset)", enumerated_design),
           "B": ("15 sampled subsets per (size, k)", sampled_design)}
INTERVALS = ("subsets", "parametric")
TOL = 1e-6


def simulate(design: str, seeds: int, n_boot: int, log=print) -> pd.DataFrame:
    """One row per (table, law, size, parameter, interval): true, estimate, lo, hi."""
    rows = []
    t0 = time.time()
    for seed in range(seeds):
        losses = synth_losses(n_subsets=DESIGNS[design][1], seed=1000 + seed, methods=("average",))
        df = normalise_losses(losses)
        for d, true in TABLE3.items():
            view = f"domain:{d}"
            table = aggregate_views(df, [view]).sort_values(["params", "k"])
            values = subset_values(df, view)
            f = fit_unified(table["params"].to_numpy() / 1e9, table["k"].to_numpy(),
                            table["mean"].to_numpy(), weights="k", sem=table["sem"].to_numpy())
            truth = dict(zip(UNIFIED_PARAMS, true))
            tid = f"{design}{seed}:{d}"
            for iv in INTERVALS:
                draws = unified_draws(values, f, n_boot=n_boot, seed=seed, key=(view,), interval=iv)
                ci = summarise_unified(f, draws)["ci"]
                for p in UNIFIED_PARAMS:
                    rows.append({"design": design, "table": tid, "domain": d, "law": "unified",
                                 "size": "all", "parameter": p, "interval": iv,
                                 "true": truth[p], "estimate": getattr(f, p),
                                 "lo": ci[p].lo, "hi": ci[p].hi,
                                 "converged": f.converged})
                pts, dr = bootstrap_draws(losses, view, n_boot=n_boot, seed=seed, interval=iv)
                s = summarise_draws(pts, dr)
                for _, r in s.iterrows():
                    N = r["params"] / 1e9
                    t = {"L_inf": truth["L_star"] + truth["B"] * N ** -truth["beta"],
                         "A": truth["A0"] * N ** -truth["gamma"], "b": truth["b"]}[r["parameter"]]
                    rows.append({"design": design, "table": tid, "domain": d, "law": "per_size",
                                 "size": r["size"], "parameter": r["parameter"], "interval": iv,
                                 "true": t, "estimate": r["estimate"], "lo": r["lo"],
                                 "hi": r["hi"], "converged": bool(np.isfinite(r["estimate"]))})
        log(f"design {design}: seed {seed + 1}/{seeds} ({9 * (seed + 1)} tables) "
            f"{time.time() - t0:.0f} s")
    out = pd.DataFrame(rows)
    out["covered"] = (out["lo"] - TOL <= out["true"]) & (out["true"] <= out["hi"] + TOL)
    out["width"] = out["hi"] - out["lo"]
    return out


def summarise(sim: pd.DataFrame) -> pd.DataFrame:
    """Coverage, mean and median width per (design, law, parameter, interval), plus the
    coverage where the true value is inside its bounds (gamma, b > 1e-3)."""
    sim = sim.assign(interior=sim["true"].abs() > 1e-3)
    g = sim.groupby(["design", "law", "parameter", "interval"], sort=False)
    t = pd.DataFrame({"n": g.size(), "coverage": g["covered"].mean(),
                      "mean_width": g["width"].mean(), "median_width": g["width"].median()})
    gi = sim[sim["interior"]].groupby(["design", "law", "parameter", "interval"], sort=False)
    t["n_interior"] = gi.size()
    t["coverage_interior"] = gi["covered"].mean()
    return t.reset_index()


def markdown(summary: pd.DataFrame, n_tables: dict, n_boot: int, seconds: float) -> str:
    head = (f"n_boot = {n_boot} per interval; tables per design: "
            + ", ".join(f"{k} {v}" for k, v in n_tables.items())
            + f"; {seconds:.0f} s on this machine.")
    lines = [head, ""]
    for (design, law), g in summary.groupby(["design", "law"], sort=False):
        lines += [f"### design {design} ({DESIGNS[design][0]}), {law} law", "",
                  ("| parameter | coverage old | coverage new | mean width old | mean width new "
                   "| median width old | median width new | coverage new, true > 1e-3 (n) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p, h in g.groupby("parameter", sort=False):
            o = h[h["interval"] == "subsets"].iloc[0]
            n = h[h["interval"] == "parametric"].iloc[0]
            ci = ("" if not n["n_interior"] or pd.isna(n["n_interior"])
                  else f"{n['coverage_interior']:.3f} ({int(n['n_interior'])})")
            lines.append(f"| {p} | {o['coverage']:.3f} | {n['coverage']:.3f} | "
                         f"{o['mean_width']:.4g} | {n['mean_width']:.4g} | "
                         f"{o['median_width']:.4g} | {n['median_width']:.4g} | {ci} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=23, help="tables per design = 9 x seeds (default 23: 207)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "interval_coverage"))
    a = ap.parse_args(argv)
    t0 = time.time()
    sim = pd.concat([simulate(d, a.seeds, a.n_boot) for d in a.designs], ignore_index=True)
    summary = summarise(sim)
    n_tables = {d: int(sim.loc[sim["design"] == d, "table"].nunique()) for d in a.designs}
    md = markdown(summary, n_tables, a.n_boot, time.time() - t0)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
