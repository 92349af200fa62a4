"""What many test files need, defined once: running the CLI, judging its one-line errors, waiting for a condition,
launching rank scripts, reading a sweep's records, and finding the processes this test session started (every
process it starts carries the session's tag, so other sessions on the machine are never counted).

Test files import from here (tests/conftest.py too, for its fixtures); no test file imports another."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil

from bench.launch import lifetime, transport
from bench.launch.handback import collect
from bench.launch.mpirun import run_ranks

CLI = [sys.executable, "-m", "bench.cli"]
"""`alure-bench` as this interpreter runs it."""
TINY = ["--preset", "tiny", "--warmup", "1", "--no-corun"]
"""The quickest sweep a test can ask for (add --steps and the rest); without the co-run baseline points, which
tests/test_efficiency.py runs."""
RANK_SCRIPTS = Path(__file__).parent / "ranks"
HANDBACK_VAR = "RANK_HANDBACK_DIR"
"""Names the folder a rank script hands its record back into (bench.launch.handback; see tests/ranks/)."""

SESSION = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""This test session's tag: tests/conftest.py puts it in the environment, so every process the session starts
inherits it (and every launch passes it on to mpirun and the ranks)."""


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `alure-bench args` to its end (`env`: variables on top of this process's)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """`alure-bench args` run inside this process, with cli()'s result: for commands that fail on their input
    before they launch anything, where starting an interpreter would be most of the test's time."""
    from bench.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    return subprocess.CompletedProcess([*CLI, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: exit 2, no traceback, one line (argparse's own errors: its usage line, then the error); every
    fragment in what was said."""
    assert run.returncode == 2, (run.returncode, run.stdout[-1000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines if not line.startswith(("usage:", " "))]
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    """The first true value of predicate(), polled until `timeout_s`; an AssertionError naming `what` after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def records(out: Path) -> dict[str, dict]:
    """A sweep folder's point records by point id."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((Path(out) / "points").glob("*.json"))}


def launch(np: int, script: str, *args: str, timeout_s: float = 120, env: dict | None = None) -> list[dict]:
    """Run tests/ranks/<script>.py on `np` ranks; return what each rank handed back, in rank order."""
    with tempfile.TemporaryDirectory(prefix="handback-") as folder:
        run = run_ranks(np, [sys.executable, str(RANK_SCRIPTS / f"{script}.py"), *args],
                        shared_memory=transport.mechanism(), timeout_s=timeout_s, env={**os.environ, **(env or {}), HANDBACK_VAR: folder})
        handed = collect(folder)
    assert not run.timed_out, f"{script} on {np} ranks ran past {timeout_s} s\n{run.stderr[-3000:]}"
    assert run.returncode == 0, f"{script} on {np} ranks exited {run.returncode}\n{run.stderr[-3000:]}"
    assert [h["rank"] for h in handed] == list(range(np)), f"expected one record per rank, got {handed}"
    return [h["result"] for h in handed]


# --- the processes a session started ----------------------------------------------------------------------------

def own_session(name: str) -> str:
    """A session within the test session's, so a test sees only what it started."""
    return f"{SESSION}/{name}-{time.time_ns()}"


def session_processes(session: str = SESSION) -> list[psutil.Process]:
    """Live processes started (directly or not) within `session`."""
    return lifetime.tagged_processes(lifetime.SESSION_VAR, session)


def launched(session: str = SESSION) -> list[psutil.Process]:
    """Processes of the launches started within `session`: mpirun, rank guards and ranks (the command itself,
    which carries the session but no launch tag, is not one of them)."""
    found = []
    for p in session_processes(session):
        try:
            if lifetime.LAUNCH_VAR in p.environ():
                found.append(p)
        except psutil.Error:
            pass
    return found


def rank_processes(session: str = SESSION, program: str = "bench.ranks.worker") -> list[psutil.Process]:
    """The rank programs proper (python running `program`) of `session`'s launches, past their guard (mpirun's own
    command line names the program too)."""
    found = []
    for p in launched(session):
        try:
            cmd = p.cmdline()
            if program in cmd and Path(cmd[0]).name.startswith("python") and "rank_guard" not in " ".join(cmd):
                found.append(p)
        except (psutil.Error, IndexError):
            pass
    return found


def mpirun_of(session: str = SESSION) -> list[psutil.Process]:
    """The mpirun processes of `session`'s launches."""
    found = []
    for p in launched(session):
        try:
            if Path(p.cmdline()[0]).name.startswith(("mpirun", "orterun")):
                found.append(p)
        except (psutil.Error, IndexError):
            pass
    return found


def describe(procs: list[psutil.Process]) -> str:
    """One line per process: its pid and command line."""
    lines = []
    for p in procs:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}: (gone)")
    return "\n".join(lines)
