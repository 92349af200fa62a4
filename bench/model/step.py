"""The machine a prediction is for, and the step model: compute, each table's exchange, memory; fitted to a sweep."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.errors import UsageError
from bench.model.calibration import Calibration, calibrate_rows, read_comm_rows
from bench.model.collectives import Link, allreduce_s
from bench.model.profile import Profile, profile_from_records
from bench.model.shard_costs import (
    ShardTable,
    choose_sharding,
    replicated_tables_bytes,
    sharded_memory_bytes,
    sharded_network_s,
    sharded_step,
    sharded_tables_s,
    work_per_lookup_bytes,
)
from bench.model.table_costs import (
    DEFAULT_LOCAL_S_PER_BYTE,
    DENSE_MODES,
    EXCHANGE_COPIES,
    MODELLED_MODES,
    ExchangeCosts,
    choose_mode,
    dense_table_s,
    sparse_table_s,
    table_exchange_s,
    table_held_bytes,
    table_memory_bytes,
    table_network_s,
)
from bench.plan.config import SHARDED_MODES
from bench.results.records import read_records

THREAD_EXPONENT = 0.0
"""Speed-up of a rank's compute from its intra-op threads, as threads ** THREAD_EXPONENT. Measured here: the default
preset's np=1 step with 2 threads was no faster than an np=2 rank's with 1 (small ops, busy cores)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Machine:
    """Where the ranks run: the links within and between nodes, cores and memory."""

    local: Link
    """This machine's calibrated link: every link of the ring when no network is given."""
    network: Link | None = None
    """Between nodes; None: the local link at every scale. Given, it stands for every link of the ring, within a
    node too: a node's shared memory is at least as fast as its network, and this machine's is no guide to it."""
    ranks_per_node: int = 1
    cores_per_node: int = 1
    memory_per_rank_bytes: float | None = None
    """A rank's share of its node's memory; None: unlimited."""
    cpu_speedup: float = 1.0
    """How much faster a rank there computes than the rank that was measured here (all CPU work is divided by it)."""
    overlap: float = 0.0
    """Share of the backward pass that exchange time can hide behind (0: none, 1: all of it)."""
    alltoall: Link | None = None
    """This machine's calibrated all-to-all (bench.model.calibration.fit_alltoall); None: the local link."""

    def __post_init__(self):
        if self.ranks_per_node < 1 or self.cores_per_node < 1:
            raise UsageError(f"ranks per node ({self.ranks_per_node}) and cores per node ({self.cores_per_node}) "
                             f"must be at least 1")
        if self.cpu_speedup <= 0:
            raise UsageError(f"cpu speedup {self.cpu_speedup} must be positive (1 = as fast as this machine)")
        if not 0 <= self.overlap <= 1:
            raise UsageError(f"overlap {self.overlap} must be in [0, 1]: the share of backward that hides exchange")
        if self.memory_per_rank_bytes is not None and self.memory_per_rank_bytes <= 0:
            raise UsageError(f"memory per rank {self.memory_per_rank_bytes} must be positive")

    @property
    def link(self) -> Link:
        """The ring's slowest link: the network's where one is given, else this machine's."""
        return self.network if self.network is not None else self.local

    @property
    def alltoall_link(self) -> Link:
        """What the sharded modes' all-to-alls run over: the network where one is given, else this machine's
        all-to-all calibration, else its local link."""
        return self.network or self.alltoall or self.local

    def nodes(self, p: int) -> int:
        return math.ceil(p / self.ranks_per_node)


def cpu_factor(p: int, machine: Machine, measured_threads: int) -> float:
    """How much longer a rank's CPU work takes at p ranks than the np=1 rank's did: its core share (ranks beyond the
    node's cores time-share them, as the launcher shares threads out) over the machine's speed-up."""
    on_node = min(p, machine.ranks_per_node)
    threads = max(1, machine.cores_per_node // on_node)
    sharing = max(1.0, on_node * threads / machine.cores_per_node)
    return sharing * (measured_threads / threads) ** THREAD_EXPONENT / machine.cpu_speedup


def table_key(name: str) -> str:
    """A table as the exchanges name it ('sources.<source>.items'), from its parameter's name."""
    return name.removesuffix(".weight")


def auto_sharded_tables(record: dict) -> tuple[str, ...] | None:
    """The tables an auto point sharded (its record's `sharding`), () for one recorded before auto could shard;
    None for any other mode."""
    if record["point"]["mode"] != "auto":
        return None
    return tuple((record.get("sharding") or {}).get("tables") or ())


# ---- the model ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StepPrediction:
    """One predicted step of the slowest rank, with its parts (milliseconds) and memory."""

    p: int
    mode: str
    batch_per_rank: float
    compute_ms: float
    exchange_ms: float
    """Tables' exchanges (network + CPU work + optimizer) and the dense parameters' allreduce."""
    network_ms: float
    """The part of exchange_ms spent in collectives."""
    hidden_ms: float
    """Exchange time hidden behind the backward pass (the overlap term)."""
    step_ms: float
    memory_bytes: float
    exchange_bytes_held: float
    dense_tables: int
    """Tables exchanged dense this step (all in dense-reduce, none in sparse-gather, the cheaper choice in auto)."""


@dataclass(frozen=True, slots=True)
class LocalFit:
    """The per-byte CPU work of each mode around its collectives, fitted to the sweep's multi-rank points."""

    s_per_byte: dict
    """Mode -> seconds per byte (sparse-gather: per gathered byte; dense-reduce: per table byte)."""
    points: dict
    """Mode -> multi-rank points it was fitted to (0: the built-in default was used)."""
    rms_rel_error: dict
    """Mode -> rms relative error of the fitted model's step time over those points."""
    extra_s_per_byte: dict = field(default_factory=dict)
    """Mode -> CPU work beyond what table_costs charges it, seconds per byte of the rank's own sparse gradient:
    coalesced-gather's coalescing of its own rows (its tables are charged sparse-gather's cost per gathered byte) and
    auto's counting of its rows for the per-step decision; work on a rank's own rows, so it does not grow with P.
    Fitted after the modes above."""
    oversubscribed_left_out: int = 0
    """Multi-rank points left out of these fits because their ranks outnumbered their host's cores: the model
    shares a core out evenly (`cpu_factor`), and what lock-step ranks lose beyond that is not modelled, so fitted
    on such points the CPU work per byte would absorb it."""
    retained_table_copies: dict = field(default_factory=dict)
    """Mode -> resident memory beyond the tensors the memory model counts, in copies of the sparse tables' dense
    size (bytes per table byte), the median over the multi-rank points. Fitted for sparse-as-dense only, the one mode
    that makes its V x d copies afresh every step: the launch's reuse allocator (bench.launch.mpirun.ALLOCATORS)
    keeps freed memory resident, and the heap a rank holds ends above its live tensors (docs/costmodel.md)."""
    alltoall_imbalance: dict = field(default_factory=dict)
    """Sharded mode -> max / mean of the lookups a rank served (the records' alltoall_imbalance), the median over the
    multi-rank points; a mode without such points is taken as even (1). table-wise's comes from its placement, so
    only row-wise's is read off the records."""


@dataclass(frozen=True, slots=True)
class Model:
    """A profile, a calibration and the fitted CPU costs: predicts any mode at any rank count on any Machine."""

    profile: Profile
    calibration: Calibration
    local: LocalFit

    def costs(self, machine: Machine | None = None) -> ExchangeCosts:
        """The per-byte costs as measured here (CPU work unscaled: `step` applies `cpu_factor`), on the machine's
        link when one is given."""
        prof = self.profile
        optimizer = prof.optimizer_ms * 1e-3 / prof.gradient_bytes(prof.reference_batch)
        return ExchangeCosts(link=(machine.link if machine else self.calibration.link),
                             optimizer_s_per_byte=optimizer,
                             sparse_s_per_byte=self.local.s_per_byte["sparse-gather"],
                             dense_s_per_byte=self.local.s_per_byte["dense-reduce"],
                             source=f"{self.calibration.source} + sweep {prof.preset}",
                             sparse_as_dense_s_per_byte=self.local.s_per_byte.get(
                                 "sparse-as-dense", DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"]),
                             alltoall_link=(machine.alltoall_link if machine else self.calibration.alltoall),
                             row_wise_s_per_byte=self.local.s_per_byte.get(
                                 "row-wise", DEFAULT_LOCAL_S_PER_BYTE["row-wise"]))

    def costs_for(self, machine: Machine) -> ExchangeCosts:
        """What `auto` should decide with on `machine`: its link, and CPU work at its speed."""
        c = self.costs(machine)
        return replace(c, optimizer_s_per_byte=c.optimizer_s_per_byte / machine.cpu_speedup,
                       sparse_s_per_byte=c.sparse_s_per_byte / machine.cpu_speedup,
                       dense_s_per_byte=c.dense_s_per_byte / machine.cpu_speedup,
                       sparse_as_dense_s_per_byte=c.sparse_as_dense_s_per_byte / machine.cpu_speedup,
                       row_wise_s_per_byte=c.row_wise_s_per_byte / machine.cpu_speedup)

    def step(self, machine: Machine, p: int, mode: str, batch_per_rank: float,
             auto_sharded: Collection[str] | None = None) -> StepPrediction:
        """One step; for auto, `auto_sharded` names the tables it sharded (a record's `sharding` tables, so a point
        is priced as it ran); None: the tables `choose_sharding` shards."""
        prof = self.profile
        costs = self.costs(machine)
        link = machine.link
        cpu = cpu_factor(p, machine, prof.measured_threads)
        work = prof.lookups(batch_per_rank) / prof.lookups(prof.reference_batch)
        compute = prof.compute_ms * 1e-3 * work * cpu
        exchange = network = 0.0
        held = table_memory = 0.0
        dense_tables = 0
        # auto's budget: what the machine gives a rank beyond the np=1 peak and the dense parameters' copies
        budget = None if machine.memory_per_rank_bytes is None else \
            machine.memory_per_rank_bytes - prof.base_rss_mib * 2**20 - EXCHANGE_COPIES * prof.dense_param_bytes
        sharded = mode in SHARDED_MODES and p > 1
        if sharded:  # every table over the same three all-to-alls (bench.model.shard_costs)
            exchange, network, held, table_memory = self._sharded(machine, p, mode, batch_per_rank, cpu)
        for t in (() if sharded else prof.tables):
            rows_total = p * t.lookups(batch_per_rank)
            distinct_total = p * min(t.lookups(batch_per_rank), t.distinct(batch_per_rank, prof.reference_batch))
            union = t.distinct(p * batch_per_rank, prof.reference_batch, ranks=p)
            how = mode if p > 1 else "sparse-gather"  # Horovod exchanges nothing at np=1, whatever the mode
            if mode == "auto" and p > 1:  # shard the table row-wise? (once, bench.model.shard_costs.choose_sharding)
                whole = replicated_tables_bytes([ShardTable(t.name, t.rows, t.dim, 0.0)])
                choice = choose_sharding(costs, p, t.name, t.rows, t.dim, rows_total, distinct_total, cpu,
                                         None if budget is None else budget + whole)
                if choice.sharded if auto_sharded is None else table_key(t.name) in set(auto_sharded):
                    one = sharded_step("row-wise", p, [ShardTable(t.name, t.rows, t.dim, t.lookups(batch_per_rank))])
                    exchange += choice.row_wise_ms * 1e-3
                    network += sharded_network_s(one, p, machine.alltoall_link)
                    held += one.buffer_bytes
                    table_memory += choice.row_wise_bytes - whole
                    budget = None if budget is None else budget - (choice.row_wise_bytes - whole)
                    continue
            if mode == "auto":
                how, added = choose_mode(costs, p, t.rows, t.dim, rows_total, distinct_total, cpu, budget, link)
                budget = None if budget is None else budget - added
            dense_tables += p > 1 and how in DENSE_MODES
            exchange += table_exchange_s(how, costs, p, t.rows, t.dim, rows_total, distinct_total, union, cpu, link)
            network += table_network_s(how, p, t.rows, t.dim, rows_total, distinct_total, link) if p > 1 else 0.0
            held += table_held_bytes(how, p, t.rows, t.dim, rows_total, distinct_total, union)
            table_memory += table_memory_bytes(how, p, t.rows, t.dim, rows_total, distinct_total, union)
        dense_params = allreduce_s(prof.dense_param_bytes, p, link)
        exchange += dense_params
        network += dense_params
        held += prof.dense_param_bytes if p > 1 else 0.0
        if p > 1:  # what a mode does to the rank's own rows beyond its tables' costs
            exchange += self.local.extra_s_per_byte.get(mode, 0.0) * cpu * prof.gradient_bytes(batch_per_rank)
        # Exchange overlaps the backward pass (Horovod starts a gradient's collective as soon as it is ready); the
        # optimizer's share of `exchange` cannot, it runs after synchronize.
        hidden = min(machine.overlap * prof.backward_ms * 1e-3 * work * cpu, network) if p > 1 else 0.0
        step = compute + exchange - hidden
        # The np=1 peak at the reference batch, with training's own growth scaled to this batch's lookups.
        memory = ((prof.base_rss_mib + prof.train_growth_mib * (work - 1)) * 2**20 + table_memory
                  + (EXCHANGE_COPIES * prof.dense_param_bytes if p > 1 else 0.0)
                  + (self.local.retained_table_copies.get(mode, 0.0) * prof.table_bytes() if p > 1 else 0.0))
        return StepPrediction(p=p, mode=mode, batch_per_rank=batch_per_rank, compute_ms=compute * 1e3,
                              exchange_ms=exchange * 1e3, network_ms=network * 1e3, hidden_ms=hidden * 1e3,
                              step_ms=step * 1e3, memory_bytes=memory, exchange_bytes_held=held,
                              dense_tables=dense_tables)

    def _sharded(self, machine: Machine, p: int, mode: str, batch_per_rank: float, cpu: float) -> tuple:
        """(exchange s, network s, held bytes, table memory bytes beyond the np=1 peak) of a sharded step: the np=1
        peak holds every table whole with its Adagrad state, a rank here its shard and the all-to-alls' buffers."""
        prof = self.profile
        tables = [ShardTable(t.name, t.rows, t.dim, t.lookups(batch_per_rank)) for t in prof.tables]
        imbalance = self.local.alltoall_imbalance.get(mode, 1.0) if mode == "row-wise" else 1.0
        step = sharded_step(mode, p, tables, imbalance)
        optimizer = prof.optimizer_ms * 1e-3 / prof.gradient_bytes(prof.reference_batch)
        work = self.local.s_per_byte.get(mode, DEFAULT_LOCAL_S_PER_BYTE[mode])
        exchange = sharded_tables_s(step, p, machine.alltoall_link, work, optimizer, cpu)
        memory = sharded_memory_bytes(step) - replicated_tables_bytes(tables)
        return exchange, sharded_network_s(step, p, machine.alltoall_link), step.buffer_bytes, memory

    def memory_bytes(self, machine: Machine, p: int, mode: str, batch_per_rank: float) -> float:
        return self.step(machine, p, mode, batch_per_rank).memory_bytes

    def oom_rank_count(self, machine: Machine, mode: str, batch_per_rank: float, limit: int = 1 << 24) -> int | None:
        """The smallest rank count whose per-rank memory exceeds the machine's memory per rank; None if none up to
        `limit` (or no limit is known)."""
        cap = machine.memory_per_rank_bytes
        if cap is None:
            return None
        fits = lambda p: self.memory_bytes(machine, p, mode, batch_per_rank) <= cap  # noqa: E731
        if not fits(1):
            return 1
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > limit:
                return None
        while hi - lo > 1:  # memory grows with p: the first p that does not fit lies in (lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return hi

    def crossover_density(self, machine: Machine, p: int) -> float | None:
        """The density (distinct rows per rank / V, each touched once) above which dense-reduce is cheaper than
        sparse-gather for the workload's largest table at p ranks; None if sparse-gather is cheaper up to density 1,
        0.0 if dense-reduce is cheaper already at density 1e-7."""
        if p <= 1:
            return None
        t = max(self.profile.tables, key=lambda t: t.rows)
        costs = self.costs(machine)
        cpu = cpu_factor(p, machine, self.profile.measured_threads)
        link = machine.link

        def gap(density: float) -> float:  # dense - sparse: positive while sparse is cheaper
            rows = density * t.rows
            union = t.rows * (1 - (1 - density) ** p)
            return (dense_table_s(costs, p, t.rows, t.dim, union, cpu, link)
                    - sparse_table_s(costs, p, t.dim, p * rows, cpu, link))
        lo, hi = 1e-7, 1.0
        if gap(lo) <= 0:
            return 0.0
        if gap(hi) > 0:
            return None
        for _ in range(60):  # bisection on a log scale
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
        return hi


def fit_local_work(records: list[dict], profile: Profile, calibration: Calibration, machine: Machine,
                   profile_of: Callable[[dict], Profile] | None = None) -> LocalFit:
    """Each mode's CPU work around its collectives, seconds per byte, by least squares in relative error over the
    sweep's ok multi-rank points of that mode: what the step model leaves unexplained, against the bytes the work
    scales with (gathered bytes; table bytes). Then, on top of those, coalesced-gather's and auto's own work
    (`LocalFit.extra_s_per_byte`) against the bytes of the rank's own sparse gradient. Last, sparse-as-dense's
    resident memory beyond its counted tensors (`LocalFit.retained_table_copies`). `profile_of` gives a record the
    profile of its own sweep's np=1 points (default: `profile` for every record). Oversubscribed points are left out
    of every fit (`LocalFit.oversubscribed_left_out`)."""
    profile_for = profile_of or (lambda r: profile)
    s_per_byte, used, rms = {}, {}, {}
    multi = [r for r in records if r["status"] == "ok" and r["np"] > 1]
    fitted_on = [r for r in multi if not r.get("oversubscribed")]

    def fit(model: Model, mode: str, scale) -> float | None:
        points = [r for r in fitted_on if r["point"]["mode"] == mode]
        xs, ys, ts = [], [], []
        for r in points:
            p, batch = r["np"], r["batch_per_rank"]
            measured = r["metrics"]["step_time_ms"] * 1e-3
            xs.append(cpu_factor(p, machine, profile.measured_threads) * scale(p, batch))
            ys.append(measured - replace(model, profile=profile_for(r)).step(
                machine, p, mode, batch, auto_sharded=auto_sharded_tables(r)).step_ms * 1e-3)
            ts.append(measured)
        used[mode] = len(xs)
        if not xs:
            return None
        x, y, t = np.array(xs), np.array(ys), np.array(ts)
        lam = max(0.0, float(np.sum(x * y / t**2) / np.sum(x**2 / t**2)))
        rms[mode] = float(np.sqrt(np.mean(((lam * x - y) / t) ** 2)))
        return lam

    gathered = lambda p, batch: p * profile.gradient_bytes(batch)  # noqa: E731
    imbalance = {mode: float(np.median(seen)) for mode in ("row-wise",)
                 if (seen := [r["metrics"]["alltoall_imbalance"] for r in fitted_on if r["point"]["mode"] == mode
                              and r["metrics"].get("alltoall_imbalance")])}
    zero = Model(profile, calibration, LocalFit(s_per_byte={m: 0.0 for m in MODELLED_MODES}, points={},
                                                rms_rel_error={}, alltoall_imbalance=imbalance))
    sharded_work = lambda p, batch: sum(t.lookups(batch) * work_per_lookup_bytes(t.dim)  # noqa: E731
                                        for t in profile.tables)
    for mode in ("sparse-gather", "dense-reduce", "sparse-as-dense", *SHARDED_MODES):
        scale = (sharded_work if mode in SHARDED_MODES else gathered if mode not in DENSE_MODES
                 else (lambda p, batch: profile.table_bytes()))
        lam = fit(zero, mode, scale)
        s_per_byte[mode] = DEFAULT_LOCAL_S_PER_BYTE[mode] if lam is None else lam
    fitted = Model(profile, calibration, LocalFit(s_per_byte=dict(s_per_byte), points={}, rms_rel_error={},
                                                  alltoall_imbalance=imbalance))
    own = lambda p, batch: profile.gradient_bytes(batch)  # noqa: E731
    extra = {mode: lam for mode in ("coalesced-gather", "auto") if (lam := fit(fitted, mode, own)) is not None}
    retained = {}
    for mode in ("sparse-as-dense",):
        over = [(r["metrics"]["peak_rss_mib"] * 2**20 - replace(fitted, profile=profile_for(r))
                 .step(machine, r["np"], mode, r["batch_per_rank"]).memory_bytes) / profile.table_bytes()
                for r in fitted_on if r["point"]["mode"] == mode]
        if over:  # a median: one rank's heap moves by a table's size from one repeat to the next
            retained[mode] = max(0.0, float(np.median(over)))
    return LocalFit(s_per_byte=s_per_byte, points=used, rms_rel_error=rms, extra_s_per_byte=extra,
                    oversubscribed_left_out=len(multi) - len(fitted_on), retained_table_copies=retained,
                    alltoall_imbalance=imbalance)


def this_machine(calibration: Calibration, profile: Profile, ranks: int, memory_per_rank_bytes=None) -> Machine:
    """The machine that measured: `ranks` ranks on each node of it, its cores time-shared beyond their number, and
    each rank its share of the node's memory (the measured machine's memory / `ranks`, unless given)."""
    if memory_per_rank_bytes is None and profile.measured_memory_mib:
        memory_per_rank_bytes = profile.measured_memory_mib * 2**20 / max(1, ranks)
    return Machine(local=calibration.link, ranks_per_node=max(1, ranks), cores_per_node=profile.measured_cores,
                   memory_per_rank_bytes=memory_per_rank_bytes, alltoall=calibration.alltoall)


def fit_model(records: list[dict], comm_rows: list[dict], environment: dict | None = None,
              backend: str = "horovod", source: str = "") -> Model:
    """The model of a sweep's records and comm rows: its np=1 profile, the link of the comm rows, the CPU work
    around the collectives (bootstrap draws refit through here too: bench.model.uncertainty)."""
    profile = profile_from_records(records, environment)
    calibration = calibrate_rows(comm_rows, backend, source=source)
    ranks = max([r["np"] for r in records] + [1])
    local = fit_local_work(records, profile, calibration, this_machine(calibration, profile, ranks))
    return Model(profile, calibration, local)


def read_sweep(sweep_dir: str | Path) -> tuple[list[dict], dict]:
    """A sweep folder's records and environment.json ({} without one)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"results folder {sweep_dir} not found: give a folder written by `alure-bench sweep`")
    env_path = sweep_dir / "environment.json"
    return read_records(sweep_dir), json.loads(env_path.read_text()) if env_path.exists() else {}


def build_model(sweep_dir: str | Path, comm_dir: str | Path, backend: str = "horovod") -> Model:
    """Calibrate everything from a sweep folder and a comm folder."""
    records, env = read_sweep(sweep_dir)
    return fit_model(records, read_comm_rows(comm_dir), env, backend, source=str(comm_dir))
