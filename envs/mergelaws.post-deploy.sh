#!/usr/bin/env bash
# Run by Snakemake inside the new env after creating envs/mergelaws.yaml. Installs this project,
# editable and without dependencies (the env pins them), from MERGELAWS_ROOT, which
# rules/common.smk sets to the directory of the Snakefile. (A relative path in the env file's pip
# section would not work: Snakemake copies env files to .snakemake/conda/ before creating them.)
set -eu
: "${MERGELAWS_ROOT:?set MERGELAWS_ROOT to the mergelaws checkout (rules/common.smk does)}"
python -m pip install --no-deps --no-build-isolation -e "$MERGELAWS_ROOT"
