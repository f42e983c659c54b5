#!/usr/bin/env bash
# A one-machine SLURM cluster for trying the SLURM scripts (and for tests/training/test_slurm.py):
#   bash scripts/slurm/cluster.sh start <folder>   # prints the line to export: SLURM_CONF=<folder>/slurm.conf
#   SLURM_CONF=<folder>/slurm.conf sbatch ...
#   bash scripts/slurm/cluster.sh stop <folder>
# start installs slurm-wlm and munge with apt-get if they are missing (needs root), writes a
# munge key and a slurm.conf into <folder> (a node with this machine's CPUs, one partition, free
# ports, everything under <folder>), starts munged, slurmctld and slurmd as root, and waits
# until sinfo shows the node idle. stop cancels the cluster's jobs and stops the three daemons by
# the process ids in their pid files. Nothing outside <folder> is written (apt-get aside).
set -euo pipefail

usage() { echo "usage: $0 start|stop <folder>" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
export SLURM_CONF="$dir/slurm.conf"

stop() {
    if [[ -f "$SLURM_CONF" ]] && [[ -f "$dir/slurmctld.pid" ]]; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "SLURM is not installed and cannot be installed here (needs root and apt-get)." >&2
        return 1
    fi
    echo "Installing slurm-wlm and munge with apt-get ..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        >"$dir/apt.log" 2>&1 || { echo "apt-get install slurm-wlm munge failed (see $dir/apt.log)." >&2; return 1; }
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "The one-machine cluster runs its daemons as root; this user is $(id -un)." >&2
        return 1
    fi
    install
    stop  # what an earlier start in this folder left running
    local host cpus
    host=$(hostname -s)
    # nproc honours OMP_NUM_THREADS: with it set to 1 (as test workers and many users set it) the
    # node would have one CPU and a two-task job would wait forever (PartitionConfig).
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    chmod 700 "$dir"
    # munged refuses keys and sockets that others can read or write.
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge.key"
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
    cat >"$SLURM_CONF" <<EOF
ClusterName=segformer-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -i -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 300); do
        if [[ $(sinfo --noheader --format=%t 2>/dev/null) == idle ]]; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    echo "The node did not become idle within 60 s; logs in $dir/log." >&2
    stop
    return 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
