"""`alure-bench comm` and `alure-bench crossover`: what the collectives cost here, and where sparse stops paying.

comm: latency and bandwidth of allreduce, allgather and sparse-pair (the two allgathers of sparse-gather) over
Horovod (as the harness configures it), raw MPI (mpi4py) and torch.distributed/gloo, sizes doubling from --min-bytes
to --max-bytes, each backend in a launch of its own; plus this machine's memcpy bandwidth as the ceiling. Latency
of an iteration is the slowest rank's (a barrier starts each iteration); figures follow nccl-tests (docs/design.md):
algbw = S/t, busbw = algbw x `busbw_factor`, GB/s = 1e9 bytes/s. Each backend runs in --rounds launches in
alternating order (A B C C B A), iterations pooled, and Horovod's allreduce busbw is printed as a fraction of raw MPI's
per size (the target is 0.9 from 4 MiB up; sizes below it are named).

crossover: with Horovod, time and bytes of sparse-gather (allgather of the uncoalesced gradient's indices and
values, horovod's sparse_allreduce_async) against dense-reduce (to_dense + allreduce) of a V x d embedding gradient,
over density (rows touched per rank / V) and process count; the crossover density per P is where the two times meet.

The rank side lives in bench/ranks/comm_rank.py; this module plans, launches, aggregates, prints and writes.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from bench.plan.capacity import add_oversubscribe_flag, check_local_ranks
from bench.ranks.comm_rank import BACKENDS, OPS, SPARSE_DIM, geometry, memcpy_call, timed
from bench.errors import UsageError
from bench.launch.gloo_rendezvous import free_port
from bench.launch.hosts import (add_host_flags, check_fits, hosts_launcher, launcher_from_args, link_fractions,
                         link_of_host, network_summary, shares_one_machine)
from bench.results.records import atomic_write_json, atomic_write_text, ensure_writable
from bench.results.scaling import busbw_factor
from bench.launch.mpirun import (HOROVOD_SETTINGS, LOCAL, Launcher, is_oversubscribed, mpi_environment, physical_cores,
                                 run_ranks)
from bench.launch.rank_output import python_module_argv
from bench.ranks.handback import collect, failures

ROW_FIELDS = ("backend", "op", "np", "size_bytes", "latency_us_median", "latency_us_min", "latency_us_max",
              "algbw_gbps", "busbw_gbps")
"""The comm row names of docs/design.md "Results": other parts rely on them."""
LAUNCH_FIELDS = ("setting", "single_copy_mechanism", "allocator", "horovod_cycle_time_ms",
                 "horovod_fusion_threshold_bytes", "horovod_cache_capacity", "horovod_autotune")
"""What a row ran with (bench.launch.environment.launch_settings, read by the ranks from their own environment); `setting`
is A, or B under --compare-env."""
EXTRA_FIELDS = ("bytes_moved", "tensors", "warmup", "iters", "rounds", "oversubscribed", "minor_faults_per_call",
                "caller_busy_fraction", *LAUNCH_FIELDS)
"""Extra columns: bytes_moved is the S of algbw (differs from size_bytes only for sparse-pair and sizes P does not
divide); tensors is how many tensors an allreduce was split into (1 unless --tensors); iters is the timed iterations
pooled over `rounds` launches of the backend, each with `warmup` untimed ones first; minor_faults_per_call is the
largest rank's page faults per timed call and caller_busy_fraction the largest rank's CPU time of the calling
thread over the timed wall time (both the mean over launches); then the launch fields."""
CROSSOVER_FIELDS = ("np", "density", "rows_touched_per_rank", "nnz_per_rank", "mode", "time_ms_median", "time_ms_p10",
                    "time_ms_p90", "bytes_sent_per_rank", "bytes_held_per_rank", "oversubscribed")
RATIO_TARGETS = {"allreduce": 0.8, "allgather": 0.7, "sparse-pair": 0.7}
"""The fraction of raw MPI's busbw Horovod should reach per op from RATIO_FROM_BYTES up (a benchmark target,
printed, never asserted)."""
RATIO_FROM_BYTES = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


# --- pure pieces ------------------------------------------------------------------------------------------------

def parse_size(text: str, what: str = "size") -> int:
    """'64M', '1K', '4096', '1.5MiB' -> bytes (binary units: K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what} {text!r} is not a size: write a number with an optional K, M or G (e.g. 64M)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 4:
        raise UsageError(f"{what} {text!r} is below 4 bytes (one float32): use at least 4")
    return n


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


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


def rank_max(per_rank_times: list[list[float]]) -> list[float]:
    """Per iteration, the slowest rank's time: the slowest rank sets the pace."""
    if len({len(t) for t in per_rank_times}) != 1:
        raise ValueError("ranks timed different numbers of iterations")
    return [max(ts) for ts in zip(*per_rank_times)]


def comm_row(backend: str, op: str, np: int, size_bytes: int, bytes_moved: int, times_s: list[float], *,
             tensors: int = 1, warmup: int = 0, rounds: int = 1, oversubscribed: bool = False,
             launch: dict | None = None, setting: str = "A", minor_faults_per_call: float | None = None,
             caller_busy_fraction: float | None = None) -> dict:
    """One comm row from the per-iteration times (already the rank maximum), with what it ran with."""
    median = statistics.median(times_s)
    algbw = bytes_moved / median / 1e9
    return {"backend": backend, "op": op, "np": np, "size_bytes": size_bytes,
            "latency_us_median": round(median * 1e6, 3), "latency_us_min": round(min(times_s) * 1e6, 3),
            "latency_us_max": round(max(times_s) * 1e6, 3), "algbw_gbps": float(f"{algbw:.6g}"),
            "busbw_gbps": float(f"{algbw * busbw_factor(op, np):.6g}"), "bytes_moved": bytes_moved, "tensors": tensors,
            "warmup": warmup, "iters": len(times_s), "rounds": rounds, "oversubscribed": oversubscribed,
            "minor_faults_per_call": None if minor_faults_per_call is None else round(minor_faults_per_call, 1),
            "caller_busy_fraction": None if caller_busy_fraction is None else round(caller_busy_fraction, 3),
            "setting": setting, **{k: (launch or {}).get(k, "") for k in LAUNCH_FIELDS if k != "setting"}}


def busbw_ratios(rows: list[dict], num: str = "horovod", den: str = "mpi4py", op: str = "allreduce",
                 setting: str = "A") -> list[dict]:
    """busbw of `num` over `den` per size, for the sizes both have (same run, same np, same setting): from the
    median latencies (the figure), and from the minimum ones (what each reached at best; on a shared machine,
    noise only adds)."""
    return _ratios(rows, op, (num, setting), (den, setting))


def setting_ratios(rows: list[dict], backend: str, op: str) -> list[dict]:
    """busbw under setting B over setting A for one backend and op, per size (--compare-env)."""
    return _ratios(rows, op, (backend, "B"), (backend, "A"))


def _ratios(rows: list[dict], op: str, num: tuple[str, str], den: tuple[str, str]) -> list[dict]:
    by = {(r["backend"], r.get("setting", "A"), r["size_bytes"]): r for r in rows if r["op"] == op}
    out = []
    for (backend, setting, size), r in sorted(by.items(), key=lambda kv: kv[0][2]):
        other = by.get((*den, size))
        if (backend, setting) == num and other and other["busbw_gbps"] > 0:
            out.append({"op": op, "size_bytes": size, "numerator": num[0], "denominator": den[0],
                        **({"numerator_setting": num[1], "denominator_setting": den[1]} if num[1] != den[1] else {}),
                        "busbw_ratio": round(r["busbw_gbps"] / other["busbw_gbps"], 4),
                        "busbw_ratio_at_min_latency": round(other["latency_us_min"] / r["latency_us_min"], 4)})
    return out


def crossover_density(densities, sparse_s, dense_s) -> float | None:
    """The density where sparse-gather's time meets dense-reduce's, by linear interpolation between the two measured
    densities around the first point (from low density up) where sparse stops being faster; None when it never
    does in range (sparse faster throughout) or is never faster (dense faster throughout)."""
    points = sorted(zip(densities, sparse_s, dense_s))
    diffs = [(d, s - t) for d, s, t in points]
    if diffs and diffs[0][1] >= 0:
        return diffs[0][0] if diffs[0][1] == 0 else None
    for (d0, g0), (d1, g1) in zip(diffs, diffs[1:]):
        if g0 < 0 <= g1:
            return d0 + (0 - g0) * (d1 - d0) / (g1 - g0)
    return None


def describe_crossover(densities, sparse_s, dense_s, rows: int) -> str:
    x = crossover_density(densities, sparse_s, dense_s)
    if x is not None:
        return f"density {x:.4g} ({x * rows:.0f} rows per rank)"
    faster = "sparse-gather" if all(s < t for s, t in zip(sparse_s, dense_s)) else "dense-reduce"
    return f"none in range ({faster} faster at every density from {min(densities):g} to {max(densities):g})"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# --- configs ----------------------------------------------------------------------------------------------------

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
            raise UsageError(f"--min-bytes {format_size(self.min_bytes)} is above --max-bytes "
                             f"{format_size(self.max_bytes)}: swap them")
        if not 1 <= self.rounds <= self.iters:
            raise UsageError(f"--rounds {self.rounds} must be between 1 and --iters ({self.iters})")
        if self.tensors < 1:
            raise UsageError(f"--tensors {self.tensors} is below 1: use at least 1")
        # allgather holds S gathered + S/P sent (Horovod allocates another S per call): about 3 S per rank.
        need = 3 * self.max_bytes * self.np
        available = _available_memory()
        if need > available:
            raise UsageError(f"--max-bytes {format_size(self.max_bytes)} on {self.np} ranks needs about "
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


# --- results folder ---------------------------------------------------------------------------------------------

def results_dir(out: str | None, prefix: str) -> Path:
    """The folder to write into (default results/local/<prefix>-<timestamp>/), created and checked writable now,
    before anything is measured."""
    if out is None:
        base = Path("results/local") / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} is a file: pass a directory")
    return ensure_writable(path)


def write_csv_atomic(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    """CSV with a header; booleans as true|false (docs/design.md); written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def environment_record(np: int, extra: dict[str, str] | None = None, compare: dict[str, str] | None = None,
                       launcher: Launcher = LOCAL) -> dict:
    """environment.json: bench.launch.environment's record plus the variables the ranks were launched with (and those
    of setting B under --compare-env)."""
    from bench.launch.environment import ENV_PREFIXES, capture_environment

    def variables(overrides):
        env = launcher.environment(np, {**os.environ, **(overrides or {})})
        return {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES)}
    env = capture_environment()
    env["launch_variables"] = variables(extra)
    if compare is not None:
        env["compare_launch_variables"] = variables(compare)
    return env


# --- launching --------------------------------------------------------------------------------------------------



@dataclass(slots=True)
class LaunchResult:
    records: list[dict] = field(default_factory=list)
    """One record per rank, in rank order (empty on failure)."""
    error: str | None = None
    """Why the launch failed, in one line; None when it did not."""
    seconds: float = 0.0


def launch_program(spec: dict, np: int, timeout_s: float, extra_env: dict[str, str] | None = None,
                   launcher: Launcher = LOCAL) -> LaunchResult:
    """Run bench.ranks.comm_rank with `spec` on `np` ranks through bench.launch.mpirun, `extra_env` set on top of this
    process's environment; collect each rank's record."""
    env = {**os.environ, **(extra_env or {})}
    if spec.get("backend") == "gloo":
        # Rank 0 runs on the first host: torch's rendezvous listens there.
        env.update(MASTER_ADDR=launcher.hosts[0] if launcher.hosts else "127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory(prefix="alure-comm-") as work:
        spec = dict(spec, work_dir=work)
        spec_path = Path(work) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        run = run_ranks(np, python_module_argv("bench.ranks.comm_rank", str(spec_path)), timeout_s=timeout_s, env=env,
                        launcher=launcher)
        handed = collect(work)
    records = [h["result"] for h in handed if h["status"] == "ok"]
    if run.timed_out:
        return LaunchResult(error=f"timed out after {run.seconds:.0f} s (lower --max-bytes or --iters)",
                            seconds=run.seconds)
    if failed := failures(handed):
        return LaunchResult(error=failed[0]["reason"], seconds=run.seconds)
    if run.returncode != 0 or len(records) != np:
        last = next((line for line in reversed(run.stderr.strip().splitlines())
                     if line.strip() and not line.startswith(("---", "  "))), "no output")
        return LaunchResult(error=f"exited {run.returncode} with {len(records)}/{np} rank records: {last.strip()}",
                            seconds=run.seconds)
    return LaunchResult(records=records, seconds=run.seconds)


def comm_launcher(cfg: CommConfig) -> Launcher:
    if cfg.hosts:
        return replace(hosts_launcher(cfg.hosts, cfg.ranks_per_host), controller=cfg.controller)
    return Launcher(controller=cfg.controller)


def _timeout_s(total_bytes: int, calls: int) -> float:
    """A hang guard, not a budget: two minutes for start-up plus the calls at a pessimistic 20 MB/s."""
    return 120 + calls * 0.01 + total_bytes / 20e6


# --- comm -------------------------------------------------------------------------------------------------------

def measure_memcpy(cfg: CommConfig, launch: dict | None = None) -> list[dict]:
    """The single-threaded copy ceiling, in this process (`launch`: this process's launch fields)."""
    rows = []
    for size in cfg.sizes:
        call = memcpy_call(size)
        times = timed(call, lambda: None, cfg.warmup, cfg.iters)
        rows.append(comm_row("memcpy", "memcpy", 1, size, geometry("memcpy", size, 1).bytes_moved, times,
                             tensors=1, warmup=cfg.warmup, oversubscribed=False, launch=launch))
        del call
    return rows


def launch_order(backends: tuple[str, ...], rounds: int) -> list[str]:
    """Backends in launch order: forward, then backward, and so on (A B C C B A A B C ...), so slow drifts in the
    machine's load fall on every backend alike and adjacent launches pair up for same-run ratios."""
    order = []
    for r in range(rounds):
        order += list(backends if r % 2 == 0 else reversed(backends))
    return order


def split_iters(iters: int, rounds: int) -> list[int]:
    """`iters` timed iterations shared out over `rounds` launches (the first ones take the remainder)."""
    base, extra = divmod(iters, rounds)
    return [base + (r < extra) for r in range(rounds)]


def measure_backend(cfg: CommConfig, backend: str, iters: int,
                    extra_env: dict[str, str] | None = None) -> tuple[dict, dict, LaunchResult]:
    """One launch of `backend` with `iters` timed iterations per point; returns {(op, size): (bytes_moved,
    per-iteration rank-max seconds, faults per call, caller busy fraction)}, the settings rank 0 saw, and the
    launch."""
    spec = {"program": "comm", "backend": backend, "ops": list(cfg.ops), "sizes": cfg.sizes, "dim": cfg.dim,
            "tensors": cfg.tensors, "warmup": cfg.warmup, "iters": iters}
    calls = (cfg.warmup + iters) * len(cfg.ops) * len(cfg.sizes) * cfg.tensors
    total = (cfg.warmup + iters) * len(cfg.ops) * sum(cfg.sizes)
    launch = launch_program(spec, cfg.np, _timeout_s(total, calls), extra_env, comm_launcher(cfg))
    if launch.error:
        return {}, {}, launch
    points = {}
    for per_rank in zip(*(r["results"] for r in launch.records)):
        p = per_rank[0]
        points[(p["op"], p["size_bytes"])] = (p["bytes_moved"], rank_max([q["times_s"] for q in per_rank]),
                                               max(q.get("minor_faults_per_call", 0) for q in per_rank),
                                               max(q.get("caller_busy_fraction", 0) for q in per_rank))
    return points, launch.records[0]["settings"], launch


def format_comm_table(rows: list[dict], ratios: dict[int, float] | None = None, vs: str = "mpi4py") -> str:
    """One backend and op: size, latency median/min/max, algbw, busbw (and a ratio per size where given)."""
    r0 = rows[0]
    flag = f"  [OVERSUBSCRIBED: {r0['np']} ranks on {physical_cores()} cores]" if r0["oversubscribed"] else ""
    split = f", allreduce split into {r0['tensors']} tensors" if r0["tensors"] > 1 else ""
    runs = f" over {r0['rounds']} launches" if r0.get("rounds", 1) > 1 else ""
    setting = f"  [setting {r0['setting']}]" if r0.get("setting", "A") != "A" else ""
    lines = [f"{r0['backend']} {r0['op']}  np={r0['np']}  ({r0['iters']} timed iterations{runs}, "
             f"{r0['warmup']} warm-up per launch{split}){setting}{flag}",
             f"{'size':>9} {'lat med us':>11} {'min us':>10} {'max us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"
             f" {'faults/call':>11} {'busy':>5}" + (f" {'vs ' + vs:>9}" if ratios else "")]
    for r in rows:
        line = (f"{format_size(r['size_bytes']):>9} {r['latency_us_median']:11.1f} {r['latency_us_min']:10.1f} "
                f"{r['latency_us_max']:10.1f} {r['algbw_gbps']:11.3f} {r['busbw_gbps']:11.3f}"
                + (f" {r['minor_faults_per_call']:11.1f} {r['caller_busy_fraction']:5.2f}"
                   if r.get("minor_faults_per_call") is not None else f" {'-':>11} {'-':>5}"))
        if ratios:
            ratio = ratios.get(r["size_bytes"])
            line += f" {ratio:9.2f}" if ratio is not None else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def ratio_verdict(ratios: list[dict]) -> str:
    """The plain sentence about Horovod vs raw MPI for one op from RATIO_FROM_BYTES up (judged on the medians)."""
    op = ratios[0]["op"] if ratios else "allreduce"
    target = RATIO_TARGETS[op]
    big = [r for r in ratios if r["size_bytes"] >= RATIO_FROM_BYTES]
    if not big:
        return (f"Horovod/MPI {op} busbw: no size >= {format_size(RATIO_FROM_BYTES)} with both backends "
                f"in this run")
    parts = ", ".join(f"{format_size(r['size_bytes'])} {r['busbw_ratio']:.2f} [{r['busbw_ratio_at_min_latency']:.2f}]"
                      for r in big)
    below = [r for r in big if r["busbw_ratio"] < target]
    verdict = (f"BELOW {target} at {', '.join(format_size(r['size_bytes']) for r in below)}" if below
               else f"at or above {target} at every size >= {format_size(RATIO_FROM_BYTES)}")
    return (f"Horovod/MPI (mpi4py) {op} busbw, same run, from median latencies [from minimum latencies]: "
            f"{parts}; {verdict}")


def format_compare_table(rows: list[dict], backend: str, op: str) -> str:
    """Setting A against setting B for one backend and op, size by size, with B/A of busbw."""
    by = {(r["setting"], r["size_bytes"]): r for r in rows if r["backend"] == backend and r["op"] == op}
    ratios = {r["size_bytes"]: r for r in setting_ratios(rows, backend, op)}
    lines = [f"{backend} {op}: busbw GB/s under A and B, interleaved launches [B/A from minimum latencies]",
             f"{'size':>9} {'A':>9} {'B':>9} {'B/A':>6} {'[min]':>7} {'A faults/call':>13} {'B faults/call':>13}"]
    for size in sorted({s for _, s in by}):
        a, b, q = by.get(("A", size)), by.get(("B", size)), ratios.get(size)
        if a and b and q:
            lines.append(f"{format_size(size):>9} {a['busbw_gbps']:9.3f} {b['busbw_gbps']:9.3f} "
                         f"{q['busbw_ratio']:6.2f} [{q['busbw_ratio_at_min_latency']:5.2f}] "
                         f"{a['minor_faults_per_call'] or 0:13.1f} {b['minor_faults_per_call'] or 0:13.1f}")
    return "\n".join(lines)


def comm_variants(cfg: CommConfig) -> list[tuple[str, dict[str, str]]]:
    """(setting, variables on top of the launch environment): A alone, or A and B under --compare-env."""
    variants = [("A", dict(cfg.baseline_env))]
    if cfg.compare_env is not None:
        variants.append(("B", dict(cfg.compare_env)))
    return variants


def run_comm(cfg: CommConfig, out: Path) -> int:
    started = datetime.now().astimezone()
    t0 = time.perf_counter()
    variants = dict(comm_variants(cfg))
    env_record = environment_record(cfg.np, cfg.baseline_env, cfg.compare_env, comm_launcher(cfg))
    if is_oversubscribed(cfg.np):
        print(f"note: {cfg.np} ranks on {physical_cores()} cores: oversubscribed, flagged in every row", flush=True)
    if cfg.compare_env is not None:
        print(f"setting A: {format_env_setting(cfg.baseline_env)}\nsetting B: {format_env_setting(cfg.compare_env)}"
              f"\n(launches of A and B interleaved, each on top of the suite's launch environment)", flush=True)
    from bench.launch.environment import launch_settings
    rows = [r | {"setting": ""} for r in measure_memcpy(cfg, launch_settings(dict(os.environ)))]
    settings, launch_fields, failures, launches = {}, {}, [], []
    pooled: dict[tuple, tuple] = {}  # (setting, backend, op, size) -> (bytes_moved, times, faults, busy per launch)
    # Same backend under A and B side by side, so a B/A ratio compares launches minutes apart at most.
    units = [(setting, backend) for backend in cfg.backends for setting in variants]
    order = launch_order(tuple(units), cfg.rounds)
    share = split_iters(cfg.iters, cfg.rounds)
    failed = lambda unit: any((f["setting"], f["backend"]) == unit for f in failures)  # noqa: E731
    for k, (setting, backend) in enumerate(order):
        if failed((setting, backend)):
            continue
        round_ = k // len(units)
        label = f" under setting {setting}" if len(variants) > 1 else ""
        print(f"measuring {backend}{label} on {cfg.np} ranks (round {round_ + 1}/{cfg.rounds}) ...",
              file=sys.stderr, flush=True)
        points, seen, launch = measure_backend(cfg, backend, share[round_], variants[setting])
        launches.append({"backend": backend, "setting": setting, "round": round_ + 1,
                         "seconds": round(launch.seconds, 2)})
        if launch.error:
            failures.append({"backend": backend, "setting": setting, "round": round_ + 1, "error": launch.error})
            print(f"alure-bench comm: {backend}{label} failed: {launch.error}", file=sys.stderr)
            continue
        for (op, size), (moved, times, faults, busy) in points.items():
            entry = pooled.setdefault((setting, backend, op, size), (moved, [], [], []))
            entry[1].extend(times)
            entry[2].append(faults)
            entry[3].append(busy)
        launch_fields[(setting, backend)] = launch.records[0].get("launch", {})
        if backend == "horovod":
            settings.setdefault(setting, seen)
    over = is_oversubscribed(cfg.np)
    for setting, backend in units:
        if failed((setting, backend)):
            continue  # a backend with a failed round has no complete rows
        for op in cfg.ops:
            for size in cfg.sizes:
                moved, times, faults, busy = pooled[(setting, backend, op, size)]
                rows.append(comm_row(backend, op, cfg.np, size, moved, times,
                                     tensors=cfg.tensors if op == "allreduce" else 1, warmup=cfg.warmup,
                                     rounds=cfg.rounds, oversubscribed=over,
                                     launch=launch_fields[(setting, backend)], setting=setting,
                                     minor_faults_per_call=statistics.fmean(faults),
                                     caller_busy_fraction=statistics.fmean(busy)))
    for setting, extra in variants.items():
        if setting not in settings:  # Horovod not run: what it would have been launched with
            settings[setting] = {k: v for k, v in mpi_environment(cfg.np, {**os.environ, **extra}).items()
                                 if k.startswith("HOROVOD_")}

    ratios = [q for op in cfg.ops for q in busbw_ratios(rows, op=op)]
    for setting in variants:
        for backend in ("memcpy", *cfg.backends):
            for op in ("memcpy", *cfg.ops):
                table = [r for r in rows if r["backend"] == backend and r["op"] == op
                         and r["setting"] in (setting, "")]
                if table and not (backend == "memcpy" and setting != "A"):
                    show = ({q["size_bytes"]: q["busbw_ratio"] for q in busbw_ratios(rows, op=op, setting=setting)}
                            if backend == "horovod" else None)
                    print(format_comm_table(table, show) + "\n")
    for setting in variants:
        prefix = f"Setting {setting}: " if len(variants) > 1 else ""
        fields = launch_fields.get((setting, cfg.backends[0]), {})
        print(f"{prefix}shared memory {fields.get('single_copy_mechanism', '?')}, allocator "
              f"{fields.get('allocator', '?')}; Horovod settings: "
              f"{', '.join(f'{k}={v}' for k, v in settings[setting].items()) or 'none'}")
    if "horovod" in cfg.backends and "mpi4py" in cfg.backends:
        for op in cfg.ops:
            these = [q for q in ratios if q["op"] == op]
            if these:
                print(ratio_verdict(these))
    compared = []
    if cfg.compare_env is not None:
        for backend in cfg.backends:
            for op in cfg.ops:
                if not failed(("A", backend)) and not failed(("B", backend)):
                    compared += setting_ratios(rows, backend, op)
                    print("\n" + format_compare_table(rows, backend, op))
    network = network_summary(comm_launcher(cfg), cfg.np, link_of_host(comm_launcher(cfg)))
    if network["link"]:
        print(link_fractions(rows, network["link"]))

    seconds = round(time.perf_counter() - t0, 2)
    result = {"kind": "comm", "started": started.isoformat(timespec="seconds"), "seconds": seconds,
              "config": asdict(cfg) | {"sizes": cfg.sizes}, "cores": physical_cores(),
              "horovod_settings": settings["A"], "harness_horovod_settings": dict(HOROVOD_SETTINGS),
              "launches": launches, "horovod_vs_mpi4py": ratios, "failures": failures, "network": network,
              "rows": rows}
    if cfg.compare_env is not None:
        result |= {"compare_horovod_settings": settings["B"], "b_over_a": compared}
    atomic_write_json(out / "environment.json", env_record)
    atomic_write_json(out / "comm.json", result)
    write_csv_atomic(out / "comm.csv", rows, ROW_FIELDS + EXTRA_FIELDS)
    print(f"wrote {out}/comm.json, comm.csv, environment.json ({seconds:.0f} s)")
    return 1 if failures else 0


# --- crossover --------------------------------------------------------------------------------------------------

def crossover_rows(records: list[dict], np: int) -> list[dict]:
    """Rows per (density, mode) from the ranks' records: times are the slowest rank's per iteration; bytes the
    largest rank's."""
    rows = []
    for points in zip(*(r["results"] for r in records)):
        p = points[0]
        for mode in ("sparse-gather", "dense-reduce"):
            times = rank_max([q["times_s"][mode] for q in points])
            rows.append({"np": np, "density": p["density"], "rows_touched_per_rank": p["rows_touched_per_rank"],
                         "nnz_per_rank": p["nnz_per_rank"], "mode": mode,
                         "time_ms_median": round(statistics.median(times) * 1e3, 4),
                         "time_ms_p10": round(percentile(times, 10) * 1e3, 4),
                         "time_ms_p90": round(percentile(times, 90) * 1e3, 4),
                         "bytes_sent_per_rank": max(q["bytes_sent_per_rank"][mode] for q in points),
                         "bytes_held_per_rank": max(q["bytes_held_per_rank"][mode] for q in points),
                         "oversubscribed": is_oversubscribed(np)})
    return rows


def format_crossover_table(rows: list[dict]) -> str:
    np = rows[0]["np"]
    flag = f"  [OVERSUBSCRIBED: {np} ranks on {physical_cores()} cores]" if rows[0]["oversubscribed"] else ""
    lines = [f"sparse-gather vs dense-reduce, Horovod, np={np}{flag}",
             f"{'density':>8} {'rows/rank':>9} {'sparse ms':>10} {'dense ms':>10} {'sparse MiB held':>15} "
             f"{'dense MiB held':>14} {'faster':>13}"]
    pairs = {}
    for r in rows:
        pairs.setdefault(r["density"], {})[r["mode"]] = r
    for density, m in sorted(pairs.items()):
        s, d = m["sparse-gather"], m["dense-reduce"]
        faster = "sparse-gather" if s["time_ms_median"] < d["time_ms_median"] else "dense-reduce"
        lines.append(f"{density:8.4g} {s['rows_touched_per_rank']:9d} {s['time_ms_median']:10.2f} "
                     f"{d['time_ms_median']:10.2f} {s['bytes_held_per_rank'] / 2**20:15.2f} "
                     f"{d['bytes_held_per_rank'] / 2**20:14.2f} {faster:>13}")
    return "\n".join(lines)


def run_crossover(cfg: CrossoverConfig, out: Path) -> int:
    started = datetime.now().astimezone()
    t0 = time.perf_counter()
    env_record = environment_record(max(cfg.nps))
    rows, crossovers, failures, settings = [], [], [], {}
    for np in cfg.nps:
        print(f"measuring sparse-gather vs dense-reduce on {np} ranks ...", file=sys.stderr, flush=True)
        spec = {"program": "crossover", "rows": cfg.rows, "dim": cfg.dim, "densities": list(cfg.densities),
                "lookups_per_row": cfg.lookups_per_row, "warmup": cfg.warmup, "iters": cfg.iters}
        table_bytes = 4 * cfg.rows * cfg.dim
        launch = launch_program(spec, np, _timeout_s(2 * table_bytes * np * len(cfg.densities)
                                                     * (cfg.warmup + cfg.iters), 0))
        if launch.error:
            failures.append({"np": np, "error": launch.error})
            print(f"alure-bench crossover: np={np} failed: {launch.error}", file=sys.stderr)
            continue
        settings = launch.records[0]["settings"]
        these = crossover_rows(launch.records, np)
        rows += these
        print(format_crossover_table(these))
        dens = sorted({r["density"] for r in these})
        med = {(r["density"], r["mode"]): r["time_ms_median"] for r in these}
        sparse = [med[(d, "sparse-gather")] for d in dens]
        dense = [med[(d, "dense-reduce")] for d in dens]
        x = crossover_density(dens, sparse, dense)
        text = describe_crossover(dens, sparse, dense, cfg.rows)
        crossovers.append({"np": np, "crossover_density": None if x is None else round(x, 6),
                           "crossover_rows_per_rank": None if x is None else round(x * cfg.rows),
                           "description": text})
        print(f"crossover at np={np}: {text}\n")
    seconds = round(time.perf_counter() - t0, 2)
    result = {"kind": "crossover", "started": started.isoformat(timespec="seconds"), "seconds": seconds,
              "config": asdict(cfg), "cores": physical_cores(), "horovod_settings": settings,
              "harness_horovod_settings": dict(HOROVOD_SETTINGS), "crossovers": crossovers, "failures": failures,
              "rows": rows}
    atomic_write_json(out / "environment.json", env_record)
    atomic_write_json(out / "crossover.json", result)
    write_csv_atomic(out / "crossover.csv", rows, CROSSOVER_FIELDS)
    print(f"wrote {out}/crossover.json, crossover.csv, environment.json ({seconds:.0f} s)")
    return 1 if failures else 0


# --- command line -----------------------------------------------------------------------------------------------

def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a whole number") from None


def comm_main(args: argparse.Namespace) -> int:
    cfg = CommConfig(np=_int(args.np, "--np"), backends=parse_choices(args.backends, BACKENDS, "backend"),
                     ops=parse_choices(args.ops, OPS, "op"),
                     min_bytes=parse_size(args.min_bytes, "--min-bytes"),
                     max_bytes=parse_size(args.max_bytes, "--max-bytes"),
                     warmup=_int(args.warmup, "--warmup"), iters=_int(args.iters, "--iters"),
                     rounds=_int(args.rounds, "--rounds"), tensors=_int(args.tensors, "--tensors"),
                     baseline_env=parse_env_setting(args.baseline_env, "--baseline-env") if args.baseline_env else {},
                     compare_env=parse_env_setting(args.compare_env) if args.compare_env is not None else None,
                     **host_layout(args))
    if not cfg.hosts or shares_one_machine(list(cfg.hosts)):  # remote hosts' memory is not this machine's
        check_local_ranks(cfg.np, 3 * cfg.max_bytes / 2**20, ranks_per_core=args.oversubscribe_limit)
    return run_comm(cfg, results_dir(args.out, "comm"))


def host_layout(args: argparse.Namespace) -> dict:
    """CommConfig's hosts and ranks_per_host from --hosts / --ranks-per-host, checked against --np."""
    launcher = launcher_from_args(args)
    check_fits(launcher, [_int(args.np, "--np")])
    return {"hosts": launcher.hosts, "ranks_per_host": launcher.ranks_per_host, "controller": launcher.controller}


def crossover_main(args: argparse.Namespace) -> int:
    cfg = CrossoverConfig(nps=parse_numbers(args.np, int, "--np"), rows=_int(args.rows, "--rows"),
                          dim=_int(args.dim, "--dim"), densities=parse_numbers(args.densities, float, "--densities"),
                          lookups_per_row=_int(args.lookups_per_row, "--lookups-per-row"),
                          warmup=_int(args.warmup, "--warmup"), iters=_int(args.iters, "--iters"))
    check_local_ranks(max(cfg.nps), 0, ranks_per_core=args.oversubscribe_limit)
    return run_crossover(cfg, results_dir(args.out, "crossover"))


def register(sub) -> None:
    """`alure-bench comm` and `alure-bench crossover`."""
    c = CommConfig.__dataclass_fields__
    p = sub.add_parser("comm", help="latency and bandwidth of allreduce, allgather and sparse-pair over Horovod, "
                                    "mpi4py and gloo, with memcpy as the ceiling",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--np", default="2", help="ranks per launch (default 2)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    p.add_argument("--min-bytes", default="1K", help="smallest size, e.g. 1K (sizes double up to --max-bytes)")
    p.add_argument("--max-bytes", default="64M", help="largest size, e.g. 64M")
    p.add_argument("--warmup", default=str(c["warmup"].default), help="untimed iterations per point")
    p.add_argument("--iters", default=str(c["iters"].default), help="timed iterations per point")
    p.add_argument("--rounds", default=str(c["rounds"].default),
                   help="launches per backend in alternating order, iterations pooled (default 2)")
    p.add_argument("--tensors", default="1", help="split each allreduce into this many tensors started together "
                                                  "(to measure Horovod's tensor fusion; default 1)")
    p.add_argument("--compare-env", default=None, metavar="'VAR=VALUE ...'",
                   help="also run every backend with these variables set on top of the launch environment "
                        "(setting B), launches interleaved with setting A, and print busbw B/A per size; e.g. "
                        "'OMPI_MCA_btl_vader_single_copy_mechanism=none' or 'HOROVOD_CYCLE_TIME=1'")
    p.add_argument("--baseline-env", default=None, metavar="'VAR=VALUE ...'",
                   help="variables for setting A (default: the suite's launch environment as it is)")
    p.add_argument("--out", default=None, help="results folder (default results/local/comm-<timestamp>/)")
    add_oversubscribe_flag(p)
    add_host_flags(p)
    p.set_defaults(func=comm_main)

    x = CrossoverConfig.__dataclass_fields__
    q = sub.add_parser("crossover", help="sparse-gather vs dense-reduce over density and np with Horovod; the "
                                         "crossover density per np",
                       description=__doc__.split("\n\n")[2])
    q.add_argument("--np", default="2", help="comma list of process counts (default 2)")
    q.add_argument("--rows", default=str(x["rows"].default), help="V, rows of the embedding table")
    q.add_argument("--dim", default=str(x["dim"].default), help="d, columns of the embedding table")
    q.add_argument("--densities", default=",".join(f"{d:g}" for d in x["densities"].default),
                   help="comma list of rows touched per rank / V")
    q.add_argument("--lookups-per-row", default="1", help="entries per touched row in the uncoalesced gradient "
                                                          "(default 1)")
    q.add_argument("--warmup", default=str(x["warmup"].default), help="untimed iterations per density")
    q.add_argument("--iters", default=str(x["iters"].default), help="timed iterations per density")
    q.add_argument("--out", default=None, help="results folder (default results/local/crossover-<timestamp>/)")
    add_oversubscribe_flag(q)
    q.set_defaults(func=crossover_main)
