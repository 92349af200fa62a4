"""The results folder: atomic writes, point records, and the one loader that pandas users call.

<root>/<sweep>/
    sweep.json          the resolved SweepConfig
    environment.json    bench.launch.environment.capture_environment()
    points/<id>.json    one record per point (status ok | failed | oom | timeout, with the reason)
    logs/<id>.log       the launch's command line and everything its ranks printed
    handback/<id>/      while a point runs: what each rank hands back (bench.launch.handback); removed after it
    summary.csv, report.md, *.png   derived by bench.results.report; rebuilt at will
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import MachineFault, UsageError

if TYPE_CHECKING:  # rank programs write through this module: they need not load pandas
    import pandas as pd

SCHEMA_VERSION = 1
"""Version of the point record layout; a record of another version is refused with a way to mend it."""
STATUSES = ("ok", "failed", "oom", "timeout")


DEFAULT_ROOT = Path("results/local")
"""Where a command writes unless told --out."""


def default_out(name: str) -> Path:
    """A new folder for a command's results: results/local/<name>-<local time>, suffixed -2, -3, ... when one of
    that name exists already (two commands started within the same second)."""
    base = DEFAULT_ROOT / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def utc_now() -> str:
    """Now, as every record and note of the suite stamps it: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str, *, parents: bool = True) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of one, and no temporary file
    stays behind. `parents`: create the missing folders above it (False: only its own folder, inside one that
    must exist, so that a results folder removed under a running command is not silently made again). A failure
    of the machine (no space, quota, read-only, I/O error) is a MachineFault naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=parents, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a read-only or failing file system may refuse even this
                os.unlink(tmp)
        fault = MachineFault.from_os_error(err, path)
        if fault is not None:
            raise fault from err
        raise


def atomic_write_json(path: str | Path, data, *, parents: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", parents=parents)


def write_csv_atomic(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    """CSV with a header; booleans as true|false (docs/design.md); written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def ensure_writable(folder: str | Path) -> Path:
    """Create `folder` and prove it takes a file, before any point is measured into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as err:
        fault = MachineFault.from_os_error(err, folder)
        if fault is not None:
            raise fault from None
        raise UsageError(f"results folder {folder} is not writable ({err.strerror}): choose another with --out "
                         f"or fix its permissions") from None
    return folder


def free_bytes(folder: str | Path) -> int:
    """What an unprivileged writer may still put on the file system of `folder` (statvfs: available blocks)."""
    try:
        st = os.statvfs(folder)
    except OSError as err:
        fault = MachineFault.from_os_error(err, folder)
        if fault is not None:
            raise fault from None
        raise
    return st.f_bavail * st.f_frsize


# What a point needs on disk while it runs (`room_for_point`): rounded up from the records and logs of the committed
# sweeps (docs/faults.md says how), so that a sweep refuses a folder where not even one point would fit.
RECORD_BASE_BYTES = 8192
"""A point record's part that does not grow with np: the point's config, its metrics, the launch's description."""
RECORD_RANK_BYTES = 4096
"""What each rank adds to the record besides its per-step lists (its memory, exchange counters, host)."""
RECORD_RANK_STEP_BYTES = 512
"""What each rank adds per timed step (its step and phase times, the memory probe's cost)."""
LOG_RANK_BYTES = 8192
"""Allowance per rank and launch attempt for the point's log: a failed launch's holds mpirun's notice and each
rank's traceback."""
BLOCK_BYTES = 4096
"""The smallest space a file takes on common file systems (ext4, xfs, tmpfs pages)."""
REPORT_BYTES = 2**20
"""Allowance for summary.csv, report.md and the plots a sweep writes at its end."""


def _blocks(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def room_for_point(np: int, timed_steps: int, attempts: int = 1) -> int:
    """Bytes a point of `np` ranks and `timed_steps` timed steps (or stage repetitions) needs while it runs and is
    recorded: rank 0's record handed back, one small file and one start marker per other rank, then the record
    and the log (rewritten whole after each attempt, so briefly twice)."""
    record = RECORD_BASE_BYTES + np * (RECORD_RANK_BYTES + timed_steps * RECORD_RANK_STEP_BYTES)
    return _blocks(record) + 2 * np * BLOCK_BYTES + 2 * _blocks(attempts * np * LOG_RANK_BYTES)


def point_record(point, status: str, *, reason: str | None, started_at: str, wall_seconds: float,
                 oversubscribed: bool, metrics: dict | None = None, ranks: list[dict] = (), **fields) -> dict:
    """A point's record (docs/design.md "Results"), composed here for every outcome: the rank programs' ok records
    (their measurements as `metrics`, `ranks` and the `fields` of their kind) and the sweep's failure records.
    `point` is the PointConfig measured."""
    return {"schema_version": SCHEMA_VERSION, "point_id": point.point_id, "point": point.as_dict(), "status": status,
            "reason": reason, "started_at": started_at, "wall_seconds": wall_seconds,
            "oversubscribed": oversubscribed, "np": point.np, **fields, "metrics": metrics, "ranks": list(ranks)}


def point_path(sweep_dir: Path, point_id: str) -> Path:
    return Path(sweep_dir) / "points" / f"{point_id}.json"


def write_record(sweep_dir: Path, record: dict) -> Path:
    path = point_path(sweep_dir, record["point_id"])
    atomic_write_json(path, record)
    return path


def read_record(path: Path) -> dict:
    """One point record, checked for its schema version."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"point record {path} is not valid JSON ({err.msg}): delete it and rerun with --resume") \
            from None
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"point record {path} has schema version {version}, this alure-bench reads "
                         f"{SCHEMA_VERSION}: rerun that sweep with --resume into a new folder, or use the "
                         f"alure-bench version that wrote it")
    point = record.get("point") or {}
    if point.get("threads_per_rank") == 0 and record.get("threads_per_rank"):
        # Written when 0 meant "cores // np": the point ran with the thread count its record resolved.
        point["threads_per_rank"] = record["threads_per_rank"]
    return record


def read_records(sweep_dir: str | Path) -> list[dict]:
    """Every point record of a sweep folder, in file-name order."""
    points = Path(sweep_dir) / "points"
    if not points.is_dir():
        raise UsageError(f"{sweep_dir} has no points/ folder: give the folder a sweep wrote")
    return [read_record(p) for p in sorted(points.glob("*.json"))]


def load(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep as one pandas table, one row per point (the summary.csv columns and more)."""
    from bench.results.summary import summarize  # imports pandas: only where a folder is loaded
    return summarize(read_records(sweep_dir))
