"""Quick or full: the normal test run takes the quick mode (small sizes, few rounds, the whole folder in well under
a minute); ALURE_BENCH_FULL=1 takes the full one. See README.md here for the commands."""
from __future__ import annotations

import os

FULL = os.environ.get("ALURE_BENCH_FULL", "") == "1"
"""True when ALURE_BENCH_FULL=1: more sizes, densities, backends and rounds."""


def pick(quick, full):
    """The quick value in a normal test run, the full one under ALURE_BENCH_FULL=1."""
    return full if FULL else quick
