#!/usr/bin/env bash
# Start, stop or inspect a real single-node Slurm cluster on this machine, for tests.
#
#   bash slurm/local_cluster.sh start    # install (if needed), configure, start, wait until the node is idle
#   bash slurm/local_cluster.sh stop     # cancel its jobs, stop the daemons this script started (safe when nothing runs)
#   bash slurm/local_cluster.sh status   # print sinfo; exit 0 only if the node is idle/mixed/allocated
#   bash slurm/local_cluster.sh prepare  # install the packages and start munged only (for slurm/cluster_slurm.sh)
#
# Env: ALURE_SLURM_DIR (default /tmp/alure-slurm) holds all state, spool, log and pid files.
#      ALURE_SLURM_WAIT (default 30) is how many seconds `start` waits for the node to become idle.
#
# The choices below were measured on Debian 12 (Slurm 22.05.8, munge 0.5.15); each comment says
# what went wrong without its setting. Ports 6817/6818, /etc/slurm/slurm.conf and /run/munge are
# machine-wide, so there can be only one such cluster per machine.

set -uo pipefail

PROG="local_cluster.sh"
DIR="${ALURE_SLURM_DIR:-/tmp/alure-slurm}"
WAIT_S="${ALURE_SLURM_WAIT:-30}"
NODE="$(hostname -s)"
CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

LOG_DIR="$DIR/log"
RUN_DIR="$DIR/run"
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
APT_LOG="$LOG_DIR/apt.log"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGED_PID="$RUN_DIR/munged.pid"

# shellcheck source=slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, say, running, live_pid, stop_daemon
# Anything unforeseen still ends in one line rather than a cascade of follow-on failures.
trap 'die "unexpected failure at line $LINENO ($BASH_COMMAND); rerun with: bash -x $0 ${CMD:-}"' ERR
set -E

now_ms() { date +%s%3N; }
elapsed() { local t=$(( $(now_ms) - $1 )); printf '%d.%01d s' $((t / 1000)) $(((t % 1000) / 100)); }

# --- helpers ---------------------------------------------------------------------------------

pkg_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

# True if slurmctld answers. `scontrol ping` says so at once, whereas sinfo retries a controller
# that is down for several seconds, which would slow every start from a stopped cluster.
# (Outputs are matched from a variable, not piped into grep -q: with pipefail, grep quitting early
# can make the writer die of SIGPIPE and the test fail at random.)
ctld_up() {
    command -v scontrol >/dev/null 2>&1 || return 1
    local out; out=$(timeout 5 scontrol ping 2>/dev/null) || true
    [[ "$out" == *" is UP"* ]]
}

# Node state from the controller ("" if Slurm is missing or the controller does not answer).
node_state() {
    ctld_up || return 0
    timeout 5 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true
}

# slurmctld keeps reporting a node idle for SlurmdTimeout (300 s) after its slurmd died, so also
# ask the local slurmd directly (answers or fails at once).
slurmd_up() { timeout 5 scontrol show slurmd >/dev/null 2>&1; }

healthy() { [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]] && slurmd_up; }

munge_works() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    local t0; t0=$(now_ms)
    say "installing ${missing[*]} (log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when apt does not know a candidate for every package
    # (fresh image) - an update costs time and network, and is usually unnecessary.
    local need_update=0
    for p in "${missing[@]}"; do
        [[ "$(apt-cache policy "$p" 2>/dev/null)" =~ Candidate:\ [0-9] ]] || need_update=1
    done
    if ((need_update)); then
        apt-get update >>"$APT_LOG" 2>&1 || die "apt-get update failed; check network/apt sources, see $APT_LOG"
    fi
    # --no-install-recommends: the few packages Slurm needs, instead of pulling in mail servers and docs.
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; then
        # Lists may be stale (404 on an old version): refresh once and retry.
        apt-get update >>"$APT_LOG" 2>&1 &&
            apt-get install -y --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1 ||
            die "apt-get install ${missing[*]} failed; see $APT_LOG"
    fi
    say "installed packages in $(elapsed "$t0")"
}

start_munge() {
    if munge_works; then return 0; fi
    # The munge package creates /etc/munge/munge.key; recreate it only if it is missing.
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
                die "cannot create /etc/munge/munge.key; reinstall munge (apt-get install --reinstall munge)"
        else
            die "/etc/munge/munge.key is missing; reinstall munge (apt-get install --reinstall munge)"
        fi
    fi
    # No systemd here, so nothing creates /run/munge (tmpfs) for us; munged refuses to start without
    # its socket directory owned by the munge user.
    install -d -o munge -g munge -m 0755 /run/munge
    # munged must run as the munge user; --force lets it start despite a leftover socket/pid file.
    runuser -u munge -- /usr/sbin/munged --force >>"$LOG_DIR/munged.out" 2>&1 ||
        die "munged failed to start; see /var/log/munge/munged.log and $LOG_DIR/munged.out"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && break
        sleep 0.1
    done
    munge_works || die "munged runs but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
    # Remember that we started it, so `stop` stops it and nothing else.
    if [[ -s /run/munge/munged.pid ]]; then cp /run/munge/munged.pid "$MUNGED_PID"; fi
}

write_conf() {
    local tmp
    mkdir -p /etc/slurm
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
# Written by alure-bench slurm/local_cluster.sh - regenerated on every start; do not edit.
ClusterName=alure
SlurmctldHost=$NODE(127.0.0.1)
# Run everything as root: no slurm user or extra permissions to set up in a throwaway container.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# No cgroups or systemd here: track processes by /proc and do no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs go to a text file, which 'sacct -c' can read (no slurmdbd).
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Start batch jobs immediately: 10 tiny array tasks went from 12 s to 4-5 s.
SchedulerParameters=batch_sched_delay=0
# A node that went DOWN comes back by itself once slurmd registers again.
ReturnToService=2
# An impossible request fails at submit instead of pending forever.
EnforcePartLimits=ALL
# Without a valid MailProg slurmctld complains "Configured MailProg is invalid".
MailProg=/bin/true
# Trust the CPU count declared below, not the hardware: CPUs=4 on 2 cores would otherwise put the
# node in INVAL; with it, 4-rank jobs run oversubscribed.
SlurmdParameters=config_overrides
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
}

# slurm.conf is machine-wide: if it names pid files outside $DIR, a cluster started with another
# ALURE_SLURM_DIR may be running, which this invocation neither sees nor stops.
other_dir_note() {
    local pidfile
    [[ -r "$CONF" ]] || return 0
    pidfile=$(sed -n 's/^SlurmctldPidFile=//p' "$CONF" 2>/dev/null | head -n 1) || true
    if [[ -n "$pidfile" && "$pidfile" != "$CTLD_PID" ]] && live_pid "$pidfile" slurmctld >/dev/null; then
        local other; other=$(dirname "$(dirname "$pidfile")")
        say "note: a cluster started with ALURE_SLURM_DIR=$other is running; stop it with: ALURE_SLURM_DIR=$other bash $0 stop"
    fi
}

# --- subcommands -----------------------------------------------------------------------------

cmd_start() {
    local t0; t0=$(now_ms)
    ((EUID == 0)) || die "must run as root (it installs packages and writes $CONF); use: sudo bash $0 start"
    if healthy; then
        say "already running: node $NODE is $(node_state), slurmd answers; nothing to do"
        other_dir_note
        return 0
    fi
    mkdir -p "$DIR/state" "$DIR/spool" "$LOG_DIR" "$RUN_DIR"
    install_packages
    start_munge

    # Daemons from an earlier, unhealthy start are restarted so they read the fresh slurm.conf.
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    if [[ "$(ss -Hltn 'sport = :6817 or sport = :6818' 2>/dev/null)" == *LISTEN* ]]; then
        die "port 6817 or 6818 is in use by a process this script did not start from $DIR (see: ss -ltnp 'sport = :6817 or sport = :6818'); stop it first"
    fi
    write_conf

    # No systemd: start the daemons by hand; they daemonize and write the pid files named in slurm.conf.
    slurmctld >>"$LOG_DIR/slurmctld.out" 2>&1 ||
        die "slurmctld failed to start; read $CTLD_LOG (and $LOG_DIR/slurmctld.out)"
    slurmd >>"$LOG_DIR/slurmd.out" 2>&1 ||
        die "slurmd failed to start; read $SLURMD_LOG (and $LOG_DIR/slurmd.out)"

    local deadline=$(($(now_ms) + WAIT_S * 1000)) state=""
    while (($(now_ms) < deadline)); do
        state=$(node_state)
        [[ "$state" =~ ^(idle|mixed|allocated)$ ]] && break
        sleep 0.2
    done
    if ! [[ "$state" =~ ^(idle|mixed|allocated)$ ]]; then
        if [[ -z "$state" ]]; then
            die "slurmctld did not answer within ${WAIT_S}s; read $CTLD_LOG, then run: bash $0 stop && bash $0 start"
        fi
        die "node $NODE is '$state' after ${WAIT_S}s, not idle; read $SLURMD_LOG and $CTLD_LOG, then run: bash $0 stop && bash $0 start"
    fi
    say "started: node $NODE is $state, partition debug (files under $DIR) in $(elapsed "$t0")"
}

# Job steps outlive slurmd: each slurmstepd is reparented to PID 1 and keeps its job running.
# Ours are recognisable by their working directory, which slurmd sets to the folder of SlurmdLogFile.
our_stepds() {
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ "$(cat "$d/comm" 2>/dev/null)" == slurmstepd ]] || continue
        [[ "$(readlink "$d/cwd" 2>/dev/null)" == "$LOG_DIR" ]] || continue
        running "$pid" && echo "$pid"
    done
    return 0
}

# A process and all its descendants (children first listed after parents).
with_descendants() {
    local table; table=$(ps -e -o pid=,ppid=)
    local queue=("$@") out=() pid child
    while ((${#queue[@]})); do
        pid=${queue[0]}; queue=("${queue[@]:1}")
        out+=("$pid")
        for child in $(awk -v p="$pid" '$2 == p {print $1}' <<<"$table"); do queue+=("$child"); done
    done
    echo "${out[@]}"
}

stop_jobs() {
    local i steps
    # Cancel through Slurm first, so jobs end the normal way (and are recorded as CANCELLED)
    # instead of coming back as pending or running after the next start. Only when the running
    # controller is the one this script started from $DIR: never cancel someone else's jobs.
    if live_pid "$CTLD_PID" slurmctld >/dev/null && ctld_up; then
        timeout 10 scancel --partition=debug >/dev/null 2>&1 || true
        for ((i = 0; i < 100; i++)); do
            [[ -z "$(our_stepds)" ]] && break
            sleep 0.05
        done
    fi
    steps=$(our_stepds)
    [[ -n "$steps" ]] || return 0
    # Fallback (controller already gone, or a step ignored the cancel): kill step daemons and their jobs.
    local victims; victims=$(with_descendants $steps)
    kill -TERM $victims 2>/dev/null || true
    sleep 0.5
    kill -KILL $victims 2>/dev/null || true
    say "killed leftover job processes: $victims"
}

cmd_stop() {
    ((EUID == 0)) || die "must run as root (the daemons run as root); use: sudo bash $0 stop"
    stop_jobs
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    # munged only if this script started it (its copy of the pid file exists).
    stop_daemon "$MUNGED_PID" munged
    say "stopped (nothing of ours is running)"
    other_dir_note
}

cmd_status() {
    command -v sinfo >/dev/null 2>&1 || die "sinfo not found: Slurm is not installed; run: bash $0 start"
    ctld_up || die "slurmctld is not running or does not answer; run: bash $0 start"
    local out
    if ! out=$(timeout 10 sinfo -N -o '%N %P %T %c %O' 2>&1); then
        die "sinfo failed (${out//$'\n'/ }); read $CTLD_LOG, or run: bash $0 stop && bash $0 start"
    fi
    echo "$out"
    local state; state=$(node_state)
    [[ "$state" =~ ^(idle|mixed|allocated)$ ]] ||
        die "node $NODE is '$state', not idle/mixed/allocated; read $SLURMD_LOG, or run: bash $0 stop && bash $0 start"
    slurmd_up || die "slurmd on $NODE does not answer (the controller still shows '$state' until SlurmdTimeout); run: bash $0 start"
}

# Packages and munged only: what slurm/cluster_slurm.sh (Slurm on the emulated cluster) shares with this cluster.
cmd_prepare() {
    ((EUID == 0)) || die "must run as root (it installs packages); use: sudo bash $0 prepare"
    mkdir -p "$LOG_DIR" "$RUN_DIR"
    install_packages
    start_munge
}

CMD="${1:-}"
case "$CMD" in
    start) cmd_start ;;
    prepare) cmd_prepare ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash $0 start|stop|status|prepare" >&2; exit 2 ;;
esac
