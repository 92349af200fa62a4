"""`alure-bench`: the command line. Each command lives in its own module; this file only parses and dispatches."""
from __future__ import annotations

import argparse
import json
import sys

from bench.errors import UsageError


def cmd_env(args: argparse.Namespace) -> int:
    from bench.environment import capture_environment
    print(json.dumps(capture_environment(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alure-bench",
        description="Scaling benchmarks for an ALURE recommendation workload on MPI: weak and strong scaling, "
                    "sparse-gather (allgather) vs dense-reduce (allreduce) embedding-gradient exchange.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    env = sub.add_parser("env", help="print the environment record (versions, Horovod build, MPI, CPU, git) as JSON")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as err:
        # Bad input is the user's to mend: one line, no traceback.
        print(f"alure-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alure-bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
