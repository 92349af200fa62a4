"""`alure-bench shard-demo`: where sharding must win, under a per-rank memory budget derived from measurement.

Replicated, every rank holds every table and its optimizer state whole; row-wise, 1/P of them. The demonstration
measures first and caps second, as `oom-demo` does, but caps the whole data segment (tables and state are made in
the build, so a cap on what training adds would not see them):

1. run the sweep's points uncapped (heap never handed back, so the data segment at a step's end is the run's peak)
   and read each point's `peak_data_mib`: the data segment (VmData, what RLIMIT_DATA caps) at its largest;
2. the budget lies midway between row-wise's largest peak at np >= 2 and the smallest peak of any replicated
   point, which must lie twice a margin apart;
3. run the same points again under that budget (`mem_limit_mib`) and check the prediction: every replicated point
   `oom`, row-wise ok at every np >= 2 (at np=1 row-wise is the bare model, predicted from its own peak).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.cli.oom_demo import HEAP_KEPT, MARGIN_MIB, MARGIN_SHARE, check
from bench.errors import UsageError
from bench.plan.config import REPLICATED_MODES, SweepConfig

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
    import numpy as np
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


def cmd_shard_demo(args: argparse.Namespace) -> int:
    from bench.results.records import atomic_write_json, default_out, read_records
    from bench.results.report import write_report
    from bench.run.sweep import SweepInterrupted, run_sweep, start_sweep

    config = SweepConfig.from_toml(args.config)
    if "row-wise" not in config.modes or not set(config.modes) & set(REPLICATED_MODES) or max(config.nps) < 2:
        raise UsageError(f"{args.config}: the demonstration needs row-wise, a replicated mode and an np >= 2 (got "
                         f"modes {config.modes}, nps {config.nps})")
    # No co-run points: its mode would read as row-wise here, and its peak is not a sharded rank's.
    config = replace(config, scalings=["weak"], mem_limit_mib=0, train_mem_limit_mib=0, corun=False)
    out = Path(args.out) if args.out else default_out(config.name)
    os.environ.update(HEAP_KEPT)  # both runs' launches inherit it
    try:
        print(f"1/2 uncapped: {len(config.plan())} points into {out / 'uncapped'}", flush=True)
        start_sweep(config, out / "uncapped")
        run_sweep(config, out / "uncapped")
        write_report(out / "uncapped")
        derivation = derive_budget(peak_table(read_records(out / "uncapped")))
        atomic_write_json(out / "budget.json", {**asdict(derivation), "allocator_environment": HEAP_KEPT})
        budget = int(round(derivation.budget_mib))
        print(f"row-wise peaks at {derivation.sharded_max_mib:.0f} MiB per rank, the replicated modes at "
              f"{derivation.replicated_min_mib:.0f} MiB or more: budget {budget} MiB (midway; margin "
              f"{derivation.margin_mib:.0f} MiB)", flush=True)
        print(f"2/2 capped at {budget} MiB per rank: into {out / 'capped'}", flush=True)
        start_sweep(replace(config, mem_limit_mib=budget), out / "capped")
        run_sweep(replace(config, mem_limit_mib=budget), out / "capped")
    except SweepInterrupted:
        print(f"interrupted: what finished is kept in {out}", file=sys.stderr)
        return 130
    table = check(derivation, write_report(out / "capped")).rename(columns={"growth_mib": PEAK})
    atomic_write_json(out / "outcome.json", table.to_dict(orient="records"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    if table["agrees"].all():
        print(f"sharding won: the replicated modes oom under {budget} MiB per rank, row-wise ok from np=2 "
              f"(results: {out})")
        return 0
    print(f"the outcome did NOT match the prediction (rows with agrees False; results: {out})")
    return 1


def register(sub) -> None:
    p = sub.add_parser("shard-demo", help="where sharding must win: measure replicated and row-wise uncapped, cap "
                                          "each rank's memory midway, rerun and check the prediction",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, metavar="FILE", help="TOML sweep file (e.g. configs/shard-demo.toml)")
    p.add_argument("--out", metavar="DIR", help="results folder (default results/local/<name>-<time>): "
                                                "uncapped/, capped/, budget.json, outcome.json")
    p.set_defaults(func=cmd_shard_demo)
