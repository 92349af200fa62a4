"""Running a plan of points locally: one mpirun launch per point, every outcome recorded, the sweep going on.

A point whose rank crashes, runs out of memory or hangs past its timeout gets a record with status failed, oom
or timeout and the reason; the next point runs. Ctrl-C or SIGTERM stops the sweep between or during points,
keeping every finished record. `resume` reruns only the points with no ok record.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from bench.errors import UsageError
from bench.launch.environment import capture_environment, launch_environment
from bench.launch.interrupts import Interrupted, signals_interrupt
from bench.launch.mpirun import LOCAL, Launcher, is_oversubscribed, run_ranks
from bench.launch.rank_program import python_module_argv
from bench.plan.config import PointConfig, SweepConfig
from bench.ranks.handback import collect, failures
from bench.ranks.memory import looks_like_oom
from bench.ranks.point_program import point_argv
from bench.results.records import (SCHEMA_VERSION, atomic_write_json, atomic_write_text, ensure_writable, point_path,
                                   read_record, utc_now, write_record)

SWEEP_FILE = "sweep.json"


SweepInterrupted = Interrupted
"""SIGTERM (or Ctrl-C) arrived: stop launching, keep what is recorded (bench.launch.interrupts)."""


def sigterm_interrupts():
    """Turn SIGTERM into an exception, so a batch scheduler's kill unwinds like Ctrl-C: ranks killed, records
    kept."""
    return signals_interrupt()


def classify_failure(timed_out: bool, returncode: int | None, stderr: str, timeout_s: float,
                     failed: list[dict] = ()) -> tuple[str, str]:
    """(status, reason) of a launch that left no ok record; `failed`: what failing ranks handed back
    (bench.ranks.handback.failures), the reason of first resort."""
    if timed_out:
        return "timeout", f"ran past its timeout of {timeout_s:g} s and was killed"
    if failed:
        return failed[0]["status"], failed[0]["reason"]
    if looks_like_oom(stderr):
        return "oom", "out of memory: " + _first_line_matching(stderr, looks_like_oom)
    signalled = re.search(r"exited on signal (\d+) \(([^)]*)\)", stderr)
    if signalled:
        return "failed", f"a rank exited on signal {signalled.group(1)} ({signalled.group(2)})"
    last = [line for line in stderr.splitlines() if line.strip() and not set(line.strip()) <= set("-")]
    return "failed", f"exit code {returncode}: " + (last[-1].strip() if last else "no error output")[:300]


def _first_line_matching(text: str, predicate) -> str:
    return next((line.strip() for line in text.splitlines() if predicate(line)), "")[:300]


def failure_record(point: PointConfig, status: str, reason: str, wall_seconds: float, started_at: str,
                   launcher: Launcher = LOCAL) -> dict:
    # Without the ranks' host list, only a single-host launch can say whether the point was oversubscribed.
    return {"schema_version": SCHEMA_VERSION, "point_id": point.point_id, "point": point.as_dict(),
            "status": status, "reason": reason, "started_at": started_at, "wall_seconds": wall_seconds,
            "oversubscribed": launcher.single_host and is_oversubscribed(point.np), "np": point.np,
            "metrics": None, "ranks": []}


def worker_module(point: PointConfig) -> str:
    """The rank program of a point: training steps, or a whole pipeline stage."""
    return "bench.ranks.worker" if point.stage == "train" else "bench.ranks.stage_worker"


def run_point(point: PointConfig, sweep_dir: Path, launcher: Launcher = LOCAL) -> tuple[dict, float]:
    """Measure one point on local ranks; always returns (and has written) its record, with the launch's wall
    time."""
    point_path(sweep_dir, point.point_id).unlink(missing_ok=True)  # an old record must never pass for this run's
    started_at = utc_now()
    # In the sweep's folder: the one place every host of a multi-host launch (or Slurm task) writes to.
    handback = Path(sweep_dir) / "handback" / point.point_id
    shutil.rmtree(handback, ignore_errors=True)
    handback.mkdir(parents=True)
    argv = python_module_argv(worker_module(point), *point_argv(point, str(handback)))
    try:
        run = run_ranks(point.np, argv, timeout_s=point.timeout_s, launcher=launcher)
        handed = collect(handback)
    finally:
        # handback/ itself stays: Slurm tasks of one sweep run points side by side, and removing it under another
        # task's mkdir would fail that task.
        shutil.rmtree(handback, ignore_errors=True)
    atomic_write_text(Path(sweep_dir) / "logs" / f"{point.point_id}.log",
                      f"$ {' '.join(argv)}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}")
    rank0 = next((h for h in handed if h["rank"] == 0), None)
    if run.returncode == 0 and not run.timed_out and rank0 and rank0["status"] == "ok" and rank0["result"]:
        write_record(sweep_dir, rank0["result"])
        return rank0["result"], run.seconds
    status, reason = classify_failure(run.timed_out, run.returncode, run.stderr, point.timeout_s, failures(handed))
    record = failure_record(point, status, reason, run.seconds, started_at, launcher)
    write_record(sweep_dir, record)
    return record, run.seconds


def existing_ok(sweep_dir: Path, point: PointConfig) -> bool:
    path = point_path(sweep_dir, point.point_id)
    return path.exists() and read_record(path)["status"] == "ok"


def progress_line(done: int, total: int, point: PointConfig, record: dict, seconds: float) -> str:
    width = 20
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    what = point.label("*" if is_oversubscribed(point.np) else "")
    if record["status"] == "ok":
        outcome = f"ok {record['metrics']['step_time_ms']:.1f} ms/{'step' if point.stage == 'train' else 'stage'}"
    else:
        outcome = f"{record['status'].upper()}: {record['reason']}"
    return f"[{bar}] {done}/{total} {what}: {outcome} ({seconds:.0f} s)"


def start_sweep(config: SweepConfig, sweep_dir: Path) -> None:
    """Prepare a new sweep folder: writable, its config and environment recorded before any point runs."""
    ensure_writable(sweep_dir)
    if (sweep_dir / "points").is_dir() and any((sweep_dir / "points").glob("*.json")):
        raise UsageError(f"{sweep_dir} already holds a sweep: add --resume to continue it, or choose a new --out")
    (sweep_dir / "points").mkdir(exist_ok=True)
    atomic_write_json(sweep_dir / SWEEP_FILE, config.as_dict())
    atomic_write_json(sweep_dir / "environment.json",
                      capture_environment() | {"launch_environment": launch_environment(config.nps)})
    if "auto" in config.modes:  # the costs auto will decide with, kept beside what it measured
        from bench.model.calibration_store import keep_costs
        keep_costs(sweep_dir)


def load_sweep_config(sweep_dir: Path) -> SweepConfig:
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        raise UsageError(f"{sweep_dir} has no {SWEEP_FILE}: --resume takes a folder that alure-bench sweep wrote")
    try:
        return SweepConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg}): restore it or start a new sweep") from None


def run_sweep(config: SweepConfig, sweep_dir: Path, *, resume: bool = False, out=sys.stdout,
              launcher: Launcher = LOCAL) -> list[dict]:
    """Run every point of the plan (with `resume`, only those without an ok record); return all records."""
    plan = config.plan()
    todo = [p for p in plan if not (resume and existing_ok(sweep_dir, p))]
    if resume:
        print(f"resuming {sweep_dir}: {len(plan) - len(todo)} of {len(plan)} points already ok", file=out)
        ensure_writable(sweep_dir)
    oversubscribed = sorted({p.np for p in todo if is_oversubscribed(p.np)})
    if oversubscribed:
        print(f"note: np {oversubscribed} exceed this machine's cores: oversubscribed (marked *), flagged in "
              f"every table and plot", file=out)
    start = time.perf_counter()
    with sigterm_interrupts():
        for i, point in enumerate(todo, 1):
            record, seconds = run_point(point, sweep_dir, launcher)
            print(progress_line(i, len(todo), point, record, seconds), file=out, flush=True)
    print(f"{len(todo)} points in {time.perf_counter() - start:.0f} s", file=out)
    return [read_record(point_path(sweep_dir, p.point_id)) for p in plan
            if point_path(sweep_dir, p.point_id).exists()]
