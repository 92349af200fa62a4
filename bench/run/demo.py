"""The two-run memory demonstrations (`alure-bench oom-demo`, `shard-demo`; docs/usage.md "The memory cap"): measure
a sweep uncapped, derive a cap from what it measured, run it again under the cap and check the prediction. The cap
derivations (`derive_cap` for training growth, `derive_budget` for a rank's whole data segment), the check, and the
one runner both commands use (`run_demo`)."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.plan.config import REPLICATED_MODES, SweepConfig
from bench.results.records import atomic_write_json
from bench.results.report import write_report
from bench.run.sweep import SweepInterrupted, run_sweep, start_sweep

MARGIN_MIB = 32.0
"""Least distance, in MiB of growth, between the allowance and any growth it is predicted to pass or stop."""
MARGIN_SHARE = 0.10
"""... or this share of dense-reduce's growth, if larger: measured growth varies by a few percent between runs."""
MODES = ("sparse-gather", "dense-reduce")
"""The two modes whose cliff is shown: the one whose memory grows with P, and the one that stays flat."""
GROWTH = "data_growth_mib"
"""The summary column the cap is derived from (bench.ranks.worker: VmData at each step's end above its built size)."""
HEAP_KEPT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""Both runs' ranks allocate from the heap only and never hand its top back: the data segment then never shrinks,
so its size at a step's end is the step's peak, and a capped run meets the cap where the uncapped one grew past it.
(The launcher's default allocator already serves everything from the heap, but returns more than 256 MiB of free
top: a step's transient peak could hide from the step-end sample.)"""


@dataclass(frozen=True, slots=True)
class CapDerivation:
    """The allowance and what it predicts, from one uncapped sweep."""

    allowance_mib: float
    """The training-growth cap: midway between dense_max_mib and sparse_cliff_mib."""
    margin_mib: float
    """Growth within this distance of the allowance is not predicted either way."""
    dense_max_mib: float
    """dense-reduce's largest training growth at any np."""
    cliff_np: int
    """The first np where sparse-gather's growth clears dense_max_mib by twice the margin."""
    sparse_cliff_mib: float
    """sparse-gather's growth at cliff_np."""
    growth_mib: dict
    """'mode np' -> measured growth (median over repeats)."""
    predicted: dict
    """'mode np' -> ok, oom, or '?' where the growth lies within the margin of the allowance."""


def growth_table(df: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(mode, np) -> median training growth over the ok weak points of the two modes."""
    ok = df[(df["status"] == "ok") & (df["scaling"] == "weak") & df["mode"].isin(MODES)]
    if ok[GROWTH].isna().any():
        raise UsageError(f"the uncapped sweep's records lack {GROWTH} (written before it was measured, or on a "
                         f"system without VmData in /proc/self/status): rerun the demonstration with this version")
    return {(m, int(n)): float(g) for (m, n), g in ok.groupby(["mode", "np"])[GROWTH].median().items()}


def derive_cap(df: pd.DataFrame) -> CapDerivation:
    """The allowance from an uncapped sweep's summary (bench.results.load); UsageError when the sweep shows no
    cliff to demonstrate."""
    growth = growth_table(df)
    nps = sorted({n for _, n in growth})
    missing = [f"{m} np={n}" for m in MODES for n in nps if (m, n) not in growth]
    if not growth or missing:
        raise UsageError(f"the uncapped sweep lacks ok weak points ({', '.join(missing) or 'all'}): both "
                         f"sparse-gather and dense-reduce must run ok at every np before a cap can be derived")
    dense_max = max(growth[("dense-reduce", n)] for n in nps)
    margin = max(MARGIN_MIB, MARGIN_SHARE * dense_max)
    cliff = next((n for n in nps if growth[("sparse-gather", n)] >= dense_max + 2 * margin), None)
    if cliff is None:
        sparse = ", ".join(f"{growth['sparse-gather', n]:.0f}" for n in nps)
        raise UsageError(f"no cliff at np {nps}: sparse-gather's training growth ({sparse} MiB) never clears "
                         f"dense-reduce's largest ({dense_max:.0f} MiB) by 2 x {margin:.0f} MiB; add larger np or "
                         f"a workload whose gradient exchange outweighs its activations")
    allowance = (dense_max + growth[("sparse-gather", cliff)]) / 2
    predicted = {}
    for (mode, n), g in sorted(growth.items()):
        predicted[f"{mode} {n}"] = "oom" if g >= allowance + margin else "ok" if g <= allowance - margin else "?"
    return CapDerivation(allowance_mib=allowance, margin_mib=margin, dense_max_mib=dense_max, cliff_np=cliff,
                         sparse_cliff_mib=growth[("sparse-gather", cliff)],
                         growth_mib={f"{m} {n}": g for (m, n), g in sorted(growth.items())}, predicted=predicted)


def check(derivation: CapDerivation, capped: pd.DataFrame) -> pd.DataFrame:
    """Per mode and np: growth uncapped, predicted outcome, the capped run's statuses, and whether they agree."""
    rows = []
    for key, predicted in derivation.predicted.items():
        mode, n = key.rsplit(" ", 1)
        got = capped[(capped["mode"] == mode) & (capped["np"] == int(n)) & (capped["scaling"] == "weak")]["status"]
        statuses = sorted(set(got))
        agrees = predicted == "?" or (bool(statuses) and statuses == [predicted])
        rows.append({"mode": mode, "np": int(n), "growth_mib": derivation.growth_mib[key], "predicted": predicted,
                     "capped": ",".join(statuses) or "missing", "agrees": agrees})
    return pd.DataFrame(rows)


PEAK = "peak_data_mib"
"""The record metric the budget is derived from (bench.ranks.worker)."""


@dataclass(frozen=True, slots=True)
class BudgetDerivation:
    """The per-rank budget and what it predicts, from one uncapped sweep."""

    budget_mib: float
    """The cap on each rank's data segment: midway between sharded_max_mib and replicated_min_mib."""
    margin_mib: float
    """A peak within this distance of the budget is not predicted either way."""
    sharded_max_mib: float
    """row-wise's largest peak data segment at any np >= 2."""
    replicated_min_mib: float
    """The smallest peak data segment of any replicated point."""
    growth_mib: dict
    """'mode np' -> measured peak data segment (median over repeats); named as oom_demo's, whose check reads it."""
    predicted: dict
    """'mode np' -> ok, oom, or '?' where the peak lies within the margin of the budget."""


def peak_table(records: list[dict]) -> dict[tuple[str, int], float]:
    """(mode, np) -> median peak data segment of the ok weak points."""
    peaks: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r["status"] == "ok" and r["point"]["scaling"] == "weak":
            value = r["metrics"].get(PEAK)
            if value is None:
                raise UsageError(f"{r['point_id']} lacks {PEAK} (recorded before it was measured, or on a system "
                                 f"without VmData in /proc/self/status): rerun the demonstration with this version")
            peaks.setdefault((r["point"]["mode"], r["np"]), []).append(value)
    return {k: float(np.median(v)) for k, v in sorted(peaks.items())}


def derive_budget(peaks: dict[tuple[str, int], float]) -> BudgetDerivation:
    """The budget from the uncapped peaks; UsageError when they show no gap to demonstrate."""
    sharded = [v for (m, n), v in peaks.items() if m == "row-wise" and n >= 2]
    replicated = [v for (m, _), v in peaks.items() if m in REPLICATED_MODES]
    if not sharded or not replicated:
        raise UsageError("the uncapped sweep lacks ok weak points of row-wise at np >= 2 or of a replicated mode: "
                         "both must run ok before a budget can be derived")
    high, low = max(sharded), min(replicated)
    margin = max(MARGIN_MIB, MARGIN_SHARE * high)
    if low < high + 2 * margin:
        raise UsageError(f"no gap: the replicated modes' smallest peak ({low:.0f} MiB) does not clear row-wise's "
                         f"largest ({high:.0f} MiB) by 2 x {margin:.0f} MiB; use a preset whose tables outweigh "
                         f"the rest of a rank (--preset sharded)")
    budget = (high + low) / 2
    predicted = {f"{m} {n}": "oom" if v >= budget + margin else "ok" if v <= budget - margin else "?"
                 for (m, n), v in peaks.items()}
    return BudgetDerivation(budget_mib=budget, margin_mib=margin, sharded_max_mib=high, replicated_min_mib=low,
                            growth_mib={f"{m} {n}": v for (m, n), v in peaks.items()}, predicted=predicted)


def run_demo(config: SweepConfig, out: Path, *, derive: Callable[[Path], object], cap: Callable[[object], dict],
             derivation_file: str, outcome_file: str, derived: Callable[[object], str],
             capped_as: Callable[[object], str], measured_as: str = "growth_mib") -> tuple[object, bool] | None:
    """Measure `config`'s weak points uncapped into out/uncapped, `derive` a cap from that folder (written to
    `derivation_file` with the allocator environment), run them again with the config fields `cap` returns into
    out/capped, and `check` the prediction against the capped run's summary: the table is printed and written to
    `outcome_file` (its measured column named `measured_as`). `derived` and `capped_as` say the derivation and the
    capped run in a line each. Returns (derivation, whether every point fell as predicted), or None when interrupted
    (what finished is kept)."""
    # The demonstrations are about memory: the co-run baseline's timings say nothing there (and its mode would read
    # as the sweep's own); no cap of the sweep's own carries over.
    config = replace(config, scalings=["weak"], mem_limit_mib=0, train_mem_limit_mib=0, corun=False)
    os.environ.update(HEAP_KEPT)  # both runs' launches inherit it (a variable set before a launch wins)
    try:
        print(f"1/2 uncapped: {len(config.plan())} points into {out / 'uncapped'}", flush=True)
        start_sweep(config, out / "uncapped")
        run_sweep(config, out / "uncapped")
        derivation = derive(out / "uncapped")
        atomic_write_json(out / derivation_file, {**asdict(derivation), "allocator_environment": HEAP_KEPT})
        print(derived(derivation), flush=True)
        capped = replace(config, **cap(derivation))
        print(f"2/2 {capped_as(derivation)}: into {out / 'capped'}", flush=True)
        start_sweep(capped, out / "capped")
        run_sweep(capped, out / "capped")
    except SweepInterrupted:
        print(f"interrupted: what finished is kept in {out}", file=sys.stderr)
        return None
    table = check(derivation, write_report(out / "capped")).rename(columns={"growth_mib": measured_as})
    atomic_write_json(out / outcome_file, table.to_dict(orient="records"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    return derivation, bool(table["agrees"].all())
