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
from pathlib import Path

from bench.errors import UsageError
from bench.plan.config import REPLICATED_MODES, SweepConfig
from bench.results.records import default_out, read_records
from bench.results.report import write_report
from bench.run.demo import PEAK, derive_budget, peak_table, run_demo


def cmd_shard_demo(args: argparse.Namespace) -> int:
    config = SweepConfig.from_toml(args.config)
    if "row-wise" not in config.modes or not set(config.modes) & set(REPLICATED_MODES) or max(config.nps) < 2:
        raise UsageError(f"{args.config}: the demonstration needs row-wise, a replicated mode and an np >= 2 (got "
                         f"modes {config.modes}, nps {config.nps})")
    out = Path(args.out) if args.out else default_out(config.name)

    def derive(folder: Path):
        write_report(folder)
        return derive_budget(peak_table(read_records(folder)))
    ran = run_demo(config, out, derive=derive, cap=lambda d: {"mem_limit_mib": int(round(d.budget_mib))},
                   derivation_file="budget.json", outcome_file="outcome.json", measured_as=PEAK,
                   derived=lambda d: (f"row-wise peaks at {d.sharded_max_mib:.0f} MiB per rank, the replicated modes "
                                      f"at {d.replicated_min_mib:.0f} MiB or more: budget {int(round(d.budget_mib))} "
                                      f"MiB (midway; margin {d.margin_mib:.0f} MiB)"),
                   capped_as=lambda d: f"capped at {int(round(d.budget_mib))} MiB per rank")
    if ran is None:
        return 130
    derivation, agrees = ran
    if agrees:
        print(f"sharding won: the replicated modes oom under {int(round(derivation.budget_mib))} MiB per rank, "
              f"row-wise ok from np=2 (results: {out})")
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
