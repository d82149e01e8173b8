#!/usr/bin/env bash
# Stops what start_local_cluster.sh started (same $NEMO_RLHF_SLURM_BASE): cancels the cluster's jobs,
# then slurmd, slurmctld and munged, each by its PID file after checking the process name.
#   scripts/slurm/stop_local_cluster.sh [--keep-munge]
set -uo pipefail
BASE=${NEMO_RLHF_SLURM_BASE:-/tmp/nemo_rlhf-slurm}
RUN=$BASE/run
KEEP_MUNGE=0; [ "${1:-}" = --keep-munge ] && KEEP_MUNGE=1

stop_pid() {  # stop_pid PIDFILE COMM
  local f=$1 comm=$2 pid
  [ -s "$f" ] || { echo "$comm: not running (no $f)"; return 0; }
  pid=$(cat "$f")
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || [ ! -r "/proc/$pid/comm" ] || [ "$(cat "/proc/$pid/comm")" != "$comm" ]; then
    echo "$comm: stale pid file ($pid), removed"; rm -f "$f"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then echo "$comm: pid $pid ignored TERM, sending KILL"; kill -KILL "$pid"; fi
  rm -f "$f"; echo "$comm: stopped (pid $pid)"
}

# cancel the jobs first, so that no slurmstepd outlives slurmd
if [ -s "$RUN/slurmctld.pid" ] && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    scancel --full $jobs 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
stop_pid "$RUN/slurmd.pid" slurmd
stop_pid "$RUN/slurmctld.pid" slurmctld
[ "$KEEP_MUNGE" = 1 ] || stop_pid /run/munge/munged.pid munged
exit 0
