#!/usr/bin/env bash
# Run by Snakemake inside the new env after creating envs/train-openrlhf.yaml (on a GPU node).
# flash-attn builds against the torch already in the env (no build isolation; it downloads a
# prebuilt wheel when one matches, else compiles with nvcc), then OpenRLHF, then this project
# (editable, no dependencies) from MERGELAWS_ROOT, which rules/common.smk sets.
set -eu
: "${MERGELAWS_ROOT:?set MERGELAWS_ROOT to the mergelaws checkout (rules/common.smk does)}"
python -m pip install --no-build-isolation flash-attn==2.8.3
python -m pip install openrlhf==0.11.2
python -m pip install --no-deps --no-build-isolation -e "$MERGELAWS_ROOT"
