"""Run in front of every rank: ask the kernel to kill this process when its parent dies, then become the rank.

The launcher starts each rank as `python -I -S bench/launch/rank_guard.py PROGRAM ARGS...` (bench.launch.lifetime.guarded_argv).
The guard sets the parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL) and execs PROGRAM in the same process;
the setting survives exec. So when mpirun dies by any means (killed, crashed, its own parent killed), its ranks die
with it at once instead of running on under init. It imports nothing outside the standard library, so it runs under
`-I -S` (isolated, no site-packages) and costs a few milliseconds per rank.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
"""prctl option number (linux/prctl.h)."""
ORPHAN_EXIT_CODE = 137
"""What the guard exits with when its parent was already gone: as if the parent-death SIGKILL had come."""


def libc_prctl():
    """libc's prctl. Look it up before a fork: dlopen in a forked child of a threaded process can deadlock."""
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig: int = signal.SIGKILL, prctl=None) -> None:
    """Have the kernel send `sig` to this process when the thread that forked it exits (Linux only)."""
    if (prctl or libc_prctl())(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: rank_guard.py PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    die_with_parent()
    # The parent may have died before the prctl above: then no signal will ever come. An orphan is re-parented (to
    # init or a subreaper), so a changed parent, or init, means the launch is already over.
    if os.getppid() != parent or parent == 1:
        return ORPHAN_EXIT_CODE
    os.execvp(argv[0], argv)
    return 127  # not reached: execvp raises if it fails


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
