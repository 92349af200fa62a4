"""What a valid measurement is: one point, and a sweep of points. The CLI, a TOML sweep file and a Slurm array
task all build these same dataclasses, so validation lives here and nowhere else."""
from __future__ import annotations

import itertools
import random
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from alure.stages import GRAPH_STRATEGIES, STAGES
from bench.errors import UsageError

SCALINGS = ("weak", "strong")
REPLICATED_MODES = ("sparse-gather", "coalesced-gather", "dense-reduce", "sparse-as-dense")
"""Data-parallel modes: every rank holds every table whole; sparse-gather allgathers each rank's rows as they are;
coalesced-gather sums a rank's duplicate rows first; dense-reduce densifies into a kept buffer, allreduces it and
updates densely (the paper's path); sparse-as-dense is Horovod-PyTorch's own sparse_as_dense=True (a control)
(bench.ranks.exchange). The cost model prices these."""
SHARDED_MODES = ("row-wise", "table-wise")
"""Model-parallel modes (bench.ranks.sharded): each rank holds a share of the tables' rows (row-wise) or whole tables
(table-wise); ids, rows and their gradients travel by all-to-all."""
MODES = (*REPLICATED_MODES, "auto", *SHARDED_MODES)
"""Embedding-table exchange modes; auto chooses among the first three replicated ones per table and step."""
FIXED_MODES = (*REPLICATED_MODES, *SHARDED_MODES)
"""Every mode that exchanges one way only."""
DEFAULT_SWEEP_MODES = ("sparse-gather", "dense-reduce")
"""What a sweep measures unless told otherwise: the two modes the suite compares (keeps `make bench` quick)."""
EXCHANGE_BACKENDS = ("horovod", "mpi")
"""What carries a training point's exchange modes: Horovod (bench.ranks.exchange), or raw MPI through mpi4py's
nonblocking collectives with no Horovod in the process (bench.ranks.mpi_exchange), the reference that says what
Horovod's runtime costs the step."""



def stage_label(stage: str, graph_strategy) -> str:
    """'graph ring', 'refresh', ...: what a stage point measured (a summary's empty strategy may be NaN)."""
    return f"{stage} {graph_strategy}" if isinstance(graph_strategy, str) and graph_strategy else stage


@dataclass(kw_only=True, slots=True)
class RunSettings:
    """What every point of a sweep shares: the workload, how long to measure, and the limits."""

    preset: str = "default"
    """Workload preset: a name of alure.config.PRESETS."""
    batch_per_rank: int = 0
    """Per-rank batch for weak scaling; 0 takes the preset's batch size."""
    global_batch: int = 0
    """Global batch for strong scaling, divided evenly over the ranks; 0 takes the preset's batch size."""
    steps: int = 20
    """Timed training steps."""
    warmup_steps: int = 3
    """Steps run before timing starts (allocator, Horovod negotiation, caches); not counted."""
    threads_per_rank: int = 1
    """Torch intra-op threads per rank, the same at every np of a sweep: efficiency divides a point by np=1 run
    the same way, never by a baseline that had the cores to itself."""
    timeout_s: float = 300.0
    """Wall time after which the point is killed and recorded as timeout."""
    mem_limit_mib: int = 0
    """Per-rank cap on the data address space (RLIMIT_DATA, enforced by the kernel); 0 for none."""
    train_mem_limit_mib: int = 0
    """Per-rank cap on what training may add to the data segment once the workload is built (RLIMIT_DATA set to the
    segment's size after the build plus this); 0 for none. Unlike mem_limit_mib it does not depend on how much the
    world and the libraries take on a machine, so a cap derived from measured training growth (`alure-bench
    oom-demo`) means the same anywhere."""
    seed: int = 0
    """Seed of the synthetic data and the initial weights."""
    workload: dict = field(default_factory=dict)
    """Overrides of alure.config.WorkloadConfig fields (e.g. sampled_negatives, zipf_exponent)."""
    stage_steps: int = 3
    """Timed repetitions of a whole stage at a point of a stage other than train (each is many training steps
    long)."""
    stage_warmup_steps: int = 1
    """Untimed repetitions of the stage before those."""

    def __post_init__(self):
        if self.steps < 1:
            raise UsageError(f"steps must be at least 1 (got {self.steps})")
        if self.stage_steps < 1:
            raise UsageError(f"stage_steps must be at least 1 (got {self.stage_steps})")
        for name in ("warmup_steps", "batch_per_rank", "global_batch", "mem_limit_mib", "train_mem_limit_mib",
                     "stage_warmup_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative (got {getattr(self, name)})")
        if self.mem_limit_mib and self.train_mem_limit_mib:
            raise UsageError(f"mem_limit_mib ({self.mem_limit_mib}) and train_mem_limit_mib "
                             f"({self.train_mem_limit_mib}) are both set: cap the whole process or the training, "
                             f"not both")
        if self.threads_per_rank < 1:
            raise UsageError(f"threads_per_rank must be at least 1 (got {self.threads_per_rank}): every point runs "
                             f"the same threads per rank, so give a number such as 1 (--threads 1)")
        if self.timeout_s <= 0:
            raise UsageError(f"timeout_s must be positive (got {self.timeout_s})")

    def as_dict(self) -> dict:
        return asdict(self)

    def shared(self) -> dict:
        """These settings as keyword arguments (the workload overrides copied, so points do not share one dict)."""
        return {f.name: getattr(self, f.name) for f in fields(RunSettings)} | {"workload": dict(self.workload)}


@dataclass(kw_only=True, slots=True)
class PointConfig(RunSettings):
    """One measured point: a scaling kind, an exchange mode and a process count."""

    scaling: str = "weak"
    """weak keeps the per-rank batch fixed; strong keeps the global batch fixed (per-rank = global / np)."""
    mode: str = "sparse-gather"
    """Embedding-gradient exchange, one of MODES."""
    np: int = 1
    """MPI process count."""
    repeat: int = 0
    """Index of this repetition of the same point (repeats give the noise band)."""
    stage: str = "train"
    """The pipeline stage timed: train (a training step), refresh, graph or retrieval (the whole stage)."""
    graph_strategy: str = ""
    """For stage graph: how ranks share the embeddings, replicate or ring; empty for the other stages."""
    corun: bool = False
    """The co-run baseline of np ranks (bench.ranks.corun): np independent np=1 trainings started together on the
    same cores, no exchange and no Horovod; their step time against the lone np=1 point is what sharing the machine
    costs (docs/efficiency.md). The mode plays no part in it."""
    exchange_backend: str = "horovod"
    """What carries the exchange: one of EXCHANGE_BACKENDS."""
    launch_env: dict = field(default_factory=dict)
    """Variables set on top of the suite's launch environment for this point's ranks (a variable named here wins
    over the launcher's own setting, e.g. HOROVOD_CYCLE_TIME); empty: the suite's launch environment as it is."""
    workload_b: dict = field(default_factory=dict)
    """Setting B's workload overrides, applied on top of `workload` (SweepConfig.compare_set), e.g. shard_rows =
    "residue"; empty: the sweep's workload as it is (setting A)."""

    def __post_init__(self):
        RunSettings.__post_init__(self)  # zero-argument super() does not work in a slots dataclass
        if self.scaling not in SCALINGS:
            raise UsageError(f"unknown scaling {self.scaling!r}: use weak or strong")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}: use {' or '.join(MODES)}")
        if self.np < 1:
            raise UsageError(f"np must be at least 1 (got {self.np})")
        if self.repeat < 0:
            raise UsageError(f"repeat must not be negative (got {self.repeat})")
        if self.stage not in STAGES:
            raise UsageError(f"unknown stage {self.stage!r}: use one of {', '.join(STAGES)}")
        if self.graph_strategy not in (GRAPH_STRATEGIES if self.stage == "graph" else ("",)):
            raise UsageError(f"graph_strategy {self.graph_strategy!r} for stage {self.stage}: the graph stage "
                             f"takes one of {', '.join(GRAPH_STRATEGIES)}, other stages none")
        if self.exchange_backend not in EXCHANGE_BACKENDS:
            raise UsageError(f"unknown exchange backend {self.exchange_backend!r}: use "
                             f"{' or '.join(EXCHANGE_BACKENDS)}")
        if self.exchange_backend == "mpi" and self.mode in SHARDED_MODES:
            raise UsageError(f"mode {self.mode} shards its tables over Horovod's all-to-all; the raw-MPI backend "
                             f"carries the data-parallel modes only: drop --exchange-backend mpi for it")
        bad = [f"{k}={v!r}" for k, v in self.launch_env.items() if not (isinstance(k, str) and k.isidentifier()
                                                                          and isinstance(v, str))]
        if bad:
            raise UsageError(f"launch_env {', '.join(bad)}: give environment variables as NAME = \"value\" (strings), "
                             f"e.g. HOROVOD_CYCLE_TIME = \"1\"")
        if self.stage != "train" and self.scaling != "strong":
            raise UsageError(f"stage {self.stage} scales strongly only (the preset's users split over the ranks)")
        if self.scaling == "strong" and self.global_batch and self.global_batch % self.np:
            raise UsageError(f"strong scaling splits the global batch {self.global_batch} over {self.np} ranks "
                             f"unevenly: choose a global batch divisible by every np")
        if self.corun and (self.stage != "train" or self.np < 2):
            raise UsageError(f"a co-run baseline runs training steps on np >= 2 processes (got stage {self.stage}, "
                             f"np={self.np}): the lone np=1 point is its own baseline")

    @property
    def point_id(self) -> str:
        """Stable file name of the point's record (a train point's is what it was before stages existed; a backend
        other than Horovod adds itself at the end, so Horovod's ids stay what they were before backends existed)."""
        backend = ("" if self.exchange_backend == "horovod" else f"-{self.exchange_backend}") + \
            ("-envB" if self.launch_env else "") + ("-setB" if self.workload_b else "")
        if self.corun:
            return f"corun-{self.scaling}-np{self.np}-r{self.repeat}{backend}"
        if self.stage != "train":
            return (f"{self.stage}{'-' + self.graph_strategy if self.graph_strategy else ''}-np{self.np}"
                    f"-r{self.repeat}{backend}")
        return f"{self.scaling}-{self.mode}-np{self.np}-r{self.repeat}{backend}"

    def label(self, np_mark: str = "") -> str:
        """What a person reads of the point: 'weak sparse-gather np=2 r0', 'graph ring np=4 r1' (`np_mark`, e.g. '*'
        for oversubscribed, right after the process count)."""
        what = f"{self.scaling} {self.mode}" if self.stage == "train" else stage_label(self.stage, self.graph_strategy)
        what = f"{self.scaling} co-run" if self.corun else what
        backend = "" if self.exchange_backend == "horovod" else f" ({self.exchange_backend})"
        setting = " [B]" if self.launch_env or self.workload_b else ""
        return f"{what}{backend}{setting} np={self.np}{np_mark} r{self.repeat}"

    @classmethod
    def from_dict(cls, data: dict) -> PointConfig:
        return cls(**_known_fields(cls, data, "point"))


@dataclass(kw_only=True, slots=True)
class SweepConfig(RunSettings):
    """A plan of points: every scaling kind x mode x np x repeat, with the settings they share."""

    name: str = "sweep"
    """Results folder name under the output root."""
    scalings: list[str] = field(default_factory=lambda: list(SCALINGS))
    """Scaling kinds to measure."""
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_SWEEP_MODES))
    """Exchange modes to measure."""
    nps: list[int] = field(default_factory=lambda: [1, 2])
    """Process counts; efficiency is relative to np=1, so without 1 among them it is left blank."""
    repeats: int = 1
    """Repetitions of every point (but those `repeats_by_np` names)."""
    repeats_by_np: dict = field(default_factory=dict)
    """np -> repetitions of that np's points, in place of `repeats` (TOML: `repeats_by_np = {3 = 3, 4 = 3}`). So a
    recording spends its repeats where the intervals must rank modes and fewer where points cost most and are
    ranked least (oversubscribed np); interleaved, round r measures only the np with more than r repeats."""
    interleave: bool = True
    """Run the repeats in rounds: round r measures every point once, in an order shuffled by seed and r, so slow
    drift of the machine spreads over all points instead of landing on some. False: each point's repeats back to
    back, np ascending."""
    stages: list[str] = field(default_factory=lambda: ["train"])
    """Pipeline stages to measure. train: every scaling x mode; refresh, graph, retrieval: strong scaling of the
    preset's users (the gradient exchange mode plays no part in them)."""
    graph_strategies: list[str] = field(default_factory=lambda: list(GRAPH_STRATEGIES))
    """k-NN strategies the graph stage is measured with, side by side."""
    retries: int = 0
    """Launches again, after a short pause, of a point whose launch failed before any rank began to measure
    (mpirun, its daemons or the transport failed to start; bench.launch.handback.mark_measuring); a point that
    failed once measuring (a crash, oom, a timeout) is a result and never retried. Every attempt is in the
    record."""
    corun: bool = True
    """With training points: at every np > 1, per scaling kind, a co-run baseline point (PointConfig.corun), so the
    efficiency splits into the machine's own share and the rest (docs/efficiency.md)."""
    exchange_backends: list[str] = field(default_factory=lambda: ["horovod"])
    """What carries the exchange, from EXCHANGE_BACKENDS: every point is measured once per backend, so horovod and
    mpi together put Horovod's runtime and raw MPI side by side in one interleaved sweep."""
    compare_env: dict = field(default_factory=dict)
    """Setting B: variables set on top of the suite's launch environment (setting A). When given, every point is
    measured under both, interleaved like the repeats, so a launch setting's effect on the training step is read
    from one run (B's points divide by B's np=1); empty: setting A only."""
    compare_set: dict = field(default_factory=dict)
    """Setting B's workload overrides on top of `workload` (as --set takes them): with them, every point is also
    measured training the workload they change, interleaved like compare_env (with which it makes one setting B),
    e.g. shard_rows = "residue" against the default split; empty: setting A only."""

    def __post_init__(self):
        for name, allowed in (("scalings", SCALINGS), ("modes", MODES), ("stages", STAGES),
                              ("graph_strategies", GRAPH_STRATEGIES), ("exchange_backends", EXCHANGE_BACKENDS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise UsageError(f"{name} must be a non-empty list from {', '.join(allowed)} (got {values})")
        if not self.nps or any(not isinstance(n, int) or n < 1 for n in self.nps):
            raise UsageError(f"nps must be positive whole numbers (got {self.nps})")
        if self.repeats < 1:
            raise UsageError(f"repeats must be at least 1 (got {self.repeats})")
        try:
            self.repeats_by_np = {int(n): int(r) for n, r in self.repeats_by_np.items()}
        except (AttributeError, TypeError, ValueError):
            raise UsageError(f"repeats_by_np must map rank counts to repeats, e.g. {{3 = 3, 4 = 3}} (got "
                             f"{self.repeats_by_np})") from None
        if any(r < 1 for r in self.repeats_by_np.values()):
            raise UsageError(f"repeats_by_np: every count of repeats must be at least 1 (got {self.repeats_by_np})")
        if self.retries < 0:
            raise UsageError(f"retries must not be negative (got {self.retries}): 0 launches every point once")
        PointConfig(launch_env=self.compare_env)  # one check of its variables, before any point is planned
        self.nps = sorted(set(self.nps))
        self.plan()  # every point must be valid before anything runs (RunSettings' checks run there too)

    def plan(self) -> list[PointConfig]:
        """The points in run order (see `interleave`). Interleaved, the first round runs its np=1 points first, so
        a sweep interrupted after them still has a baseline for every later point. Back to back: cheap np first,
        at each np the training points first, in the order they had before stages existed."""
        if not self.interleave:
            return self._back_to_back()
        plan = []
        for r in range(max(map(self.repeats_at, self.nps))):
            points = [p for n in self.nps if r < self.repeats_at(n) for p in self._points(n, r)]
            order = random.Random(f"{self.seed}-{r}").sample(points, len(points))
            if r == 0:
                order.sort(key=lambda p: p.np != min(self.nps))  # stable: shuffled within each part
            plan += order
        return plan

    def repeats_at(self, n: int) -> int:
        """Repetitions of the points at np=n."""
        return self.repeats_by_np.get(n, self.repeats)

    def _points(self, n: int, r: int) -> list[PointConfig]:
        """Repeat r of every point at np=n, per exchange backend and launch setting: training (scaling x mode), then
        the other stages (strong scaling)."""
        points = []
        settings = [({}, {})]  # A: the launch environment and the workload as they are
        if self.compare_env or self.compare_set:
            settings.append((self.compare_env, self.compare_set))  # B
        for backend, (env, workload_b) in itertools.product(self.exchange_backends, settings):
            how = {"exchange_backend": backend, "launch_env": dict(env), "workload_b": dict(workload_b),
                   **self.shared()}
            if "train" in self.stages:
                points += [PointConfig(scaling=s, mode=m, np=n, repeat=r, **how)
                           for s, m in itertools.product(self.scalings, self.modes)]
                if self.corun and n > 1:  # per backend and setting, so every point finds its own co-run share
                    points += [PointConfig(scaling=s, mode=self.modes[0], np=n, repeat=r, corun=True, **how)
                               for s in self.scalings]
            for stage in (s for s in STAGES if s != "train" and s in self.stages):
                strategies = self.graph_strategies if stage == "graph" else [""]
                points += [PointConfig(stage=stage, graph_strategy=g, scaling="strong", mode=self.modes[0], np=n,
                                       repeat=r, **how) for g in strategies]
        return points

    def _back_to_back(self) -> list[PointConfig]:
        """Each point's repeats in a row, np ascending (the order Slurm array indices of old sweeps rely on)."""
        points = []
        for n in self.nps:
            by_point = list(zip(*[self._points(n, r) for r in range(self.repeats_at(n))]))
            points += [p for repeats in by_point for p in repeats]
        return points

    @classmethod
    def from_dict(cls, data: dict) -> SweepConfig:
        return cls(**_known_fields(cls, data, "sweep"))

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"sweep file {path} not found: give the path of a TOML sweep file") from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"sweep file {path} is not valid TOML ({err}): fix it and rerun") from None
        return cls.from_dict(data.get("sweep", data))


def _known_fields(cls, data: dict, what: str) -> dict:
    """`data` checked against the fields of `cls`: an unknown key or a value of the wrong type is an error that
    names the valid keys or the expected type (a config file must never end in a traceback)."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise UsageError(f"unknown {what} setting(s) {', '.join(unknown)}: valid ones are "
                         f"{', '.join(sorted(defaults))}")
    for key, value in data.items():
        expected = type(defaults[key])
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"{what} setting {key} = {value!r} should be a {expected.__name__}")
    return dict(data)
