"""What the cost model predicts, as tables: per rank count and mode (weak and strong), the sweep's own points beside
their predictions, the crossover density per rank count. `alure-bench predict` prints, plots and writes them; the
notebook reads them too."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.model.step import Machine, Model, this_machine
from bench.plan.config import REPLICATED_MODES
from bench.results.scaling import efficiency

PREDICT_MODES = (*REPLICATED_MODES, "auto")
TABLE_COLUMNS = ["np", "nodes", "mode", "weak_step_ms", "weak_efficiency", "strong_batch_per_rank",
                 "strong_step_ms", "strong_efficiency", "memory_gib", "fits_memory", "exchange_held_mib",
                 "dense_tables"]


def rank_counts(max_np: int, extra: list[int] | None = None) -> list[int]:
    """1, 2, 4, ... up to max_np (and max_np itself), plus any extra counts."""
    if max_np < 1:
        raise UsageError(f"--max-np {max_np} is below 1: give the largest rank count to predict, e.g. 4096")
    counts = {1 << k for k in range(int(math.log2(max_np)) + 1)} | {max_np} | set(extra or [])
    return sorted(c for c in counts if c >= 1)


def prediction_table(model: Model, machine: Machine, nps: list[int], batch_per_rank: float,
                     global_batch: int) -> pd.DataFrame:
    """One row per (np, mode): weak and strong step times and efficiencies, memory per rank (weak)."""
    group = model.profile.group_size
    rows = []
    for mode in PREDICT_MODES:
        weak1 = model.step(machine, 1, mode, batch_per_rank).step_ms
        strong1 = model.step(machine, 1, mode, global_batch).step_ms
        for p in nps:
            weak = model.step(machine, p, mode, batch_per_rank)
            per_rank = global_batch / p
            feasible = per_rank >= group  # a rank's batch is whole groups of in-batch negatives
            strong = model.step(machine, p, mode, per_rank) if feasible else None
            cap = machine.memory_per_rank_bytes
            rows.append({
                "np": p, "nodes": machine.nodes(p), "mode": mode,
                "weak_step_ms": weak.step_ms, "weak_efficiency": efficiency("weak", weak1, weak.step_ms, p),
                "strong_batch_per_rank": per_rank if feasible else np.nan,
                "strong_step_ms": strong.step_ms if strong else np.nan,
                "strong_efficiency": efficiency("strong", strong1, strong.step_ms, p) if strong else np.nan,
                "memory_gib": weak.memory_bytes / 2**30,
                "fits_memory": cap is None or weak.memory_bytes <= cap,
                "exchange_held_mib": weak.exchange_bytes_held / 2**20, "dense_tables": weak.dense_tables,
                "weak_compute_ms": weak.compute_ms, "weak_exchange_ms": weak.exchange_ms,
                "weak_network_ms": weak.network_ms, "weak_hidden_ms": weak.hidden_ms})
    return pd.DataFrame(rows)


def measured_vs_predicted(model: Model, sweep_dir: str | Path, machine: Machine | None = None) -> pd.DataFrame:
    """The sweep's own ok points (median over repeats) beside the model's step time for them on the machine that
    measured them: columns scaling, mode, np, batch_per_rank, oversubscribed, measured_ms, predicted_ms, ratio."""
    from bench.results.records import load
    df = load(sweep_dir)
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise UsageError(f"{sweep_dir} has no ok point to compare the model with")
    machine = machine or this_machine(model.calibration, model.profile, int(ok["np"].max()))
    rows = []
    for (scaling, mode, p), g in ok.groupby(["scaling", "mode", "np"]):
        if mode not in PREDICT_MODES:
            continue
        batch = float(g["batch_per_rank"].median())
        predicted = model.step(machine, int(p), mode, batch).step_ms
        measured = float(g["step_time_ms"].median())
        rows.append({"scaling": scaling, "mode": mode, "np": int(p), "batch_per_rank": batch,
                     "oversubscribed": bool(g["oversubscribed"].any()), "measured_ms": measured,
                     "measured_p10_ms": float(g["step_time_ms_p10"].median()),
                     "measured_p90_ms": float(g["step_time_ms_p90"].median()),
                     "predicted_ms": predicted, "ratio": predicted / measured,
                     "measured_peak_rss_mib": float(g["peak_rss_mib"].median()),
                     "predicted_rss_mib": model.memory_bytes(machine, int(p), mode, batch) / 2**20})
    return pd.DataFrame(rows)


def crossover_table(model: Model, machine: Machine, nps: list[int]) -> pd.DataFrame:
    return pd.DataFrame([{"np": p, "crossover_density": model.crossover_density(machine, p)} for p in nps if p > 1])


def workload_density(model: Model) -> float:
    """Distinct rows a rank's batch (and its negatives) touches over all rows of the item tables (the sweep's
    gradient_density)."""
    items = [t for t in model.profile.tables if t.name.endswith("items.weight")] or list(model.profile.tables)
    batch = model.profile.reference_batch
    return sum(t.distinct(batch, batch) for t in items) / sum(t.rows for t in items)
