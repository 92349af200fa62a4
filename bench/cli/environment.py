"""`alure-bench env`: print what a result would be recorded with (bench.launch.environment)."""
from __future__ import annotations

import json

from bench.launch.environment import capture_environment


def register(sub) -> None:
    """`alure-bench env`."""
    def run(args):
        print(json.dumps(capture_environment(), indent=2))
    parser = sub.add_parser("env", help="print the environment record (versions, Horovod build, MPI library, CPU, "
                                        "git state, HOROVOD_/OMPI_/SLURM_ variables) as JSON")
    parser.set_defaults(func=run)
