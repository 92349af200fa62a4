#!/usr/bin/env bash
# Record results/reference-cluster/: the suite on the emulated cluster of slurm/cluster.sh, one rank per host, at
# two link rates. Run from the repository on a quiet machine, as root, after `make setup`:
#
#   bash slurm/reference_cluster.sh [--rates 1gbit,3gbit] [--modes M1,M2] [OUT]   # OUT: results/reference-cluster
#
# For each link rate (default 1gbit and 3gbit), on 4 emulated hosts:
#   - first `alure-bench calibrate` on this host (shared memory) and across node1-node2 (TCP at that rate), into
#     OUT/<rate>/calibration/, which the sweep's auto points then decide with (ALURE_BENCH_CALIBRATIONS): never the
#     built-in costs, and the calibration the records name is committed beside them;
#   - a sweep at np 1, 2 and 4 (np 1: node1 alone, the efficiency baseline; np 2: node1-node2; np 4: node1-node4),
#     weak and strong scaling, every exchange mode the suite has (bench.plan.config.MODES; --modes picks some), 3
#     interleaved repeats;
#   - comm across 2 hosts (np 2) and across 4 hosts (np 4): mpi4py and Horovod, allreduce, allgather and
#     sparse-pair, 1 KiB to 16 MiB.
# Output: OUT/<rate>/calibration/, OUT/<rate>/sweep/ (summary.csv, report.md, plots, records), OUT/<rate>/comm-np2/
# and comm-np4/.
# 4 hosts time-share this machine's 2 cores: np 4 is oversubscribed and flagged as everywhere else.
# Why 3gbit and not 10gbit: a rate only says something if TCP between the namespaces can fill it. On the reference
# machine Open MPI's collectives come close to 3gbit but not to 10gbit, where the copies through two kernels' stacks
# on the ranks' own cores cap them (results/collectives/tcp-10gbit; docs/collectives.md "TCP between emulated
# hosts"). Give --rates for another machine.
# The cluster is stopped at the end, also when a step fails or the script is interrupted.
#
# Run time: the longest of the references (`bash scripts/record_references.sh --dry-run` prints its estimate): 138
# points per rate (7 modes, weak and strong, np 1, 2 and 4, 3 rounds, and the co-run points), dominated by the dense
# modes' full-table exchange over the shaped link, plus the comm runs and the two calibrations.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
RATES=(1gbit 3gbit)
MODES=""
while [[ "${1:-}" == --rates || "${1:-}" == --modes ]]; do
    [[ -n "${2:-}" ]] || { echo "reference_cluster.sh: $1 needs a comma list, e.g. $1 ${1/--rates/1gbit}" >&2; exit 2; }
    if [[ "$1" == --rates ]]; then IFS=, read -r -a RATES <<< "$2"; else MODES="$2"; fi
    shift 2
done
OUT="${1:-$REPO/results/reference-cluster}"
BENCH="$REPO/.venv/bin/alure-bench"
HOSTS=node1,node2,node3,node4

[[ -x "$BENCH" ]] || { echo "reference_cluster.sh: $BENCH missing: run make setup first" >&2; exit 1; }
[[ ! -e "$OUT" ]] || { echo "reference_cluster.sh: $OUT exists: move it away or give another folder" >&2; exit 1; }
trap 'bash "$HERE/cluster.sh" stop >/dev/null 2>&1 || true' EXIT
[[ -n "$MODES" ]] || MODES=$("$REPO/.venv/bin/python" -c "from bench.plan.config import MODES; print(','.join(MODES))")
cd "$REPO"
for rate in "${RATES[@]}"; do
    bash "$HERE/cluster.sh" start --hosts 4 --link-rate "$rate"
    mkdir -p "$OUT/$rate"
    calibrations="$OUT/$rate/calibration"
    "$BENCH" calibrate --nps 2 --out "$calibrations"
    "$BENCH" calibrate --hosts node1,node2 --ranks-per-host 1 --nps 2 --out "$calibrations"
    ALURE_BENCH_CALIBRATIONS="$calibrations" "$BENCH" sweep --name "reference-cluster-$rate" --preset default --hosts "$HOSTS" --ranks-per-host 1 \
        --nps 1,2,4 --scalings weak,strong --modes "$MODES" --repeats 3 --steps 20 --warmup 3 --threads 1 --global-batch 384 \
        --out "$OUT/$rate/sweep" || echo "reference_cluster.sh: some sweep points at $rate are not ok (see report.md)"
    for np in 2 4; do
        "$BENCH" comm --hosts "$HOSTS" --ranks-per-host 1 --np "$np" --backends mpi4py,horovod \
            --ops allreduce,allgather,sparse-pair --min-bytes 1K --max-bytes 16M --iters 20 --rounds 2 \
            --out "$OUT/$rate/comm-np$np"
    done
done
echo "reference_cluster.sh: wrote $OUT"
