"""What `alure-bench comm` and `alure-bench crossover` measure: their configs, validated, and the parsers of the
sizes, lists and environment settings their flags take."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from bench.errors import UsageError
from bench.plan.sizes import format_bytes

OPS = ("allreduce", "allgather", "sparse-pair", "alltoall", "alltoall-zipf")
"""The collectives the micro-benchmark times (bench.ranks.comm_rank runs them)."""
BACKENDS = ("horovod", "mpi4py", "gloo")
"""The libraries it times them through."""
SPARSE_DIM = 64
"""Columns of the embedding table whose gradient sparse-pair stands for."""

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str, what: str = "size") -> int:
    """'64M', '1K', '4096', '1.5MiB' -> bytes (binary units: K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what} {text!r} is not a size: write a number with an optional K, M or G (e.g. 64M)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 4:
        raise UsageError(f"{what} {text!r} is below 4 bytes (one float32): use at least 4")
    return n


def doubling_sizes(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... up to hi."""
    sizes = []
    while lo <= hi:
        sizes.append(lo)
        lo *= 2
    return sizes


def parse_choices(text: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each checked against `valid`."""
    items = tuple(s.strip() for s in str(text).split(",") if s.strip())
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise UsageError(f"unknown {what} {','.join(bad) or repr(text)}: choose from {','.join(valid)}")
    return items


def parse_env_setting(text: str, what: str = "--compare-env") -> dict[str, str]:
    """'VAR=VALUE VAR2=VALUE2' (spaces or commas between) -> {VAR: VALUE, ...}: variables set on top of the
    suite's launch environment."""
    pairs = {}
    for item in re.split(r"[\s,]+", str(text).strip()):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"{what} {item!r} is not VAR=VALUE: write e.g. {what} "
                             f"'OMPI_MCA_btl_vader_single_copy_mechanism=none MALLOC_MMAP_MAX_=65536'")
        pairs[name] = value
    if not pairs:
        raise UsageError(f"{what} is empty: give at least one VAR=VALUE")
    return pairs


def format_env_setting(pairs: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs.items()) or "the suite's launch environment"


def parse_numbers(text: str, kind, what: str) -> tuple:
    try:
        values = tuple(kind(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a comma-separated list of numbers (e.g. 2,4)") from None
    if not values:
        raise UsageError(f"{what} is empty: give at least one number")
    return values


def _check_counts(warmup: int, iters: int) -> None:
    if warmup < 0:
        raise UsageError(f"--warmup {warmup} is negative: use 0 or more")
    if iters < 1:
        raise UsageError(f"--iters {iters} is below 1: use at least 1")


def _check_np(np: int) -> None:
    if np < 1:
        raise UsageError(f"--np {np} is below 1: launch at least one rank")


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """What one `alure-bench comm` run measures."""

    np: int = 2
    """Ranks per launch (more than the cores is allowed and flagged as oversubscribed)."""
    backends: tuple[str, ...] = BACKENDS
    """Communication backends, each run in a launch of its own; memcpy (the ceiling) is always measured."""
    ops: tuple[str, ...] = OPS
    """Collectives: allreduce (float32 sum), allgather (size = total gathered), sparse-pair."""
    min_bytes: int = 1 << 10
    """Smallest size; sizes double from here."""
    max_bytes: int = 64 << 20
    """Largest size."""
    warmup: int = 5
    """Untimed iterations per (op, size)."""
    iters: int = 30
    """Timed iterations per (op, size), shared out over the rounds."""
    rounds: int = 2
    """Launches per backend, in alternating order (A B C C B A): on a noisy machine, the same-run comparison of
    backends then does not hinge on which one ran during someone else's burst."""
    tensors: int = 1
    """Split each allreduce into this many tensors started together (what Horovod's tensor fusion acts on)."""
    dim: int = SPARSE_DIM
    """Columns of the table whose gradient sparse-pair stands for."""
    baseline_env: dict[str, str] = field(default_factory=dict)
    """Setting A: variables set on top of the suite's launch environment for every launch (default none)."""
    compare_env: dict[str, str] | None = None
    """Setting B: when given, every backend also runs with these variables on top of the suite's launch
    environment, launches of A and B interleaved, and each size's busbw is printed as B/A."""
    hosts: tuple[str, ...] = ()
    """Hosts to place the ranks on (bench.launch.hosts), ranks_per_host each; empty: this host."""
    ranks_per_host: int = 1
    """Ranks on each of `hosts`."""
    controller: str = "mpi"
    """Horovod's controller and CPU collectives: mpi or gloo (bench.launch.mpirun.Launcher.controller)."""

    def __post_init__(self):
        _check_np(self.np)
        _check_counts(self.warmup, self.iters)
        for b in self.backends:
            if b not in BACKENDS:
                raise UsageError(f"unknown backend {b}: choose from {','.join(BACKENDS)}")
        for o in self.ops:
            if o not in OPS:
                raise UsageError(f"unknown op {o}: choose from {','.join(OPS)}")
        if self.min_bytes > self.max_bytes:
            raise UsageError(f"--min-bytes {format_bytes(self.min_bytes)} is above --max-bytes "
                             f"{format_bytes(self.max_bytes)}: swap them")
        if not 1 <= self.rounds <= self.iters:
            raise UsageError(f"--rounds {self.rounds} must be between 1 and --iters ({self.iters})")
        if self.tensors < 1:
            raise UsageError(f"--tensors {self.tensors} is below 1: use at least 1")
        # allgather holds S gathered + S/P sent (Horovod allocates another S per call): about 3 S per rank.
        need = 3 * self.max_bytes * self.np
        available = _available_memory()
        if need > available:
            raise UsageError(f"--max-bytes {format_bytes(self.max_bytes)} on {self.np} ranks needs about "
                             f"{need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is available: "
                             f"lower --max-bytes or --np")

    @property
    def sizes(self) -> list[int]:
        return doubling_sizes(self.min_bytes, self.max_bytes)


@dataclass(kw_only=True, slots=True)
class CrossoverConfig:
    """What one `alure-bench crossover` run measures."""

    nps: tuple[int, ...] = (2,)
    """Process counts, one Horovod launch each."""
    rows: int = 100_000
    """V: rows of the embedding table."""
    dim: int = 64
    """d: columns of the embedding table."""
    densities: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.7, 1.0)
    """Rows touched per rank / V."""
    lookups_per_row: int = 1
    """Entries per touched row in the uncoalesced gradient (an embedding gradient has one per lookup; Horovod sends
    them all, uncoalesced): nnz per rank = density x V x lookups_per_row."""
    warmup: int = 3
    """Untimed iterations per density (each iteration runs both modes)."""
    iters: int = 15
    """Timed iterations per density."""

    def __post_init__(self):
        for np in self.nps:
            _check_np(np)
        _check_counts(self.warmup, self.iters)
        if self.rows < 1 or self.dim < 1 or self.lookups_per_row < 1:
            raise UsageError(f"--rows {self.rows}, --dim {self.dim} and --lookups-per-row {self.lookups_per_row} "
                             f"must all be at least 1")
        bad = [d for d in self.densities if not 0 < d <= 1]
        if bad:
            raise UsageError(f"density {bad[0]:g} is outside (0, 1]: densities are rows touched per rank / V")
        # dense-reduce holds the V x d table densified; sparse-gather holds P x the touched rows.
        need = max(self.nps) * 4 * self.rows * self.dim * (2 + max(self.nps) * max(self.densities)
                                                          * self.lookups_per_row)
        if need > _available_memory():
            raise UsageError(f"a {self.rows} x {self.dim} table on {max(self.nps)} ranks needs about "
                             f"{need / 2**30:.1f} GiB: lower --rows, --dim or --np")


def _available_memory() -> int:
    import psutil
    return psutil.virtual_memory().available
