"""Errors that are not bugs of the suite: the CLI prints them as one line and exits 2, with no traceback.

Raise UsageError for every bad input (flag, file, environment) with what is wrong and how to mend it. Raise
MachineFault where the machine fails the suite around its results (a full disk, an exhausted quota, a read-only
or failing file system, a results folder removed under a running command): bench.results.records and
bench.results.folder_lock raise it where they write, and the command that knows how to go on (`sweep --resume`)
adds that as the next step. Any other exception reaching the CLI is taken for a bug of the suite and shown with
its traceback."""
from __future__ import annotations

import errno
import os
from pathlib import Path

USAGE_EXIT_CODE = 2
"""Bad input, or a machine fault: nothing to report, something to mend before running again."""


class UsageError(Exception):
    """Bad input: the message says what is wrong and how to mend it."""


FOLDER_GONE = errno.ENOENT
"""The errno a MachineFault carries when the results folder itself was removed (or moved) while a command ran."""

MACHINE_ERRNOS = {
    errno.ENOSPC: ("no space left on its file system", "free space there (`df -h {folder}`)"),
    errno.EDQUOT: ("your disk quota there is used up", "free space within your quota (`quota -s`) or ask for more"),
    errno.EROFS: ("its file system is read-only (mounted so, or remounted read-only after an error)",
                  "remount it read-write (`mount -o remount,rw`), or move the folder to a writable file system"),
    errno.EIO: ("an I/O error of the disk or network file system under it",
                "check that storage (`dmesg`, or ask its administrator) and free it of the fault"),
    errno.ESTALE: ("its network file system handle went stale (the folder was removed or replaced on the server)",
                   "check that the folder still exists on the server"),
}
"""errno -> (what went wrong, what to do): the failures of the machine, not of the suite or of its input."""


class MachineFault(Exception):
    """The machine failed the suite where it writes: `path` could not be written (or the results folder is gone).
    Its message is one line: the file, what went wrong, what to do, and then how to go on (`next_step`, added by
    the command that knows it: `then`)."""

    def __init__(self, path: str | Path, code: int, next_step: str = "", detail: str = "",
                 folder: str | Path | None = None):
        super().__init__(path, code)
        self.path = Path(path)
        self.errno = code
        self.next_step = next_step
        self.detail = detail
        """What was measured about the fault (e.g. the free space against the space needed)."""
        self.folder = Path(folder) if folder is not None else None
        """The folder the remedy names (`df -h`); default: `path`'s own (or `path`, a folder)."""

    @classmethod
    def from_os_error(cls, err: BaseException, path: str | Path | None = None) -> MachineFault | None:
        """The fault an OSError stands for (None when it is no failure of the machine): `path` is the file being
        written (default: the one the error names)."""
        if not isinstance(err, OSError) or err.errno not in MACHINE_ERRNOS:
            return None
        where = path if path is not None else err.filename
        return cls(where if where is not None else "the results", err.errno)

    @classmethod
    def folder_gone(cls, folder: str | Path) -> MachineFault:
        return cls(folder, FOLDER_GONE)

    def then(self, next_step: str) -> MachineFault:
        """This fault, telling how to go on once it is mended (unless a command nearer the fault already said)."""
        if not self.next_step:
            self.next_step = next_step
        return self

    def as_dict(self) -> dict:
        """What a rank prints for its launcher (bench.launch.handback): enough to raise the same fault there."""
        return {"path": str(self.path), "errno": self.errno}

    @classmethod
    def from_dict(cls, data: dict) -> MachineFault:
        return cls(data["path"], int(data["errno"]))

    def __str__(self) -> str:
        if self.errno == FOLDER_GONE:
            said = (f"results folder {self.path} is gone (removed or moved while the command ran; the records it "
                    f"held went with it): put it back")
        else:
            problem, remedy = MACHINE_ERRNOS[self.errno]
            folder = self.folder or (self.path if os.path.isdir(self.path) else self.path.parent)  # never raises
            said = (f"cannot write {self.path}: {problem}{f' ({self.detail})' if self.detail else ''}: "
                    f"{remedy.format(folder=folder)}")
        return f"{said}, then {self.next_step}" if self.next_step else said
