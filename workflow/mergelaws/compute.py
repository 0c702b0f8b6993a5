"""The compute ledger (the paper's Fig 2 inset and Table 13): what every job cost, measured.

Every rule writes a Snakemake ``benchmark:`` file, ``<results>/benchmarks/<rule>/<wildcards…>.tsv``
(wall seconds ``s``, ``cpu_time``, ``max_rss`` in MB, …). :func:`ledger` reads them into one
table (``<results>/compute.csv``: one row per job with ``rule``, ``size``, ``key`` = the job's
other wildcards); :func:`unit_costs` turns it, with the losses table, into per-size costs the
plan uses: one expert's training, one merge + its evaluation on every domain, and the multitask
model's training + evaluation, all in wall seconds of the job that ran them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergelaws.errors import TableError

__all__ = ["COLUMNS", "read_benchmark", "ledger", "write_ledger", "unit_costs"]

COLUMNS = ["rule", "size", "key", "s", "cpu_time", "max_rss_mb", "mean_load", "path"]
# rules whose first wildcard (the first directory under benchmarks/<rule>/) is the base size
_PER_SIZE = {"pretrain", "convert", "train", "sweep", "multitask", "theory"}


def read_benchmark(path: str | Path) -> dict:
    """One Snakemake benchmark TSV as a dict of floats (the mean over repeats, if any)."""
    path = Path(path)
    try:
        t = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as exc:
        raise TableError(f"benchmark file {path} cannot be read ({exc}); delete it and rerun the job "
                         f"that writes it") from None
    if "s" not in t.columns or t.empty:
        raise TableError(f"benchmark file {path} has no 's' column or no row; delete it and rerun the job")
    num = t.apply(pd.to_numeric, errors="coerce")
    return {c: float(num[c].mean()) for c in ("s", "cpu_time", "max_rss", "mean_load") if c in num.columns}


def _root_of(f: Path) -> Path:
    for parent in f.parents:
        if parent.name == "benchmarks":
            return parent
    raise TableError(f"benchmark file {f} is not under a 'benchmarks' directory; pass --root")


def ledger(files: list[str | Path], root: str | Path | None = None) -> pd.DataFrame:
    """One row per benchmark file under ``root`` (``<root>/<rule>/<wildcards…>.tsv``; default:
    the file's nearest ancestor directory named ``benchmarks``)."""
    rows = []
    for f in files:
        f = Path(f)
        base = Path(root) if root is not None else _root_of(f)
        try:
            parts = f.relative_to(base).with_suffix("").parts
        except ValueError:
            raise TableError(f"benchmark file {f} is not under {base}; pass files under --root") from None
        rule, rest = parts[0], list(parts[1:])
        size = rest.pop(0) if rule in _PER_SIZE and rest else ""
        b = read_benchmark(f)
        rows.append({"rule": rule, "size": size, "key": "/".join(rest), "s": b.get("s"),
                     "cpu_time": b.get("cpu_time"), "max_rss_mb": b.get("max_rss"),
                     "mean_load": b.get("mean_load"), "path": str(f)})
    t = pd.DataFrame(rows, columns=COLUMNS)
    return t.sort_values(["rule", "size", "key"], kind="mergesort").reset_index(drop=True)


def write_ledger(files: list[str | Path], root: str | Path | None, out: str | Path) -> pd.DataFrame:
    from mergelaws.io import atomic_path

    t = ledger(files, root)
    with atomic_path(out) as tmp:
        t.to_csv(tmp, index=False)
    return t


def unit_costs(compute: pd.DataFrame, losses: pd.DataFrame | None = None) -> dict[str, dict]:
    """Per size, measured wall seconds: ``expert`` (mean over the trained experts), ``merge``
    (one merge + its evaluation on every domain: a sweep job's seconds over the subsets it
    evaluated, averaged over methods; needs ``losses``), ``multitask`` (training + evaluation).
    A cost that was not measured (e.g. your own experts, not trained here) is absent."""
    out: dict[str, dict] = {}
    for size, g in compute.groupby("size", sort=False):
        if not size:
            continue
        c: dict[str, float] = {}
        tr = g[g["rule"] == "train"]
        if len(tr):
            c["expert"] = float(tr["s"].mean())
        mt = g[g["rule"] == "multitask"]
        if len(mt):
            c["multitask"] = float(mt["s"].mean())
        sw = g[g["rule"] == "sweep"]
        if len(sw) and losses is not None:
            per_method = []
            for method, h in sw.groupby(sw["key"].str.split("/").str[0], sort=True):
                n = losses[(losses["size"].astype(str) == str(size)) & (losses["method"] == method)]["subset"].nunique()
                if n:
                    per_method.append(float(h["s"].sum()) / n)
            if per_method:
                c["merge"] = sum(per_method) / len(per_method)
        out[str(size)] = c
    return out
