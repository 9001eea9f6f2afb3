#!/usr/bin/env bash
# local_cluster.sh - a throwaway SLURM cluster on this machine, to try job scripts before the
# real cluster (and for the launch tests). Debian/Ubuntu, run as root (it installs the
# slurm-wlm packages and writes /etc/slurm/slurm.conf).
#
#   bash launch/local_cluster.sh start    # install if needed, write the config, start, wait idle
#   bash launch/local_cluster.sh stop     # cancel jobs, stop the daemons this script started
#   bash launch/local_cluster.sh status   # nodes, jobs and daemon PIDs
#
# Several nodes are emulated on one host: node n<i> is its own slurmd on port 6820+i, and
# "127.0.0.1 n1 n2 ..." is added to /etc/hosts so the nodes' names resolve. There is no munge
# (auth/none), no cgroups and no accounting (sacct does not work; use scontrol show job).
#
# Settings (environment):
#   LOCAL_SLURM_NODES   emulated nodes (default 2)
#   LOCAL_SLURM_CPUS    CPUs advertised per node (default: nproc, at least 4; more than the
#                       machine has is allowed, so a 2 x 2-process job fits on a laptop)
#   LOCAL_SLURM_DIR     state, spool and logs (default /tmp/parcae-local-slurm)
# Differences from SLURM's defaults, to keep a laptop session (and CI) quick:
#   MinJobAge=5 (finished jobs leave scontrol after seconds), AuthInfo=cred_expire=10 (a
#   requeued job may start again after ~10 s instead of 120 s), a main scheduler pass every 2 s.
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-$(($(nproc) > 4 ? $(nproc) : 4))}
DIR=${LOCAL_SLURM_DIR:-/tmp/parcae-local-slurm}
CONF=/etc/slurm/slurm.conf   # the path compiled into Debian's build: no SLURM_CONF needed
HOST=$(hostname -s)
MARK="# written by parcae_megatron launch/local_cluster.sh"

say() { echo "[local-cluster $(date +%T)] $*" >&2; }

# A live process (zombies count as dead).
running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

nodes() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || { say "installing SLURM needs root (apt-get)"; exit 1; }
    local policy=/usr/sbin/policy-rc.d made=0
    if [ ! -e "$policy" ]; then  # stop the packages from starting their own daemons
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made=1
    fi
    say "installing slurmctld, slurmd and slurm-client"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client >/dev/null
    if [ "$made" = 1 ]; then rm -f "$policy"; fi
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool" /etc/slurm
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        cp -a "$CONF" "$CONF.bak.$(date +%s)"
        say "kept the previous $CONF as $CONF.bak.*"
    fi
    local n i=0
    {
        echo "$MARK"
        cat <<EOF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=5
EOF
        for n in $(nodes); do
            i=$((i + 1))
            echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((6820 + i))" \
                "CPUs=$CPUS State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    local line
    line="127.0.0.1 $(nodes | tr '\n' ' ')"
    line=${line% }
    grep -qxF "$line" /etc/hosts || echo "$line" >>/etc/hosts
    for n in $(nodes); do mkdir -p "$DIR/spool/$n"; done
}

stop_cluster() {
    local pidfile pid stopped=()
    if [ -f "$DIR/slurmctld.pid" ] && running "$(cat "$DIR/slurmctld.pid")"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086  # one job id per word
            scancel $jobs || true
            for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    for pidfile in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if running "$pid"; then
            kill "$pid" && stopped+=("$pid")
            say "stopping $(basename "$pidfile" .pid) (pid $pid)"
        fi
        rm -f "$pidfile"
    done
    for pid in "${stopped[@]}"; do
        for _ in $(seq 50); do running "$pid" || break; sleep 0.2; done
        if running "$pid"; then kill -9 "$pid"; say "pid $pid needed SIGKILL"; fi
    done
}

start_cluster() {
    install_slurm
    stop_cluster
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then
        say "another slurmctld (not started by this script) answers on this machine; stop it first"
        exit 1
    fi
    rm -rf "$DIR/state" "$DIR/spool"  # a fresh cluster: job ids start at 1 again
    write_config
    slurmctld
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
    if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
        tail -n 40 "$DIR/log/slurmctld.log" >&2 || true
        exit 1
    fi
    local n
    for n in $(nodes); do slurmd -N "$n"; done
    for _ in $(seq 300); do
        [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ] && break
        sleep 0.2
    done
    if [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -ne "$NODES" ]; then
        sinfo -N -l >&2
        tail -n 20 "$DIR"/log/*.log >&2 || true
        exit 1
    fi
    say "$NODES node(s) with $CPUS CPUs each are idle (logs in $DIR/log)"
    sinfo
}

show_status() {
    sinfo -N -l || true
    squeue || true
    local pidfile
    for pidfile in "$DIR"/*.pid; do
        [ -f "$pidfile" ] && echo "$(basename "$pidfile" .pid) pid $(cat "$pidfile")"
    done
    return 0
}

if [ "$NODES" -lt 1 ]; then say "LOCAL_SLURM_NODES must be at least 1"; exit 2; fi
case "${1:-}" in
    start) start_cluster ;;
    stop) stop_cluster ;;
    status) show_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
