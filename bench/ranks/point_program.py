"""What the two rank programs of a sweep point share (bench.ranks.worker: timed training steps;
bench.ranks.stage_worker: a whole pipeline stage): the command line, the exchange (`exchange_for`: Horovod,
raw MPI or the sharded modes), every rank's measurements gathered to rank 0, which builds the point's record, and
the hand-back of the outcome (bench.launch.handback)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from bench.launch.handback import hand_back, hand_back_failure, launched_rank, mark_measuring
from bench.plan.config import PointConfig
from bench.plan.workload import workload_config
from bench.ranks.memory import apply_mem_limit
from bench.results.records import utc_now

Measure = Callable[[PointConfig, object], dict]
"""(point, exchange) -> this rank's measurements."""
BuildRecord = Callable[[PointConfig, list, float, str], dict]
"""(point, every rank's measurements, wall seconds, started at) -> the point's record."""


def point_argv(point: PointConfig, results: str) -> list[str]:
    """The arguments `main` takes (what the sweep launches)."""
    return ["--point", json.dumps(point.as_dict()), "--results", str(results)]


def exchange_for(point: PointConfig):
    """The point's exchange, over its backend (bench.plan.config.EXCHANGE_BACKENDS). Imported only when chosen: a
    raw-MPI point must never load Horovod."""
    if point.exchange_backend == "mpi":
        # Imports torch and mpi4py: rank side only (the launcher imports this module).
        from bench.ranks.mpi_exchange import MpiExchange
        return MpiExchange(point.mode)
    # Imports torch and Horovod: rank side only (the launcher imports this module).
    from bench.ranks.sharded import exchange_for as horovod_exchange_for
    return horovod_exchange_for(point.mode, workload_config(point))  # Horovod, or the sharded modes over it


def main(prog: str, measure: Measure, build_record: BuildRecord, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--point", required=True, help="the PointConfig as JSON")
    parser.add_argument("--results", required=True, help="the folder each rank hands its outcome back in")
    args = parser.parse_args(argv)
    point = PointConfig.from_dict(json.loads(args.point))
    apply_mem_limit(point.mem_limit_mib)
    started_at = utc_now()
    start = time.perf_counter()
    rank = launched_rank()
    try:
        exchange = exchange_for(point)
        rank = exchange.rank
        if exchange.size != point.np:
            raise RuntimeError(f"launched with {exchange.size} ranks for a point of np={point.np}")
        mark_measuring(args.results, rank)  # the launch is up: a failure from here on is the point's result
        ranks = exchange.allgather_object(measure(point, exchange))
        record = build_record(point, ranks, time.perf_counter() - start, started_at) if rank == 0 else None
        hand_back(args.results, rank, record)
        exchange.shutdown()
    except BaseException as err:  # noqa: BLE001 - every failure must reach the sweep classified
        hand_back_failure(args.results, rank, err)
        sys.stderr.flush()
        # A rank that fails mid-collective would leave its peers waiting forever: end this process now and
        # let mpirun take the others down.
        os._exit(1)
    return 0
