#!/usr/bin/env bash
# Record every committed reference, one after the other, from a clean commit on an idle machine, then write the
# derived files the docs quote (report.md of each sweep, predict's prediction and validation tables):
#
#   bash scripts/record_references.sh [--dry-run] [--only PART[,PART...]] [--max-load L] [--busy-ok]
#   make references                     # the same, every part
#
# Parts, in the order they run (each into its committed folder under results/):
#   calibrate  alure-bench calibrate on this host (shared memory), so that every auto point of the sweeps below
#              decides with this host's measured costs, never the built-in ones
#   comm       results/reference-comm/np{2,3,4}: Horovod comm at np 2, 3 and 4 (what predict fits a, b, g to)
#   reference  results/reference: configs/reference.toml
#   cluster    results/reference-cluster: slurm/reference_cluster.sh, the emulated cluster at 1 and 3 Gbit/s (root;
#              it calibrates TCP between the emulated hosts at each rate before its sweep)
#   paper      results/paper: configs/paper.toml
#   shard      results/shard-demo: alure-bench shard-demo --config configs/shard-demo.toml
#   derived    alure-bench report of every sweep folder above; alure-bench predict --validate into
#              results/reference/predict (prediction.csv, validation.csv, validation-summary.csv, costs.json, ...)
#              and the Stampede2-like what-ifs of docs/costmodel.md into results/reference/whatif-*/ and
#              results/paper/whatif-*/. It reads the committed folders, so it also runs alone (--only derived)
#              after a change to the model or the report.
#
# Why each recorded part goes to a staging folder first (results/local/references-<time>/, ignored by git) and is
# moved into results/ only when every recorded part is done: each recording's environment.json says whether the
# checkout was dirty (`git status --porcelain --untracked-files=no`), and replacing one committed folder makes the
# tree dirty for every recording after it. Commit the result (git add results/ && git commit) before the next run:
# the script refuses a dirty tree.
#
# After each sweep the script checks its records: every auto point must name the calibration it decided with (no
# "built-in" costs) and environment.json must say `dirty: false`; it stops loudly where one does not.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
BENCH="$REPO/.venv/bin/alure-bench"
PY="$REPO/.venv/bin/python"
PARTS=(calibrate comm reference cluster paper shard derived)
# Minutes each part takes on the 2-core reference machine, from what its last recording took there: reference
# 8 rounds of points plus the launches between them; cluster 138 points per rate with 7 modes and co-run points,
# plus two calibrations and the comm runs per rate; paper 6 modes x np 1-2 x 8 rounds;
# shard-demo its 18 short points; calibrate, comm and derived their own runs.
declare -A MINUTES=([calibrate]=1 [comm]=2 [reference]=70 [cluster]=135 [paper]=36 [shard]=10 [derived]=10)
declare -A FOLDER=([calibrate]="" [comm]=results/reference-comm [reference]=results/reference
                   [cluster]=results/reference-cluster [paper]=results/paper [shard]=results/shard-demo [derived]="")
MAX_LOAD=0.5
DRY=0
BUSY_OK=0
ONLY=""

die() { echo "record_references.sh: $*" >&2; exit 2; }

while (($#)); do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --busy-ok) BUSY_OK=1; shift ;;
        --only) [[ -n "${2:-}" ]] || die "--only needs a comma list of parts: ${PARTS[*]}"; ONLY="$2"; shift 2 ;;
        --max-load) [[ "${2:-}" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--max-load needs a number, e.g. --max-load 0.5"
                    MAX_LOAD="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1': give --dry-run, --only PART[,PART], --max-load L or --busy-ok" ;;
    esac
done

SELECTED=("${PARTS[@]}")
if [[ -n "$ONLY" ]]; then
    IFS=, read -r -a wanted <<< "$ONLY"
    for w in "${wanted[@]}"; do
        [[ " ${PARTS[*]} " == *" $w "* ]] || die "--only $w: no such part; the parts are ${PARTS[*]}"
    done
    SELECTED=()
    for p in "${PARTS[@]}"; do [[ ",$ONLY," == *",$p,"* ]] && SELECTED+=("$p"); done
fi
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

cd "$REPO"
# A recording must say which commit measured it: refuse before anything runs, also with --dry-run.
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null) || die "$REPO is not a git checkout: record from a clone"
[[ -z "$dirty" ]] || die "the tree has uncommitted changes ($(echo "$dirty" | wc -l) files, e.g. '$(echo "$dirty" | head -1 | cut -c4-)'): commit or stash them first, recordings must come from a clean commit"

STAGE="$REPO/results/local/references-$(date +%Y%m%d-%H%M%S)"
where() {  # where part $1 records to: its staging folder
    echo "$STAGE/$(basename "${FOLDER[$1]}")"
}

# The plan, with what each part takes.
total=0
echo "record_references.sh: plan (minutes on the 2-core reference machine; from commit $(git rev-parse --short HEAD))"
for p in "${SELECTED[@]}"; do
    printf '  %-10s %4d min  %s\n' "$p" "${MINUTES[$p]}" "${FOLDER[$p]:-(no folder of its own)}"
    total=$((total + MINUTES[$p]))
done
printf '  %-10s %4d min  (about %d h %02d min)\n' total "$total" $((total / 60)) $((total % 60))

# The machine must be idle: a neighbour's work moves a step by several times on a shared 2-core box.
busy=()
load=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN { exit !(l > m) }' && busy+=("load average $load over $MAX_LOAD")
others=$(pgrep -af 'bin/alure-bench|python[0-9.]* -m bench[.]|bench/ranks/|slurm/cluster[.]sh|slurm/reference_cluster[.]sh' \
         | grep -v -e "^$$ " -e "^$PPID " || true)
[[ -z "$others" ]] || busy+=("other alure-bench processes run: $(echo "$others" | head -3 | cut -c1-120 | tr '\n' ';')")
if ((${#busy[@]})); then
    msg="the machine is not idle (${busy[*]})"
    if ((DRY || BUSY_OK)); then echo "record_references.sh: warning: $msg" >&2
    else die "$msg: wait until it is, or give --busy-ok to record anyway (the timings will say so)"; fi
fi

if ((!DRY)); then
    [[ -x "$BENCH" ]] || die "$BENCH missing: run make setup first"
    if selected cluster && ((EUID != 0)); then
        die "the cluster part starts the emulated cluster, which needs root: run as root or leave it out (--only ...)"
    fi
fi

run() {  # print a command; run it unless --dry-run
    printf '+'; printf ' %q' "$@"; printf '\n'
    ((DRY)) || "$@"
}

# A recording that exits 1 measured every point and some are not ok (failed, oom, timeout: recorded as such, as a
# reviewer should see them); anything else stops the script, leaving what was recorded in the staging folder.
WARNINGS=()
record() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    ((DRY)) && return 0
    local rc=0
    "$@" || rc=$?
    ((rc == 0)) && return 0
    ((rc == 1)) || { echo "record_references.sh: stopped: exit $rc of $*; what was recorded so far is in $STAGE" >&2; exit "$rc"; }
    WARNINGS+=("some points are not ok (exit 1) in: $*")
}

# A sweep's records say it was recorded from a clean tree and, for auto points, which calibration they decided with.
check_sweep() {
    printf '+ check %q\n' "$1"
    ((DRY)) && return 0
    "$PY" - "$1" <<'EOF' || { echo "record_references.sh: FAILED: $1 is not a reference (above); nothing was moved into results/" >&2; exit 1; }
import json, sys
from pathlib import Path
sweep = Path(sys.argv[1])
problems = []
env = json.loads((sweep / "environment.json").read_text())
if (env.get("git") or {}).get("dirty") is not False:
    problems.append(f"environment.json says git {env.get('git')}: not recorded from a clean commit")
for path in sorted((sweep / "points").glob("*.json")):
    record = json.loads(path.read_text())
    if record["point"]["mode"] != "auto" or record["status"] != "ok":
        continue
    kind = (record.get("auto_costs") or {}).get("kind")
    if kind in (None, "built-in"):
        problems.append(f"{path.name}: auto decided with {kind or 'unnamed'} costs, not this host's calibration")
for p in problems:
    print(f"record_references.sh: {sweep}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}

record_calibrate() {
    run "$BENCH" calibrate --nps 2
}
record_comm() {
    local np
    for np in 2 3 4; do run "$BENCH" comm --np "$np" --backends horovod --out "$(where comm)/np$np"; done
}
record_reference() {
    record "$BENCH" sweep --config configs/reference.toml --out "$(where reference)"
    check_sweep "$(where reference)"
}
record_cluster() {
    record bash slurm/reference_cluster.sh "$(where cluster)"
    local rate
    for rate in 1gbit 3gbit; do check_sweep "$(where cluster)/$rate/sweep"; done
}
record_paper() {
    record "$BENCH" sweep --config configs/paper.toml --out "$(where paper)"
    check_sweep "$(where paper)"
}
record_shard() {
    record "$BENCH" shard-demo --config configs/shard-demo.toml --out "$(where shard)"
    local run_dir
    for run_dir in uncapped capped; do check_sweep "$(where shard)/$run_dir"; done
}

# Replace each committed folder by its new recording (git keeps the old one).
install_recorded() {
    local p
    for p in "${SELECTED[@]}"; do
        [[ -n "${FOLDER[$p]}" && "$p" != derived ]] || continue
        run rm -rf "${FOLDER[$p]}"
        run mv "$(where "$p")" "${FOLDER[$p]}"
    done
}

# The files the docs quote, from the committed folders: what docs/costmodel.md's commands print, kept beside the
# results they come from (tests/test_doc_quotes.py reads them).
write_derived() {
    local d
    for d in results/reference results/paper results/reference-cluster/1gbit/sweep results/reference-cluster/3gbit/sweep; do
        if [[ -d "$d/points" ]] || ((DRY)); then run "$BENCH" report "$d"; fi
    done
    run rm -rf results/reference/predict results/reference/whatif-stampede2-weak results/reference/whatif-stampede2-strong \
        results/reference/whatif-stampede2-weak-x4 results/paper/whatif-stampede2-weak
    run "$BENCH" predict --validate --validate-with results/reference-cluster --out results/reference/predict
    local stampede2=(--latency-us 1 --bandwidth-gbps 100 --cores-per-node 48)
    run "$BENCH" predict "${stampede2[@]}" --ranks-per-node 4 --memory-per-rank-gib 44 --max-np 4096 --nps 1200 \
        --out results/reference/whatif-stampede2-weak
    run "$BENCH" predict "${stampede2[@]}" --ranks-per-node 2 --memory-per-rank-gib 88 --max-np 512 --nps 400 \
        --global-batch 12800 --out results/reference/whatif-stampede2-strong
    run "$BENCH" predict "${stampede2[@]}" --ranks-per-node 4 --memory-per-rank-gib 44 --max-np 4096 --nps 1200 \
        --cpu-speedup 4 --out results/reference/whatif-stampede2-weak-x4
    run "$BENCH" predict --results results/paper "${stampede2[@]}" --ranks-per-node 4 --memory-per-rank-gib 44 \
        --max-np 4096 --nps 1200 --out results/paper/whatif-stampede2-weak
}

((DRY)) && echo "record_references.sh: --dry-run: the commands, none run (staging folder $STAGE)"
recorded=0
for p in "${SELECTED[@]}"; do
    [[ "$p" == derived ]] && continue
    echo "record_references.sh: $p (about ${MINUTES[$p]} min), started $(date -u +%H:%M:%S) UTC"
    "record_$p"
    recorded=1
done
((recorded)) && install_recorded
if selected derived; then
    echo "record_references.sh: derived (about ${MINUTES[derived]} min), started $(date -u +%H:%M:%S) UTC"
    write_derived
fi
for w in "${WARNINGS[@]}"; do echo "record_references.sh: warning: $w" >&2; done
if ((DRY)); then
    echo "record_references.sh: --dry-run: nothing recorded"
else
    echo "record_references.sh: done; review and commit: git add results/ && git commit -m 'Record the references'"
fi
