"""Launching the collective micro-benchmark: one launch of bench.ranks.comm_rank per backend (and setting), each
rank's outcome collected (bench.launch.handback), the launch environment recorded."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.launch.environment import ENV_PREFIXES, capture_environment
from bench.launch.gloo_rendezvous import free_port
from bench.launch.handback import collect, failures
from bench.launch.hosts import hosts_launcher
from bench.launch.mpirun import LOCAL, Launcher, run_ranks
from bench.launch.rank_program import python_module_argv
from bench.plan.comm_config import CommConfig
from bench.ranks.comm_rank import geometry, memcpy_call, timed
from bench.results.comm_rows import comm_row
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


def measure_backend(cfg: CommConfig, backend: str, iters: int, extra_env: dict[str, str] | None = None, *,
                    shared_memory: str) -> tuple[dict, dict, LaunchResult]:
    """One launch of `backend` with `iters` timed iterations per point; returns {(op, size): (bytes_moved,
    per-iteration rank-max seconds, faults per call, caller busy fraction)}, the settings rank 0 saw, and the
    launch."""
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
        points[(p["op"], p["size_bytes"])] = (p["bytes_moved"], slowest_rank_per_step([q["times_s"] for q in per_rank]).tolist(),
                                               max(q.get("minor_faults_per_call", 0) for q in per_rank),
                                               max(q.get("caller_busy_fraction", 0) for q in per_rank))
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
