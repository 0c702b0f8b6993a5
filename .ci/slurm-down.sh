#!/usr/bin/env bash
# Stop the daemons started by .ci/slurm-up.sh, by PID from their pid files (never by name:
# no pkill/killall). TERM all first, then wait up to 10 s each, then KILL. Always exits 0.
# Usage: .ci/slurm-down.sh [STATE_DIR]  (default /tmp/ci-slurm)
STATE=${1:-/tmp/ci-slurm}
# Cancel the jobs first: slurmstepd and the job's processes outlive a stopped slurmd. Every job
# on this private CI cluster is ours. Bounded: at most ~15 s.
if [ -f "$STATE/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    echo "slurm-down.sh: cancelling jobs $(echo $jobs)"
    timeout 5 scancel $jobs 2>/dev/null || true
    for i in $(seq 20); do
      [ -z "$(timeout 5 squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi
pids=()
for f in "$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid" "$STATE/run/slurmdbd.pid" \
         /run/munge/munged.pid /run/mysqld/mariadb-ci.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f"); rm -f "$f"
  [[ "$pid" =~ ^[0-9]+$ ]] || continue
  kill "$pid" 2>/dev/null && pids+=("$pid")
done
for pid in "${pids[@]}"; do
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
done
true
