# Shell helpers the cluster scripts share (sourced, never run): slurm/local_cluster.sh, slurm/cluster.sh and
# slurm/cluster_slurm.sh. Each script sets PROG (its name in messages) before sourcing this file.

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

# True while a process runs. A zombie counts as gone: daemons are reparented to PID 1, which on some sandboxes
# reaps them only every few seconds, so waiting for /proc/PID to vanish would cost seconds per daemon.
running() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n "$st" && "$st" != Z ]]; }

# Pid from a pid file, printed only if that process runs and is the named program:
# a stale pid file must never make us signal an unrelated process that reused the pid.
live_pid() {
    local file=$1 name=$2 pid
    [[ -s "$file" ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n "$pid" ]] && running "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    echo "$pid"
}

# Stop one daemon by its pid file: TERM, wait up to 10 s, then KILL; the pid file goes either way.
stop_daemon() {
    local file=$1 name=$2 pid i
    if pid=$(live_pid "$file" "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            running "$pid" || break
            sleep 0.05
        done
        if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$file"
    return 0
}
