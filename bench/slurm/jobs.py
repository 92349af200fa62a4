"""A sweep's Slurm state and its tasks: what was submitted, which points are still outstanding and why, the
rounds of `submit` and `--resume`, and what one array task runs. bench/slurm/arrays.py makes the arrays and their
scripts, bench/slurm/scheduler.py asks Slurm; bench/cli/slurm.py is the command line. Each task writes its record
into the sweep's folder exactly as a local sweep does. The sweep folder is the only state, so `collect` and
`submit --resume` work from the folder alone:

<sweep>/slurm/
    jobs.json                the Slurm options in force and every array submitted (job id, np, task indices)
    submit<k>-np<N>.sbatch   the script of round k for np=N (round 1 is the first submit, then one per --resume)
    np<N>-<job>_<task>.out   Slurm's output of each task
    tasks/<point_id>.json    the Slurm task that last ran the point, its SLURM_* variables and how it ended
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from bench.errors import MachineFault, UsageError
from bench.launch import transport
from bench.launch.hosts import allocation_launcher
from bench.plan.config import PointConfig, SweepConfig
from bench.results.records import STATUSES, atomic_write_json, atomic_write_text, point_path, read_record, utc_now
from bench.run.sweep import (
    SWEEP_FILE,
    SweepInterrupted,
    existing_ok,
    load_sweep_config,
    progress_line,
    run_point,
    sigterm_interrupts,
)
from bench.slurm.arrays import JOBS_FILE, LAUNCHERS, SLURM_DIR, ArrayPlan, SlurmOptions, array_spec, point_for_task
from bench.slurm.scheduler import ACTIVE_STATES, sbatch

# --- the sweep folder ---------------------------------------------------------------------------------------

def require_sweep(sweep_dir: Path) -> SweepConfig:
    if not (Path(sweep_dir) / SWEEP_FILE).is_file():
        raise UsageError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE}): give the folder that "
                         f"`alure-bench slurm submit` or `render` wrote (its --out)")
    return load_sweep_config(Path(sweep_dir))


def read_jobs(sweep_dir: Path) -> dict:
    """slurm/jobs.json: {"options": SlurmOptions as a dict, "arrays": [one entry per submitted array]}."""
    path = Path(sweep_dir) / SLURM_DIR / JOBS_FILE
    if not path.exists():
        return {"options": SlurmOptions().as_dict(), "arrays": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg}): restore it, or delete it to submit afresh") from None


def write_jobs(sweep_dir: Path, jobs: dict) -> None:
    atomic_write_json(Path(sweep_dir) / SLURM_DIR / JOBS_FILE, jobs)


def latest_tasks(jobs: dict) -> dict[str, tuple[str, int]]:
    """point id -> (job id, task index) of its latest submission."""
    latest = {}
    for entry in jobs["arrays"]:
        for index, point_id in zip(entry["indices"], entry["point_ids"]):
            latest[point_id] = (entry["job_id"], index)
    return latest


def outstanding(config: SweepConfig, sweep_dir: Path) -> list[tuple[PointConfig, dict | None]]:
    """The points that still need a run, as local `sweep --resume` sees them (no ok record), with their record
    if they have one (failed, oom or timeout)."""
    return [(p, read_record(point_path(sweep_dir, p.point_id)) if point_path(sweep_dir, p.point_id).exists()
             else None) for p in config.plan() if not existing_ok(sweep_dir, p)]


def active_points(jobs: dict, states: dict[tuple[str, int], str]) -> dict[str, str]:
    """point id -> state, for points whose latest task is still queued or running."""
    return {pid: states[task] for pid, task in latest_tasks(jobs).items()
            if states.get(task) in ACTIVE_STATES}


def task_note(sweep_dir: Path, point_id: str) -> dict | None:
    path = Path(sweep_dir) / SLURM_DIR / "tasks" / f"{point_id}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_task_note(sweep_dir: Path, point: PointConfig, index: int, outcome: str, started_at: str) -> None:
    """Which Slurm task ran the point and how it ended; the record itself stays exactly a local run's."""
    env = os.environ
    atomic_write_json(Path(sweep_dir) / SLURM_DIR / "tasks" / f"{point.point_id}.json", {
        "point_id": point.point_id, "np": point.np, "index": index,
        "task": f"{env.get('SLURM_ARRAY_JOB_ID', '?')}_{env.get('SLURM_ARRAY_TASK_ID', index)}",
        "nodes": env.get("SLURM_JOB_NODELIST"), "started_at": started_at,
        "ended_at": None if outcome == "running" else utc_now(), "outcome": outcome,
        "variables": {k: v for k, v in sorted(env.items()) if k.startswith("SLURM_")}})


def why_outstanding(sweep_dir: Path, point: PointConfig, record: dict | None, jobs: dict,
                    states: dict[tuple[str, int], str]) -> str:
    """One line: why this point has no ok record, from its record, its task note and Slurm's state."""
    task = latest_tasks(jobs).get(point.point_id)
    name = f"task {task[0]}_{task[1]}" if task else ""
    state = states.get(task) if task else None
    if record is not None:
        again = f" (again in {name}, {state})" if state in ACTIVE_STATES else ""
        return f"{record['status']}: {record['reason']}{again}"
    if task is None:
        return "missing: never submitted"
    note = task_note(sweep_dir, point.point_id)
    slurm_said = f" (Slurm: {state})" if state else ""
    if note and note.get("task") == name.removeprefix("task ") and note["outcome"] != "running":
        if note["outcome"] in STATUSES:  # the task wrote a record, which has gone since
            return f"missing: {name} ended {note['outcome']}, but its record is gone{slurm_said}"
        return f"missing: {name} {note['outcome']} before it wrote a record{slurm_said}"
    if state in ACTIVE_STATES:
        return f"missing: {name} is {state}"
    if state:
        return f"missing: {name} ended {state} without a record"
    return f"missing: {name} left no record (Slurm no longer knows it; see {SLURM_DIR}/np{point.np}-" \
           f"{task[0]}_{task[1]}.out)"


# --- rendering and submitting rounds ------------------------------------------------------------------------


def write_scripts(sweep_dir: Path, rendered: list[tuple[ArrayPlan, str]],
                  round_no: int) -> list[tuple[ArrayPlan, Path]]:
    """Write round `round_no`'s scripts into <sweep>/slurm/."""
    scripts = []
    for array, text in rendered:
        path = Path(sweep_dir) / SLURM_DIR / f"submit{round_no}-np{array.np}.sbatch"
        atomic_write_text(path, text)
        path.chmod(0o755)
        scripts.append((array, path))
    return scripts


def next_round(jobs: dict) -> int:
    return max((entry["round"] for entry in jobs["arrays"]), default=0) + 1


def submit_scripts(sweep_dir: Path, jobs: dict, options: SlurmOptions, scripts: list[tuple[ArrayPlan, Path]],
                   round_no: int) -> list[dict]:
    """sbatch every script; jobs.json gains each array as soon as Slurm took it, so a refusal half-way leaves the
    accepted ones on record (their points are then not resubmitted while they are queued or running)."""
    jobs["options"] = options.as_dict()
    write_jobs(sweep_dir, jobs)
    submitted = []
    for array, script in scripts:
        try:
            job_id = sbatch(script)
        except UsageError as err:
            if submitted:
                raise UsageError(f"{err} (already submitted: {', '.join(e['job_id'] for e in submitted)}; fix the "
                                 f"option, then `alure-bench slurm submit --resume {sweep_dir}` submits the "
                                 f"rest)") from None
            raise
        entry = {"round": round_no, "job_id": job_id, "np": array.np, "indices": list(array.indices),
                 "array": array_spec(array.indices, options.array_limit), "point_ids": list(array.point_ids),
                 "script": str(script.relative_to(sweep_dir)), "submitted_at": utc_now()}
        jobs["arrays"].append(entry)
        write_jobs(sweep_dir, jobs)
        submitted.append(entry)
    return submitted


# --- inside an array task -----------------------------------------------------------------------------------

def run_task(sweep_dir: Path, np: int, index: int, launcher: str, out=None) -> int:
    """Measure the point of array task `index` of the np-rank array, with ranks started inside the allocation,
    launched again as a local sweep would (the sweep's `retries`). Exit code: 0 ok, 1 a failed/oom/timeout record,
    143 stopped by Slurm (scancel, time limit) with no record; a fault of the machine raises its MachineFault (the
    CLI's one line, exit 2), the point left without a record."""
    out = out or sys.stdout
    if launcher not in LAUNCHERS:
        raise UsageError(f"unknown launcher {launcher!r}: use mpirun or srun")
    config = require_sweep(sweep_dir)
    point = point_for_task(config, np, index)
    started_at = utc_now()
    resubmit = f"`alure-bench slurm submit --resume {sweep_dir}` measures the point again"
    try:
        write_task_note(sweep_dir, point, index, "running", started_at)
        with sigterm_interrupts():
            record, seconds = run_point(point, sweep_dir, allocation_launcher(launcher),
                                        shared_memory=transport.mechanism(), retries=config.retries, out=out)
    except (SweepInterrupted, KeyboardInterrupt) as err:
        write_task_note(sweep_dir, point, index, f"was stopped ({err or 'interrupt'})", started_at)
        print(f"{point.label()}: stopped ({err or 'interrupt'}); no record written", file=out, flush=True)
        return 143
    except MachineFault as fault:
        # The point has no record (collect lists it as missing); say why where the machine still lets us.
        with contextlib.suppress(MachineFault, OSError):
            write_task_note(sweep_dir, point, index, f"stopped by a fault of the machine ({fault})", started_at)
        raise fault.then(resubmit)
    write_task_note(sweep_dir, point, index, record["status"], started_at)
    print(progress_line(1, 1, point, record, seconds), file=out, flush=True)
    return 0 if record["status"] == "ok" else 1
