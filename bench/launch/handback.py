"""The one way every rank program hands its results back to the command that launched it.

The launcher names a folder (on storage every host of the launch sees: the sweep's own folder, or a temporary one
for a single-host launch); each rank writes one file `rank<r>.json` into it, atomically, whether it succeeded
(`hand_back`: {"rank", "status": "ok", "result"}) or failed (`hand_back_failure`: {"rank", "status": "oom" |
"failed", "reason"}, the traceback going to stderr for the log); the launcher reads the folder once the ranks have
exited (`collect`). A rank killed from outside (a signal, the kernel's OOM killer, a timeout) writes nothing: the
launcher then judges from mpirun's exit and output.

Two more things pass this way. A rank marks `measuring-rank<r>` as it begins to measure (`mark_measuring`), after
the launch, its transport and the exchange are up: a failed point with no such mark failed in its launch, which
`sweep --retries` may try again (`measured_ranks`). And a rank that cannot write here because the machine fails it
(a full disk, a read-only file system: bench.errors.MachineFault) says so on stderr in one marked line
(`machine_fault_in` reads it back), so the launcher stops with that fault instead of recording a failed point.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from bench.errors import MachineFault
from bench.results.records import atomic_write_json

MACHINE_FAULT_MARK = "alure-bench machine fault: "
"""Starts the stderr line of a rank that could not hand back because of the machine; JSON follows."""

OOM_MARKERS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "out of memory",
               "std::bad_alloc", "memoryerror")
"""Lower-case fragments by which torch, Horovod's C++ core, MPI and Python say an allocation failed."""


def looks_like_oom(text: str) -> bool:
    """Whether a traceback or a launch's output says an allocation failed (OOM_MARKERS)."""
    text = text.lower()
    return any(marker in text for marker in OOM_MARKERS)


def rank_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.json"


def _marker(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"measuring-rank{rank}"


def launched_rank() -> int:
    """This process's rank as mpirun told it, before any library is up (0 outside mpirun)."""
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))


def _write(folder: str | Path, path: Path, data) -> None:
    # The launcher made the folder: a rank never makes it (or the results folder above it) again.
    atomic_write_json(path, data, parents=False)


def mark_measuring(folder: str | Path, rank: int) -> None:
    """This rank's launch is up (its transport connected, its exchange made) and it begins to measure: a failure
    from here on is the point's result, never a failed launch to retry."""
    _write(folder, _marker(folder, rank), {"rank": rank})


def measured_ranks(folder: str | Path) -> list[int]:
    """The ranks that began to measure (`mark_measuring`)."""
    return sorted(int(p.name.removeprefix("measuring-rank")) for p in Path(folder).glob("measuring-rank*"))


def hand_back(folder: str | Path, rank: int, result) -> None:
    """This rank succeeded; `result` (anything JSON can hold) is what it hands back."""
    _write(folder, rank_file(folder, rank), {"rank": rank, "status": "ok", "result": result})


def hand_back_failure(folder: str | Path, rank: int, err: BaseException) -> None:
    """This rank failed: its classified reason for the launcher, its traceback on stderr for whoever reads the
    log; a fault of the machine (in `err`, or in writing the failure) in its marked line."""
    text = "".join(traceback.format_exception(err))
    status = "oom" if isinstance(err, MemoryError) or looks_like_oom(text) else "failed"
    reason = f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    print(text, file=sys.stderr, flush=True)
    fault = err if isinstance(err, MachineFault) else None
    try:
        _write(folder, rank_file(folder, rank), {"rank": rank, "status": status, "reason": reason})
    except MachineFault as write_fault:
        fault = fault or write_fault
    except OSError as write_err:  # the folder went away: the launcher still has the traceback on stderr
        print(f"rank {rank}: could not hand back the failure: {write_err}", file=sys.stderr, flush=True)
    if fault is not None:
        print(MACHINE_FAULT_MARK + json.dumps(fault.as_dict()), file=sys.stderr, flush=True)


def machine_fault_in(stderr: str) -> MachineFault | None:
    """The first machine fault a rank reported in the launch's stderr (`hand_back_failure`), if any."""
    for line in stderr.splitlines():
        at = line.find(MACHINE_FAULT_MARK)
        if at >= 0:
            try:
                return MachineFault.from_dict(json.loads(line[at + len(MACHINE_FAULT_MARK):]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a dying rank: look on
    return None


def collect(folder: str | Path) -> list[dict]:
    """What the ranks handed back, in rank order (a rank that wrote nothing is missing)."""
    files = sorted(Path(folder).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


def failures(handed: list[dict]) -> list[dict]:
    """The failed ranks' entries, an out-of-memory one first (it explains the others' broken collectives)."""
    failed = [h for h in handed if h["status"] != "ok"]
    return sorted(failed, key=lambda h: h["status"] != "oom")
