"""What the cost model predicts, as tables: per rank count and mode (weak and strong), the sweep's own points beside
their predictions, the crossover density per rank count. `alure-bench predict` prints, plots and writes them; the
notebook reads them too."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.model.step import Machine, Model, auto_sharded_tables, this_machine
from bench.plan.config import REPLICATED_MODES, SHARDED_MODES
from bench.results.records import load, read_records
from bench.results.scaling import efficiency

PREDICT_MODES = (*REPLICATED_MODES, "auto", *SHARDED_MODES)
OUT_OF_MEMORY = "out of memory"
"""The status of a predicted step whose memory per rank exceeds the machine's (it has no step time, no efficiency)."""
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
    """One row per (np, mode): weak and strong step times and efficiencies, memory per rank of each. A step whose
    memory does not fit the machine's memory per rank (or whose np=1 baseline does not) has no step time and no
    efficiency: its status says out of memory (`weak_status`, `strong_status`)."""
    group = model.profile.group_size
    cap = machine.memory_per_rank_bytes
    fits = lambda s: cap is None or s.memory_bytes <= cap  # noqa: E731
    rows = []
    for mode in PREDICT_MODES:
        weak1 = model.step(machine, 1, mode, batch_per_rank)
        strong1 = model.step(machine, 1, mode, global_batch)
        for p in nps:
            weak = model.step(machine, p, mode, batch_per_rank)
            per_rank = global_batch / p
            feasible = per_rank >= group  # a rank's batch is whole groups of in-batch negatives
            strong = model.step(machine, p, mode, per_rank) if feasible else None
            weak_ok, strong_ok = fits(weak) and fits(weak1), strong is not None and fits(strong) and fits(strong1)
            rows.append({
                "np": p, "nodes": machine.nodes(p), "mode": mode,
                "weak_step_ms": weak.step_ms if weak_ok else np.nan,
                "weak_efficiency": efficiency("weak", weak1.step_ms, weak.step_ms, p) if weak_ok else np.nan,
                "weak_status": "ok" if weak_ok else OUT_OF_MEMORY,
                "strong_batch_per_rank": per_rank if feasible else np.nan,
                "strong_step_ms": strong.step_ms if strong_ok else np.nan,
                "strong_efficiency": efficiency("strong", strong1.step_ms, strong.step_ms, p) if strong_ok else np.nan,
                "strong_status": "ok" if strong_ok else OUT_OF_MEMORY if feasible else "batch below one group",
                "memory_gib": weak.memory_bytes / 2**30, "fits_memory": fits(weak),
                "strong_memory_gib": strong.memory_bytes / 2**30 if strong else np.nan,
                "exchange_held_mib": weak.exchange_bytes_held / 2**20, "dense_tables": weak.dense_tables,
                "weak_compute_ms": weak.compute_ms, "weak_exchange_ms": weak.exchange_ms,
                "weak_network_ms": weak.network_ms, "weak_hidden_ms": weak.hidden_ms})
    return pd.DataFrame(rows)


def measured_vs_predicted(model: Model, sweep_dir: str | Path, machine: Machine | None = None) -> pd.DataFrame:
    """The sweep's own ok points (median over repeats) beside the model's step time for them on the machine that
    measured them: columns scaling, mode, np, batch_per_rank, oversubscribed, measured_ms, predicted_ms, ratio."""
    df = load(sweep_dir)
    # auto points as they ran: with the tables each sharded (the first repeat's; every repeat decides alike)
    sharded = {(r["point"]["scaling"], r["np"]): auto_sharded_tables(r) for r in read_records(sweep_dir)
               if r["status"] == "ok" and r["point"]["mode"] == "auto"}
    ok = df[df["status"] == "ok"]
    if ok.empty:
        raise UsageError(f"{sweep_dir} has no ok point to compare the model with")
    machine = machine or this_machine(model.calibration, model.profile, int(ok["np"].max()))
    rows = []
    for (scaling, mode, p), g in ok.groupby(["scaling", "mode", "np"]):
        if mode not in PREDICT_MODES:
            continue
        batch = float(g["batch_per_rank"].median())
        given = sharded.get((scaling, int(p))) if mode == "auto" else None
        predicted = model.step(machine, int(p), mode, batch, auto_sharded=given).step_ms
        measured = float(g["step_time_ms"].median())
        rows.append({"scaling": scaling, "mode": mode, "np": int(p), "batch_per_rank": batch,
                     "oversubscribed": bool(g["oversubscribed"].any()), "measured_ms": measured,
                     "measured_p10_ms": float(g["step_time_ms_p10"].median()),
                     "measured_p90_ms": float(g["step_time_ms_p90"].median()),
                     "predicted_ms": predicted, "ratio": predicted / measured,
                     "measured_peak_rss_mib": float(g["peak_rss_mib"].median()),
                     "predicted_rss_mib": model.step(machine, int(p), mode, batch, auto_sharded=given).memory_bytes
                     / 2**20})
    return pd.DataFrame(rows)


def crossover_table(model: Model, machine: Machine, nps: list[int]) -> pd.DataFrame:
    return pd.DataFrame([{"np": p, "crossover_density": model.crossover_density(machine, p)} for p in nps if p > 1])


def workload_density(model: Model) -> float:
    """Distinct rows a rank's batch (and its negatives) touches over all rows of the item tables (the sweep's
    gradient_density)."""
    items = [t for t in model.profile.tables if t.name.endswith("items.weight")] or list(model.profile.tables)
    batch = model.profile.reference_batch
    return sum(t.distinct(batch, batch) for t in items) / sum(t.rows for t in items)


def _link_name(gbps: float) -> str:
    return f"{gbps:.3g} Gb/s"


def label_extrapolation(table: pd.DataFrame, machine: Machine, ranges: dict) -> pd.DataFrame:
    """`table` with `extrapolation`: why a row lies outside the range its mode was validated in (`ranges`: mode ->
    bench.model.validation.ValidatedRange), '' where it lies within; and `validated_range`, that range in words."""
    link = machine.network
    gbps = None if link is None else 8 / link.beta_s_per_byte / 1e9
    reasons, described = [], []
    for row in table.itertuples():
        r = ranges.get(row.mode)
        described.append(r.describe() if r else "none")
        if r is None:
            reasons.append("no validation of this mode held")
            continue
        why = []
        if row.np > max(r.nps) or row.np < min(r.nps):
            why.append(f"np {row.np} outside {min(r.nps)}-{max(r.nps)}")
        if link is None:
            if "shared memory" not in r.links:
                why.append("this machine's shared memory not validated")
        else:
            rates = [float(name.split()[0]) for name in r.links if name.endswith("Gb/s")]
            if not any(abs(gbps / rate - 1) <= LINK_MATCH for rate in rates):
                why.append(f"a {_link_name(gbps)} link not validated")
            if row.nodes > r.hosts:
                why.append(f"{row.nodes} nodes > {r.hosts}")
        if machine.cpu_speedup != 1:
            why.append(f"CPU speed-up {machine.cpu_speedup:g} assumed")
        if machine.overlap:
            why.append(f"overlap {machine.overlap:g} assumed")
        reasons.append("; ".join(why))
    return table.assign(extrapolation=reasons, validated_range=described)


LINK_MATCH = 0.15
"""A data-sheet link counts as a validated one when its bandwidth is within this share of a link's rate the
validation predicted points over."""
