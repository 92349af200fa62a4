"""One writer per results folder.

`sweep`, `run` and `sweep --resume` hold an exclusive flock on `<folder>/.alure-bench.lock` while they write the
folder; a second writer is refused with one line naming the process that holds it. The kernel drops a flock when
its holder dies however it dies, so a lock left by a killed command is simply taken over (the file's stale pid is
overwritten). Slurm array tasks take no lock: each writes only its own point's file.

On NFS, Linux turns flock into a POSIX record lock the server arbitrates, so the lock holds across nodes too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from bench.errors import MachineFault, UsageError
from bench.results.records import utc_now

LOCK_FILE = ".alure-bench.lock"


class FolderBusy(UsageError):
    """Another process is writing the folder."""


def holder_of(folder: str | Path) -> dict | None:
    """What the folder's lock file says about its holder (pid, host, command, since); None if it says nothing."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, since "
            f"{holder.get('since')})")


@contextmanager
def exclusive_writer(folder: str | Path):
    """Hold `folder` for writing for the length of the block; FolderBusy if another process holds it."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    fd = _acquire(path)
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(_command_line()),
              "since": utc_now()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as err:
            raise (MachineFault.from_os_error(err, path) or err) from err
        yield
    finally:
        # Unlink while still holding the lock: a writer that opened the old file sees it replaced and retries
        # (`_acquire`), so two writers can never hold locks on two different files. A file system gone read-only
        # or failing may refuse the unlink: the lock still ends with the descriptor, and the fault that brought
        # us here must not be hidden by a second one.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise (MachineFault.from_os_error(err, path) or err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"cannot lock results folder {path.parent} ({err.strerror}): choose another "
                                 f"with --out") from None
            raise FolderBusy(f"{path.parent} is being written by {describe_holder(holder_of(path.parent))}: wait "
                             f"for it to finish or stop it, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder finished and removed the file between our open and our lock: try again


def _command_line() -> list[str]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "alure-bench"
    else:
        argv[0] = Path(argv[0]).name if argv else "python"
    return argv
