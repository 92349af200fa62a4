"""Shared test helpers: launching real MPI ranks through the project's own launcher."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench.launch import python_module_argv, run_ranks

RANK_SCRIPTS = Path(__file__).parent / "ranks"


def launch(np: int, script: str, *args: str, timeout_s: float = 120, env: dict | None = None) -> list[dict]:
    """Run tests/ranks/<script>.py on `np` ranks; return the JSON line each rank printed, in rank order."""
    run = run_ranks(np, [sys.executable, str(RANK_SCRIPTS / f"{script}.py"), *args], timeout_s=timeout_s,
                    env={**os.environ, **(env or {})})
    assert not run.timed_out, f"{script} on {np} ranks ran past {timeout_s} s\n{run.stderr[-3000:]}"
    assert run.returncode == 0, f"{script} on {np} ranks exited {run.returncode}\n{run.stderr[-3000:]}"
    records = rank_records(run.stdout)
    assert len(records) == np, f"expected one record per rank, got {len(records)}\n{run.stdout[-3000:]}"
    return sorted(records, key=lambda r: r["rank"])


def rank_records(stdout: str) -> list[dict]:
    """Every `{"rank": ...}` object in the ranks' merged output. mpirun forwards each rank's output in chunks, so
    one rank's record can end up on the same line as another's: decode objects, not lines."""
    decoder, records, at = json.JSONDecoder(), [], 0
    while (at := stdout.find('{"rank"', at)) != -1:
        try:
            record, end = decoder.raw_decode(stdout, at)
            records.append(record)
            at = end
        except json.JSONDecodeError:
            at += 1
    return records


@pytest.fixture
def mpi_launch():
    return launch
