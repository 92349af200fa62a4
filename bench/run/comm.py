"""Launching the collective micro-benchmark: one launch of bench.ranks.comm_rank per backend (and setting), each
rank's outcome collected (bench.launch.handback), the launch environment recorded."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from bench.host import is_oversubscribed, physical_cores
from bench.launch.environment import ENV_PREFIXES, capture_environment, launch_settings
from bench.launch.gloo_rendezvous import free_port
from bench.launch.handback import collect, failures
from bench.launch.hosts import hosts_launcher
from bench.launch.mpirun import HOROVOD_SETTINGS, LOCAL, Launcher, mpi_environment, run_ranks
from bench.launch.rank_program import python_module_argv
from bench.plan.comm_config import CommConfig
from bench.ranks.comm_rank import geometry, memcpy_call, split_sizes, timed
from bench.results.comm_rows import EXTRA_FIELDS, ROW_FIELDS, comm_row
from bench.results.records import atomic_write_json, write_csv_atomic
from bench.results.scaling import slowest_rank_per_step


def environment_record(np: int, extra: dict[str, str] | None = None, compare: dict[str, str] | None = None,
                       launcher: Launcher = LOCAL) -> dict:
    """environment.json: bench.launch.environment's record plus the variables the ranks were launched with (and those
    of setting B under --compare-env). Its shared-memory mechanism is the one the command's launches use
    (`shared_memory_of`)."""
    env = capture_environment()

    def variables(overrides):
        launch = launcher.environment(np, {**os.environ, **(overrides or {})}, shared_memory=shared_memory_of(env))
        return {k: v for k, v in sorted(launch.items()) if k.startswith(ENV_PREFIXES)}
    env["launch_variables"] = variables(extra)
    if compare is not None:
        env["compare_launch_variables"] = variables(compare)
    return env


def shared_memory_of(environment: dict) -> str:
    """The shared-memory mechanism an environment record (`environment_record`) resolved: what every launch of the
    command is handed."""
    return environment["shared_memory"]["single_copy_mechanism"]


@dataclass(slots=True)
class LaunchResult:
    records: list[dict] = field(default_factory=list)
    """One record per rank, in rank order (empty on failure)."""
    error: str | None = None
    """Why the launch failed, in one line; None when it did not."""
    seconds: float = 0.0


def launch_program(spec: dict, np: int, timeout_s: float, extra_env: dict[str, str] | None = None,
                   launcher: Launcher = LOCAL, *, shared_memory: str) -> LaunchResult:
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
                        launcher=launcher, shared_memory=shared_memory)
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


def hang_timeout_s(total_bytes: int, calls: int) -> float:
    """A hang guard, not a budget: two minutes for start-up plus the calls at a pessimistic 20 MB/s."""
    return 120 + calls * 0.01 + total_bytes / 20e6


def launch_order(backends: tuple[str, ...], rounds: int) -> list[str]:
    """Backends in launch order: forward, then backward, and so on (A B C C B A A B C ...), so slow drifts in the
    machine's load fall on every backend alike and adjacent launches pair up for same-run ratios."""
    order = []
    for r in range(rounds):
        order += list(backends if r % 2 == 0 else reversed(backends))
    return order


@dataclass(slots=True)
class CommMeasurement:
    """One (op, size) of a backend, measured in one launch or pooled over the rounds' launches."""

    bytes_moved: int
    """Bytes one call moves (bench.ranks.comm_rank.geometry)."""
    times_s: list[float]
    """Per timed iteration, the slowest rank's seconds."""
    minor_faults_per_call: list[float]
    """Page faults per call of the rank that faulted most, one entry per launch."""
    caller_busy_fraction: list[float]
    """CPU time of the calling thread over the wall time of the calls (largest rank), one entry per launch."""

    def pool(self, other: CommMeasurement) -> None:
        """Add another launch's measurement of the same op and size."""
        self.times_s.extend(other.times_s)
        self.minor_faults_per_call.extend(other.minor_faults_per_call)
        self.caller_busy_fraction.extend(other.caller_busy_fraction)


def measure_backend(cfg: CommConfig, backend: str, iters: int, extra_env: dict[str, str] | None = None, *,
                    shared_memory: str) -> tuple[dict[tuple[str, int], CommMeasurement], dict, LaunchResult]:
    """One launch of `backend` with `iters` timed iterations per point; returns {(op, size): CommMeasurement}, the
    settings rank 0 saw, and the launch."""
    spec = {"program": "comm", "backend": backend, "ops": list(cfg.ops), "sizes": cfg.sizes, "dim": cfg.dim,
            "tensors": cfg.tensors, "warmup": cfg.warmup, "iters": iters}
    calls = (cfg.warmup + iters) * len(cfg.ops) * len(cfg.sizes) * cfg.tensors
    total = (cfg.warmup + iters) * len(cfg.ops) * sum(cfg.sizes)
    launch = launch_program(spec, cfg.np, hang_timeout_s(total, calls), extra_env, comm_launcher(cfg),
                            shared_memory=shared_memory)
    if launch.error:
        return {}, {}, launch
    points = {}
    for per_rank in zip(*(r["results"] for r in launch.records)):
        p = per_rank[0]
        points[(p["op"], p["size_bytes"])] = CommMeasurement(
            p["bytes_moved"], slowest_rank_per_step([q["times_s"] for q in per_rank]).tolist(),
            [max(q.get("minor_faults_per_call", 0) for q in per_rank)],
            [max(q.get("caller_busy_fraction", 0) for q in per_rank)])
    return points, launch.records[0]["settings"], launch


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


def comm_variants(cfg: CommConfig) -> list[tuple[str, dict[str, str]]]:
    """(setting, variables on top of the launch environment): A alone, or A and B under --compare-env."""
    variants = [("A", dict(cfg.baseline_env))]
    if cfg.compare_env is not None:
        variants.append(("B", dict(cfg.compare_env)))
    return variants


@dataclass(slots=True)
class CommRun:
    """What `measure_comm` measured: the rows and what every launch ran with."""

    cfg: CommConfig
    """What was measured."""
    environment: dict
    """environment.json (`environment_record`)."""
    rows: list[dict] = field(default_factory=list)
    """One comm row per backend, op, size and setting (bench.results.comm_rows.comm_row), memcpy's first."""
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per setting (A, B), Horovod's knobs as rank 0 saw them, or as it would have been launched with."""
    launch_fields: dict[tuple[str, str], dict] = field(default_factory=dict)
    """Per (setting, backend), rank 0's launch fields (bench.launch.environment.launch_settings)."""
    failures: list[dict] = field(default_factory=list)
    """The failed launches: backend, setting, round, error."""
    launches: list[dict] = field(default_factory=list)
    """Every launch in order: backend, setting, round, seconds."""
    started: datetime = field(default_factory=lambda: datetime.now().astimezone())
    """When the measurement began."""
    start_s: float = field(default_factory=time.perf_counter)
    """perf_counter at the start, for the run's duration."""

    def failed(self, unit: tuple[str, str]) -> bool:
        """Whether (setting, backend) had a failed launch: it then has no complete rows."""
        return any((f["setting"], f["backend"]) == unit for f in self.failures)


def measure_comm(cfg: CommConfig) -> CommRun:
    """Every backend under every setting in `cfg.rounds` interleaved launches (progress on stderr), iterations
    pooled per op and size into rows."""
    variants = dict(comm_variants(cfg))
    run = CommRun(cfg, environment_record(cfg.np, cfg.baseline_env, cfg.compare_env, comm_launcher(cfg)))
    shared_memory = shared_memory_of(run.environment)
    run.rows = [r | {"setting": ""} for r in measure_memcpy(cfg, launch_settings(dict(os.environ)))]
    pooled: dict[tuple, CommMeasurement] = {}  # (setting, backend, op, size) -> pooled over its launches
    # Same backend under A and B side by side, so a B/A ratio compares launches minutes apart at most.
    units = [(setting, backend) for backend in cfg.backends for setting in variants]
    share = split_sizes(cfg.iters, cfg.rounds)
    for k, (setting, backend) in enumerate(launch_order(tuple(units), cfg.rounds)):
        if run.failed((setting, backend)):
            continue
        round_ = k // len(units)
        label = f" under setting {setting}" if len(variants) > 1 else ""
        print(f"measuring {backend}{label} on {cfg.np} ranks (round {round_ + 1}/{cfg.rounds}) ...",
              file=sys.stderr, flush=True)
        points, seen, launch = measure_backend(cfg, backend, share[round_], variants[setting],
                                               shared_memory=shared_memory)
        run.launches.append({"backend": backend, "setting": setting, "round": round_ + 1,
                             "seconds": round(launch.seconds, 2)})
        if launch.error:
            run.failures.append({"backend": backend, "setting": setting, "round": round_ + 1, "error": launch.error})
            print(f"alure-bench comm: {backend}{label} failed: {launch.error}", file=sys.stderr)
            continue
        for (op, size), measured in points.items():
            if (setting, backend, op, size) in pooled:
                pooled[(setting, backend, op, size)].pool(measured)
            else:
                pooled[(setting, backend, op, size)] = measured
        run.launch_fields[(setting, backend)] = launch.records[0].get("launch", {})
        if backend == "horovod":
            run.settings.setdefault(setting, seen)
    over = is_oversubscribed(cfg.np)
    for setting, backend in units:
        if run.failed((setting, backend)):
            continue  # a backend with a failed round has no complete rows
        for op in cfg.ops:
            for size in cfg.sizes:
                m = pooled[(setting, backend, op, size)]
                run.rows.append(comm_row(backend, op, cfg.np, size, m.bytes_moved, m.times_s,
                                         tensors=cfg.tensors if op == "allreduce" else 1, warmup=cfg.warmup,
                                         rounds=cfg.rounds, oversubscribed=over,
                                         launch=run.launch_fields[(setting, backend)], setting=setting,
                                         minor_faults_per_call=statistics.fmean(m.minor_faults_per_call),
                                         caller_busy_fraction=statistics.fmean(m.caller_busy_fraction)))
    for setting, extra in variants.items():
        if setting not in run.settings:  # Horovod not run: what it would have been launched with
            run.settings[setting] = {k: v for k, v in mpi_environment(cfg.np, {**os.environ, **extra},
                                                                          shared_memory=shared_memory).items()
                                     if k.startswith("HOROVOD_")}
    return run


def write_comm(out: Path, run: CommRun, ratios: list[dict], compared: list[dict], network: dict) -> float:
    """environment.json, comm.json and comm.csv of a measured run into `out`; returns the run's seconds."""
    cfg = run.cfg
    seconds = round(time.perf_counter() - run.start_s, 2)
    result = {"kind": "comm", "started": run.started.isoformat(timespec="seconds"), "seconds": seconds,
              "config": asdict(cfg) | {"sizes": cfg.sizes}, "cores": physical_cores(),
              "horovod_settings": run.settings["A"], "harness_horovod_settings": dict(HOROVOD_SETTINGS),
              "launches": run.launches, "horovod_vs_mpi4py": ratios, "failures": run.failures, "network": network,
              "rows": run.rows}
    if cfg.compare_env is not None:
        result |= {"compare_horovod_settings": run.settings["B"], "b_over_a": compared}
    atomic_write_json(out / "environment.json", run.environment)
    atomic_write_json(out / "comm.json", result)
    write_csv_atomic(out / "comm.csv", run.rows, ROW_FIELDS + EXTRA_FIELDS)
    return seconds
