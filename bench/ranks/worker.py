"""The per-rank worker: build this rank's shard of the workload, warm up, run timed steps phase by phase, and
let rank 0 build the point's record (bench.ranks.point_program hands it back). Launched on every rank by the sweep
as `python -m bench.ranks.worker`."""
from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from bench.host import physical_cores, point_oversubscribed
from bench.launch.hosts import link_as_configured, network_of_ranks, shares_one_machine
from bench.model.exchange_price import exchange_price, host_collective_model
from bench.model.row_price import measured_rows, rows_named
from bench.plan.config import PointConfig
from bench.plan.workload import batch_sizes, preset_batch, workload_config
from bench.ranks import grouped_gather, point_program
from bench.ranks.memory import MIB, PeakProbe, apply_training_mem_limit, peak_rss_mib, rss_mib, vm_data_bytes
from bench.results.records import point_record
from bench.results.scaling import (
    PHASES,
    rank_skew,
    slowest_rank_per_step,
    spread,
    throughput_samples_per_s,
    useful_metrics,
)


class StepMeasurement(NamedTuple):
    """One instrumented training step of one rank."""

    ms: dict
    """Milliseconds per phase."""
    moved: dict
    """What the exchange moved and made: bench.ranks.exchange.ExchangeCounters, plus bytes_sent/_held/_received."""
    density: dict | None
    """The gradient density, if asked for."""
    peak_mib: dict
    """Peak resident set during each phase (the kernel's high-water mark, reset as the phase starts); empty
    without a probe."""
    probe_ms: float
    """What the memory probe's resets and reads cost in this step (outside every phase's clock)."""
    data_bytes: int | None
    """The data segment (VmData, what RLIMIT_DATA caps) as the step ends. The launcher's allocator serves every
    allocation from the heap and keeps up to 256 MiB of freed top (bench.launch.mpirun.ALLOCATORS), so this is the step's
    peak unless more than that was freed at the top of the heap."""


def instrumented_step(trainer, exchange, measure_density: bool = False,
                      probe: PeakProbe | None = None) -> StepMeasurement:
    """One training step, phase by phase as `Trainer.train_step` runs it, with a clock around each phase and, with a
    probe, the memory high-water mark reset before and read after each phase (outside the clocks)."""
    exchange.counters.reset()
    ms, peak, probe_s = {}, {}, 0.0

    def timed(phase, run):
        nonlocal probe_s
        if probe is not None:
            t = time.perf_counter()
            probe.reset()
            probe_s += time.perf_counter() - t
        t = time.perf_counter()
        out = run()
        ms[phase] = (time.perf_counter() - t) * 1000
        if probe is not None:
            t = time.perf_counter()
            peak[phase] = probe.peak_mib()
            probe_s += time.perf_counter() - t
        return out

    batch = timed("data", trainer.next_batch)
    loss = timed("forward", lambda: trainer.forward(batch))
    timed("backward", lambda: trainer.backward(loss))
    # Counting touched rows costs a coalesce: kept out of every phase (the exchange runs on meanwhile, so callers ask
    # for it on a warm-up step only).
    density = trainer.gradient_density() if measure_density else None
    timed("exchange_wait", trainer.synchronize)
    timed("optimizer", trainer.step)
    counters = exchange.counters
    moved = {**counters.as_dict(), "bytes_sent": counters.bytes_sent, "bytes_held": counters.bytes_held,
             "bytes_received": counters.bytes_received(exchange.size)}
    return StepMeasurement({p: ms[p] for p in PHASES}, moved, density, peak, probe_s * 1000, vm_data_bytes())


def measure(point: PointConfig, exchange, before_timed_steps: Callable[[], None] | None = None) -> dict:
    """Run the point on this rank; return this rank's raw measurements. `before_timed_steps` runs after the
    warm-up, outside every clock (the co-run baseline lines its processes up there)."""
    import torch

    from alure.train import Trainer  # imports torch: rank side only

    torch.set_num_threads(point.threads_per_rank)  # the same at every np: see RunSettings.threads_per_rank
    trainer = Trainer(workload_config(point), exchange)
    build_peak = peak_rss_mib()  # the kernel's mark since the process began: imports, world, model
    probe = PeakProbe()  # returns freed heap and resets the mark: from here on, peaks are the training's own
    baseline_rss = rss_mib()  # after the model is built: growth beyond it is the training's own
    # Cap (if asked) and count the data segment from the same base, after the probe's trim: what training adds.
    data_base = vm_data_bytes()
    apply_training_mem_limit(point.train_mem_limit_mib, data_base)
    density, warmup = None, []
    for i in range(point.warmup_steps):
        warmup.append(instrumented_step(trainer, exchange, measure_density=i == point.warmup_steps - 1))
        density = warmup[-1].density or density
    warmup_peak = probe.peak_mib()
    if before_timed_steps is not None:
        before_timed_steps()
    timed_start = time.time()
    steps = [instrumented_step(trainer, exchange, measure_density=density is None and i == 0, probe=probe)
             for i in range(point.steps)]
    timed_end = time.time()
    probe.close()
    density = density or steps[0].density
    phase_ms = {p: [s.ms[p] for s in steps] for p in PHASES}
    moved = {k: float(np.median([s.moved[k] for s in steps])) for k in steps[0].moved}
    phase_peak = {p: max(s.peak_mib[p] for s in steps) for p in PHASES}
    train_peak = max(phase_peak.values())
    data_ends = [s.data_bytes for s in warmup + steps if s.data_bytes is not None]
    return {
        "rank": exchange.rank, "host": socket.gethostname(), "pid": os.getpid(), "host_cores": physical_cores(),
        "step_time_ms": [sum(s.ms.values()) for s in steps], "phase_ms": phase_ms,
        "work_ms": [s.moved["work_ms"] for s in steps],  # the exchange's own work per step, outside exchange_wait
        "timed_start_unix": timed_start, "timed_end_unix": timed_end,
        "baseline_rss_mib": baseline_rss,
        # the largest of the windows the probe saw: build, warm-up and every timed phase (the kernel's own lifetime
        # mark is reset by the probe)
        "peak_rss_mib": max(build_peak, warmup_peak, train_peak),
        "build_peak_rss_mib": build_peak, "warmup_peak_rss_mib": warmup_peak,
        "train_peak_rss_mib": train_peak, "phase_peak_rss_mib": phase_peak,
        "rss_growth_mib": train_peak - baseline_rss,
        # The cap of --train-mem-limit applies from before the warm-up: so does this growth (None without VmData).
        "data_growth_mib": (max(data_ends) - data_base) / MIB if data_ends and data_base is not None else None,
        # The whole data segment (what --mem-limit caps) at its largest step end: the run's peak when the heap is
        # never handed back (bench.run.demo launches so).
        "peak_data_mib": max(data_ends) / MIB if data_ends else None,
        "memory_probe": probe.method, "memory_probe_ms": [s.probe_ms for s in steps],
        "exchange": moved,  # medians over timed steps of bench.ranks.exchange.ExchangeCounters, per rank per step
        "exchange_bytes_held": moved["bytes_held"], "exchange_bytes_sent": moved["bytes_sent"],
        "exchange_bytes_received": moved["bytes_received"],
        "gradient_density": density["items"], "gradient_density_tables": density,
        "sharding": getattr(exchange, "sharding", None),  # sharded modes: how the tables were split
        "auto_costs": getattr(exchange, "costs_origin", None),
    }


EXCHANGE_METRICS = ("allgather_calls", "allreduce_calls", "allgather_bytes_held", "allreduce_bytes_held",
                    "allgather_rows_sent", "allgather_rows_held", "allreduce_ring_bytes", "densify_bytes",
                    "coalesced_bytes", "resparsified_bytes", "allreduce_bytes_sent", "alltoall_calls",
                    "alltoall_bytes_sent", "alltoall_bytes_received", "alltoall_ids_bytes_sent",
                    "alltoall_ids_bytes_received", "alltoall_rows_bytes_sent", "alltoall_rows_bytes_received",
                    "alltoall_grad_bytes_sent", "alltoall_grad_bytes_received", "alltoall_lookups_served",
                    "alltoall_buffer_bytes", "table_bytes", "table_state_bytes", "work_ms")
"""Counters of bench.ranks.exchange.ExchangeCounters a record's metrics carry (the largest rank's median per step)."""


def build_record(point: PointConfig, ranks: list[dict], wall_seconds: float, started_at: str) -> dict:
    """Rank 0's record of an ok point, from every rank's measurements."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    step_ms = np.array([r["step_time_ms"] for r in ranks])  # [ranks, steps]
    slowest = slowest_rank_per_step(step_ms)
    slowest_rank = step_ms.argmax(axis=0)
    stats = spread(slowest)
    per_rank, global_batch = batch_sizes(point, preset_batch(point))
    # The breakdown follows the rank that set the pace in each step, so the phases add up to the step time.
    phase_ms = {p: float(np.median([ranks[r]["phase_ms"][p][s] for s, r in enumerate(slowest_rank)]))
                for p in PHASES}
    metrics = {
        "step_time_ms": stats["median"], "step_time_ms_p10": stats["p10"], "step_time_ms_p90": stats["p90"],
        "throughput_samples_per_s": throughput_samples_per_s(global_batch, stats["median"]),
        "rank_skew": rank_skew(step_ms), "phase_ms": phase_ms,
        **{k: max(r[k] for r in ranks) for k in ("peak_rss_mib", "rss_growth_mib", "build_peak_rss_mib",
                                                 "train_peak_rss_mib", "exchange_bytes_held", "exchange_bytes_sent",
                                                 "exchange_bytes_received", "gradient_density")},
        "phase_peak_rss_mib": {p: max(r["phase_peak_rss_mib"][p] for r in ranks) for p in PHASES},
        "data_growth_mib": max((r["data_growth_mib"] for r in ranks if r.get("data_growth_mib") is not None),
                               default=None),
        "peak_data_mib": max((r["peak_data_mib"] for r in ranks if r.get("peak_data_mib") is not None),
                             default=None),
        "memory_probe": "; ".join(sorted({r["memory_probe"] for r in ranks})),
        "memory_probe_ms": float(np.median([r["memory_probe_ms"] for r in ranks])),
        # Counters a mode does not issue count 0.
        **{k: max(r["exchange"].get(k, 0) for r in ranks) for k in EXCHANGE_METRICS},
        "alltoall_imbalance": receive_imbalance([r["exchange"].get("alltoall_lookups_served", 0) for r in ranks]),
        **useful_metrics(ranks),
    }
    network = network_of_ranks(ranks)
    # What the pace-setting rank spent on the exchange: its wait plus the exchange's own work in the other phases.
    exchange_ms = float(np.median([ranks[r]["phase_ms"]["exchange_wait"][s] + ranks[r]["work_ms"][s]
                                   for s, r in enumerate(slowest_rank)]))
    metrics |= price_exchange(point, metrics, exchange_ms, network["transport"])
    # Emulated hosts (slurm/cluster.sh) are namespaces of this one machine: their ranks time-share its cores.
    shared = network["transport"] == "tcp" and shares_one_machine(network["hosts"])
    return point_record(
        point, "ok", reason=None, started_at=started_at, wall_seconds=wall_seconds,
        oversubscribed=point_oversubscribed(point.np, ranks, one_machine=shared), metrics=metrics, ranks=ranks,
        threads_per_rank=point.threads_per_rank,
        batch_per_rank=per_rank, global_batch=global_batch,
        **network,  # hosts, ranks_per_host, transport
        exchange_backend=point.exchange_backend,
        # what the ranks ran with (the launcher's knobs, or the point's own launch_env over them): a before/after of
        # a launch setting is read from the records themselves. Gloo's interface is where the ranks talk, not a
        # knob, and differs between a local and an allocated launch (environment.json keeps it).
        horovod_settings={k: v for k, v in sorted(os.environ.items())
                          if (k.startswith("HOROVOD_") and k != "HOROVOD_GLOO_IFACE")
                          or k == grouped_gather.VARIABLE},
        launch_env=point.launch_env,
        horovod_controller=os.environ.get("HOROVOD_CONTROLLER", "mpi") if point.exchange_backend == "horovod"
        else None,
        # This host's egress as tc has it (the emulated cluster shapes every host alike); only between hosts.
        link=link_as_configured() if network["transport"] == "tcp" else None,
        # auto: the costs it decided with (calibration file and date, costs.json, or built-in); None in fixed modes
        auto_costs=ranks[0].get("auto_costs"),
        step_time_ms_slowest_rank=slowest.tolist(),
        sharding=ranks[0].get("sharding"),
    )


def receive_imbalance(served: list[float]) -> float | None:
    """Max over mean of the lookups each rank served per step (its median): the all-to-all splits' imbalance, 1.0
    when even; None when no all-to-all ran."""
    mean = float(np.mean(served))
    return float(max(served)) / mean if mean > 0 else None


def price_exchange(point: PointConfig, counters: dict, exchange_ms: float, transport: str) -> dict:
    """exchange_ideal_ms and exchange_efficiency of the point (bench.model.exchange_price), priced with the host's
    comm fit, or with the measured comm rows ALURE_BENCH_COMM_ROWS names (bench.model.row_price, the fit pricing
    what they lack); where nothing is exchanged (np=1, the co-run baseline) the ideal is 0 and no model is
    consulted."""
    if point.np == 1 or point.corun:
        return {"exchange_ideal_ms": 0.0, "exchange_ms": exchange_ms, "exchange_efficiency": None,
                "exchange_priced": None, "exchange_model": None}
    model = host_collective_model(transport)
    if rows_named():
        model = measured_rows(rows_named(), point.exchange_backend, point.np, fallback=model)
    return exchange_price(counters, point.np, exchange_ms, model)


def main(argv: list[str] | None = None) -> int:
    return point_program.main("python -m bench.ranks.worker", measure, build_record, argv)


if __name__ == "__main__":
    sys.exit(main())
