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


def _cfg(args):
    from mergelaws import config

    return config.load(args.config)


def cmd_validate(args) -> None:
    from mergelaws import grid

    cfg = _cfg(args)
    subs = grid.subsets(cfg)
    print(f"{args.config}: valid. {len(grid.sizes(cfg))} sizes x {len(grid.domains(cfg))} domains -> "
          f"{len(grid.sizes(cfg)) * len(grid.domains(cfg))} experts; {len(grid.methods(cfg))} methods x "
          f"{len(subs)} subsets -> {len(grid.sizes(cfg)) * len(grid.methods(cfg)) * len(subs)} merges")


def cmd_subsets(args) -> None:
    from mergelaws import grid

    for s in grid.subsets(_cfg(args)):
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


def cmd_train(args) -> None:
    from mergelaws import train

    _threads(args.threads)
    rec = train.train_expert(_cfg(args), args.size, args.domain, args.out)
    print(f"expert {args.size}/{args.domain}: loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f} "
          f"in {rec['seconds']}s -> {args.out}")


def cmd_sweep(args) -> None:
    from mergelaws import sweep

    _threads(args.threads)
    sweep.run_sweep(_cfg(args), args.size, args.method, args.out)


def cmd_aggregate(args) -> None:
    from mergelaws import sweep

    t = sweep.aggregate(args.sweeps, args.out)
    print(f"{len(t)} rows from {len(args.sweeps)} sweeps -> {args.out} (+ .csv)")


def cmd_fit(args) -> None:
    import pandas as pd

    from mergelaws import fit, io

    cfg = _cfg(args) if args.config else None
    losses = pd.read_parquet(args.losses) if str(args.losses).endswith(".parquet") else pd.read_csv(args.losses)
    weights = args.weights or (cfg["fit"]["weights"] if cfg else "k")
    fits = fit.fit_all(losses, weights=weights)
    out = Path(args.out)
    io.write_text(out / "fits.json", json.dumps(fits, indent=2, sort_keys=True, default=float) + "\n")
    summary = fit.summary_frame(fits)
    with io.atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    print(summary.to_string(index=False))


def cmd_figures(args) -> None:
    import pandas as pd

    from mergelaws import fit, plots

    cfg = _cfg(args)
    losses = pd.read_parquet(args.losses)
    fits = json.loads(Path(args.fits).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = fit.view_table(losses)
    made = []
    for view in ("in_domain", "cross_domain"):
        made += plots.plot_loss_vs_k(table, fits, view, out / f"loss_vs_k_{view}")
        made += plots.plot_variance_vs_k(table, view, out / f"variance_vs_k_{view}")
    headline = cfg["fit"]["view"]
    made += plots.paper_figures(losses, fits, out, view=headline)  # the paper's figures, analogues
    print(f"{len(made)} figure files -> {out} (headline view: {headline})")


def cmd_plan(args) -> None:
    import pandas as pd

    from mergelaws import plan

    losses = pd.read_parquet(args.losses) if str(args.losses).endswith(".parquet") else pd.read_csv(args.losses)
    fits = json.loads(Path(args.fits).read_text()) if args.fits else None
    view = args.view or (_cfg(args)["fit"]["view"] if args.config else "cross_domain")
    for p in plan.write_plan(losses, fits, args.out, targets=args.target, eps=args.eps,
                             view=view, n_boot=args.n_boot, seed=args.seed):
        print(p)


def cmd_schema(args) -> None:
    from mergelaws import config

    print(f"method parameters regenerated from the registry -> {config.regenerate_method_defs()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mergelaws", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    from mergelaws import evalcli, mergeyaml

    evalcli.add_parser(sub)
    mergeyaml.add_parser(sub)

    def add(name, fn, help_, config=True):
        p = sub.add_parser(name, help=help_)
        if config:
            p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
        p.set_defaults(fn=fn)
        return p

    add("validate", cmd_validate, "validate a config and print the grid's size")
    add("schema", cmd_schema, "regenerate the config schema's method parameters from the registry", config=False)
    add("subsets", cmd_subsets, "list the merged subsets (k, id, members)")
    p = add("tokenizer", cmd_tokenizer, "train the byte-level BPE tokenizer on the domains' train splits")
    p.add_argument("--out", required=True)
    p = add("pretrain", cmd_pretrain, "pretrain a tiny base on the general mixture")
    p.add_argument("--size", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p = add("train", cmd_train, "fine-tune one expert (size, domain)")
    p.add_argument("--size", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p = add("sweep", cmd_sweep, "merge + evaluate every subset for one (size, method)")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p = add("aggregate", cmd_aggregate, "concatenate sweep tables into the losses table", config=False)
    p.add_argument("sweeps", nargs="+")
    p.add_argument("--out", required=True)
    p = add("fit", cmd_fit, "fit the scaling laws to a losses table", config=False)
    p.add_argument("losses")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--weights", choices=["k", "sem", "none"])
    p = add("plan", cmd_plan, "planning answers from the fitted laws (plan.md + plan.json)", config=False)
    p.add_argument("losses")
    p.add_argument("--fits")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--target", type=float, help="target loss (default: per size, midway to the floor)")
    p.add_argument("--eps", type=float, default=0.01, help="marginal gain threshold (nats/token)")
    p.add_argument("--view", help="view to plan on (default: fit.view from --config, else cross_domain)")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p = add("figures", cmd_figures, "draw the figures")
    p.add_argument("--losses", required=True)
    p.add_argument("--fits", required=True)
    p.add_argument("--out", required=True)

    args = ap.parse_args(argv)
    from mergelaws.config import ConfigError
    from mergelaws.data import DataError
    from mergelaws.models import ModelError

    t0 = time.time()
    try:
        args.fn(args)
    except (ConfigError, DataError, ModelError, NotImplementedError) as exc:
        print(f"mergelaws {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    print(f"mergelaws {args.cmd}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
