"""`alure-bench`: the command line. Each command lives in its own module of this package with a
`register(subparsers)` function that adds its parser and sets `func`; this file only collects them, dispatches and
turns bad input into one line."""
from __future__ import annotations

import argparse
import importlib
import sys

from bench.errors import UsageError
from bench.launch.interrupts import INTERRUPTED_EXIT_CODE, signals_interrupt

# One module per command (or group of commands), registered in this order in --help.
COMMAND_MODULES = (
    "bench.cli.sweep",
    "bench.cli.slurm",
    "bench.cli.pipeline",
    "bench.cli.environment",
    "bench.cli.comm",
    "bench.calibrate_cli",
    "bench.predict",
    "bench.cli.compare",
    "bench.oomcliff",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alure-bench",
        description="Scaling benchmarks for an ALURE recommendation workload on MPI: weak and strong scaling, "
                    "sparse-gather (allgather) vs dense-reduce (allreduce) embedding-gradient exchange.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # SIGTERM and SIGHUP unwind like Ctrl-C: launches stop their ranks on the way out, records stay.
        with signals_interrupt():
            return args.func(args) or 0
    except (UsageError, ValueError, FileNotFoundError, PermissionError) as err:
        # Bad input is the user's to mend: one line, no traceback.
        print(f"alure-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"alure-bench {args.command}: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE

