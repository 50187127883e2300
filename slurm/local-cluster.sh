#!/usr/bin/env bash
# A one-node Slurm on this machine, for the tests in tests/distributed/test_slurm.py and for trying the sbatch scripts.
#
#   slurm/local-cluster.sh start    install (apt, as root) if needed, configure, start munged/slurmctld/slurmd
#   slurm/local-cluster.sh status   exit 0 when `sinfo` answers and the node is usable
#   slurm/local-cluster.sh stop     stop the daemons this script started
#
# Idempotent: `start` on a running cluster only checks it. Exits non-zero with one clear line where it
# cannot run (not root, no apt, daemons that will not start). Knobs: SLURM_LOCAL_CPUS (default: all
# cores, at most what the machine has), SLURM_LOCAL_MEM_MB (16000), SLURM_LOCAL_INSTALL (1: apt-get
# install missing packages).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm-local
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM=${SLURM_LOCAL_MEM_MB:-16000}
HOST=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

answers() { timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mix|alloc|completing'; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "${SLURM_LOCAL_INSTALL:-1}" = 1 ] || die "Slurm is not installed and SLURM_LOCAL_INSTALL=0"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root"
    echo "local-cluster: installing slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed (no network?)"
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install failed"
}

configure() {
    mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
    cat > "$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: one node, this machine.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
KillWait=30
MinJobAge=300
JobRequeue=1
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # Debian's packages also read cgroup.conf when it exists; linuxproc needs none.
}

start_munge() {
    pgrep -x munged >/dev/null && return 0
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    mkdir -p /run/munge && chown munge:munge /run/munge
    chmod 400 /etc/munge/munge.key
    if command -v runuser >/dev/null; then runuser -u munge -- munged; else su -s /bin/sh munge -c munged; fi \
        || die "munged would not start (see /var/log/munge/munged.log)"
}

start() {
    if answers; then echo "local-cluster: already running ($(sinfo -h -o '%N %c CPUs %T'))"; return 0; fi
    [ "$(id -u)" = 0 ] || die "starting a local Slurm needs root (daemons run as SlurmUser=root)"
    install
    configure
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld would not start (see $LOGS/slurmctld.log)"
    pgrep -x slurmd >/dev/null || slurmd || die "slurmd would not start (see $LOGS/slurmd.log)"
    for _ in $(seq 30); do
        if answers; then echo "local-cluster: up ($(sinfo -h -o '%N %c CPUs %T'))"; return 0; fi
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    die "Slurm started but the node is not usable: $(sinfo -h -o '%N %T %E' 2>&1 | head -1)"
}

stop() {
    for d in slurmd slurmctld; do
        [ -s "$RUN/$d.pid" ] && kill "$(cat "$RUN/$d.pid")" 2>/dev/null || true
    done
    echo "local-cluster: stopped (munged left running)"
}

status() {
    if answers; then sinfo; exit 0; fi
    echo "local-cluster: not running (sinfo does not answer)" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
