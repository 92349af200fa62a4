"""A sweep as Slurm job arrays: one array per process count (every task of an array asks the same resources), one
task per point, each task writing its record into the sweep's folder exactly as a local sweep does.

This module is the logic (arrays of a plan, the sbatch script, Slurm's answers, what is still outstanding) and
the few calls of sbatch and scontrol; bench/cli/slurm.py is the command line. The sweep folder is the only state,
so `collect` and `submit --resume` work from the folder alone:

<sweep>/slurm/
    jobs.json                the Slurm options in force and every array submitted (job id, np, task indices)
    submit<k>-np<N>.sbatch   the script of round k for np=N (round 1 is the first submit, then one per --resume)
    np<N>-<job>_<task>.out   Slurm's output of each task
    tasks/<point_id>.json    the Slurm task that last ran the point, its SLURM_* variables and how it ended
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.plan.config import PointConfig, SweepConfig
from bench.launch.environment import REPO
from bench.errors import UsageError
from bench.launch.hosts import allocation_launcher
from bench.results.records import (STATUSES, atomic_write_json, atomic_write_text, point_path, read_record,
                                   utc_now)
from bench.plan.sweep import (SWEEP_FILE, SweepInterrupted, existing_ok, load_sweep_config, progress_line, run_point,
                         sigterm_interrupts)

SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
DEFAULT_TEMPLATE = REPO / "slurm" / "array.sbatch"
LAUNCHERS = ("mpirun", "srun")
TIME_MARGIN_S = 300
"""Added to a point's timeout for the task's time limit: interpreter start-up, imports, writing the record."""
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})
"""Job states of a task that may still write its point's record."""
REQUIRED_MARKS = ("sbatch_options", "task_command")
_NAME = re.compile(r"^[A-Za-z0-9_.,+-]*$")
_TIME = re.compile(r"^(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+|UNLIMITED|INFINITE)$", re.I)


@dataclass(kw_only=True, slots=True)
class SlurmOptions:
    """How the arrays of a sweep are submitted; kept in slurm/jobs.json so that --resume submits alike."""

    partition: str = ""
    """Partition of every array; empty: the cluster's default (or the template's #SBATCH line)."""
    account: str = ""
    """Account charged; empty: the user's default (or the template's #SBATCH line)."""
    time_limit: str = ""
    """Slurm time limit of every task (e.g. 30, 1:00:00, 1-00:00:00); empty: the point timeout plus 5 min."""
    nodes: int = 0
    """Nodes per array (fewer when np is smaller); 0: as --ranks-per-node needs, or Slurm's choice."""
    ranks_per_node: int = 0
    """MPI ranks per node; 0: Slurm's choice."""
    array_limit: int = 0
    """At most this many tasks of one array run at once (sbatch --array=...%N); 0: no limit."""
    launcher: str = "mpirun"
    """How a task starts its ranks inside the allocation: mpirun, or srun (--mpi=pmix)."""
    template: str = ""
    """sbatch template; empty: slurm/array.sbatch of this checkout."""

    def __post_init__(self):
        for name in ("partition", "account"):
            if not _NAME.match(getattr(self, name)):
                raise UsageError(f"{name} {getattr(self, name)!r} is not a Slurm {name} name (letters, digits, "
                                 f"_ . , + -)")
        if self.time_limit and not _TIME.match(self.time_limit):
            raise UsageError(f"time limit {self.time_limit!r} is not a Slurm time: use minutes (30), "
                             f"hours:minutes:seconds (1:30:00) or days-hours:minutes:seconds (1-00:00:00)")
        for name in ("nodes", "ranks_per_node"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name.replace('_', ' ')} must not be negative (got {getattr(self, name)})")
        if self.array_limit < 0:
            raise UsageError(f"array limit must be at least 1 (got {self.array_limit}); leave it out for no limit")
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"unknown launcher {self.launcher!r}: use mpirun or srun")

    def template_path(self) -> Path:
        return Path(self.template) if self.template else DEFAULT_TEMPLATE

    def time_for(self, config: SweepConfig) -> str:
        return self.time_limit or format_time_limit(config.timeout_s + TIME_MARGIN_S)

    def layout(self, np: int) -> tuple[int, int]:
        """(nodes, ranks per node) of the np-rank array; 0 leaves it to Slurm."""
        per_node = min(self.ranks_per_node, np)
        if self.nodes:
            nodes = min(self.nodes, np)
            if per_node and nodes * per_node < np:
                raise UsageError(f"np={np} does not fit on {nodes} node(s) x {per_node} ranks per node: raise "
                                 f"--nodes or --ranks-per-node")
            return nodes, per_node
        return (math.ceil(np / per_node) if per_node else 0), per_node

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SlurmOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown Slurm option(s) {', '.join(unknown)} in {SLURM_DIR}/{JOBS_FILE}: valid ones "
                             f"are {', '.join(sorted(known))}")
        return cls(**data)


# --- arrays of a plan ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ArrayPlan:
    """One job array: the tasks to submit for one process count."""

    np: int
    """Process count of every task (so every task asks the same resources)."""
    indices: tuple[int, ...]
    """Array task indices to submit: positions in `points_for_np(config, np)`."""
    point_ids: tuple[str, ...]
    """The points those tasks measure, in the same order."""


def points_for_np(config: SweepConfig, np: int) -> list[PointConfig]:
    """The np-rank points in plan order: array task i measures the i-th. The plan is rebuilt from sweep.json, so
    the mapping is the same at render time and inside every task, and a resubmitted index means the same point."""
    return [p for p in config.plan() if p.np == np]


def point_for_task(config: SweepConfig, np: int, index: int) -> PointConfig:
    points = points_for_np(config, np)
    if not points:
        raise UsageError(f"the sweep has no np={np} points (its process counts are {config.nps})")
    if not 0 <= index < len(points):
        raise UsageError(f"array task {index} is out of range: the sweep has {len(points)} np={np} point(s), "
                         f"tasks 0-{len(points) - 1}")
    return points[index]


def plan_arrays(config: SweepConfig, only: set[str] | None = None) -> list[ArrayPlan]:
    """One array per process count, holding every point (or only those whose id is in `only`)."""
    arrays = []
    for np in config.nps:
        points = points_for_np(config, np)
        chosen = [i for i, p in enumerate(points) if only is None or p.point_id in only]
        if chosen:
            arrays.append(ArrayPlan(np, tuple(chosen), tuple(points[i].point_id for i in chosen)))
    return arrays


def array_spec(indices, limit: int = 0) -> str:
    """sbatch's --array value: runs of consecutive indices as ranges, e.g. [0, 1, 2, 5] with limit 2 -> 0-2,5%2."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spec = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return spec + (f"%{limit}" if limit else "")


def expand_task_ids(spec: str) -> list[int]:
    """Array task ids as Slurm prints them ('3', '0-3%2', '1,5-7', '[0-9:2]') -> the indices."""
    ids: list[int] = []
    for part in spec.strip("[]").split("%")[0].split(","):
        if not part:
            continue
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        ids.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    return ids


def format_time_limit(seconds: float) -> str:
    """Seconds as a Slurm time limit (days-hours:minutes:seconds), rounded up to whole minutes."""
    days, minutes = divmod(math.ceil(seconds / 60), 24 * 60)
    return f"{days}-{minutes // 60:02d}:{minutes % 60:02d}:00"


# --- the sbatch script -------------------------------------------------------------------------------------

def sbatch_directives(config: SweepConfig, options: SlurmOptions, array: ArrayPlan, sweep_dir: Path,
                      workdir: Path) -> list[str]:
    """The #SBATCH lines of one array."""
    nodes, per_node = options.layout(array.np)
    name = re.sub(r"[^\w.-]", "_", config.name)  # a job name is one word
    opts = [f"--job-name=alure-{name}-np{array.np}",
            f"--array={array_spec(array.indices, options.array_limit)}", f"--ntasks={array.np}"]
    opts += [f"--nodes={nodes}"] if nodes else []
    opts += [f"--ntasks-per-node={per_node}"] if per_node else []
    opts += [f"--cpus-per-task={config.threads_per_rank}"] if config.threads_per_rank > 1 else []
    opts += [f"--partition={options.partition}"] if options.partition else []
    opts += [f"--account={options.account}"] if options.account else []
    opts += [f"--time={options.time_for(config)}",
             f"--output={sweep_dir / SLURM_DIR}/np{array.np}-%A_%a.out", f"--chdir={workdir}"]
    return [f"#SBATCH {o}" for o in opts]


def task_command(sweep_dir: Path, np: int, launcher: str) -> str:
    return shlex.join(["alure-bench", "slurm", "task", "--sweep", str(sweep_dir), "--np", str(np),
                       "--launcher", launcher])


def render_template(text: str, values: dict[str, str], name: str = "template") -> str:
    """Fill the {{mark}}s of an sbatch template; a mark it does not know, or a missing required one, is an error."""
    marks = set(re.findall(r"\{\{(\w+)\}\}", text))
    unknown = sorted(marks - set(values))
    if unknown:
        raise UsageError(f"{name} has unknown mark(s) {', '.join('{{%s}}' % m for m in unknown)}: known ones are "
                         f"{', '.join('{{%s}}' % m for m in sorted(values))}")
    missing = [m for m in REQUIRED_MARKS if m not in marks]
    if missing:
        raise UsageError(f"{name} lacks {', '.join('{{%s}}' % m for m in missing)}: keep them from "
                         f"slurm/array.sbatch")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def read_template(options: SlurmOptions) -> str:
    path = options.template_path()
    try:
        return path.read_text()
    except OSError as err:
        raise UsageError(f"sbatch template {path} cannot be read ({err.strerror}): give one with --template")


def render_array(config: SweepConfig, options: SlurmOptions, array: ArrayPlan, sweep_dir: Path,
                 template: str | None = None, workdir: Path | None = None) -> str:
    """The sbatch script of one array. `sweep_dir` should be absolute: the task runs elsewhere."""
    workdir = workdir or Path.cwd()
    for folder in (sweep_dir, workdir):
        if any(c.isspace() for c in str(folder)):
            raise UsageError(f"{str(folder)!r} has white space, which #SBATCH lines cannot carry: choose an --out (and "
                             f"a working folder) without spaces")
    values = {"sbatch_options": "\n".join(sbatch_directives(config, options, array, sweep_dir, workdir)),
              "task_command": task_command(sweep_dir, array.np, options.launcher),
              "np": str(array.np), "sweep_dir": str(sweep_dir), "launcher": options.launcher,
              "venv": sys.prefix}
    text = read_template(options) if template is None else template
    return render_template(text, values, name=f"sbatch template {options.template_path()}")


# --- Slurm's answers ----------------------------------------------------------------------------------------

def parse_sbatch_output(stdout: str) -> str:
    """The job id from `sbatch --parsable` ('1234' or '1234;cluster')."""
    job_id = stdout.strip().splitlines()[-1].split(";")[0].strip() if stdout.strip() else ""
    if not job_id.isdigit():
        raise UsageError(f"sbatch printed no job id (got {stdout.strip()[:200]!r})")
    return job_id


def parse_scontrol_jobs(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output: one dict of its KEY=VALUE fields per job record."""
    records = []
    for line in text.splitlines():
        record = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if record:
            records.append(record)
    return records


def task_states(records: list[dict[str, str]]) -> dict[tuple[str, int], str]:
    """(array job id, task index) -> job state; a pending record that stands for many tasks gives each its state."""
    states = {}
    for r in records:
        ids = r.get("ArrayTaskId")
        if not ids or ids == "N/A":
            continue
        for index in expand_task_ids(ids):
            states[(r.get("ArrayJobId") or r["JobId"], index)] = r.get("JobState", "UNKNOWN")
    return states


def _slurm(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]} not found on PATH: run this on a Slurm login node (or `module load slurm`)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{argv[0]} did not answer within {timeout:g} s: is slurmctld up? (scontrol ping)") \
            from None


def sbatch(script: Path) -> str:
    """Submit a script; its job id. A refusal (unknown partition, impossible request) is a UsageError."""
    run = _slurm(["sbatch", "--parsable", str(script)])
    if run.returncode != 0:
        said = [line.removeprefix("sbatch: error: ") for line in run.stderr.splitlines() if line.strip()]
        raise UsageError(f"sbatch refused {script.name}: {'; '.join(said[-2:]) or f'exit code {run.returncode}'}")
    return parse_sbatch_output(run.stdout)


def query_states(job_ids) -> dict[tuple[str, int], str]:
    """What Slurm still knows of these array jobs' tasks. A job it has forgotten (finished more than MinJobAge
    ago) is left out: the records in the sweep folder are the truth, Slurm's states only explain gaps."""
    states: dict[tuple[str, int], str] = {}
    for job_id in sorted(set(job_ids), key=int):
        run = _slurm(["scontrol", "-o", "show", "job", job_id])
        if run.returncode == 0:
            states.update(task_states(parse_scontrol_jobs(run.stdout)))
    return states


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

def render_arrays(config: SweepConfig, options: SlurmOptions, sweep_dir: Path,
                  arrays: list[ArrayPlan]) -> list[tuple[ArrayPlan, str]]:
    """Every array's script, rendered in memory: a template or layout error shows before anything is written."""
    template = read_template(options)
    return [(a, render_array(config, options, a, sweep_dir, template)) for a in arrays]


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

def run_task(sweep_dir: Path, np: int, index: int, launcher: str, out=sys.stdout) -> int:
    """Measure the point of array task `index` of the np-rank array, with ranks started inside the allocation.
    Exit code: 0 ok, 1 a failed/oom/timeout record, 143 stopped by Slurm (scancel, time limit) with no record."""
    if launcher not in LAUNCHERS:
        raise UsageError(f"unknown launcher {launcher!r}: use mpirun or srun")
    config = require_sweep(sweep_dir)
    point = point_for_task(config, np, index)
    started_at = utc_now()
    write_task_note(sweep_dir, point, index, "running", started_at)
    try:
        with sigterm_interrupts():
            record, seconds = run_point(point, sweep_dir, allocation_launcher(launcher))
    except (SweepInterrupted, KeyboardInterrupt) as err:
        write_task_note(sweep_dir, point, index, f"was stopped ({err or 'interrupt'})", started_at)
        print(f"{point.label()}: stopped ({err or 'interrupt'}); no record written", file=out, flush=True)
        return 143
    write_task_note(sweep_dir, point, index, record["status"], started_at)
    print(progress_line(1, 1, point, record, seconds), file=out, flush=True)
    return 0 if record["status"] == "ok" else 1
