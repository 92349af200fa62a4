"""`alure-bench comm` and `alure-bench crossover`: what the collectives cost here, and where sparse stops paying.

comm: latency and bandwidth of allreduce, allgather, sparse-pair (the two allgathers of sparse-gather) and alltoall
(the sharded modes' exchange; equal and Zipf-skewed splits, alltoall-zipf) over
Horovod (as the harness configures it), raw MPI (mpi4py) and torch.distributed/gloo, sizes doubling from --min-bytes
to --max-bytes, each backend in a launch of its own; plus this machine's memcpy bandwidth as the ceiling. Latency
of an iteration is the slowest rank's (a barrier starts each iteration); figures follow nccl-tests (docs/design.md):
algbw = S/t, busbw = algbw x `busbw_factor`, GB/s = 1e9 bytes/s. Each backend runs in --rounds launches in
alternating order (A B C C B A), iterations pooled, and Horovod's busbw is printed as a fraction of raw MPI's per
size, judged against bench.results.comm_rows.RATIO_TARGETS where an op has one.

crossover: with Horovod, time and bytes of sparse-gather (allgather of the uncoalesced gradient's indices and
values, horovod's sparse_allreduce_async) against dense-reduce (to_dense + allreduce) of a V x d embedding gradient,
over density (rows touched per rank / V) and process count; the crossover density per P is where the two times meet.

The rank side lives in bench/ranks/comm_rank.py, the configs in bench/plan/comm_config.py, the launches in
bench/run/comm.py, the rows and tables in bench/results/comm_rows.py; this module runs the two commands.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from bench.errors import UsageError
from bench.host import is_oversubscribed, physical_cores
from bench.launch.hosts import (
    add_host_flags,
    check_fits,
    launcher_from_args,
    link_fractions,
    link_of_host,
    network_summary,
    shares_one_machine,
)
from bench.launch.mpirun import HOROVOD_SETTINGS
from bench.plan.capacity import add_oversubscribe_flag, check_local_ranks
from bench.plan.comm_config import (
    BACKENDS,
    OPS,
    CommConfig,
    CrossoverConfig,
    format_env_setting,
    parse_choices,
    parse_env_setting,
    parse_numbers,
    parse_size,
)
from bench.results.comm_rows import (
    CROSSOVER_FIELDS,
    busbw_ratios,
    crossover_density,
    crossover_rows,
    describe_crossover,
    format_comm_table,
    format_compare_table,
    format_crossover_table,
    ratio_verdict,
    setting_ratios,
)
from bench.results.records import atomic_write_json, default_out, ensure_writable, write_csv_atomic
from bench.run.comm import (
    comm_launcher,
    comm_variants,
    environment_record,
    hang_timeout_s,
    launch_program,
    measure_comm,
    shared_memory_of,
    write_comm,
)


def results_dir(out: str | None, prefix: str) -> Path:
    """The folder to write into (default: bench.results.records.default_out(prefix)), created and checked writable
    now, before anything is measured."""
    path = default_out(prefix) if out is None else Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file: pass a directory")
    return ensure_writable(path)


# --- comm -------------------------------------------------------------------------------------------------------


def run_comm(cfg: CommConfig, out: Path) -> int:
    if is_oversubscribed(cfg.np):
        print(f"note: {cfg.np} ranks on {physical_cores()} cores: oversubscribed, flagged in every row", flush=True)
    if cfg.compare_env is not None:
        print(f"setting A: {format_env_setting(cfg.baseline_env)}\nsetting B: {format_env_setting(cfg.compare_env)}"
              f"\n(launches of A and B interleaved, each on top of the suite's launch environment)", flush=True)
    run = measure_comm(cfg)
    rows, variants = run.rows, dict(comm_variants(cfg))
    ratios = [q for op in cfg.ops for q in busbw_ratios(rows, op=op)]
    for setting in variants:
        for backend in ("memcpy", *cfg.backends):
            for op in ("memcpy", *cfg.ops):
                table = [r for r in rows if r["backend"] == backend and r["op"] == op
                         and r["setting"] in (setting, "")]
                if table and not (backend == "memcpy" and setting != "A"):
                    show = ({q["size_bytes"]: q["busbw_ratio"] for q in busbw_ratios(rows, op=op, setting=setting)}
                            if backend == "horovod" else None)
                    print(format_comm_table(table, show) + "\n")
    for setting in variants:
        prefix = f"Setting {setting}: " if len(variants) > 1 else ""
        fields = run.launch_fields.get((setting, cfg.backends[0]), {})
        print(f"{prefix}shared memory {fields.get('single_copy_mechanism', '?')}, allocator "
              f"{fields.get('allocator', '?')}; Horovod settings: "
              f"{', '.join(f'{k}={v}' for k, v in run.settings[setting].items()) or 'none'}")
    if "horovod" in cfg.backends and "mpi4py" in cfg.backends:
        for op in cfg.ops:
            these = [q for q in ratios if q["op"] == op]
            if these:
                print(ratio_verdict(these))
    compared = []
    if cfg.compare_env is not None:
        for backend in cfg.backends:
            for op in cfg.ops:
                if not run.failed(("A", backend)) and not run.failed(("B", backend)):
                    compared += setting_ratios(rows, backend, op)
                    print("\n" + format_compare_table(rows, backend, op))
    network = network_summary(comm_launcher(cfg), cfg.np, link_of_host(comm_launcher(cfg)))
    if network["link"]:
        print(link_fractions(rows, network["link"]))
    seconds = write_comm(out, run, ratios, compared, network)
    print(f"wrote {out}/comm.json, comm.csv, environment.json ({seconds:.0f} s)")
    return 1 if run.failures else 0


# --- crossover --------------------------------------------------------------------------------------------------


def run_crossover(cfg: CrossoverConfig, out: Path) -> int:
    started = datetime.now().astimezone()
    t0 = time.perf_counter()
    env_record = environment_record(max(cfg.nps))
    shared_memory = shared_memory_of(env_record)
    rows, crossovers, failures, settings = [], [], [], {}
    for np in cfg.nps:
        print(f"measuring sparse-gather vs dense-reduce on {np} ranks ...", file=sys.stderr, flush=True)
        spec = {"program": "crossover", "rows": cfg.rows, "dim": cfg.dim, "densities": list(cfg.densities),
                "lookups_per_row": cfg.lookups_per_row, "warmup": cfg.warmup, "iters": cfg.iters}
        table_bytes = 4 * cfg.rows * cfg.dim
        launch = launch_program(spec, np, hang_timeout_s(2 * table_bytes * np * len(cfg.densities)
                                                     * (cfg.warmup + cfg.iters), 0),
                                shared_memory=shared_memory)
        if launch.error:
            failures.append({"np": np, "error": launch.error})
            print(f"alure-bench crossover: np={np} failed: {launch.error}", file=sys.stderr)
            continue
        settings = launch.records[0]["settings"]
        these = crossover_rows(launch.records, np)
        rows += these
        print(format_crossover_table(these))
        dens = sorted({r["density"] for r in these})
        med = {(r["density"], r["mode"]): r["time_ms_median"] for r in these}
        sparse = [med[(d, "sparse-gather")] for d in dens]
        dense = [med[(d, "dense-reduce")] for d in dens]
        x = crossover_density(dens, sparse, dense)
        text = describe_crossover(dens, sparse, dense, cfg.rows)
        crossovers.append({"np": np, "crossover_density": None if x is None else round(x, 6),
                           "crossover_rows_per_rank": None if x is None else round(x * cfg.rows),
                           "description": text})
        print(f"crossover at np={np}: {text}\n")
    seconds = round(time.perf_counter() - t0, 2)
    result = {"kind": "crossover", "started": started.isoformat(timespec="seconds"), "seconds": seconds,
              "config": asdict(cfg), "cores": physical_cores(), "horovod_settings": settings,
              "harness_horovod_settings": dict(HOROVOD_SETTINGS), "crossovers": crossovers, "failures": failures,
              "rows": rows}
    atomic_write_json(out / "environment.json", env_record)
    atomic_write_json(out / "crossover.json", result)
    write_csv_atomic(out / "crossover.csv", rows, CROSSOVER_FIELDS)
    print(f"wrote {out}/crossover.json, crossover.csv, environment.json ({seconds:.0f} s)")
    return 1 if failures else 0


# --- command line -----------------------------------------------------------------------------------------------

def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a whole number") from None


def comm_main(args: argparse.Namespace) -> int:
    cfg = CommConfig(np=_int(args.np, "--np"), backends=parse_choices(args.backends, BACKENDS, "backend"),
                     ops=parse_choices(args.ops, OPS, "op"),
                     min_bytes=parse_size(args.min_bytes, "--min-bytes"),
                     max_bytes=parse_size(args.max_bytes, "--max-bytes"),
                     warmup=_int(args.warmup, "--warmup"), iters=_int(args.iters, "--iters"),
                     rounds=_int(args.rounds, "--rounds"), tensors=_int(args.tensors, "--tensors"),
                     baseline_env=parse_env_setting(args.baseline_env, "--baseline-env") if args.baseline_env else {},
                     compare_env=parse_env_setting(args.compare_env) if args.compare_env is not None else None,
                     **host_layout(args))
    if not cfg.hosts or shares_one_machine(list(cfg.hosts)):  # remote hosts' memory is not this machine's
        check_local_ranks(cfg.np, 3 * cfg.max_bytes / 2**20, ranks_per_core=args.oversubscribe_limit)
    return run_comm(cfg, results_dir(args.out, "comm"))


def host_layout(args: argparse.Namespace, nps: list[int] | None = None) -> dict:
    """CommConfig's hosts and ranks_per_host from --hosts / --ranks-per-host, checked against `nps` (else --np)."""
    launcher = launcher_from_args(args)
    check_fits(launcher, nps if nps is not None else [_int(args.np, "--np")])
    return {"hosts": launcher.hosts, "ranks_per_host": launcher.ranks_per_host, "controller": launcher.controller}


def crossover_main(args: argparse.Namespace) -> int:
    cfg = CrossoverConfig(nps=parse_numbers(args.np, int, "--np"), rows=_int(args.rows, "--rows"),
                          dim=_int(args.dim, "--dim"), densities=parse_numbers(args.densities, float, "--densities"),
                          lookups_per_row=_int(args.lookups_per_row, "--lookups-per-row"),
                          warmup=_int(args.warmup, "--warmup"), iters=_int(args.iters, "--iters"))
    check_local_ranks(max(cfg.nps), 0, ranks_per_core=args.oversubscribe_limit)
    return run_crossover(cfg, results_dir(args.out, "crossover"))


def register(sub) -> None:
    """`alure-bench comm` and `alure-bench crossover`."""
    c = CommConfig.__dataclass_fields__
    p = sub.add_parser("comm", help="latency and bandwidth of allreduce, allgather, sparse-pair and alltoall over "
                                    "Horovod, mpi4py and gloo, with memcpy as the ceiling",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--np", default="2", help="ranks per launch (default 2)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    p.add_argument("--min-bytes", default="1K", help="smallest size, e.g. 1K (sizes double up to --max-bytes)")
    p.add_argument("--max-bytes", default="64M", help="largest size, e.g. 64M")
    p.add_argument("--warmup", default=str(c["warmup"].default), help="untimed iterations per point")
    p.add_argument("--iters", default=str(c["iters"].default), help="timed iterations per point")
    p.add_argument("--rounds", default=str(c["rounds"].default),
                   help="launches per backend in alternating order, iterations pooled (default 2)")
    p.add_argument("--tensors", default="1", help="split each allreduce into this many tensors started together "
                                                  "(to measure Horovod's tensor fusion; default 1)")
    p.add_argument("--compare-env", default=None, metavar="'VAR=VALUE ...'",
                   help="also run every backend with these variables set on top of the launch environment "
                        "(setting B), launches interleaved with setting A, and print busbw B/A per size; e.g. "
                        "'OMPI_MCA_btl_vader_single_copy_mechanism=none' or 'HOROVOD_CYCLE_TIME=1'")
    p.add_argument("--baseline-env", default=None, metavar="'VAR=VALUE ...'",
                   help="variables for setting A (default: the suite's launch environment as it is)")
    p.add_argument("--out", default=None, help="results folder (default results/local/comm-<timestamp>/)")
    add_oversubscribe_flag(p)
    add_host_flags(p)
    p.set_defaults(func=comm_main)

    x = CrossoverConfig.__dataclass_fields__
    q = sub.add_parser("crossover", help="sparse-gather vs dense-reduce over density and np with Horovod; the "
                                         "crossover density per np",
                       description=__doc__.split("\n\n")[2])
    q.add_argument("--np", default="2", help="comma list of process counts (default 2)")
    q.add_argument("--rows", default=str(x["rows"].default), help="V, rows of the embedding table")
    q.add_argument("--dim", default=str(x["dim"].default), help="d, columns of the embedding table")
    q.add_argument("--densities", default=",".join(f"{d:g}" for d in x["densities"].default),
                   help="comma list of rows touched per rank / V")
    q.add_argument("--lookups-per-row", default="1", help="entries per touched row in the uncoalesced gradient "
                                                          "(default 1)")
    q.add_argument("--warmup", default=str(x["warmup"].default), help="untimed iterations per density")
    q.add_argument("--iters", default=str(x["iters"].default), help="timed iterations per density")
    q.add_argument("--out", default=None, help="results folder (default results/local/crossover-<timestamp>/)")
    add_oversubscribe_flag(q)
    q.set_defaults(func=crossover_main)
