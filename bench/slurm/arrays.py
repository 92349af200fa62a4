"""The Slurm job arrays of a sweep plan and their sbatch scripts: one array per process count (every task of an
array asks the same resources), one task per point; the options a user gives, checked; the script rendered from the
template (slurm/array.sbatch or --template)."""
from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.errors import UsageError
from bench.launch.environment import REPO
from bench.plan.config import PointConfig, SweepConfig

SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
DEFAULT_TEMPLATE = REPO / "slurm" / "array.sbatch"
LAUNCHERS = ("mpirun", "srun")
TIME_MARGIN_S = 300
"""Added to a point's timeout for the task's time limit: interpreter start-up, imports, writing the record."""
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
        # Each retry is a launch that failed before measuring, plus its pause: within one more margin.
        return self.time_limit or format_time_limit(config.timeout_s + TIME_MARGIN_S * (1 + config.retries))

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
    def from_dict(cls, data: dict) -> SlurmOptions:
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


def render_arrays(config: SweepConfig, options: SlurmOptions, sweep_dir: Path,
                  arrays: list[ArrayPlan]) -> list[tuple[ArrayPlan, str]]:
    """Every array's script, rendered in memory: a template or layout error shows before anything is written."""
    template = read_template(options)
    return [(a, render_array(config, options, a, sweep_dir, template)) for a in arrays]
