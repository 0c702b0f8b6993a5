"""The fused sweep: for one (size, method), load the base and the experts once, then for every
subset build the merged weights in memory, evaluate them on every domain, and emit one row per
(subset, eval domain). No merged checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from mergelaws import data as D
from mergelaws import grid, merge, models
from mergelaws.evaluate import evaluate_examples
from mergelaws.io import atomic_path, write_text
from mergelaws.progress import Progress

COLUMNS = ["size", "params", "method", "k", "subset", "members", "eval_domain", "in_domain", "loss", "tokens",
           "status"]


def load_eval_sets(cfg: dict, tokenizer) -> dict[str, list[D.Example]]:
    e = cfg["eval"]
    return {d: D.load_domain(cfg, d, "eval", tokenizer, e["max_len"], limit=e["max_examples"]).examples
            for d in grid.domains(cfg)}


def run_sweep(cfg: dict, size: str, method: str, out: str | Path, expert_dirs: dict[str, str] | None = None,
              log=print) -> pd.DataFrame:
    params = cfg["methods"][method]
    device = models.resolve_device(cfg["sweep"]["device"])
    doms = grid.domains(cfg)
    base_path = grid.base_dir(cfg, size)
    expert_dirs = expert_dirs or {d: grid.expert_dir(cfg, size, d) for d in doms}
    subsets = grid.subsets(cfg)
    t0 = time.time()

    tok = models.load_tokenizer(base_path)
    model = models.load_model(base_path, cfg["sweep"]["dtype"], device)
    n_params = models.count_params(model)
    live = models.float_state(model)
    base_state = {n: p.detach().float().clone() for n, p in live.items()}
    experts = []
    for d in doms:
        em = models.load_model(expert_dirs[d], "float32", "cpu")
        models.check_compatible(model, em, expert_dirs[d])
        experts.append({n: p.detach().float().to(device) for n, p in models.float_state(em).items()})
        del em
    evalsets = load_eval_sets(cfg, tok)
    log(f"sweep {size}/{method}: {n_params:,} params, {len(doms)} experts, {len(subsets)} subsets x "
        f"{len(doms)} eval domains; loaded in {time.time() - t0:.1f}s")

    index = {d: i for i, d in enumerate(doms)}
    progress = PartialResults(out, fingerprint(cfg, size, method, base_path, expert_dirs, subsets))
    done = progress.done_ids()
    todo = [s for s in subsets if s.id not in done]
    if done:
        log(f"sweep {size}/{method}: resuming, {len(subsets) - len(todo)} of {len(subsets)} subsets "
            f"already done (kept in {progress.dir})")
    prog = Progress(len(subsets), f"sweep {size}/{method}")
    prog.update(len(subsets) - len(todo))
    chunk = cfg["sweep"]["chunk"]
    for start in range(0, len(todo), chunk):
        rows = []
        for s in todo[start:start + chunk]:
            if s.k == 0:
                merged = base_state
            else:
                merged = merge.merge_state_dicts(method, base_state, [experts[index[d]] for d in s.members],
                                                 params, seed=cfg["seed"], subset_id=s.id)
            bad = [n for n, t in merged.items() if not torch.isfinite(t).all()]
            if bad:
                log(f"sweep {size}/{method}: merge of subset {s.id} ({s.label}) has non-finite weights in "
                    f"{bad[:3]}; recorded as failed (loss NaN), excluded from means and fits")
            else:
                with torch.no_grad():
                    for name, p in live.items():
                        p.copy_(merged[name].to(p.dtype))
            for d in doms:
                if bad:
                    rows.append((size, n_params, method, s.k, s.id, s.label, d, d in s.members, float("nan"), 0,
                                 "failed: non-finite weights"))
                    continue
                res = evaluate_examples(model, evalsets[d], pad_id=tok.pad_token_id,
                                        batch_tokens=cfg["eval"]["batch_tokens"], device=device)
                status = "ok" if math.isfinite(res.loss) else "failed: non-finite loss"
                if status != "ok":
                    log(f"sweep {size}/{method}: subset {s.id} ({s.label}) gives a non-finite loss on {d}; "
                        f"recorded as failed")
                rows.append((size, n_params, method, s.k, s.id, s.label, d, d in s.members, res.loss, res.tokens,
                             status))
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
    log(f"sweep {size}/{method}: {len(todo)} merges evaluated ({len(subsets)} in the table) in "
        f"{time.time() - t0:.1f}s -> {out}")
    return table


def fingerprint(cfg: dict, size: str, method: str, base: str, expert_dirs: dict[str, str], subsets) -> str:
    """What a sweep's results depend on; partial results with another fingerprint are discarded."""
    def stamp(path: str):
        p = Path(path)
        if not p.is_dir():
            return path
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                      if f.suffix in (".safetensors", ".json"))

    key = {"size": size, "method": method, "params": cfg["methods"][method], "seed": cfg["seed"],
           "eval": cfg["eval"], "dtype": cfg["sweep"]["dtype"], "domains": cfg["domains"],
           "subsets": [s.id for s in subsets], "base": stamp(base),
           "experts": {d: stamp(p) for d, p in sorted(expert_dirs.items())}}
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
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    table = table.sort_values(["params", "size", "method", "k", "subset", "eval_domain"], kind="stable").reset_index(drop=True)
    write_table(table, out, csv=True)
    return table
