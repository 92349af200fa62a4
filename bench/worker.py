"""The per-rank worker: build this rank's shard of the workload, warm up, run timed steps phase by phase, and
let rank 0 write the point's record. Launched on every rank by the sweep as `python -m bench.worker`."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np

from bench.config import PointConfig
from bench.memory import apply_mem_limit, looks_like_oom, peak_rss_mib, rss_mib
from bench.results import SCHEMA_VERSION, write_record
from bench.scaling import PHASES, rank_skew, slowest_rank_per_step, spread, throughput_samples_per_s
from bench.launch import is_oversubscribed, threads_per_rank

RANK_ERROR_MARKER = "ALURE_BENCH_RANK_ERROR"
"""Prefix of the one stderr line a failing rank leaves for the sweep to classify the failure."""


def batch_sizes(point: PointConfig, preset_batch: int) -> tuple[int, int]:
    """(per-rank, global) batch: weak keeps the per-rank batch, strong the global one."""
    if point.scaling == "weak":
        per_rank = point.batch_per_rank or preset_batch
        return per_rank, per_rank * point.np
    global_batch = point.global_batch or preset_batch
    if global_batch % point.np:
        raise ValueError(f"global batch {global_batch} does not split over {point.np} ranks: choose a global "
                         f"batch divisible by every np")
    return global_batch // point.np, global_batch


def workload_config(point: PointConfig):
    """The alure config this point trains: its preset, its overrides, its seed and per-rank batch."""
    from alure.config import preset
    base = preset(point.preset)
    per_rank, _ = batch_sizes(point, base.batch_size)
    return replace(base, **{**point.workload, "seed": point.seed, "batch_size": per_rank})


def measure(point: PointConfig, exchange) -> dict:
    """Run the point on this rank; return this rank's raw measurements."""
    import torch
    from alure.train import Trainer

    torch.set_num_threads(point.threads_per_rank or threads_per_rank(point.np))
    trainer = Trainer(workload_config(point), exchange)
    baseline_rss = rss_mib()  # after the model is built: growth beyond it is the training's own
    n = point.warmup_steps + point.steps
    phase_ms = {p: np.zeros(n) for p in PHASES}
    held, sent, received, gathers, reduces = (np.zeros(n) for _ in range(5))
    counters = exchange.counters
    density = None
    for i in range(n):
        counters.reset()
        t0 = time.perf_counter()
        batch = trainer.next_batch()
        t1 = time.perf_counter()
        loss = trainer.forward(batch)
        t2 = time.perf_counter()
        trainer.backward(loss)
        t3 = time.perf_counter()
        if i == point.warmup_steps - 1 or (point.warmup_steps == 0 and i == 0):
            # Counting touched rows costs a coalesce: do it on one step, outside what is timed as the exchange.
            density = trainer.gradient_density()
            t3 = time.perf_counter()
        trainer.synchronize()
        t4 = time.perf_counter()
        trainer.step()
        t5 = time.perf_counter()
        for phase, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            phase_ms[phase][i] = (b - a) * 1000
        held[i], sent[i] = counters.bytes_held, counters.bytes_sent
        received[i] = counters.bytes_received(exchange.size)
        gathers[i], reduces[i] = counters.allgather_calls, counters.allreduce_calls
    timed = slice(point.warmup_steps, n)
    return {
        "rank": exchange.rank, "host": socket.gethostname(), "pid": os.getpid(),
        "step_time_ms": sum(phase_ms[p][timed] for p in PHASES).tolist(),
        "phase_ms": {p: phase_ms[p][timed].tolist() for p in PHASES},
        "baseline_rss_mib": baseline_rss, "peak_rss_mib": peak_rss_mib(),
        "rss_growth_mib": peak_rss_mib() - baseline_rss,
        "exchange_bytes_held": float(np.median(held[timed])), "exchange_bytes_sent": float(np.median(sent[timed])),
        "exchange_bytes_received": float(np.median(received[timed])),
        "allgather_calls": int(np.median(gathers[timed])), "allreduce_calls": int(np.median(reduces[timed])),
        "gradient_density": density["items"], "gradient_density_tables": density,
        "loss_last": float(loss.detach()),
    }


def build_record(point: PointConfig, ranks: list[dict], wall_seconds: float, started_at: str) -> dict:
    """Rank 0's record of an ok point, from every rank's measurements."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    step_ms = np.array([r["step_time_ms"] for r in ranks])  # [ranks, steps]
    slowest = slowest_rank_per_step(step_ms)
    slowest_rank = step_ms.argmax(axis=0)
    stats = spread(slowest)
    per_rank, global_batch = batch_sizes(point, _preset_batch(point))
    # The breakdown follows the rank that set the pace in each step, so the phases add up to the step time.
    phase_ms = {p: float(np.median([ranks[r]["phase_ms"][p][s] for s, r in enumerate(slowest_rank)]))
                for p in PHASES}
    metrics = {
        "step_time_ms": stats["median"], "step_time_ms_p10": stats["p10"], "step_time_ms_p90": stats["p90"],
        "throughput_samples_per_s": throughput_samples_per_s(global_batch, stats["median"]),
        "rank_skew": rank_skew(step_ms), "phase_ms": phase_ms,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "rss_growth_mib": max(r["rss_growth_mib"] for r in ranks),
        **{k: max(r[k] for r in ranks) for k in ("exchange_bytes_held", "exchange_bytes_sent",
                                                 "exchange_bytes_received", "allgather_calls", "allreduce_calls",
                                                 "gradient_density")},
    }
    return {
        "schema_version": SCHEMA_VERSION, "point_id": point.point_id, "point": point.as_dict(), "status": "ok",
        "reason": None, "started_at": started_at, "wall_seconds": wall_seconds,
        "oversubscribed": is_oversubscribed(point.np), "np": point.np,
        "threads_per_rank": point.threads_per_rank or threads_per_rank(point.np),
        "batch_per_rank": per_rank, "global_batch": global_batch,
        "hosts": sorted({r["host"] for r in ranks}),
        "step_time_ms_slowest_rank": slowest.tolist(), "metrics": metrics, "ranks": ranks,
    }


def _preset_batch(point: PointConfig) -> int:
    from alure.config import preset
    return preset(point.preset).batch_size


def report_failure(rank: int, err: BaseException) -> None:
    """Leave one classified line for the sweep, then the traceback for whoever reads the log."""
    text = "".join(traceback.format_exception(err))
    status = "oom" if isinstance(err, MemoryError) or looks_like_oom(text) else "failed"
    reason = f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    print(f"{RANK_ERROR_MARKER} " + json.dumps({"rank": rank, "status": status, "reason": reason}),
          file=sys.stderr, flush=True)
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("--point", required=True, help="the PointConfig as JSON")
    parser.add_argument("--out", required=True, help="the sweep's results folder")
    args = parser.parse_args(argv)
    point = PointConfig.from_dict(json.loads(args.point))
    apply_mem_limit(point.mem_limit_mib)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    try:
        from bench.exchange import HorovodExchange
        exchange = HorovodExchange(point.mode)
        rank = exchange.rank
        if exchange.size != point.np:
            raise RuntimeError(f"launched with {exchange.size} ranks for a point of np={point.np}")
        mine = measure(point, exchange)
        ranks = exchange.allgather_object(mine)
        if rank == 0:
            write_record(args.out, build_record(point, ranks, time.perf_counter() - start, started_at))
        exchange.shutdown()
    except BaseException as err:  # noqa: BLE001 - every failure must reach the sweep classified
        report_failure(rank, err)
        sys.stderr.flush()
        # A rank that fails mid-collective would leave its peers waiting forever: end this process now and
        # let mpirun take the others down.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
