"""`mergelaws merge CONFIG.yml OUT_DIR`: the command line of mergelaws.mergeyaml.

Kept apart from mergeyaml (which needs torch) so that `mergelaws --help` and the torch-free
commands (fit, figures, plan; envs/fit.yaml) start without importing torch.
"""

from __future__ import annotations


def cmd_merge(args) -> None:
    from mergelaws import mergeyaml

    mergeyaml.cmd_merge(args)


def add_parser(subparsers):
    """Register `mergelaws merge CONFIG.yml OUT_DIR` on the CLI's subparsers."""
    p = subparsers.add_parser("merge", help="merge checkpoints from a mergekit-format YAML into a HF model directory")
    p.add_argument("config", help="mergekit-format YAML (merge_method, base_model, models, parameters, dtype)")
    p.add_argument("out", help="output model directory (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (dare*, della*; default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int)
    p.add_argument("--allow-bin", action="store_true",
                   help="also read pickle .bin weights (with torch.load(weights_only=True)); only for files you trust")
    p.set_defaults(fn=cmd_merge)
    return p
