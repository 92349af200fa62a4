"""The per-rank program of a point of a pipeline stage other than train (refresh, graph, retrieval).

Each rank builds the preset's world and the model at its seed's initial weights (a stage's time and memory do not
depend on what the weights learnt), prepares the stage's input untimed (the graph stage needs the refreshed
embeddings, retrieval the graph), then runs the whole stage: warm-up repetitions, then timed ones, each started
at a barrier. Per repetition it records its time, what the stage's collectives and ring transfers moved, and the
stage's own peak memory: the kernel's high-water mark is reset just before the repetition, so the world and
whatever came before are not counted. Rank 0 builds the point's record, in the schema of training points
(bench.ranks.point_program hands it back).
Launched by the sweep as `python -m bench.ranks.stage_worker`.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from bench.host import physical_cores, point_oversubscribed, threads_per_rank
from bench.plan.config import PointConfig
from bench.plan.workload import workload_config
from bench.ranks import point_program
from bench.ranks.memory import PeakProbe, rss_mib
from bench.results.records import point_record
from bench.results.scaling import rank_skew, slowest_rank_per_step, spread

# ---- what the stage's collectives moved ----------------------------------------------------------------------------

@dataclass(slots=True)
class StageCounters:
    """What one rank's collectives and ring transfers moved during one repetition of a stage."""

    allgather_calls: int = 0
    allreduce_calls: int = 0
    sendrecv_calls: int = 0
    """Ring shifts (one send to the next rank and one receive from the previous)."""
    bytes_sent: int = 0
    """Bytes of this rank's arrays handed to collectives and sends (0 on one rank: nothing leaves it)."""
    bytes_received: int = 0
    """Bytes that came from other ranks: the peers' part of a gather, a whole reduction, a received block."""
    bytes_held_max: int = 0
    """The largest result of one call this rank held: a gathered array, a reduction or a received block."""


class CountingExchange:
    """An `alure.exchange.Exchange` that passes every call on and counts the bytes of the stage-level ones."""

    def __init__(self, inner):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size
        self.counters = StageCounters()

    def _moved(self, sent: np.ndarray, result: np.ndarray, from_peers: int) -> None:
        if self.size > 1:
            self.counters.bytes_sent += sent.nbytes
            self.counters.bytes_received += from_peers
            self.counters.bytes_held_max = max(self.counters.bytes_held_max, result.nbytes)

    def allgather_array(self, array):
        array = np.asarray(array)
        out = self.inner.allgather_array(array)
        self.counters.allgather_calls += 1
        self._moved(array, out, out.nbytes - array.nbytes)
        return out

    def allreduce_sum(self, array):
        array = np.asarray(array)
        out = self.inner.allreduce_sum(array)
        self.counters.allreduce_calls += 1
        self._moved(array, out, out.nbytes)
        return out

    def start_ring_shift(self, array):
        array = np.asarray(array)
        transfer = self.inner.start_ring_shift(array)
        self.counters.sendrecv_calls += 1
        counting = self

        class Counted:
            def test(self):
                return transfer.test()

            def wait(self):
                out = transfer.wait()
                counting._moved(array, out, out.nbytes)
                return out
        return Counted()

    def barrier(self):
        self.inner.barrier()


# ---- the stage -----------------------------------------------------------------------------------------------------

def prepare_stage(point: PointConfig, exchange):
    """Build the stage's inputs, untimed; return a function that runs the stage once and keeps nothing."""
    import torch

    from alure.data import build_world  # imports torch: only where a workload is built
    from alure.model import UserEncoder  # imports torch: only where a model is built
    from alure.pipeline import (  # imports torch: only where it runs
        DEFAULT_GRAPH_STRATEGY,
        graph_stage,
        refresh_stage,
        retrieval_stage,
    )

    config = workload_config(point)
    world = build_world(config)
    torch.manual_seed(config.seed)  # the same initial weights on every rank, as the trainer starts from
    model = UserEncoder(config)
    store = graph = None
    if point.stage in ("graph", "retrieval"):
        store = refresh_stage(model, world, exchange)
    if point.stage == "retrieval":
        graph = graph_stage(store, config, exchange, DEFAULT_GRAPH_STRATEGY)

    def run() -> None:  # the result is dropped at once, so one repetition's output never inflates the next's peak
        if point.stage == "refresh":
            refresh_stage(model, world, exchange)
        elif point.stage == "graph":
            graph_stage(store, config, exchange, point.graph_strategy)
        elif point.stage == "retrieval":
            retrieval_stage(world, graph, exchange)
        else:
            raise ValueError(f"bench.ranks.stage_worker measures refresh, graph and retrieval, not {point.stage!r}")
    return run


def measure_stage(point: PointConfig, exchange) -> dict:
    """Run the stage point on this rank; return this rank's raw measurements."""
    import torch
    torch.set_num_threads(point.threads_per_rank or threads_per_rank(point.np))
    counting = CountingExchange(exchange)
    run = prepare_stage(point, counting)
    for _ in range(point.stage_warmup_steps):
        exchange.barrier()
        run()
    times_ms, peaks, growths, moved = [], [], [], []
    probe = PeakProbe()
    for _ in range(point.stage_steps):
        exchange.barrier()
        counting.counters = StageCounters()
        # The heap's free memory goes back first: what the warm-up freed would otherwise stay resident, the next
        # repetition would reuse it, and the stage's own peak would read as nothing.
        probe.reset(release_heap=True)
        before = rss_mib()
        start = time.perf_counter()
        run()
        times_ms.append((time.perf_counter() - start) * 1000)
        peaks.append(probe.peak_mib())
        # Sampled (the kernel refused the reset), the peak is the resident set at the end: no growth to speak of.
        growths.append(peaks[-1] - before if probe.resets else float("nan"))
        moved.append(asdict(counting.counters))
    probe.close()
    return {
        "rank": exchange.rank, "host": socket.gethostname(), "pid": os.getpid(), "host_cores": physical_cores(),
        "step_time_ms": times_ms, "peak_rss_mib": max(peaks), "rss_growth_mib": max(growths),
        "stage_peak_mib": peaks, "stage_growth_mib": growths, "memory_probe": probe.method,
        "exchange": {k: max(m[k] for m in moved) for k in moved[0]},
    }


def build_stage_record(point: PointConfig, ranks: list[dict], wall_seconds: float, started_at: str) -> dict:
    """Rank 0's record of an ok stage point: the training record's fields, a stage's time as its step time."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    stage_ms = np.array([r["step_time_ms"] for r in ranks])  # [ranks, repetitions]
    slowest = slowest_rank_per_step(stage_ms)
    stats = spread(slowest)
    users = workload_config(point).users
    exchange = {k: max(r["exchange"][k] for r in ranks) for k in ranks[0]["exchange"]}
    metrics = {
        "step_time_ms": stats["median"], "step_time_ms_p10": stats["p10"], "step_time_ms_p90": stats["p90"],
        "throughput_samples_per_s": users / (stats["median"] / 1000), "rank_skew": rank_skew(stage_ms),
        "phase_ms": {},
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "rss_growth_mib": max(r["rss_growth_mib"] for r in ranks),
        "exchange_bytes_held": exchange["bytes_held_max"], "exchange_bytes_sent": exchange["bytes_sent"],
        "exchange_bytes_received": exchange["bytes_received"],
        "allgather_calls": exchange["allgather_calls"], "allreduce_calls": exchange["allreduce_calls"],
        "sendrecv_calls": exchange["sendrecv_calls"], "memory_probe": ranks[0]["memory_probe"],
    }
    return point_record(
        point, "ok", reason=None, started_at=started_at, wall_seconds=wall_seconds,
        oversubscribed=point_oversubscribed(point.np, ranks, one_machine=False), metrics=metrics, ranks=ranks,
        threads_per_rank=point.threads_per_rank or threads_per_rank(point.np),
        batch_per_rank=None, global_batch=None, users=users, hosts=sorted({r["host"] for r in ranks}),
        step_time_ms_slowest_rank=slowest.tolist())


def main(argv: list[str] | None = None) -> int:
    return point_program.main("python -m bench.ranks.stage_worker", measure_stage, build_stage_record, argv)


if __name__ == "__main__":
    sys.exit(main())
