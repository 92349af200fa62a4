#!/usr/bin/env bash
# Slurm on the emulated cluster of slurm/cluster.sh: slurmctld in the "head" namespace, one slurmd per host, each
# slurmd in its host's network, UTS and a private mount namespace with a /tmp of its own (two slurmd's PMIx plugins
# otherwise collide on /tmp/spmix_appdir_*). Called by `cluster.sh start --slurm` and `cluster.sh stop`; not meant
# to be run alone.
#
#   bash slurm/cluster_slurm.sh start N | stop | status
#
# Its slurm.conf is $DIR/slurm/slurm.conf, never /etc/slurm/slurm.conf, and its daemons listen inside the
# cluster's namespaces: it runs beside slurm/local_cluster.sh's single-node cluster without touching it. Clients run
# inside a host of the cluster: bash slurm/cluster_agent.sh head sinfo (the agent sets SLURM_CONF).
set -uo pipefail

PROG="cluster_slurm.sh"
DIR="${ALURE_CLUSTER_DIR:-/run/alure-cluster}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
S="$DIR/slurm"
CONF="$S/slurm.conf"
AGENT="$HERE/cluster_agent.sh"
WAIT_S="${ALURE_SLURM_WAIT:-30}"
PARTITION=emu

# shellcheck source=slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, say, running, live_pid, stop_daemon

# Like ssh, the agent joins its words for a shell: quote each one.
on_head() { timeout "${TIMEOUT:-10}" bash "$AGENT" head "$(printf '%q ' "$@")"; }

write_conf() {
    local n=$1 k
    cat >"$CONF.tmp" <<CONF
# Written by alure-bench slurm/cluster_slurm.sh for the emulated cluster; regenerated on every start.
ClusterName=alure-emulated
SlurmctldHost=head(198.18.0.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
EnforcePartLimits=ALL
MailProg=/bin/true
SlurmdParameters=config_overrides
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
CONF
    for ((k = 1; k <= n; k++)); do
        echo "NodeName=node$k NodeAddr=198.18.0.$k CPUs=2 State=UNKNOWN" >>"$CONF.tmp"
    done
    echo "PartitionName=$PARTITION Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP" >>"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
}

idle_nodes() { on_head sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated)$/' | wc -l; }

cmd_start() {
    local n=${1:?number of hosts}
    # Packages and munged as for the single-node cluster (one munged serves every namespace: its socket is a file).
    ALURE_SLURM_DIR="$S/local" bash "$HERE/local_cluster.sh" prepare || die "could not install Slurm or start munged"
    mkdir -p "$S/state" "$S/log" "$S/run"
    local k
    for ((k = 1; k <= n; k++)); do mkdir -p "$S/spool/node$k" "$S/tmp/node$k"; chmod 1777 "$S/tmp/node$k"; done
    write_conf "$n"
    on_head slurmctld -f "$CONF" >>"$S/log/slurmctld.out" 2>&1 || die "slurmctld did not start; read $S/log/slurmctld.log"
    # A /tmp of its own per node hides the machine's: a suite cloned under /tmp (and the venv the jobs run) must
    # stay visible at its own path, so it is bound back into the node's /tmp.
    local repo keep_repo=""
    repo=$(cd "$HERE/.." && pwd)
    if [[ "$repo/" == /tmp/* ]]; then
        mkdir -p "$S/machine-tmp"
        keep_repo="mount --bind /tmp $S/machine-tmp && "
    fi
    for ((k = 1; k <= n; k++)); do
        local private_tmp="${keep_repo}mount --bind $S/tmp/node$k /tmp"
        [[ -n "$keep_repo" ]] && private_tmp+=" && mkdir -p $repo && mount --bind $S/machine-tmp${repo#/tmp} $repo"
        timeout 10 bash "$AGENT" "node$k" "$private_tmp && slurmd -f $CONF -N node$k" \
            >>"$S/log/slurmd-node$k.out" 2>&1 || die "slurmd on node$k did not start; read $S/log/slurmd-node$k.log"
    done
    local deadline=$((SECONDS + WAIT_S)) up=0
    while ((SECONDS < deadline)); do
        up=$(idle_nodes)
        ((up == n)) && break
        sleep 0.3
    done
    ((up == n)) || die "$up of $n nodes idle after ${WAIT_S}s; read $S/log/"
    say "started slurmctld on head and slurmd on node1..node$n (partition $PARTITION, SLURM_CONF=$CONF)"
}

cmd_stop() {
    [[ -d "$S" ]] || return 0
    if live_pid "$S/run/slurmctld.pid" slurmctld >/dev/null; then
        TIMEOUT=10 on_head scancel --partition="$PARTITION" >/dev/null 2>&1 || true
    fi
    local f
    for f in "$S"/run/slurmd-*.pid; do [[ -e "$f" ]] && stop_daemon "$f" slurmd; done
    stop_daemon "$S/run/slurmctld.pid" slurmctld
    # munged only if `prepare` started it for us and no other Slurm (the single-node cluster) still needs it.
    if ! other_slurmctld; then
        stop_daemon "$S/local/run/munged.pid" munged
    fi
    return 0
}

# A live slurmctld that is not ours (ours is stopped by now; a zombie of it does not count).
other_slurmctld() {
    local pid
    for pid in $(pgrep -x slurmctld 2>/dev/null); do running "$pid" && return 0; done
    return 1
}

cmd_status() {
    [[ -f "$CONF" ]] || die "Slurm is not running on the cluster; start it with: bash slurm/cluster.sh start --hosts 2 --slurm"
    on_head sinfo -N -o '%N %P %T %c' || die "slurmctld on head does not answer; read $S/log/slurmctld.log"
}

case "${1:-}" in
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash $0 start N | stop | status" >&2; exit 2 ;;
esac
