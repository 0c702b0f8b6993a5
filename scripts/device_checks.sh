#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine that has PyTorch but no package index:
# tests/test_cuda.py (every comparison against the CPU), OpenRLHF's real train_sft on the GPU
# (test_cuda.py's slow test), and the benchmarks with --device cuda. Each step has its own time
# limit and a failed step does not stop the next; logs go to $OUT (default ./device-out).
#
# The packages the machine lacks travel as files (never committed; a copy of the list below):
#   .whl/   wheels for Python 3.12 x86-64, installed with --no-deps into /tmp/site:
#           jsonschema jsonschema-specifications referencing rpds-py (config validation),
#           datasets dill multiprocess (mergelaws.data, OpenRLHF), transformers==5.15.0
#           tokenizers==0.22.2 (OpenRLHF 0.11.2's pin), torchdata pylatexenc jsonlines (train_sft),
#           hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions (DeepSpeed)
#   .whlx/  deepspeed-0.19.6.tar.gz (an sdist, built there without its C++/CUDA ops: they JIT-build
#           on first use) and openrlhf-0.11.2-*.whl (pure Python despite its cp311 tag: unzipped)
# Fetch them with `pip download --no-deps` (see the device tool's notes), then e.g.
#   run(command="bash scripts/device_checks.sh", carry=[".whl", ".whlx"], timeout_s=590)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
ROOT=$PWD
SITE=/tmp/site
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 ))s: $*"; }

step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "wheel install failed"; exit 3; }
python3 -m zipfile -e .whlx/openrlhf-*.whl "$SITE" || exit 3
cp -r "$SITE"/openrlhf-*.data/purelib/. "$SITE"/ && rm -rf "$SITE"/openrlhf-*.data   # a platform-tagged wheel
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
  .whlx/deepspeed-*.tar.gz > "$OUT/deepspeed_build.log" 2>&1 || { tail -30 "$OUT/deepspeed_build.log"; exit 3; }
export PYTHONPATH=$SITE:$ROOT/workflow
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} && export PATH=$CUDA_HOME/bin:$PATH
echo "image TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
# (the image sets 9.0a, which DeepSpeed 0.19.6 cannot parse; mergelaws.openrlhf.launch_env passes it plain)
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, deepspeed, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)"
which nvcc && nvcc --version | tail -1

ONLY=${ONLY:-all}   # all, or one of: tests openrlhf bench
if [ "$ONLY" = all ] || [ "$ONLY" = tests ]; then
step "tests/test_cuda.py (CUDA against the CPU)"
OMP_NUM_THREADS=1 timeout "${T_TESTS:-180}" python3 -m pytest -q -p no:cacheprovider -n 12 --durations 8 -m "not slow" tests/test_cuda.py 2>&1 \
  | tee "$OUT/test_cuda.log" | tail -15
fi
if [ "$ONLY" = all ] || [ "$ONLY" = openrlhf ]; then
step "OpenRLHF train_sft on the GPU (tests/test_cuda.py -m slow)"
MERGELAWS_OPENRLHF_PYTHON=$(command -v python3) timeout "${T_OPENRLHF:-190}" \
  python3 -m pytest -q -p no:cacheprovider -s -m slow tests/test_cuda.py -k openrlhf > "$OUT/openrlhf.log" 2>&1
echo "rc $?"; grep -E "openrlhf cuda|passed|failed|Error|error:" "$OUT/openrlhf.log" | tail -15
fi
if [ "$ONLY" = all ] || [ "$ONLY" = bench ]; then
step "benchmarks --device cuda"
timeout 35 python3 benchmarks/bench_eval.py --device cuda --threads 8 2>&1 | tee "$OUT/bench_eval.md" | tail -12
timeout 50 python3 benchmarks/bench_merge.py --device cuda --random-params 150e6 --skip-yaml --threads 8 2>&1 \
  | tee "$OUT/bench_merge.md" | tail -20
timeout 35 python3 benchmarks/bench_sweep.py --device cuda --size m --sample 64 --threads 8 2>&1 \
  | tee "$OUT/bench_sweep.md" | tail -14
fi
step done
