"""Made-up results written by the harness's own writers (bench.ranks.worker.build_record,
bench.results.comm_rows.comm_row): sweeps and comm runs whose timings follow a known model, for the cost-model,
predict, validation, compare and notebook tests. They take seconds, where real ranks take minutes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.model.collectives import Link, allgather_s, allreduce_s
from bench.plan.config import PointConfig, SweepConfig
from bench.ranks.exchange import ExchangeCounters
from bench.results.comm_rows import comm_row
from bench.results.records import atomic_write_json, write_record
from bench.results.scaling import PHASES

LINK = Link(alpha_s=20e-6, beta_s_per_byte=1e-9, gamma_s_per_byte=0.25e-9)
SHM = Link(alpha_s=20e-6, beta_s_per_byte=1e-9, gamma_s_per_byte=0.5e-9)


def synthetic_rows(link: Link, nps=(2, 4), noise=0.0, seed=0, sizes=range(10, 27, 2), transport=None) -> list[dict]:
    """comm rows (bench.results.comm_rows.comm_row) whose latencies follow the model exactly, or with multiplicative
    noise; sizes are powers of two; `transport` is written into every row when given."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in nps:
        for size in (1 << k for k in sizes):
            for op, seconds in (("allreduce", allreduce_s(size, p, link)), ("allgather", allgather_s(size, p, link)),
                                ("sparse-pair", allgather_s(size, p, link) + (p - 1) * link.alpha_s)):
                t = seconds * (1 + noise * rng.standard_normal())
                rows.append(comm_row("horovod", op, p, size, size, [t] * 3, tensors=1, warmup=1, oversubscribed=False)
                            | ({"transport": transport} if transport else {}))
    for size in (1 << 20, 1 << 24):
        rows.append(comm_row("memcpy", "memcpy", 1, size, size, [size * 1e-10] * 3, tensors=1, warmup=1,
                             oversubscribed=False))
    return rows


def point_record(point: PointConfig, step_ms: float, rss_mib: float = 400.0, held: float = 0.0) -> dict:
    """A point's record as the worker writes it, for made-up per-rank measurements."""
    from bench.ranks.worker import build_record
    steps = 5
    phases = {"data": 0.05, "forward": 0.3, "backward": 0.45, "exchange_wait": 0.1 if point.np > 1 else 0.0,
              "optimizer": 0.1}
    scale = step_ms / sum(phases.values())
    ranks = []
    for r in range(point.np):
        jitter = [1.0 + 0.05 * ((s + r) % 3 - 1) for s in range(steps)]
        phase_ms = {p: [phases[p] * scale * j for j in jitter] for p in PHASES}
        exchange = {**ExchangeCounters().as_dict(), "allgather_bytes_held": held, "bytes_received": 0}
        ranks.append({"rank": r, "host": "test", "pid": 1000 + r, "host_cores": 2,
                      "step_time_ms": [sum(phase_ms[p][s] for p in PHASES) for s in range(steps)],
                      "phase_ms": phase_ms, "work_ms": [0.0] * steps, "baseline_rss_mib": rss_mib - 20, "peak_rss_mib": rss_mib,
                      "rss_growth_mib": 20.0, "build_peak_rss_mib": rss_mib - 10, "train_peak_rss_mib": rss_mib,
                      "phase_peak_rss_mib": dict.fromkeys(PHASES, rss_mib), "memory_probe": "vmhwm-reset",
                      "memory_probe_ms": [0.1] * steps, "exchange": exchange, "exchange_bytes_held": held,
                      "exchange_bytes_sent": held / max(1, point.np), "exchange_bytes_received": 0.0,
                      "gradient_density": 0.05, "gradient_density_tables": {"items": 0.05}})
    return build_record(point, ranks, 10.0, "2025-01-01T00:00:00+00:00")


def model_sweep(config: SweepConfig, true_local: dict, environment: dict, *, np1_ms: float = 40.0,
                noise: float = 0.0, seed: int = 0, extra_per_rank: float = 0.0, alltoall: Link | None = None,
                imbalance: dict | None = None, with_memory: bool = False) -> list[dict]:
    """Records of `config`'s sweep whose step times a known Model gives: the ring link LINK, `alltoall` for the
    sharded modes, `true_local` seconds per byte of each mode's CPU work, the weak np=1 step `np1_ms`. Every other
    point takes the model's step times (1 + noise x normal) x (1 + extra_per_rank x (np - 2)) at np >= 3, a cost the
    model does not have. `imbalance`: a sharded mode's all-to-all imbalance, in the truth and in its np > 1 records;
    `with_memory`: each record's peak RSS is the model's memory, not point_record's fixed one."""
    from bench.model.calibration import Calibration, FitQuality
    from bench.model.profile import profile_from_records
    from bench.model.step import LocalFit, Model, this_machine
    rng = np.random.default_rng(seed)
    imbalance = imbalance or {}
    plan = config.plan()
    base = [point_record(p, np1_ms) for p in plan if p.np == 1 and p.scaling == "weak"]
    profile = profile_from_records(base, environment)
    quality = FitQuality(rows=0, nps=(), r2=1.0, rms_rel_error=0, max_rel_error=0, median_rel_error=0,
                         holdout_rows=0, holdout_median_rel_error=None)
    truth = Model(profile, Calibration(link=LINK, copy_s_per_byte=None, backend="horovod", quality=quality,
                                       source="truth", alltoall=alltoall),
                  LocalFit(s_per_byte=true_local, points={}, rms_rel_error={}, alltoall_imbalance=imbalance))
    machine = this_machine(truth.calibration, profile, max(config.nps))
    records = list(base)
    for point in plan:
        if point.np == 1 and point.scaling == "weak":
            continue
        batch = point_record(point, 1.0)["batch_per_rank"]
        predicted = truth.step(machine, point.np, point.mode, batch)
        step = predicted.step_ms * (1 + noise * rng.standard_normal()) * (1 + extra_per_rank * max(0, point.np - 2))
        record = point_record(point, step, **({"rss_mib": predicted.memory_bytes / 2**20} if with_memory else {}))
        # exactly `step`: point_record's per-rank jitter would add a rank skew the truth does not have
        metrics = record["metrics"]
        scale = step / metrics["step_time_ms"]
        for key in ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90"):
            metrics[key] *= scale
        if point.mode in imbalance and point.np > 1:
            metrics["alltoall_imbalance"] = imbalance[point.mode]
        records.append(record)
    return records


def make_sweep(folder: Path, nps=(1, 2, 4), slowdown: dict | None = None, failed: set | None = None) -> Path:
    """A tiny-preset sweep folder: weak and strong, both modes, made-up step times that grow with np (dense-reduce
    more), optionally some points slower by a factor or failed."""
    config = SweepConfig(name="test", preset="tiny", nps=list(nps), steps=5, global_batch=64, corun=False)
    atomic_write_json(folder / "sweep.json", config.as_dict())
    atomic_write_json(folder / "environment.json", {"cores": 2, "memory_mib": 8192, "cpu_model": "test"})
    for point in config.plan():
        key = (point.scaling, point.mode, point.np)
        if failed and key in failed:
            from bench.run.sweep import failure_record
            write_record(folder, failure_record(point, "oom", "rank 1: MemoryError", 1.0, "2025-01-01"))
            continue
        base = 40.0 if point.scaling == "weak" else 40.0 / point.np
        grow = {"sparse-gather": 6.0, "dense-reduce": 12.0}[point.mode] * (point.np - 1)
        step = (base + grow) * (slowdown or {}).get(key, 1.0)
        write_record(folder, point_record(point, step, 400 + 5 * point.np, 1e5 * point.np))
    return folder


def make_comm(folder: Path) -> Path:
    atomic_write_json(folder / "comm.json", {"kind": "comm", "rows": synthetic_rows(LINK, nps=(2,))})
    return folder


def alltoall_rows(link: Link, nps=(2, 3, 4), sizes=range(10, 25, 2)) -> list[dict]:
    """comm rows of alltoall and alltoall-zipf whose latencies follow the all-to-all model exactly (each rank sends
    the nominal size in all; the zipf rows' hot owner sets the pace)."""
    from bench.model.collectives import alltoall_far_bytes, alltoall_s
    return [comm_row("horovod", op, p, size, size, [alltoall_s(alltoall_far_bytes(op, p, size), p, link)] * 3,
                     tensors=1, warmup=1, oversubscribed=False)
            for p in nps for size in (1 << k for k in sizes) for op in ("alltoall", "alltoall-zipf")]
