"""Shared test helpers: launching real MPI ranks through the project's own launcher."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.launch import json_after, run_ranks

RANK_SCRIPTS = Path(__file__).parent / "ranks"
RECORD_MARKER = "RANK_RECORD "
"""What a rank script prints before its one JSON record (see tests/ranks/)."""


def launch(np: int, script: str, *args: str, timeout_s: float = 120, env: dict | None = None) -> list[dict]:
    """Run tests/ranks/<script>.py on `np` ranks; return the JSON line each rank printed, in rank order."""
    run = run_ranks(np, [sys.executable, str(RANK_SCRIPTS / f"{script}.py"), *args], timeout_s=timeout_s,
                    env={**os.environ, **(env or {})})
    assert not run.timed_out, f"{script} on {np} ranks ran past {timeout_s} s\n{run.stderr[-3000:]}"
    assert run.returncode == 0, f"{script} on {np} ranks exited {run.returncode}\n{run.stderr[-3000:]}"
    records = json_after(run.stdout, RECORD_MARKER)
    assert len(records) == np, f"expected one record per rank, got {len(records)}\n{run.stdout[-3000:]}"
    return sorted(records, key=lambda r: r["rank"])


@pytest.fixture
def mpi_launch():
    return launch
