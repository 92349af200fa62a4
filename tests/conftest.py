"""Fixtures and the session's promise that nothing it started outlives it. The helpers themselves live in
tests/helpers.py, which test files import (never each other)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from bench.launch import lifetime
from tests.helpers import SESSION, describe, launch, session_processes

os.environ[lifetime.SESSION_VAR] = SESSION
LEFTOVER_GRACE_S = 10.0
SLURM_START_HINT = "start it with: bash slurm/local_cluster.sh start"


@pytest.fixture
def mpi_launch():
    return launch


def _slurm_unavailable(reason: str):
    """Skip, except where the cluster was started for this run (make test sets ALURE_REQUIRE_SLURM=1): there a
    cluster that is not usable is a failure, never a silent skip."""
    if os.environ.get("ALURE_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """The local single-node Slurm cluster of slurm/local_cluster.sh: skip the module unless Slurm is installed and
    its node is usable; return the node's name."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        _slurm_unavailable(f"Slurm client tools (sinfo/sbatch) not installed; {SLURM_START_HINT}")
    ask = dict(capture_output=True, text=True, timeout=10)
    # `scontrol ping` answers at once; sinfo retries a stopped controller for ~9 s.
    try:
        ping = subprocess.run(["scontrol", "ping"], **ask)
    except subprocess.TimeoutExpired:
        _slurm_unavailable(f"scontrol ping timed out: slurmctld does not answer; {SLURM_START_HINT}")
    if " is UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip()).splitlines()[:1]
        _slurm_unavailable(f"slurmctld is not running ({''.join(said) or 'no answer'}); {SLURM_START_HINT}")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], **ask)
    except subprocess.TimeoutExpired:
        _slurm_unavailable(f"sinfo timed out: slurmctld does not answer; {SLURM_START_HINT}")
    if out.returncode != 0:
        _slurm_unavailable(f"slurmctld does not answer ({out.stderr.strip()}); {SLURM_START_HINT}")
    nodes = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    usable = [n for n, state in nodes.items() if state in {"idle", "mixed", "allocated"}]
    if not usable:
        _slurm_unavailable(f"no idle/mixed/allocated node (sinfo: {nodes or 'none'}); {SLURM_START_HINT}")
    return usable[0]


# --- nothing outlives the session --------------------------------------------------------------------------------

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
