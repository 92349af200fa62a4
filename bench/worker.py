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
from bench.launch import physical_cores, threads_per_rank

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
    # A stage other than train covers every user whatever the ranks: it keeps the preset's batch.
    per_rank = batch_sizes(point, base.batch_size)[0] if point.stage == "train" else base.batch_size
    return replace(base, **{**point.workload, "seed": point.seed, "batch_size": per_rank})


def instrumented_step(trainer, exchange, measure_density: bool = False) -> tuple[dict, dict, dict | None]:
    """One training step, phase by phase as `Trainer.train_step` runs it, with a clock between the phases.
    Returns (milliseconds per phase, what the exchange moved, the gradient density if asked for)."""
    exchange.counters.reset()
    density = None
    t0 = time.perf_counter()
    batch = trainer.next_batch()
    t1 = time.perf_counter()
    loss = trainer.forward(batch)
    t2 = time.perf_counter()
    trainer.backward(loss)
    t3 = time.perf_counter()
    if measure_density:
        # Counting touched rows costs a coalesce: keep it out of every phase (the exchange runs on meanwhile, so
        # callers ask for it on a warm-up step only).
        density = trainer.gradient_density()
        t3 = time.perf_counter()
    trainer.synchronize()
    t4 = time.perf_counter()
    trainer.step()
    t5 = time.perf_counter()
    ms = {p: (b - a) * 1000 for p, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)))}
    moved = exchange.counters.as_dict()
    moved["bytes_received"] = exchange.counters.bytes_received(exchange.size)
    return ms, moved, density


def measure(point: PointConfig, exchange) -> dict:
    """Run the point on this rank; return this rank's raw measurements."""
    import torch
    from alure.train import Trainer

    torch.set_num_threads(point.threads_per_rank or threads_per_rank(point.np))
    trainer = Trainer(workload_config(point), exchange)
    baseline_rss = rss_mib()  # after the model is built: growth beyond it is the training's own
    density = None
    for i in range(point.warmup_steps):
        _, _, measured = instrumented_step(trainer, exchange, measure_density=i == point.warmup_steps - 1)
        density = measured or density
    steps = [instrumented_step(trainer, exchange, measure_density=density is None and i == 0)
             for i in range(point.steps)]
    density = density or steps[0][2]
    phase_ms = {p: [ms[p] for ms, _, _ in steps] for p in PHASES}
    moved = {k: float(np.median([m[k] for _, m, _ in steps])) for k in steps[0][1]}
    return {
        "rank": exchange.rank, "host": socket.gethostname(), "pid": os.getpid(), "host_cores": physical_cores(),
        "step_time_ms": [sum(ms.values()) for ms, _, _ in steps], "phase_ms": phase_ms,
        "baseline_rss_mib": baseline_rss, "peak_rss_mib": peak_rss_mib(),
        "rss_growth_mib": peak_rss_mib() - baseline_rss,
        "exchange": moved,  # medians over timed steps of bench.exchange.ExchangeCounters, per rank per step
        "exchange_bytes_held": moved["allgather_bytes_held"] + moved["allreduce_bytes_held"],
        "exchange_bytes_sent": moved["allgather_bytes_sent"] + moved["allreduce_bytes_sent"],
        "exchange_bytes_received": moved["bytes_received"],
        "gradient_density": density["items"], "gradient_density_tables": density,
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
                                                 "exchange_bytes_received", "gradient_density")},
        **{k: max(r["exchange"][k] for r in ranks) for k in ("allgather_calls", "allreduce_calls",
                                                            "allgather_bytes_held", "allreduce_bytes_held")},
    }
    return {
        "schema_version": SCHEMA_VERSION, "point_id": point.point_id, "point": point.as_dict(), "status": "ok",
        "reason": None, "started_at": started_at, "wall_seconds": wall_seconds,
        "oversubscribed": hosts_oversubscribed(ranks), "np": point.np,
        "threads_per_rank": point.threads_per_rank or threads_per_rank(point.np),
        "batch_per_rank": per_rank, "global_batch": global_batch,
        "hosts": sorted({r["host"] for r in ranks}),
        "step_time_ms_slowest_rank": slowest.tolist(), "metrics": metrics, "ranks": ranks,
    }


def hosts_oversubscribed(ranks: list[dict]) -> bool:
    """More ranks on some host than that host has cores (counted per host, so multi-node runs are judged right)."""
    per_host: dict[str, list[dict]] = {}
    for r in ranks:
        per_host.setdefault(r["host"], []).append(r)
    return any(len(rs) > rs[0]["host_cores"] for rs in per_host.values())


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
