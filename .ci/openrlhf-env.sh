#!/usr/bin/env bash
# Build a minimal OpenRLHF 0.11.2 environment for the `openrlhf` training backend's
# integration test (tests/test_openrlhf.py), on a CPU-only machine.
#
#   .ci/openrlhf-env.sh VENV_DIR
#   export MERGELAWS_OPENRLHF_PYTHON=VENV_DIR/bin/python
#   export TORCH_EXTENSIONS_DIR=VENV_DIR/torch_extensions   # DeepSpeed's JIT ops, built here once
# (TORCH_EXTENSIONS_DIR is per environment: DeepSpeed rebuilds its ops whenever another install
# shares the cache directory. The tests default to VENV_DIR/torch_extensions.)
#
# The `--no-deps` route: a full `pip install openrlhf` needs
# flash-attn 2.8.3, which only builds against CUDA. Here: torch (CPU, pinned first), OpenRLHF
# without its dependencies, then only what its SFT trainer imports. flash_attn is NOT installed:
# the tests put a pure-Python stand-in (tests/openrlhf_shim) on PYTHONPATH.
# On a GPU cluster install OpenRLHF normally (`pip install openrlhf`) instead.
#
# Idempotent: exits 0 at once when VENV_DIR already holds a working environment.
set -euo pipefail
VENV=${1:?usage: .ci/openrlhf-env.sh VENV_DIR}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
PY=${PYTHON:-python3}
STAMP="$VENV/.mergelaws-openrlhf-env"
# OpenRLHF's own pins where it has them (deepspeed, transformers); the rest as measured working
PKGS="deepspeed==0.19.6 transformers==5.15.0 datasets==5.2.0 peft==0.21.2 pylatexenc==2.11 torchdata==0.11.0 \
einops==0.8.2 jsonlines==4.0.0"
want="openrlhf==0.11.2 $TORCH_PIN $PKGS"

advice() {
  echo "openrlhf env ready: $VENV"
  echo "  export MERGELAWS_OPENRLHF_PYTHON=$VENV/bin/python"
  echo "  export TORCH_EXTENSIONS_DIR=$VENV/torch_extensions   # cache DeepSpeed's JIT ops per env"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && "$VENV/bin/python" -c "import importlib.metadata as m; [m.version(p) for p in \
       ('openrlhf', 'deepspeed', 'transformers', 'datasets', 'torch', 'peft', 'torchdata', 'einops')]" >/dev/null 2>&1; then
  advice
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)

# 1. torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" "$TORCH_PIN"
echo "$TORCH_PIN" > "$VENV/pip-constraint.txt"
# inherited by pip's build-isolation subprocesses too (deepspeed is an sdist)
export PIP_CONSTRAINT="$VENV/pip-constraint.txt"

# 2. OpenRLHF without its requirements (flash-attn, ray, vllm, bitsandbytes, wandb, ...)
"${pip[@]}" --no-deps openrlhf==0.11.2
# 3. only what `openrlhf.cli.train_sft` imports (found by iterating on ImportErrors)
"${pip[@]}" $PKGS

"$VENV/bin/python" -c "import openrlhf, deepspeed, transformers, datasets, torch; \
print('openrlhf', openrlhf.__version__ if hasattr(openrlhf, '__version__') else '0.11.2', \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" 2>/dev/null
# 4. DeepSpeed JIT-compiles two C++ ops (shm_comm, fused_adam) on first use on a CPU: about
#    1.5-3.5 min with g++ on 2 cores. Build them now, cached in this env (OPENRLHF_ENV_WARM=0 skips).
mkdir -p "$VENV/torch_extensions"
if [ "${OPENRLHF_ENV_WARM:-1}" = 1 ]; then
  t=$(date +%s)
  TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.accelerator import get_accelerator
for name in ('ShareMemCommBuilder', 'FusedAdamBuilder'):
    get_accelerator().create_op_builder(name).load()" >/dev/null 2>&1 \
    || echo "warning: DeepSpeed's CPU ops did not pre-build; the first run builds them (needs g++, python3-dev)"
  echo "DeepSpeed CPU ops built in $(( $(date +%s) - t ))s"
fi
echo "$want" > "$STAMP"
echo "built in $(( $(date +%s) - start ))s"
advice
