"""`alure-bench compare A B`: two results folders side by side, per point, as a CI gate.

Per point (its stage and graph strategy, scaling, mode, preset, threads per rank and np, as the summary keys it): the
median step time of each (over repeats), the ratio B/A and its noise band [B low / A high, B high / A low] from the
95% confidence intervals of the two medians. A point is slower when the
ratio exceeds 1 + threshold and even the band's low end is above 1 (the difference is not noise); a point ok in A and
failed, oom or timed out in B is a regression too. The exit code is 1 when any point regressed, 0 otherwise, 2 for bad
input.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.errors import UsageError
from bench.results.compare import compare, format_table, point_label, regressions
from bench.results.records import atomic_write_text, load


def cmd_compare(args: argparse.Namespace) -> int:
    frames = []
    for flag, folder in (("A", args.a), ("B", args.b)):
        if not Path(folder).is_dir():
            raise UsageError(f"{flag} = {folder} is not a folder: give two results folders written by alure-bench "
                             f"sweep")
        frames.append(load(folder))
    a, b = frames
    presets = {str(p) for p in pd.concat([a["preset"], b["preset"]]).dropna().unique()}
    if len(presets) > 1:
        raise UsageError(f"A and B ran different presets ({', '.join(sorted(presets))}): compare sweeps of the same "
                         f"workload")
    table = compare(a, b, args.threshold)
    print(f"A = {args.a}\nB = {args.b}\nratio = B / A of the median step time; band = [B low / A high, "
          f"B high / A low] of their 95% intervals; slower = ratio > {1 + args.threshold:.2f} with the whole band "
          f"above 1\n")
    print(format_table(table))
    if args.csv:
        atomic_write_text(args.csv, table.to_csv(index=False))
    bad = regressions(table)
    both = table["ratio"].notna().sum()
    if bad.empty:
        print(f"\nno regression: {both} points in both, none slower beyond {args.threshold:.0%} and its noise band")
        return 0
    print(f"\n{len(bad)} regressed point(s): " + "; ".join(f"{point_label(r)} {r.verdict}"
                                                         for r in bad.itertuples()))
    return 1


def register(sub) -> None:
    p = sub.add_parser("compare", help="two results folders side by side: per-point ratio with its noise band; "
                                       "exit 1 when a point got slower beyond a threshold (a CI gate)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("a", metavar="A", help="the baseline results folder")
    p.add_argument("b", metavar="B", help="the results folder to check against it")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="tolerated slow-down before a point counts as slower (default 0.10: 10%%)")
    p.add_argument("--csv", metavar="FILE", help="also write the comparison table as CSV")
    p.set_defaults(func=cmd_compare)
