#!/usr/bin/env bash
# Run a command on a host of the emulated cluster (slurm/cluster.sh), the way ssh would run it on a real one:
#
#   bash slurm/cluster_agent.sh HOST COMMAND...
#
# The command runs inside HOST's network namespace, in a UTS namespace of its own whose host name is HOST (so Open
# MPI and Slurm see distinct nodes), and in a private mount namespace where the cluster's hosts file is bind-mounted
# over /etc/hosts (so every host resolves every other; the machine's /etc/hosts is untouched). Like ssh, the words
# of COMMAND are joined and run by a shell. This is Open MPI's remote launch agent on the emulated cluster
# (--mca plm_rsh_agent), and what runs mpirun itself inside the first host.
set -uo pipefail
DIR="${ALURE_CLUSTER_DIR:-/run/alure-cluster}"
PREFIX="alure-"

if [[ "${1:-}" == "--inside" ]]; then
    # Second stage, already in the new namespaces: name the host, give it the cluster's names, run the command.
    host=$2; shift 2
    mount --make-rprivate / 2>/dev/null || true
    mount --bind "$DIR/hosts" /etc/hosts || { echo "cluster_agent.sh: cannot bind $DIR/hosts over /etc/hosts" >&2; exit 1; }
    hostname "$host"
    [[ -f "$DIR/slurm/slurm.conf" ]] && export SLURM_CONF="$DIR/slurm/slurm.conf"
    exec bash -c "$*"
fi

(($# >= 2)) || { echo "usage: bash $0 HOST COMMAND..." >&2; exit 2; }
host=$1; shift
ns="/var/run/netns/$PREFIX$host"
[[ -e "$ns" ]] || { echo "cluster_agent.sh: no host '$host' in the emulated cluster (no $ns): start it with bash slurm/cluster.sh start" >&2; exit 255; }
exec nsenter --net="$ns" unshare --uts --mount --propagation private -- bash "${BASH_SOURCE[0]}" --inside "$host" "$@"
