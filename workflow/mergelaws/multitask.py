"""The multitask reference model (the paper's Fig 2 and Table 13 baseline).

Per base size, one model fine-tuned on the union of every domain's train split, with the
experts' own trainer and settings (``train`` with the size's ``bases.<size>.train`` overrides),
then evaluated on every domain's eval set exactly as a merged model is in a sweep (the same eval
examples, dtype and loss). Its rows have the sweep table's columns with ``method`` =
``multitask``, ``k`` = the number of domains and ``subset`` = ``multitask``; they are kept in
their own table (``<results>/multitask/<size>/losses.parquet``), not in ``losses.parquet``, so no
law is fitted to them.

How long it trains (``multitask.steps``, torch backend):

* ``expert`` (the default): as many optimizer steps as one expert — the same training compute
  as one expert, spread over all domains;
* ``experts``: as many steps as all the experts together (steps x number of domains) — the same
  examples and compute as training every expert;
* an integer: that many steps.

The openrlhf backend trains whole epochs, so its multitask model always sees as many examples
as all the experts together.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from mergelaws import grid

# torch (train, models, evaluate) is imported inside the functions that train or evaluate, so
# that read_tables works in the fit environment, which has no torch (rules plan and figures)

__all__ = ["METHOD", "multitask_steps", "train_multitask", "evaluate_model", "run", "read_tables"]

METHOD = "multitask"


def multitask_steps(cfg: dict, size: str) -> int:
    """Optimizer steps of the size's multitask model (torch backend), from ``multitask.steps``."""
    steps = cfg["multitask"]["steps"]
    per_expert = grid.train_settings(cfg, size)["steps"]
    if steps == "expert":
        return per_expert
    if steps == "experts":
        return per_expert * len(grid.domains(cfg))
    return int(steps)


def train_multitask(cfg: dict, size: str, out: str | Path, log=print) -> dict:
    """Train the size's multitask model into ``out`` (written atomically); return its record."""
    from mergelaws import train

    domains = grid.domains(cfg)
    base = grid.base_dir(cfg, size)
    if cfg["train"]["backend"] == "openrlhf":
        from mergelaws import openrlhf

        seed = train._expert_seed(cfg["seed"], size, f"{METHOD}:" + "+".join(domains))
        return openrlhf.train_expert(cfg, size, METHOD, base, out, seed=seed, domains=domains)
    return train.train_expert_torch(cfg, size, METHOD, base, out, log=log, domains=domains,
                                    steps=multitask_steps(cfg, size), kind=METHOD)


def evaluate_model(cfg: dict, size: str, model_dir: str | Path, log=print) -> pd.DataFrame:
    """Every domain's eval loss of ``model_dir``, as sweep rows (see the module doc)."""
    from mergelaws import models, sweep
    from mergelaws.evaluate import evaluate_examples

    domains = grid.domains(cfg)
    device = models.resolve_device(cfg["sweep"]["device"])
    base = grid.base_dir(cfg, size)
    tok = models.load_tokenizer(model_dir)
    model = models.load_model(model_dir, sweep.sweep_dtype(cfg, base), device,
                              allow_bin=cfg["allow_bin_checkpoints"])
    n_params = models.count_params(model)
    encoded = sweep.load_eval_sets(cfg, tok, log)
    rows = []
    for d in domains:
        res = evaluate_examples(model, encoded[d].examples, pad_id=tok.pad_token_id,
                                batch_tokens=cfg["eval"]["batch_tokens"], device=device)
        status = "ok" if math.isfinite(res.loss) else "failed: non-finite loss"
        rows.append((size, n_params, METHOD, len(domains), METHOD, "+".join(domains), d, True,
                     res.loss, res.tokens, len(encoded[d].examples), encoded[d].skipped, status))
        log(f"{METHOD} {size}: {d} loss {res.loss:.4f} over {res.tokens} tokens")
    return pd.DataFrame(rows, columns=sweep.COLUMNS)


def run(cfg: dict, size: str, model_out: str | Path, table_out: str | Path, log=print) -> pd.DataFrame:
    """`mergelaws multitask`: train (unless ``model_out`` already holds a finished model, e.g.
    after a job died during its evaluation) and evaluate; the table is written last."""
    from mergelaws import sweep

    t0 = time.time()
    model_out = Path(model_out)
    if (model_out / "config.json").exists() and (model_out / "mergelaws_expert.json").exists():
        log(f"{METHOD} {size}: {model_out} is already trained; evaluating it")
    else:
        rec = train_multitask(cfg, size, model_out, log=log)
        log(f"{METHOD} {size}: loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f} in {rec['seconds']}s")
    table = evaluate_model(cfg, size, model_out, log=log)
    sweep.write_table(table, table_out)
    log(f"{METHOD} {size}: mean loss over {len(table)} domains {table['loss'].mean():.4f}; "
        f"done in {time.time() - t0:.1f}s -> {table_out}")
    return table


def read_tables(paths: list[str | Path]) -> pd.DataFrame:
    """The multitask rows of several sizes as one table (empty with the sweep columns if none)."""
    from mergelaws import io

    frames = [io.read_table(p, what="multitask losses table",
                            fix="pass the <results>/multitask/<size>/losses.parquet rule multitask writes")
              for p in paths]
    if not frames:
        return pd.DataFrame(columns=["size", "params", "method", "k", "subset", "members", "eval_domain",
                                     "in_domain", "loss", "tokens", "examples", "skipped", "status"])
    return pd.concat(frames, ignore_index=True)
