"""`alure-bench oom-demo`: the out-of-memory cliff of Cavdar et al., with a cap derived from measurement.

A cap picked by hand near the edge does not travel: how much the world, the libraries and the allocator take
differs between machines by more than the gap between the modes. So the demonstration measures first and caps
only what training adds:

1. run the sweep's points uncapped and read each point's training growth (`data_growth_mib`: how far the data
   segment grew above the built workload during warm-up and timed steps; exactly what the cap limits, counted from
   the same base, so a measured growth and a cap are in one unit);
2. take dense-reduce's largest growth at any np, and the first np where sparse-gather's growth clears it by twice
   a margin; the allowance is midway between the two;
3. run the same points again with that allowance as `train_mem_limit_mib` (RLIMIT_DATA set above the built data
   segment, so the build's size drops out), and check the prediction: dense-reduce ok at every np, sparse-gather
   `oom` wherever its measured growth lies a margin above the allowance and ok wherever it lies a margin below.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from bench.errors import UsageError
from bench.plan.config import SweepConfig

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


def cmd_oom_demo(args: argparse.Namespace) -> int:
    from bench.results.records import atomic_write_json, default_out
    from bench.results.report import write_report
    from bench.run.sweep import SweepInterrupted, run_sweep, start_sweep

    config = SweepConfig.from_toml(args.config)
    if set(config.modes) != set(MODES) or "weak" not in config.scalings:
        raise UsageError(f"{args.config}: the demonstration needs modes = {list(MODES)} and weak scaling (got modes "
                         f"{config.modes}, scalings {config.scalings})")
    # The demonstration is about memory: the co-run baseline's timings say nothing there.
    config = replace(config, scalings=["weak"], mem_limit_mib=0, train_mem_limit_mib=0, corun=False)
    out = Path(args.out) if args.out else default_out(config.name)
    os.environ.update(HEAP_KEPT)  # both runs' launches inherit it (a variable set before a launch wins)
    try:
        print(f"1/2 uncapped: {len(config.plan())} points into {out / 'uncapped'}", flush=True)
        start_sweep(config, out / "uncapped")
        run_sweep(config, out / "uncapped")
        derivation = derive_cap(write_report(out / "uncapped"))
        atomic_write_json(out / "cap.json", {**asdict(derivation), "allocator_environment": HEAP_KEPT})
        allowance = int(round(derivation.allowance_mib))
        print(f"dense-reduce grows at most {derivation.dense_max_mib:.0f} MiB; sparse-gather "
              f"{derivation.sparse_cliff_mib:.0f} MiB at np={derivation.cliff_np}: training cap {allowance} MiB "
              f"(midway; margin {derivation.margin_mib:.0f} MiB)", flush=True)
        capped_config = replace(config, train_mem_limit_mib=allowance)
        print(f"2/2 capped at {allowance} MiB of training growth: into {out / 'capped'}", flush=True)
        start_sweep(capped_config, out / "capped")
        run_sweep(capped_config, out / "capped")
    except SweepInterrupted:
        print(f"interrupted: what finished is kept in {out}", file=sys.stderr)
        return 130
    table = check(derivation, write_report(out / "capped"))
    atomic_write_json(out / "cliff.json", table.to_dict(orient="records"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    if table["agrees"].all():
        print(f"the cliff reproduced: dense-reduce ok at every np, sparse-gather oom from np={derivation.cliff_np} "
              f"(results: {out})")
        return 0
    print(f"the cliff did NOT reproduce as predicted (rows with agrees False; results: {out})")
    return 1


def register(sub) -> None:
    p = sub.add_parser("oom-demo", help="the out-of-memory cliff: measure sparse-gather and dense-reduce uncapped, "
                                        "cap training growth midway, rerun and check the prediction",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, metavar="FILE", help="TOML sweep file (e.g. configs/oom-demo.toml)")
    p.add_argument("--out", metavar="DIR", help="results folder (default results/local/<name>-<time>): "
                                                "uncapped/, capped/, cap.json, cliff.json")
    p.set_defaults(func=cmd_oom_demo)
