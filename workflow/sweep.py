"""The fused sweep: for one (size, method), load the base and the experts once, then for every
subset build the merged weights in memory, evaluate them on every domain, and emit one row per
(subset, eval domain). No merged checkpoint is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from mergelaws import data as D
from mergelaws import grid, merge, models
from mergelaws.evaluate import evaluate_examples
from mergelaws.io import atomic_path
from mergelaws.progress import Progress

COLUMNS = ["size", "params", "method", "k", "subset", "members", "eval_domain", "in_domain", "loss", "tokens"]


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

    rows = []
    prog = Progress(len(subsets), f"sweep {size}/{method}")
    index = {d: i for i, d in enumerate(doms)}
    for s in subsets:
        if s.k == 0:
            merged = base_state
        else:
            merged = merge.merge_state_dicts(method, base_state, [experts[index[d]] for d in s.members],
                                             params, seed=cfg["seed"], subset_id=s.id)
        with torch.no_grad():
            for name, p in live.items():
                p.copy_(merged[name].to(p.dtype))
        for d in doms:
            res = evaluate_examples(model, evalsets[d], pad_id=tok.pad_token_id,
                                    batch_tokens=cfg["eval"]["batch_tokens"], device=device)
            rows.append((size, n_params, method, s.k, s.id, s.label, d, d in s.members, res.loss, res.tokens))
        prog.update()
    prog.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_table(table, out)
    log(f"sweep {size}/{method}: {len(subsets)} merges evaluated in {time.time() - t0:.1f}s -> {out}")
    return table


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
