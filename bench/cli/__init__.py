"""`alure-bench`: the command line. Each command lives in its own module of this package with a
`register(subparsers)` function that adds its parser and sets `func`; this file only collects them and dispatches.
Bad input the user can mend (UsageError) is one line and exit 2; so is a fault of the machine around the results
(MachineFault, or an OSError of a full disk, a quota, a read-only or failing file system that no writer turned into
one), whose line ends with how to go on. Any other exception is a bug of the suite: its traceback, then a line
saying so and where to report it, and exit 1."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import traceback

from bench.errors import USAGE_EXIT_CODE, MachineFault, UsageError
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
    "bench.cli.noise",
    "bench.cli.oom_demo",
    "bench.cli.shard_demo",
    "bench.cli.tune",
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


def output_of(args: argparse.Namespace, err: BaseException) -> str | None:
    """What a failed write was writing: the file the error names, else the folder the command writes (some writers,
    pandas' and matplotlib's, raise without a file name)."""
    return getattr(err, "filename", None) or next(
        (getattr(args, name) for name in ("out", "resume", "dir", "sweep") if getattr(args, name, None)), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # SIGTERM and SIGHUP unwind like Ctrl-C: launches stop their ranks on the way out, records stay.
        with signals_interrupt():
            return args.func(args) or 0
    except UsageError as err:
        # Bad input is the user's to mend: one line, no traceback.
        print(f"alure-bench {args.command}: error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt as err:
        print(f"alure-bench {args.command}: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - not the user's input: the machine's fault, or a bug shown whole
        fault = err if isinstance(err, MachineFault) else MachineFault.from_os_error(err, output_of(args, err))
        if fault is not None:
            # Not a bug either: one line, and (unless the command said better, e.g. `sweep --resume`) the same
            # command again once the machine is mended.
            print(f"alure-bench {args.command}: error: "
                  f"{fault.then(f'run `alure-bench {shlex.join(argv)}` again')}", file=sys.stderr)
            return USAGE_EXIT_CODE
        traceback.print_exc()
        print(f"alure-bench {args.command}: this is a bug of alure-bench, not a mistake in your input: please "
              f"report it with the traceback above ({BUG_REPORT})", file=sys.stderr)
        return BUG_EXIT_CODE
