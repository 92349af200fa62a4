"""Running a plan of points locally: one mpirun launch per point, every outcome recorded, the sweep going on.

A point whose rank crashes, runs out of memory or hangs past its timeout gets a record with status failed, oom
or timeout and the reason; the next point runs. Ctrl-C or SIGTERM stops the sweep between or during points,
keeping every finished record. `resume` reruns only the points with no ok record. A launch that failed before any
rank began to measure is tried again up to `retries` times. A fault of the machine around the results (a full disk,
a read-only file system, the folder removed) stops the sweep with a MachineFault, every record already written
intact; a folder too full for one point is refused before anything launches.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import MachineFault, UsageError
from bench.host import OVERSUBSCRIBED_MARK, is_oversubscribed, point_oversubscribed
from bench.launch import transport
from bench.launch.environment import capture_environment, launch_environment
from bench.launch.handback import collect, failures, looks_like_oom, machine_fault_in, measured_ranks
from bench.launch.interrupts import Interrupted, signals_interrupt
from bench.launch.mpirun import LOCAL, Launcher, run_ranks
from bench.launch.rank_program import python_module_argv
from bench.model.calibration_store import keep_costs
from bench.model.exchange_price import host_collective_model
from bench.plan.config import PointConfig, SweepConfig
from bench.plan.sizes import format_bytes
from bench.ranks.point_program import point_argv
from bench.results.records import (
    REPORT_BYTES,
    atomic_write_json,
    atomic_write_text,
    ensure_writable,
    free_bytes,
    point_path,
    point_record,
    read_record,
    room_for_point,
    utc_now,
    write_record,
)

SWEEP_FILE = "sweep.json"


SweepInterrupted = Interrupted
"""SIGTERM (or Ctrl-C) arrived: stop launching, keep what is recorded (bench.launch.interrupts)."""


def sigterm_interrupts():
    """Turn SIGTERM into an exception, so a batch scheduler's kill unwinds like Ctrl-C: ranks killed, records
    kept."""
    return signals_interrupt()


CRASH_SIGNALS = {6: "SIGABRT", 7: "SIGBUS", 11: "SIGSEGV"}
"""Signals native code dies of when it does not check an allocation the kernel refused (a null pointer used, an
abort on a failed new)."""


def classify_failure(timed_out: bool, returncode: int | None, stderr: str, timeout_s: float,
                     failed: list[dict] = (), capped: bool = False) -> tuple[str, str]:
    """(status, reason) of a launch that left no ok record; `failed`: what failing ranks handed back
    (bench.launch.handback.failures), the reason of first resort. `capped`: the ranks measured under a memory cap
    (RLIMIT_DATA): there a crash signal is taken as out of memory, since Horovod's and MPI's native threads die of a
    refused allocation instead of raising, and the reason says it was inferred."""
    if timed_out:
        return "timeout", f"ran past its timeout of {timeout_s:g} s and was killed"
    if failed:
        return failed[0]["status"], failed[0]["reason"]
    if looks_like_oom(stderr):
        return "oom", "out of memory: " + _first_line_matching(stderr, looks_like_oom)
    signalled = re.search(r"exited on signal (\d+) \(([^)]*)\)", stderr)
    if signalled:
        signal_number, said = int(signalled.group(1)), f"signal {signalled.group(1)} ({signalled.group(2)})"
        if capped and signal_number in CRASH_SIGNALS:
            return "oom", (f"out of memory (inferred): a rank exited on {said} while measuring under its memory "
                           "cap, as native code does when the kernel refuses an allocation")
        return "failed", f"a rank exited on {said}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not set(line.strip()) <= set("-")]
    # A rank's exception (before mpirun's own notice, which ends every failed launch alike) says most.
    raised = [line for line in lines if PYTHON_EXCEPTION.match(line)]
    said = raised[-1] if raised else lines[-1] if lines else "no error output"
    return "failed", f"exit code {returncode}: {said[:300]}"


PYTHON_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")
"""The last line of a Python traceback: `FileNotFoundError: [Errno 2] ...`."""


def _first_line_matching(text: str, predicate) -> str:
    return next((line.strip() for line in text.splitlines() if predicate(line)), "")[:300]


def failure_record(point: PointConfig, status: str, reason: str, wall_seconds: float, started_at: str,
                   launcher: Launcher = LOCAL) -> dict:
    # Without the ranks' host list, only a single-host launch can say whether the point was oversubscribed.
    return point_record(point, status, reason=reason, started_at=started_at, wall_seconds=wall_seconds,
                        oversubscribed=point_oversubscribed(point.np, one_machine=launcher.single_host))


def worker_module(point: PointConfig) -> str:
    """The rank program of a point: training steps, the co-run baseline's independent trainings, or a whole pipeline
    stage."""
    if point.corun:
        return "bench.ranks.corun"
    return "bench.ranks.worker" if point.stage == "train" else "bench.ranks.stage_worker"


RETRY_PAUSE_S = 5.0
"""Pause before the first retry of a failed launch; the n-th retry waits n times as long (a link or a daemon
coming back takes seconds)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One launch of a point."""

    record: dict
    """The point's record from this launch (rank 0's, or a failure record), not yet written."""
    seconds: float
    """The launch's wall time."""
    log: str
    """The launch's command line and everything its ranks printed."""
    measuring: bool
    """Whether any rank began to measure (bench.launch.handback.mark_measuring): if not, a failure was the launch's,
    which `retries` may try again."""

    @property
    def retryable(self) -> bool:
        return self.record["status"] == "failed" and not self.measuring


def require_folder(sweep_dir: Path) -> None:
    """The sweep's folder is still there (a command may run for hours; someone may remove it meanwhile)."""
    if not os.path.isfile(Path(sweep_dir) / SWEEP_FILE):  # isfile never raises, even on a stale NFS handle
        raise MachineFault.folder_gone(sweep_dir)


def launch_point(point: PointConfig, sweep_dir: Path, launcher: Launcher = LOCAL, *, shared_memory: str) -> Attempt:
    """Launch the point once on its ranks (`shared_memory`: the command's, bench.launch.transport.mechanism). A rank that could not hand back because of the machine raises that
    MachineFault here (the point then has no record: `--resume` measures it again)."""
    started_at = utc_now()
    require_folder(sweep_dir)  # before anything below could make a removed folder again
    # In the sweep's folder: the one place every host of a multi-host launch (or Slurm task) writes to.
    handback = Path(sweep_dir) / "handback" / point.point_id
    shutil.rmtree(handback, ignore_errors=True)
    ensure_writable(handback)
    argv = python_module_argv(worker_module(point), *point_argv(point, str(handback)))
    try:
        # A point's own launch setting goes on top of this process's environment, so it wins over the launcher's.
        env = {**os.environ, **point.launch_env} if point.launch_env else None
        run = run_ranks(point.np, argv, shared_memory=shared_memory, timeout_s=point.timeout_s, env=env,
                        launcher=launcher)
        handed = collect(handback)
        measuring = bool(measured_ranks(handback))
    finally:
        # handback/ itself stays: Slurm tasks of one sweep run points side by side, and removing it under another
        # task's mkdir would fail that task.
        shutil.rmtree(handback, ignore_errors=True)
    fault = machine_fault_in(run.stderr)
    if fault is not None:
        fault.folder = Path(sweep_dir)  # the rank's folder is gone by now: free space in the sweep's
        raise fault
    require_folder(sweep_dir)
    log = f"$ {' '.join(argv)}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    rank0 = next((h for h in handed if h["rank"] == 0), None)
    if run.returncode == 0 and not run.timed_out and rank0 and rank0["status"] == "ok" and rank0["result"]:
        return Attempt(rank0["result"], run.seconds, log, True)
    capped = measuring and (point.mem_limit_mib > 0 or point.train_mem_limit_mib > 0)
    status, reason = classify_failure(run.timed_out, run.returncode, run.stderr, point.timeout_s, failures(handed),
                                      capped=capped)
    return Attempt(failure_record(point, status, reason, run.seconds, started_at, launcher), run.seconds, log,
                   measuring)


def run_point(point: PointConfig, sweep_dir: Path, launcher: Launcher = LOCAL, *, shared_memory: str,
              retries: int = 0, out=None) -> tuple[dict, float]:
    """Measure one point; always returns (and has written) its record, with the wall time of all its attempts.
    A launch that failed before any rank began to measure is tried again, after a pause, up to `retries` times
    (each retry said on `out`); the record keeps every attempt (`attempts`) and its log every attempt's output."""
    require_folder(sweep_dir)
    old = point_path(sweep_dir, point.point_id)
    try:
        old.unlink(missing_ok=True)  # an old record must never pass for this run's
    except OSError as err:
        raise (MachineFault.from_os_error(err, old) or err) from err
    log_path = Path(sweep_dir) / "logs" / f"{point.point_id}.log"
    attempts, logs, seconds = [], [], 0.0
    for n in range(1, retries + 2):
        attempt = launch_point(point, sweep_dir, launcher, shared_memory=shared_memory)
        record, seconds = attempt.record, seconds + attempt.seconds
        attempts.append({"attempt": n, "status": record["status"], "reason": record["reason"],
                         "started_at": record["started_at"], "wall_seconds": attempt.seconds})
        logs.append(attempt.log)
        atomic_write_text(log_path, logs[0] if n == 1 else
                          "\n".join(f"=== attempt {i} of this point\n{text}" for i, text in enumerate(logs, 1)))
        if not attempt.retryable or n > retries:
            break
        pause = RETRY_PAUSE_S * n
        if out is not None:
            print(f"  {point.label()}: the launch failed before any rank began to measure ({record['reason']}); "
                  f"attempt {n + 1} of {retries + 1} in {pause:g} s", file=out, flush=True)
        time.sleep(pause)
        seconds += pause
    record["attempts"] = attempts
    write_record(sweep_dir, record)
    return record, seconds


def existing_ok(sweep_dir: Path, point: PointConfig) -> bool:
    path = point_path(sweep_dir, point.point_id)
    return path.exists() and read_record(path)["status"] == "ok"


def clock(seconds: float) -> str:
    """A duration as a person reads it: 0:42, 12:05, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Elapsed time of a plan of points and an estimate of what remains, from the points measured so far: a point
    is expected to take what the measured points of its process count took on average (more ranks, longer
    launches), or all measured points' average where none of its np ran yet."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds_by_np: dict[int, list[float]] = {}

    def measured(self, point: PointConfig, seconds: float) -> None:
        self.seconds_by_np.setdefault(point.np, []).append(seconds)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def eta_s(self, remaining: list[PointConfig]) -> float | None:
        """Seconds the `remaining` points are expected to take; None before any point was measured."""
        every = [s for seconds in self.seconds_by_np.values() for s in seconds]
        if not every:
            return None
        mean = {np: sum(s) / len(s) for np, s in self.seconds_by_np.items()}
        return sum(mean.get(p.np, sum(every) / len(every)) for p in remaining)


def progress_line(done: int, total: int, point: PointConfig, record: dict, seconds: float,
                  elapsed_s: float | None = None, eta_s: float | None = None) -> str:
    width = 20
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    what = point.label(OVERSUBSCRIBED_MARK if is_oversubscribed(point.np) else "")
    if record["status"] == "ok":
        outcome = f"ok {record['metrics']['step_time_ms']:.1f} ms/{'step' if point.stage == 'train' else 'stage'}"
    else:
        outcome = f"{record['status'].upper()}: {record['reason']}"
    attempts = len(record.get("attempts") or [None])
    took = f"{seconds:.0f} s" + (f", {attempts} attempts" if attempts > 1 else "")
    timing = ""
    if elapsed_s is not None:
        timing = f"; elapsed {clock(elapsed_s)}" + (f", ETA {clock(eta_s)}" if eta_s is not None and done < total
                                                     else "")
    return f"[{bar}] {done}/{total} {what}: {outcome} ({took}){timing}"


def room_needed(point: PointConfig, retries: int = 0) -> int:
    """Bytes the point needs in the results folder while it runs and is recorded (bench.results.records)."""
    timed = point.steps if point.stage == "train" else point.stage_steps
    return room_for_point(point.np, timed, attempts=retries + 1)


def check_room(config: SweepConfig, sweep_dir: Path, points: list[PointConfig], out=None) -> None:
    """Refuse (a MachineFault, before anything is launched) a folder whose file system cannot take even one of
    `points`; with `out`, note where it may fill before the last of them and the report are written."""
    if not points:
        return
    free = free_bytes(sweep_dir)
    need = max(room_needed(p, config.retries) for p in points)
    if free < need:
        raise MachineFault(sweep_dir, errno.ENOSPC, detail=f"{format_bytes(free)} free, and a point of this sweep needs "
                                                             f"about {format_bytes(need)} for its record and log")
    whole = sum(room_needed(p) for p in points) + REPORT_BYTES
    if out is not None and free < whole:
        print(f"note: {sweep_dir} has {format_bytes(free)} free, and the {len(points)} points and the report need about "
              f"{format_bytes(whole)}: it may fill before the end (the sweep then stops with the --resume command)",
              file=out)


def start_sweep(config: SweepConfig, sweep_dir: Path) -> None:
    """Prepare a new sweep folder: writable, its config and environment recorded before any point runs."""
    ensure_writable(sweep_dir)
    if (sweep_dir / "points").is_dir() and any((sweep_dir / "points").glob("*.json")):
        raise UsageError(f"{sweep_dir} already holds a sweep: add --resume to continue it, or choose a new --out")
    check_room(config, sweep_dir, config.plan())
    (sweep_dir / "points").mkdir(exist_ok=True)
    atomic_write_json(sweep_dir / SWEEP_FILE, config.as_dict())
    environment = capture_environment()
    shared_memory = environment["shared_memory"]["single_copy_mechanism"]
    atomic_write_json(sweep_dir / "environment.json",
                      environment | {"launch_environment": launch_environment(config.nps, shared_memory=shared_memory)})
    if "auto" in config.modes:  # the costs auto will decide with, kept beside what it measured
        keep_costs(sweep_dir)


def load_sweep_config(sweep_dir: Path) -> SweepConfig:
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        raise UsageError(f"{sweep_dir} has no {SWEEP_FILE}: --resume takes a folder that alure-bench sweep wrote")
    try:
        return SweepConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg}): restore it or start a new sweep") from None


def run_sweep(config: SweepConfig, sweep_dir: Path, *, resume: bool = False, out=None,
              launcher: Launcher = LOCAL) -> list[dict]:
    """Run every point of the plan (with `resume`, only those without an ok record), saying how it goes on `out`
    (default: stdout as it is at the call); return all records."""
    out = out or sys.stdout
    plan = config.plan()
    todo = [p for p in plan if not (resume and existing_ok(sweep_dir, p))]
    if resume:
        print(f"resuming {sweep_dir}: {len(plan) - len(todo)} of {len(plan)} points already ok", file=out)
        ensure_writable(sweep_dir)
    check_room(config, sweep_dir, todo, out)
    oversubscribed = sorted({p.np for p in todo if is_oversubscribed(p.np)})
    if oversubscribed:
        print(f"note: np {oversubscribed} exceed this machine's cores: oversubscribed (marked *), flagged in "
              f"every table and plot", file=out)
    if any(p.np > 1 and not p.corun for p in todo):
        # every multi-rank record's exchange_efficiency is priced with this: say so now when it is not this host's
        priced = host_collective_model("tcp" if launcher.hosts else "shared-memory")
        if not priced.calibrated:
            print(f"note: {priced.source}: exchange_efficiency is priced with those, not with this host's collective "
                  f"speed; run `alure-bench calibrate` before a sweep whose exchange efficiency you will read",
                  file=out)
    progress = Progress()
    shared_memory = transport.mechanism()  # once for the whole sweep: every point's launch gets the same
    with sigterm_interrupts():
        for i, point in enumerate(todo, 1):
            record, seconds = run_point(point, sweep_dir, launcher, shared_memory=shared_memory,
                                        retries=config.retries, out=out)
            progress.measured(point, seconds)
            print(progress_line(i, len(todo), point, record, seconds, progress.elapsed_s(),
                                progress.eta_s(todo[i:])), file=out, flush=True)
    print(f"{len(todo)} points in {clock(progress.elapsed_s())}", file=out)
    return [read_record(point_path(sweep_dir, p.point_id)) for p in plan
            if point_path(sweep_dir, p.point_id).exists()]
