#!/usr/bin/env bash
# The Slurm controller at scale, without a cluster: a sweep of N `command` stages run with
# `--executor slurm` against the stand-ins in bench/fake-slurm (sbatch queues each job and runs
# it after FAKE_SLURM_DELAY seconds; squeue answers from the fake queue and counts its calls).
# Prints the controller's wall time, CPU seconds, peak memory and squeue calls per minute; the
# jobs' own work (the real `dreampipe job` of each stage) runs outside the measured process.
#
#   bench/slurm.sh                 # N=1000, FAKE_SLURM_DELAY=2, --jobs 200
#   N=200 JOBS=50 bench/slurm.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000}
JOBS=${JOBS:-200}
export FAKE_SLURM_DELAY=${FAKE_SLURM_DELAY:-2}
export LIBTORCH=${LIBTORCH:-$("$ROOT/scripts/setup-libtorch.sh")}
(cd "$ROOT" && cargo build --release -q)
WORK=$(mktemp -d /tmp/dreampipe-slurm-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export FAKE_SLURM_SPOOL=$WORK/spool DREAMPIPE_SLURM_BIN=$ROOT/bench/fake-slurm
mkdir -p "$FAKE_SLURM_SPOOL"
{
    echo "name: sweep"
    echo "stages:"
    echo "  step:"
    echo "    kind: command"
    echo "    run: echo \$N > \$OUT/n"
    echo "    matrix:"
    printf '      run: ['
    for i in $(seq 1 "$N"); do printf '"echo %d > $OUT/n"%s' "$i" "$([ "$i" = "$N" ] || echo ', ')"; done
    echo "]"
} | sed '/^    run: echo \$N/d' >"$WORK/sweep.yaml"
cd "$WORK"
# The controller's own CPU time and peak memory (not its children: the fake sbatch/squeue
# scripts it runs), read from /proc every 0.1 s until it exits.
"$ROOT/target/release/dreampipe" --device cpu --cache cache run sweep.yaml --executor slurm \
    --jobs "$JOBS" --plain >run.log 2>&1 &
pid=$!
started=$(date +%s.%N)
ticks=$(getconf CLK_TCK)
cpu=0 rss=0
while [ -r "/proc/$pid/stat" ]; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || break
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
    [ -n "$hwm" ] || break
    set -- ${stat##*) }
    cpu=$(( ${12} + ${13} )) rss=$hwm
    sleep 0.1
done
wait "$pid" || { tail -20 run.log; exit 1; }
wall=$(echo "$(date +%s.%N) - $started" | bc)
user=$(echo "scale=2; $cpu / $ticks" | bc) sys=0
calls=$(wc -l <"$FAKE_SLURM_SPOOL/squeue.calls")
ran=$(grep -c '^\[done\]' run.log)
rerun_start=$(date +%s.%N)
"$ROOT/target/release/dreampipe" --device cpu --cache cache run sweep.yaml --executor slurm --plain >rerun.log 2>&1
rerun=$(echo "$(date +%s.%N) - $rerun_start" | bc)
awk -v n="$N" -v jobs="$JOBS" -v delay="$FAKE_SLURM_DELAY" -v wall="$wall" -v user="$user" \
    -v sys="$sys" -v rss="$rss" -v calls="$calls" -v ran="$ran" -v rerun="$rerun" 'BEGIN {
    printf "| stages | --jobs | job delay | ran | wall | controller CPU | peak RSS | squeue calls | per minute | no-op rerun |\n"
    printf "|---|---|---|---|---|---|---|---|---|---|\n"
    printf "| %d | %d | %s s | %d | %.1f s | %.2f s | %.1f MiB | %d | %.0f | %.2f s |\n",
        n, jobs, delay, ran, wall, user + sys, rss / 1024, calls, calls / (wall / 60), rerun
}'
