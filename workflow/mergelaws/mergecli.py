"""`mergelaws merge CONFIG.yml OUT_DIR`: the command line of mergelaws.merging.mergekit.

Kept apart from mergelaws.merging (which needs torch) so that `mergelaws --help` and the torch-free
commands (fit, figures, plan; envs/fit.yaml) start without importing torch.
"""

from __future__ import annotations

from mergelaws.evalcli import add_run_args


def cmd_merge(args) -> None:
    from mergelaws.merging import mergekit

    mergekit.cmd_merge(args)


def add_parser(subparsers):
    """Register `mergelaws merge CONFIG.yml OUT_DIR` on the CLI's subparsers."""
    p = subparsers.add_parser("merge", help="merge checkpoints from a mergekit-format YAML into a HF model directory")
    p.add_argument("config", help="mergekit-format YAML (merge_method, base_model, models, parameters, dtype, "
                                  "tokenizer_source: base|PATH, chat_template: NAME|auto|JINJA)")
    p.add_argument("out", help="output model directory (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (dare*, della*; default 0)")
    add_run_args(p, device="cpu")
    p.set_defaults(fn=cmd_merge)
    return p
