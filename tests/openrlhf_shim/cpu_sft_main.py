"""Run ``openrlhf.cli.train_sft`` on a CPU (tests only; never the product path).

OpenRLHF 0.11's DeepSpeed strategy calls ``torch.cuda.set_device`` and builds its device mesh
with ``init_device_mesh("cuda", ...)``; a few helpers call ``torch.cuda.current_device``,
``synchronize`` and ``empty_cache``. On a CPU-only torch those raise. This module points them at
the CPU, then runs the real CLI module as ``__main__`` with the same command-line arguments, so
the argv built by ``mergelaws.openrlhf.build_command`` is exercised unchanged (only the module
name differs). DeepSpeed picks its CPU accelerator (set ``DS_ACCELERATOR=cpu``) and gloo.

    python -m cpu_sft_main --model.model_name_or_path ... (train_sft's flags)
"""

from __future__ import annotations

import os
import runpy

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed.device_mesh as device_mesh  # noqa: E402

CPU = torch.device("cpu")


def _set_device(*args, **kwargs):
    return None


def _synchronize(*args, **kwargs):
    return None


def _empty_cache(*args, **kwargs):
    return None


def _current_device():
    return CPU


def _patch_cuda() -> None:
    # one distinct function per name: torch._dynamo refuses one object under several torch names
    torch.cuda.set_device = _set_device
    torch.cuda.synchronize = _synchronize
    torch.cuda.empty_cache = _empty_cache
    torch.cuda.current_device = _current_device


_init_device_mesh = device_mesh.init_device_mesh


def cpu_device_mesh(device_type, *args, **kwargs):
    """``init_device_mesh`` that always builds the mesh on the CPU (gloo)."""
    return _init_device_mesh("cpu", *args, **kwargs)


def main() -> None:
    _patch_cuda()
    device_mesh.init_device_mesh = cpu_device_mesh
    import openrlhf.utils.deepspeed.deepspeed as strategy_module  # imported the name at load time

    strategy_module.init_device_mesh = cpu_device_mesh
    runpy.run_module("openrlhf.cli.train_sft", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
