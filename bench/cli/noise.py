"""`alure-bench noise DIR`: how much of a sweep's spread is the machine's, read off its records (bench.results.noise)."""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.errors import UsageError
from bench.results.noise import noise_text
from bench.results.records import read_records


def cmd_noise(args: argparse.Namespace) -> int:
    if not 1 <= args.slot_minutes <= 60 or 60 % args.slot_minutes:
        raise UsageError(f"--slot-minutes {args.slot_minutes} does not divide an hour: give one that does "
                         f"(5, 10, 15, 20, 30, 60)")
    if not (Path(args.dir) / "points").is_dir():
        raise UsageError(f"{args.dir} has no points/ folder: give a results folder written by alure-bench sweep")
    print(noise_text(read_records(args.dir), args.slot_minutes))
    return 0


def register(sub) -> None:
    """`alure-bench noise`."""
    p = sub.add_parser("noise", help="how much of a sweep's spread is the machine's: its np=1 points (the same "
                                     "computation in every mode) per slot of wall time, by what ran before, against "
                                     "np=P of the same round, and within each repeat")
    p.add_argument("dir", help="a results folder written by alure-bench sweep (or slurm collect)")
    p.add_argument("--slot-minutes", type=int, default=10, help="length of the wall-time slots, minutes (default 10)")
    p.set_defaults(func=cmd_noise)
