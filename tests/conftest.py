"""Shared test helpers: launching real MPI ranks through the project's own launcher; and the session's promise that
nothing it started outlives it."""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from bench.launch import lifetime
from bench.launch.mpirun import run_ranks
from bench.launch.rank_output import json_after

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


# --- nothing outlives the session --------------------------------------------------------------------------------

SESSION = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""Every process this session starts inherits it (and every launch passes it on to mpirun and the ranks), so the
check below sees this session's processes only, not those of other test sessions on the same machine."""
os.environ[lifetime.SESSION_VAR] = SESSION
LEFTOVER_GRACE_S = 10.0


def session_processes() -> list[psutil.Process]:
    """Live processes started (directly or not) by this test session."""
    return lifetime.tagged_processes(lifetime.SESSION_VAR, SESSION)


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}: (gone)")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if any process it started is still alive LEFTOVER_GRACE_S after the last test (then kill
    them, so one failure does not leave the machine loaded)."""
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := session_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(left)} process(es) started by this test session outlived it by {LEFTOVER_GRACE_S:g} s "
               f"(now killed):\n{describe(left)}")
    if report is not None:
        report.ensure_newline()
        report.write_sep("=", "leftover processes", red=True)
        report.write_line(message)
    else:
        print(message, file=sys.stderr)
    lifetime.signal_all(left, 9)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
