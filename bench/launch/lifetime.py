"""No process a launch starts outlives the launch, however it ends.

Three layers, each covering what the others cannot:
- **Tags.** Every launch exports ALURE_BENCH_LAUNCH (unique to the launch) and ALURE_BENCH_SESSION (who started it:
  inherited when set, e.g. by a test session, else the command's own id) into mpirun's environment; mpirun passes
  them to every rank. A rank keeps them whoever re-parents it, so `tagged_processes` finds all of a launch's
  processes, in any process group (Open MPI puts each rank in a group of its own) and under any parent.
- **Parent-death signals.** mpirun is started with PR_SET_PDEATHSIG=SIGKILL (`die_with_caller`), and each rank
  through bench/launch/rank_guard.py with the same towards mpirun: SIGKILL of the command takes mpirun down, and mpirun's
  death takes its ranks down, with no Python left to clean up.
- **An end for every launch.** `end_launch` (timeout, Ctrl-C, SIGTERM) sends SIGTERM to mpirun and every tagged
  process, then SIGKILL to what is left; `reap_launch` runs after every launch, however it ended, and kills what
  still carries the tag (ranks whose mpirun died mid-spawn).
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.launch.rank_guard import die_with_parent, libc_prctl

SESSION_VAR = "ALURE_BENCH_SESSION"
"""Who started a launch: kept when already set (a test session sets it for everything it starts)."""
LAUNCH_VAR = "ALURE_BENCH_LAUNCH"
"""The one launch a process belongs to."""
RANK_GUARD = Path(__file__).with_name("rank_guard.py")

_launches = itertools.count()


def guarded_argv(argv: list[str]) -> list[str]:
    """`argv` run through the rank guard: the rank dies when the process that started it (mpirun) dies."""
    return [sys.executable, "-I", "-S", str(RANK_GUARD), *argv]


def tag_environment(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """`env` with the session and a new launch id added; (the environment, the launch id)."""
    launch_id = f"{socket.gethostname()}:{os.getpid()}:{next(_launches)}:{time.time_ns()}"
    tagged = dict(env)
    tagged.setdefault(SESSION_VAR, f"{socket.gethostname()}:{os.getpid()}")
    tagged[LAUNCH_VAR] = launch_id
    return tagged, launch_id


def die_with_caller():
    """A `preexec_fn` for Popen: the child gets SIGKILL when this process dies (and exits at once if this process
    died before the child could ask). Call it from the thread that lives as long as the child should: the signal
    follows the thread that forked."""
    caller, prctl = os.getpid(), libc_prctl()

    def preexec() -> None:
        die_with_parent(signal.SIGKILL, prctl)
        if os.getppid() != caller:
            os._exit(137)
    return preexec


def tagged_processes(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment (as they were started) holds name=value, or name=value/anything (a part of
    it: a test gives what it starts a session of its own within the test session's); never this process."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            tag = proc.environ().get(name)
            if tag is not None and (tag == value or tag.startswith(value + "/")) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def end_launch(proc: subprocess.Popen, launch_id: str, grace_s: float = 3.0) -> None:
    """Stop a launch: SIGTERM to its root process `proc` (mpirun), that process's descendants and every process
    tagged with `launch_id`; SIGKILL to any of them still alive after `grace_s`. `proc` is left for its Popen to
    reap."""
    others = _launch_processes(proc.pid, launch_id)
    proc.terminate()
    signal_all(others, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, alive = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
    # mpirun may have forked more ranks meanwhile: look again.
    signal_all(alive + _launch_processes(proc.pid, launch_id), signal.SIGKILL)


def reap_launch(launch_id: str) -> list[int]:
    """SIGKILL whatever still carries `launch_id` once its mpirun has exited; the pids killed."""
    left = tagged_processes(LAUNCH_VAR, launch_id)
    signal_all(left, signal.SIGKILL)
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in left]


def _launch_processes(root: int, launch_id: str) -> list[psutil.Process]:
    """The descendants of `root` and the processes tagged with `launch_id`, `root` itself excepted."""
    try:
        found = {p.pid: p for p in psutil.Process(root).children(recursive=True)}
    except psutil.NoSuchProcess:
        found = {}
    found.update((p.pid, p) for p in tagged_processes(LAUNCH_VAR, launch_id))
    found.pop(root, None)
    return list(found.values())
