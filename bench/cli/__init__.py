"""`alure-bench`: the command line. Each command lives in its own module of this package with a
`register(subparsers)` function that adds its parser and sets `func`; this file only collects them and dispatches.
Bad input the user can mend (UsageError) is one line and exit 2; any other exception is a bug of the suite: its
traceback, then a line saying so and where to report it, and exit 1."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from bench.errors import UsageError
from bench.launch.interrupts import INTERRUPTED_EXIT_CODE, signals_interrupt

BUG_EXIT_CODE = 1
BUG_REPORT = "README.md, section 'Reporting a bug'"
"""Where the bug line sends the user: inside the repository, so a clone has it."""

# One module per command (or group of commands), registered in this order in --help.
COMMAND_MODULES = (
    "bench.cli.sweep",
    "bench.cli.slurm",
    "bench.cli.pipeline",
    "bench.cli.environment",
    "bench.cli.comm",
    "bench.cli.calibrate",
    "bench.cli.predict",
    "bench.cli.compare",
    "bench.cli.oom_demo",
    "bench.cli.shard_demo",
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
    except UsageError as err:
        # Bad input is the user's to mend: one line, no traceback.
        print(f"alure-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"alure-bench {args.command}: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception:  # noqa: BLE001 - not the user's input: a bug, shown whole so that it can be reported
        traceback.print_exc()
        print(f"alure-bench {args.command}: this is a bug of alure-bench, not a mistake in your input: please "
              f"report it with the traceback above ({BUG_REPORT})", file=sys.stderr)
        return BUG_EXIT_CODE

