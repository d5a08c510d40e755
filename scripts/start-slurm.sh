#!/usr/bin/env bash
# A real one-node Slurm on this machine, for trying and testing dreampipe's cluster runs
# (issue #11): installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes
# a one-node config with two fake GPUs (gres backed by stand-in device files), starts munged,
# slurmctld and slurmd without systemd and waits until the node is idle. Idempotent: a running,
# idle node is left as it is. Needs root (as on the project's machines and CI).
#
#   scripts/start-slurm.sh          # prints the state folder on success
#   scripts/stop-slurm.sh           # stops the daemons
#
# DREAMPIPE_SLURM_DIR: where config, state, logs and the fake GPU files go
# (default /tmp/dreampipe-slurm). What was measured on this machine kind, and the pitfalls the
# choices below avoid: ../shared/docs/SLURM.md in the steering repo's shared folder.
set -euo pipefail

DIR=${DREAMPIPE_SLURM_DIR:-/tmp/dreampipe-slurm}
FAKE_GPUS=2
# How long to wait for the node to become idle.
START_TIMEOUT_S=60

log() { echo "start-slurm: $*" >&2; }
fail() { log "error: $*"; exit 1; }

node_idle() {
    local state
    state=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -1) || return 1
    [ "$state" = "idle" ] || [ "$state" = "mixed" ] || [ "$state" = "allocated" ]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || fail "installing Slurm needs root (apt-get); install slurmctld slurmd slurm-client munge"
    log "installing slurmctld slurmd slurm-client munge (Debian packages, once; log: $DIR/apt.log)"
    mkdir -p "$DIR"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurmctld slurmd slurm-client munge; } >"$DIR/apt.log" 2>&1 \
        || fail "apt-get install failed (see $DIR/apt.log)"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [ -f /etc/munge/munge.key ] || fail "/etc/munge/munge.key is missing (the munge package makes it)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || fail "munged does not answer (munge -n | unmunge)"
}

# The node line as slurmd detects it (else "Node reconfigured socket/core boundaries"), with
# RealMemory a little under what it finds (else the node drains) and the fake GPUs.
node_line() {
    local detected memory
    detected=$(slurmd -C | head -1) || fail "slurmd -C failed"
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    sed -e "s/RealMemory=[0-9]*/RealMemory=$((memory * 9 / 10))/" \
        -e "s/\$/ Gres=gpu:$FAKE_GPUS State=UNKNOWN/" <<<"$detected"
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR"/{state,spool,log,run,gpus}
    for index in $(seq 0 $((FAKE_GPUS - 1))); do
        [ -e "$DIR/gpus/nvidia$index" ] || mknod -m 0666 "$DIR/gpus/nvidia$index" c 1 3
    done
    mkdir -p /etc/slurm
    cat >/etc/slurm/gres.conf <<EOF
Name=gpu File=$DIR/gpus/nvidia[0-$((FAKE_GPUS - 1))]
EOF
    cat >/etc/slurm/slurm.conf <<EOF
# Written by dreampipe's scripts/start-slurm.sh: one node, two fake GPUs, no accounting.
ClusterName=dreampipe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MinJobAge=300
GresTypes=gpu
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$(node_line)
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    slurmctld || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
    slurmd || fail "slurmd did not start (see $DIR/log/slurmd.log)"
}

wait_until_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S))
    while [ $SECONDS -lt $deadline ]; do
        node_idle && return
        # Daemon mode returns 0 and then dies on a config error: check that both still run.
        for daemon in slurmctld slurmd; do
            local pid_file="$DIR/run/$daemon.pid"
            if [ -f "$pid_file" ] && ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
                fail "$daemon exited (see $DIR/log/$daemon.log)"
            fi
        done
        sleep 0.2
    done
    fail "the node is not idle after ${START_TIMEOUT_S}s (sinfo: $(timeout 5 sinfo -h -N 2>&1 | head -1))"
}

main() {
    if command -v sinfo >/dev/null && node_idle; then
        echo "$DIR"
        return
    fi
    install_packages
    start_munge
    write_config
    start_daemons
    wait_until_idle
    log "one node with $FAKE_GPUS fake GPUs is up ($(timeout 5 sinfo -h -N -o '%N %T %G' | head -1))"
    echo "$DIR"
}

main "$@"
