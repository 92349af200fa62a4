"""The one way every rank program hands its results back to the command that launched it.

The launcher names a folder (on storage every host of the launch sees: the sweep's own folder, or a temporary one
for a single-host launch); each rank writes one file `rank<r>.json` into it, atomically, whether it succeeded
(`hand_back`: {"rank", "status": "ok", "result"}) or failed (`hand_back_failure`: {"rank", "status": "oom" |
"failed", "reason"}, the traceback going to stderr for the log); the launcher reads the folder once the ranks have
exited (`collect`). A rank killed from outside (a signal, the kernel's OOM killer, a timeout) writes nothing: the
launcher then judges from mpirun's exit and output.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from bench.ranks.memory import looks_like_oom
from bench.results.records import atomic_write_json


def rank_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.json"


def launched_rank() -> int:
    """This process's rank as mpirun told it, before any library is up (0 outside mpirun)."""
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))


def hand_back(folder: str | Path, rank: int, result) -> None:
    """This rank succeeded; `result` (anything JSON can hold) is what it hands back."""
    atomic_write_json(rank_file(folder, rank), {"rank": rank, "status": "ok", "result": result})


def hand_back_failure(folder: str | Path, rank: int, err: BaseException) -> None:
    """This rank failed: its classified reason for the launcher, its traceback on stderr for whoever reads the
    log."""
    text = "".join(traceback.format_exception(err))
    status = "oom" if isinstance(err, MemoryError) or looks_like_oom(text) else "failed"
    reason = f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    print(text, file=sys.stderr, flush=True)
    try:
        atomic_write_json(rank_file(folder, rank), {"rank": rank, "status": status, "reason": reason})
    except OSError as write_err:  # the folder went away: the launcher still has the traceback on stderr
        print(f"rank {rank}: could not hand back the failure: {write_err}", file=sys.stderr, flush=True)


def collect(folder: str | Path) -> list[dict]:
    """What the ranks handed back, in rank order (a rank that wrote nothing is missing)."""
    files = sorted(Path(folder).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]


def failures(handed: list[dict]) -> list[dict]:
    """The failed ranks' entries, an out-of-memory one first (it explains the others' broken collectives)."""
    failed = [h for h in handed if h["status"] != "ok"]
    return sorted(failed, key=lambda h: h["status"] != "oom")
