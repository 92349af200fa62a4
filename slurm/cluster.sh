#!/usr/bin/env bash
# A cluster of N emulated hosts on this one machine: one network namespace per host, joined by veth pairs to a
# bridge that lives in a namespace of its own (no link to any real interface, so no packet can leave), each host's
# egress optionally shaped with tc.
#
#   bash slurm/cluster.sh start [--hosts N] [--link-rate RATE] [--burst SIZE] [--latency TIME] [--slurm]
#   bash slurm/cluster.sh stop      # remove every namespace, daemon and file it made (also after a crash); idempotent
#   bash slurm/cluster.sh status    # hosts, addresses and shaping; exit 0 only if every host is up
#   bash slurm/cluster.sh check     # exit 0 if namespaces can be made here, else one line saying what is missing
#
# Hosts are node1..nodeN at 198.18.0.K/24 (the benchmarking range, RFC 2544), each with one interface named eth0, so
# one interface name (HOROVOD_GLOO_IFACE, GLOO_SOCKET_IFNAME) is right on every host. A "head" namespace at
# 198.18.0.254 hosts slurmctld when --slurm is given. Names resolve through a hosts file that the agent
# (slurm/cluster_agent.sh) bind-mounts over /etc/hosts in a private mount namespace: the machine's own /etc/hosts,
# interfaces, routes and firewall are never touched.
#
# --link-rate RATE (tc units: 100mbit, 1gbit, 10gbit) puts `tbf rate RATE burst B latency L` on each host's eth0;
# the default burst is RATE x 8 ms (1 MiB at 1gbit) and latency 50 ms: a much smaller burst or queue holds a single
# TCP stream far below the rate (docs/cluster.md "A cluster on one machine"). Without netem in the kernel, delay
# cannot be emulated.
#
# --slurm also starts munged (if not running), slurmctld in the head namespace and one slurmd per host, each slurmd
# in its own UTS and mount namespace with a private /tmp (two slurmd's PMIx plugins otherwise collide on
# /tmp/spmix_appdir_*). Clients run inside a namespace of the cluster with SLURM_CONF=$DIR/slurm/slurm.conf:
#   bash slurm/cluster_agent.sh head sbatch ...     (the agent sets SLURM_CONF)
#
# Env: ALURE_CLUSTER_DIR (default /run/alure-cluster) holds the state (state.json, hosts, pids, logs). It is not
#      under /tmp, because every slurmd sees a /tmp of its own.
set -uo pipefail

PROG="cluster.sh"
DIR="${ALURE_CLUSTER_DIR:-/run/alure-cluster}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="alure-"            # every namespace this script makes is named alure-*: cleanup by name finds them all
NET="198.18.0"
SUBNET="$NET.0/24"
HEAD_ADDR="$NET.254"
IFACE="eth0"
BRIDGE_NS="${PREFIX}bridge"
HEAD_NS="${PREFIX}head"
STATE="$DIR/state.json"
SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)

# shellcheck source=slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, say, running, live_pid, stop_daemon
trap 'die "unexpected failure at line $LINENO ($BASH_COMMAND); run: bash $0 stop, then rerun with bash -x"' ERR
set -E

# --- what this machine must offer --------------------------------------------------------------------------------

missing() {
    ((EUID == 0)) || { echo "not root (network namespaces need root): run as root"; return; }
    local tool
    for tool in ip tc nsenter unshare mount hostname; do
        command -v "$tool" >/dev/null 2>&1 || { echo "no '$tool' on PATH (apt-get install iproute2 util-linux)"; return; }
    done
    local probe="${PREFIX}probe-$$"
    if ! ip netns add "$probe" >/dev/null 2>&1; then
        echo "'ip netns add' is refused here (no network namespaces in this kernel or sandbox)"; return
    fi
    if ! ip -n "$probe" link add probe0 type veth peer name probe1 >/dev/null 2>&1; then
        ip netns del "$probe" >/dev/null 2>&1
        echo "veth pairs cannot be made in a namespace here"; return
    fi
    ip netns del "$probe" >/dev/null 2>&1
}

cmd_check() {
    local why; why=$(missing)
    [[ -z "$why" ]] || { echo "$PROG: cannot emulate hosts: $why"; exit 1; }
}

# --- processes inside our namespaces -----------------------------------------------------------------------------

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX" || true; }

# Every process whose network namespace is one of ours (ranks, orted, slurmd, slurmstepd ...), by namespace inode:
# nothing outside the cluster can match.
processes_in_namespaces() {
    local ns inodes=() d ino
    for ns in $(our_namespaces); do
        ino=$(stat -L -c %i "/var/run/netns/$ns" 2>/dev/null) && inodes+=("net:[$ino]")
    done
    ((${#inodes[@]})) || return 0
    for d in /proc/[0-9]*; do
        ino=$(readlink "$d/ns/net" 2>/dev/null) || continue
        for want in "${inodes[@]}"; do
            if [[ "$ino" == "$want" ]]; then echo "${d#/proc/}"; break; fi
        done
    done
    return 0
}

kill_all() {
    local pids=("$@") pid i alive
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        alive=0
        for pid in "${pids[@]}"; do running "$pid" && alive=1 && break; done
        ((alive)) || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

# --- link shaping ------------------------------------------------------------------------------------------------

# tc rate -> bits per second (tc's units: bit, kbit, mbit, gbit, tbit; bps etc. are bytes)
rate_bits() {
    # %.0f, not %d: Debian's awk (mawk) prints %d through a 32-bit int, so 3gbit came out as 2147483647 bits/s.
    local r=${1,,} n unit scale
    [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
    n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
    case "$unit" in
        ""|bit) scale=1 ;;
        kbit) scale=1e3 ;;
        mbit) scale=1e6 ;;
        gbit) scale=1e9 ;;
        tbit) scale=1e12 ;;
        *) return 1 ;;
    esac
    awk -v n="$n" -v s="$scale" 'BEGIN{printf "%.0f", n * s}'
}

# --- start -------------------------------------------------------------------------------------------------------

write_hosts_file() {
    local n=$1 tmp k
    tmp=$(mktemp "$DIR/.hosts.XXXXXX")
    {
        echo "# Written by alure-bench slurm/cluster.sh: the emulated cluster's names (bind-mounted over /etc/hosts"
        echo "# inside its hosts only)."
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        for ((k = 1; k <= n; k++)); do echo "$NET.$k node$k"; done
        echo "$HEAD_ADDR head"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$DIR/hosts"
}

json_string() { if [[ -n "$1" ]]; then printf '"%s"' "$1"; else printf null; fi; }

write_state() {
    local n=$1 rate=$2 burst=$3 latency=$4 slurm=$5 tmp k hosts="" addrs=""
    for ((k = 1; k <= n; k++)); do
        hosts+="${hosts:+, }\"node$k\""
        addrs+="${addrs:+, }\"node$k\": \"$NET.$k\""
    done
    tmp=$(mktemp "$DIR/.state.XXXXXX")
    cat >"$tmp" <<EOF
{
  "hosts": [$hosts],
  "addresses": {$addrs},
  "head": {"name": "head", "address": "$HEAD_ADDR"},
  "subnet": "$SUBNET",
  "interface": "$IFACE",
  "namespace_prefix": "$PREFIX",
  "link_rate": $(json_string "$rate"),
  "burst": $(json_string "$burst"),
  "latency": $(json_string "$latency"),
  "slurm": $slurm,
  "agent": "$HERE/cluster_agent.sh",
  "hosts_file": "$DIR/hosts",
  "slurm_conf": "$DIR/slurm/slurm.conf"
}
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$STATE"
}

add_host() {
    local name=$1 addr=$2 ns="$PREFIX$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Made inside the bridge's namespace with its peer straight in the host's: the veth never exists in the
    # machine's own namespace, not even for a moment.
    ip -n "$BRIDGE_NS" link add "$name" type veth peer name "$IFACE" netns "$ns"
    ip -n "$BRIDGE_NS" link set "$name" master br0 up
    ip -n "$ns" addr add "$addr/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
}

cmd_start() {
    local n=2 rate="" burst="" latency="" slurm=false
    while (($#)); do
        case "$1" in
            --hosts) n=${2:-}; shift 2 ;;
            --link-rate) rate=${2:-}; shift 2 ;;
            --burst) burst=${2:-}; shift 2 ;;
            --latency) latency=${2:-}; shift 2 ;;
            --slurm) slurm=true; shift ;;
            *) die "unknown option '$1': use start [--hosts N] [--link-rate RATE] [--burst SIZE] [--latency TIME] [--slurm]" ;;
        esac
    done
    [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 250)) || die "--hosts '$n' is not a number of hosts from 1 to 250"
    if [[ -n "$rate" ]]; then
        local bits; bits=$(rate_bits "$rate") || die "--link-rate '$rate' is not a tc rate: use e.g. 100mbit, 1gbit, 10gbit"
        ((bits > 0)) || die "--link-rate '$rate' must be above 0"
        # Burst: the bytes sent at line rate in 8 ms (tbf needs at least rate/HZ; a small burst starves one TCP
        # stream of its window), at least 64 KiB.
        [[ -n "$burst" ]] || burst=$(awk -v b="$bits" 'BEGIN{x = b / 8 * 0.008; if (x < 65536) x = 65536; printf "%dkb", x / 1024}')
        [[ -n "$latency" ]] || latency=50ms
    elif [[ -n "$burst$latency" ]]; then
        die "--burst and --latency shape the link: give --link-rate too"
    fi
    local why; why=$(missing)
    [[ -z "$why" ]] || die "cannot emulate hosts: $why"

    # A fresh start: whatever an earlier run (or crash) left goes first.
    cmd_stop >/dev/null
    mkdir -p "$DIR"
    ip netns add "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set lo up
    ip -n "$BRIDGE_NS" link add br0 type bridge
    ip -n "$BRIDGE_NS" link set br0 up
    local k
    for ((k = 1; k <= n; k++)); do
        add_host "node$k" "$NET.$k"
        if [[ -n "$rate" ]]; then
            tc -n "$PREFIX""node$k" qdisc replace dev "$IFACE" root tbf rate "$rate" burst "$burst" latency "$latency" ||
                die "tc refused 'tbf rate $rate burst $burst latency $latency' on node$k"
        fi
    done
    add_host head "$HEAD_ADDR"
    write_hosts_file "$n"
    write_state "$n" "$rate" "$burst" "$latency" "$slurm"
    say "started $n hosts (node1..node$n, $SUBNET, interface $IFACE)${rate:+, egress shaped: tbf rate $rate burst $burst latency $latency} (state: $DIR)"
    if [[ "$slurm" == true ]]; then
        bash "$HERE/cluster_slurm.sh" start "$n" || die "Slurm did not start on the cluster; see $DIR/slurm/log (the hosts stay up)"
    fi
}

# --- stop --------------------------------------------------------------------------------------------------------

cmd_stop() {
    ((EUID == 0)) || die "must run as root; use: sudo bash $0 stop"
    local pids
    if [[ -x "$HERE/cluster_slurm.sh" || -f "$HERE/cluster_slurm.sh" ]]; then
        bash "$HERE/cluster_slurm.sh" stop >/dev/null 2>&1 || true
    fi
    # Whatever still runs inside our namespaces (ranks, daemons, Slurm's step daemons): by namespace, not by name.
    mapfile -t pids < <(processes_in_namespaces)
    if ((${#pids[@]})); then
        kill_all "${pids[@]}"
        say "stopped ${#pids[@]} process(es) inside the cluster's namespaces"
    fi
    local ns gone=0
    # Deleting a namespace deletes its veth ends and the bridge with it.
    for ns in $(our_namespaces); do ip netns del "$ns" 2>/dev/null && gone=$((gone + 1)); done
    rm -rf "$DIR"
    say "stopped: $gone namespace(s) removed, $DIR removed"
}

# --- status ------------------------------------------------------------------------------------------------------

cmd_status() {
    [[ -f "$STATE" ]] || die "not running (no $STATE); start it with: bash $0 start --hosts 2"
    local hosts k bad=0 ns
    hosts=$(sed -n 's/.*"hosts": \[\(.*\)\],/\1/p' "$STATE" | tr -d '", ' | sed 's/node/ node/g')
    for k in $hosts; do
        ns="$PREFIX$k"
        if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            echo "$k: MISSING (namespace $ns is gone)"; bad=1; continue
        fi
        local addr qdisc
        addr=$(ip -n "$ns" -4 -o addr show dev "$IFACE" 2>/dev/null | awk '{print $4}')
        qdisc=$(tc -n "$ns" qdisc show dev "$IFACE" 2>/dev/null | head -n 1)
        echo "$k: $IFACE ${addr:-no address}; $qdisc"
        [[ -n "$addr" ]] || bad=1
    done
    if [[ -f "$HERE/cluster_slurm.sh" ]] && grep -q '"slurm": true' "$STATE"; then
        bash "$HERE/cluster_slurm.sh" status || bad=1
    fi
    ((bad == 0)) || die "some hosts are not up: run bash $0 stop && bash $0 start"
}

CMD="${1:-}"
shift || true
case "$CMD" in
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    check) cmd_check ;;
    *) echo "usage: bash $0 start [--hosts N] [--link-rate RATE] [--slurm] | stop | status | check" >&2; exit 2 ;;
esac
