#!/usr/bin/env bash
# Stops the Slurm that scripts/start-slurm.sh started: slurmd first, then slurmctld (slurmd may
# ignore SIGTERM once the controller is gone), each killed after a timeout. munged is left
# running (other tools may use it). Idempotent.
set -euo pipefail

DIR=${DREAMPIPE_SLURM_DIR:-/tmp/dreampipe-slurm}
STOP_TIMEOUT_S=10

stop() {
    local daemon=$1 pid_file="$DIR/run/$1.pid" pid
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || { rm -f "$pid_file"; return 0; }
    for _ in $(seq $((STOP_TIMEOUT_S * 5))); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; return 0; }
        sleep 0.2
    done
    echo "stop-slurm: $daemon ignored SIGTERM; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pid_file"
}

stop slurmd
stop slurmctld
