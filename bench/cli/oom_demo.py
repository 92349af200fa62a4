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
from pathlib import Path

from bench.errors import UsageError
from bench.plan.config import SweepConfig
from bench.results.records import default_out
from bench.results.report import write_report
from bench.run.demo import MODES, derive_cap, run_demo


def cmd_oom_demo(args: argparse.Namespace) -> int:
    config = SweepConfig.from_toml(args.config)
    if set(config.modes) != set(MODES) or "weak" not in config.scalings:
        raise UsageError(f"{args.config}: the demonstration needs modes = {list(MODES)} and weak scaling (got modes "
                         f"{config.modes}, scalings {config.scalings})")
    out = Path(args.out) if args.out else default_out(config.name)
    ran = run_demo(config, out, derive=lambda folder: derive_cap(write_report(folder)),
                   cap=lambda d: {"train_mem_limit_mib": int(round(d.allowance_mib))},
                   derivation_file="cap.json", outcome_file="cliff.json",
                   derived=lambda d: (f"dense-reduce grows at most {d.dense_max_mib:.0f} MiB; sparse-gather "
                                      f"{d.sparse_cliff_mib:.0f} MiB at np={d.cliff_np}: training cap "
                                      f"{int(round(d.allowance_mib))} MiB (midway; margin {d.margin_mib:.0f} MiB)"),
                   capped_as=lambda d: f"capped at {int(round(d.allowance_mib))} MiB of training growth")
    if ran is None:
        return 130
    derivation, agrees = ran
    if agrees:
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
