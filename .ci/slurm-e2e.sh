#!/usr/bin/env bash
# End to end through a real single-node SLURM: bring it up, run the micro config with the
# SLURM executor (every rule an sbatch job), check the losses table, tear SLURM down (always).
# Run as root from anywhere, with the project's venv active (snakemake, the slurm executor
# plugin and the `mergelaws` CLI on PATH; sbatch exports PATH to the jobs):
#   . .venv/bin/activate && .ci/slurm-e2e.sh
# Env: E2E_TIMEOUT (s, default 900) caps the snakemake stage; SLURM_STATE (default
# /tmp/ci-slurm); E2E_LOG (default /tmp/mergelaws-slurm-e2e.log).
# Never hangs: the lock wait, slurm-up's waits and snakemake (timeout -k) are all bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${SLURM_STATE:-/tmp/ci-slurm}
LIMIT=${E2E_TIMEOUT:-900}
LOG=${E2E_LOG:-/tmp/mergelaws-slurm-e2e.log}
CFG=config/micro.yaml
t0=$(date +%s)

command -v snakemake >/dev/null && command -v mergelaws >/dev/null \
  || { echo "slurm-e2e: activate the project's venv first (snakemake, mergelaws)" >&2; exit 2; }
python -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
  || { echo "slurm-e2e: pip install 'snakemake-executor-plugin-slurm>=2.8,<2.9'" >&2; exit 2; }

# One SLURM per machine (/etc/slurm, ports 6817/6818, munged): serialize concurrent runs.
exec 9>/tmp/ci-slurm.lock
flock -w 300 9 || { echo "slurm-e2e: another SLURM e2e holds /tmp/ci-slurm.lock" >&2; exit 3; }

# set the trap BEFORE slurm-up, with an absolute path
trap '"$ROOT/.ci/slurm-down.sh" "$STATE"; echo "slurm-e2e: SLURM stopped"' EXIT
t_up=$(date +%s)
timeout -k 10 300 "$ROOT/.ci/slurm-up.sh" "$STATE"
srun -N1 --time=1 hostname >/dev/null   # smoke test, returns at once
echo "slurm-e2e: SLURM up in $(( $(date +%s) - t_up ))s"

RESULTS=$(python -c "import yaml,sys; print(yaml.safe_load(open('$CFG'))['results'])")
case "$RESULTS" in results/?*) rm -rf "$RESULTS" ;; *) echo "slurm-e2e: unexpected results dir $RESULTS" >&2; exit 2 ;; esac

# Phase 1: the whole workflow, no retries; one sweep job is scancelled while it runs, so this
# run must fail (keep-going finishes everything that does not depend on it).
t_sm=$(date +%s)
KILL_LOG=${LOG%.log}-scancel.log
timeout -k 10 "$LIMIT" snakemake --profile profiles/slurm --profile profiles/slurm-cpu \
    --configfile "$CFG" --retries 0 >"$KILL_LOG" 2>&1 &
sm_pid=$!
victim=""
deadline=$(( $(date +%s) + LIMIT ))
while [ -z "$victim" ] && kill -0 "$sm_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
  # a sweep job that has been RUNNING for at least 3 s (its python is importing or merging)
  victim=$(squeue -h -t RUNNING -o "%i %M %k" | awk '$3 ~ /^rule_sweep/ && $2 !~ /^0:0[0-2]$/ {print $1; exit}')
  [ -n "$victim" ] || sleep 0.5
done
[ -n "$victim" ] || { echo "slurm-e2e: FAILED: no running sweep job to scancel" >&2; tail -30 "$KILL_LOG" >&2; exit 1; }
victim_rule=$(squeue -h -j "$victim" -o "%k" || true)
scancel "$victim"
echo "slurm-e2e: scancelled SLURM job $victim ($victim_rule) mid-run"
set +e
wait "$sm_pid"
rc1=$?
set -e
echo "slurm-e2e: first run exited $rc1 after $(( $(date +%s) - t_sm ))s (expected non-zero: a job was cancelled)"
[ "$rc1" != 0 ] || { echo "slurm-e2e: FAILED: the run with a cancelled job reported success" >&2; exit 1; }
grep -q "Error in rule sweep" "$KILL_LOG" || { echo "slurm-e2e: FAILED: the cancelled sweep is not reported" >&2; tail -30 "$KILL_LOG" >&2; exit 1; }
n_first=$(grep -c "has been submitted with SLURM jobid" "$KILL_LOG" || true)

# Phase 2: the rerun completes, submitting only what the cancelled job left undone.
set +e
timeout -k 10 "$LIMIT" snakemake --profile profiles/slurm --profile profiles/slurm-cpu \
    --configfile "$CFG" >"$LOG" 2>&1
rc=$?
set -e
wall=$(( $(date +%s) - t_sm ))
if [ "$rc" != 0 ]; then
  echo "slurm-e2e: FAILED: snakemake exit $rc after ${wall}s (124/137 = timed out at ${LIMIT}s)" >&2
  tail -40 "$LOG" >&2
  squeue >&2 || true
  ls -t .snakemake/slurm_logs/*/*/*.log .snakemake/slurm_logs/*/*.log 2>/dev/null | head -3 \
    | while read -r f; do echo "== $f" >&2; tail -15 "$f" >&2; done
  exit 1
fi

submitted=$(grep -c "has been submitted with SLURM jobid" "$LOG" || true)
njobs=$(awk '$1=="total"{print $2; exit}' "$LOG")   # the rerun's own job stats
# every job but the local target rule `all` goes through sbatch (retries add more)
[ "$submitted" -ge 1 ] && [ "$submitted" -ge $(( njobs - 1 )) ] \
  || { echo "slurm-e2e: FAILED: $submitted sbatch submissions, expected $(( njobs - 1 ))" >&2; exit 1; }
# the rerun redoes the cancelled sweep and what depends on it, not the experts
grep -q "^sweep *1$" "$LOG" && ! grep -q "^train " "$LOG" \
  || { echo "slurm-e2e: FAILED: the rerun should run exactly 1 sweep and no training" >&2; sed -n '/Job stats/,/total/p' "$LOG" >&2; exit 1; }
echo "slurm-e2e: rerun after scancel: $submitted jobs (first run: $n_first), the job stats:"
sed -n '/^Job stats/,/^total/p' "$LOG"
sweep_log=$(sed -n 's/.*SLURM jobid [0-9]* (log: \(.*rule_sweep.*\.log\)).*/\1/p' "$LOG" | head -1)
[ -n "$sweep_log" ] && grep -h "resuming\|merges evaluated" "$sweep_log" || true
grep -q "Finished job 0\.\|steps (100%) done" "$LOG" || { echo "slurm-e2e: FAILED: no completion in log" >&2; exit 1; }

python - "$CFG" <<'PY'
import sys
import pandas as pd
from mergelaws import config, grid
cfg = config.load(sys.argv[1])
path = grid.results_dir(cfg) / "losses.parquet"
df = pd.read_parquet(path)
want = len(grid.sizes(cfg)) * len(grid.methods(cfg)) * len(grid.subsets(cfg)) * len(grid.domains(cfg))
assert len(df) == want, f"{path}: {len(df)} rows, expected {want}"
assert df["loss"].notna().all() and (df["loss"] > 0).all(), f"{path}: bad losses"
print(f"slurm-e2e: {path}: {len(df)} rows as expected")
PY

echo "slurm-e2e: $(( n_first + submitted )) jobs submitted with sbatch in the two runs, e.g.:"
grep "has been submitted with SLURM jobid" "$LOG" | head -2
echo "slurm-e2e: PASSED; snakemake stage ${wall}s, total $(( $(date +%s) - t0 ))s (log: $LOG)"
