"""The results folder: atomic writes, point records, and the one loader that pandas users call.

<root>/<sweep>/
    sweep.json          the resolved SweepConfig
    environment.json    bench.launch.environment.capture_environment()
    points/<id>.json    one record per point (status ok | failed | oom | timeout, with the reason)
    logs/<id>.log       the launch's command line and everything its ranks printed
    handback/<id>/      while a point runs: what each rank hands back (bench.ranks.handback); removed after it
    summary.csv, report.md, *.png   derived by bench.results.report; rebuilt at will
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from bench.errors import UsageError

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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


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
        raise UsageError(f"results folder {folder} is not writable ({err.strerror}): choose another with --out "
                         f"or fix its permissions") from None
    return folder


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
    from bench.results.summary import summarize
    return summarize(read_records(sweep_dir))
