"""The co-run baseline's rank program: P independent np=1 trainings started together on the same cores.

The sweep launches it like every point (the same launcher and launch environment, so the processes sit on the cores
the real ranks would), but nothing here starts Horovod or MPI: each process trains the bare model
(alure.exchange.LocalExchange, as a lone np=1 point does) and is timed by the training worker's own `measure`. The
processes line up after their warm-up through files in the hand-back folder, so their timed steps run at the same
time; afterwards the others hand their measurements back as files and rank 0 builds the record from them. Run as
`python -m bench.ranks.corun` (bench.run.sweep.worker_module)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from alure.exchange import LocalExchange
from bench.launch.handback import hand_back, hand_back_failure, launched_rank, rank_file
from bench.plan.config import PointConfig
from bench.ranks.exchange import ExchangeCounters
from bench.ranks.memory import apply_mem_limit
from bench.results.records import utc_now

POLL_S = 0.005
"""How often a waiting process looks for the others' files."""


class BareExchange(LocalExchange):
    """The bare model of one process, with the counters the worker reads (nothing is exchanged: they stay 0)."""

    def __init__(self):
        self.counters = ExchangeCounters()


def wait_for_files(paths: list[Path], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout_s:g} s for {what}: {[p.name for p in paths if not p.exists()]} "
                               f"never came")
        time.sleep(POLL_S)


def line_up(folder: Path, rank: int, size: int, timeout_s: float) -> None:
    """A barrier of files: this process is ready; return once every process is."""
    (folder / f"ready{rank}").touch()
    wait_for_files([folder / f"ready{r}" for r in range(size)], timeout_s, "the co-run's other processes")


def corun_rank(point: PointConfig, folder: Path, rank: int) -> dict:
    """This process's measurements, with what it is: its launched rank and whether Horovod or mpi4py were loaded."""
    from bench.ranks.worker import measure  # imports torch: rank side only
    measured = measure(point, BareExchange(), lambda: line_up(folder, rank, point.np, point.timeout_s))
    return measured | {"rank": rank, "modules_loaded": {m: m in sys.modules for m in ("horovod", "mpi4py")}}


def gather_files(folder: Path, size: int, timeout_s: float) -> list[dict]:
    """Rank 0: every other process's handed-back measurements (a failed one fails the point)."""
    paths = [rank_file(folder, r) for r in range(1, size)]
    wait_for_files(paths, timeout_s, "the co-run's other measurements")
    handed = [json.loads(p.read_text()) for p in paths]
    failed = [h for h in handed if h["status"] != "ok"]
    if failed:
        raise RuntimeError(f"co-run process {failed[0]['rank']} failed: {failed[0]['reason']}")
    return [h["result"] for h in handed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ranks.corun")
    parser.add_argument("--point", required=True, help="the PointConfig as JSON (corun true)")
    parser.add_argument("--results", required=True, help="the folder each process hands its outcome back in")
    args = parser.parse_args(argv)
    point = PointConfig.from_dict(json.loads(args.point))
    folder = Path(args.results)
    apply_mem_limit(point.mem_limit_mib)
    started_at, start = utc_now(), time.perf_counter()
    rank = launched_rank()
    try:
        mine = corun_rank(point, folder, rank)
        if rank != 0:
            hand_back(folder, rank, mine)
            return 0
        from bench.ranks.worker import build_record  # imports torch: rank side only
        ranks = [mine, *gather_files(folder, point.np, point.timeout_s)]
        hand_back(folder, 0, build_record(point, ranks, time.perf_counter() - start, started_at))
    except BaseException as err:  # noqa: BLE001 - every failure must reach the sweep classified
        hand_back_failure(folder, rank, err)
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
