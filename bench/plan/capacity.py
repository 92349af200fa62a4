"""Refuse, before anything starts, a launch that cannot run where it would run.

Two bounds, checked against the hosts the ranks would land on:
- **memory**: np x the least memory a rank needs (`rank_floor_mib`) must fit in the hosts' memory. The floor is a
  lower bound on purpose: the interpreter with torch, Horovod and MPI loaded, plus the workload's parameters and
  their optimizer state. What grows beyond it with the exchange and with P (the out-of-memory the suite exists to
  show) is measured and recorded as `oom`, not refused.
- **cores**: on one host ranks may share cores (oversubscribed, flagged everywhere), but at most
  `--oversubscribe-limit` ranks per core (default DEFAULT_RANKS_PER_CORE); a Slurm partition runs at most one rank
  per CPU, as Slurm itself allocates them.
The hosts are this machine (its memory, or less where a cgroup or a Slurm allocation says so) for local launches,
and the partition's nodes as `sinfo` reports them for `alure-bench slurm render/submit`; where sinfo cannot say, the
check is left to Slurm.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import psutil

from alure.config import SourceConfig, WorkloadConfig
from bench.errors import UsageError
from bench.host import physical_cores
from bench.plan.sizes import format_bytes
from bench.plan.workload import workload_config

MIB = 2**20
DEFAULT_RANKS_PER_CORE = 8
"""Ranks one core may carry on one host unless --oversubscribe-limit says otherwise."""
RUNTIME_MIB = 200.0
"""Resident memory of a rank before it builds anything: Python with torch, Horovod and mpi4py loaded and Horovod
initialised, kept below what a rank of tests/ranks/runtime_rss.py holds (launch it with
`tests.conftest.launch(1, "runtime_rss")`) so that it stays a floor across builds; a test checks it is."""
PARAMETER_COPIES = 2
"""Copies of every parameter a training rank holds at least: the weights and Adagrad's accumulated squares."""
SINFO_TIMEOUT_S = 5.0
"""sinfo retries a controller that is down for several seconds: past this, the partition is taken as unknown."""


@dataclass(frozen=True, slots=True)
class Hosts:
    """Where a launch's ranks would run."""

    where: str
    """How the refusal names them: 'this host', 'Slurm partition debug'."""
    nodes: int
    """Hosts available."""
    cpus_per_node: int
    """Cores (or Slurm CPUs) per host."""
    memory_per_node_mib: float | None
    """Memory per host; None where nobody says (a Slurm node without RealMemory)."""
    oversubscribe: bool
    """Ranks may share cores (one host under mpirun); False where a scheduler gives each rank its own CPU."""


def add_oversubscribe_flag(parser) -> None:
    parser.add_argument("--oversubscribe-limit", type=positive_int, default=DEFAULT_RANKS_PER_CORE, metavar="N",
                        help=f"refuse more than N ranks per core on one host (default {DEFAULT_RANKS_PER_CORE})")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (one line of error otherwise)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


# --- what a rank needs ------------------------------------------------------------------------------------------

def parameter_bytes(workload) -> int:
    """Bytes of every parameter of alure's model for `workload` (an alure WorkloadConfig): shapes only, nothing
    allocated."""
    return _parameter_bytes(json.dumps(asdict(workload), sort_keys=True, default=list))


@lru_cache(maxsize=16)
def _parameter_bytes(workload_json: str) -> int:
    import torch

    from alure.model import UserEncoder  # imports torch: only where a model is built
    data = json.loads(workload_json)
    data["sources"] = tuple(SourceConfig(**s) for s in data["sources"])
    with torch.device("meta"):  # shapes without memory, even for tables of millions of rows
        model = UserEncoder(WorkloadConfig(**data))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rank_floor_mib(workload, mem_limit_mib: int = 0) -> float:
    """The least resident memory one training rank of `workload` needs; no more than its cap where one is set
    (past the cap the rank fails with `oom`, and its memory is freed)."""
    floor = RUNTIME_MIB + PARAMETER_COPIES * parameter_bytes(workload) / MIB
    return min(floor, mem_limit_mib) if mem_limit_mib > 0 else floor


# --- what the hosts have ----------------------------------------------------------------------------------------

def this_host() -> Hosts:
    """This machine as a launch on it sees it: its cores, and its memory or less where a cgroup or the Slurm
    allocation this runs in caps it."""
    memory = psutil.virtual_memory().total / MIB
    limits = [memory, _cgroup_limit_mib()]
    cpus = physical_cores()
    where = "this host"
    if os.environ.get("SLURM_JOB_ID"):
        where = f"this node of Slurm job {os.environ['SLURM_JOB_ID']}"
        cpus = min(cpus, _int_env("SLURM_CPUS_ON_NODE") or cpus)
        limits.append(_int_env("SLURM_MEM_PER_NODE"))
        per_cpu = _int_env("SLURM_MEM_PER_CPU")
        limits.append(per_cpu * cpus if per_cpu else None)
    return Hosts(where=where, nodes=1, cpus_per_node=cpus,
                 memory_per_node_mib=min(x for x in limits if x), oversubscribe=True)


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _cgroup_limit_mib() -> float | None:
    """The memory cap of this process's cgroup (v2 memory.max, or v1), if any."""
    for path in _cgroup_limit_files():
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit", v2 writes "max"
            return int(text) / MIB
    return None


def _cgroup_limit_files() -> list[str]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files.append(f"/sys/fs/cgroup{path}/memory.max")
        elif "memory" in controllers.split(","):
            files.append(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
    return files


def slurm_partition(partition: str = "") -> Hosts | None:
    """The nodes of `partition` (default: the cluster's default partition) as sinfo reports them; None where sinfo
    is missing, does not answer, or does not know the partition (then Slurm itself has the last word)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        run = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m"], capture_output=True, text=True,
                             timeout=SINFO_TIMEOUT_S)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return parse_sinfo(run.stdout, partition) if run.returncode == 0 else None


def parse_sinfo(text: str, partition: str = "") -> Hosts | None:
    """Hosts of `partition` (default: the one sinfo marks with '*') from `sinfo -h -N -o '%N|%P|%c|%m'` (node,
    partition, CPUs, memory in MiB); None if no node is in it."""
    rows = [line.strip().split("|") for line in text.splitlines()]
    rows = [r for r in rows if len(r) == 4 and r[2].isdigit() and r[3].rstrip("+").isdigit()]
    name = partition or next((r[1][:-1] for r in rows if r[1].endswith("*")), "")
    nodes = {node: (int(cpus), int(memory.rstrip("+"))) for node, part, cpus, memory in rows
             if part.rstrip("*") == name}
    if not nodes:
        return None
    # The largest node stands for all: a launch is refused only where it cannot run on any placement.
    memory = max(m for _, m in nodes.values())
    return Hosts(where=f"Slurm partition {name}", nodes=len(nodes), cpus_per_node=max(c for c, _ in nodes.values()),
                 # Slurm's RealMemory defaults to 1 MiB: that means "not configured", not a tiny node.
                 memory_per_node_mib=memory if memory > 1 else None, oversubscribe=False)


# --- the check --------------------------------------------------------------------------------------------------

def check_launch(np: int, rank_mib: float, hosts: Hosts, *, flag: str, ranks_per_core: int = DEFAULT_RANKS_PER_CORE,
                 nodes: int = 0, ranks_per_node: int = 0, what: str = "") -> None:
    """UsageError, in one line saying what `np` ranks of `rank_mib` each would need and how many fit, unless they
    can run on `hosts` (`nodes` and `ranks_per_node` as asked of Slurm; 0: as evenly as the hosts allow)."""
    problems = []
    usable = hosts.nodes
    if nodes > hosts.nodes:
        problems.append(f"{nodes} nodes where {hosts.where} has {hosts.nodes}")
    elif nodes:
        usable = nodes
    # Even spread: the fewest ranks the busiest host can get. If that does not fit, no placement does.
    busiest = max(ranks_per_node, math.ceil(np / usable))
    per_cpu = ranks_per_core if hosts.oversubscribe else 1
    slots = hosts.cpus_per_node * per_cpu
    fit = slots
    if busiest > slots:
        if hosts.oversubscribe:
            problems.append(f"{busiest / hosts.cpus_per_node:.1f}".removesuffix(".0") +
                            f" ranks per core where the limit is {per_cpu} "
                            f"(--oversubscribe-limit)")
        else:
            problems.append(f"{busiest} ranks on a node of {hosts.cpus_per_node} CPUs")
    memory = hosts.memory_per_node_mib
    if memory is not None:
        fit = min(fit, int(memory // rank_mib))
        if busiest * rank_mib > memory:
            problems.append(f"at least {format_bytes(busiest * rank_mib * 2**20)} of memory per host ({busiest} ranks x "
                            f"{rank_mib:.0f} MiB{what}) where {'it' if hosts.nodes == 1 else 'a node'} has "
                            f"{format_bytes(memory * 2**20)}")
    if problems:
        fits = f"at most {fit * usable} ranks fit" if fit * usable else "not one rank fits"
        raise UsageError(f"{flag} {np} cannot run on {hosts.where}: it needs {' and '.join(problems)}; {fits}: "
                         f"lower {flag}")


def check_sweep(config, *, flag: str, ranks_per_core: int = DEFAULT_RANKS_PER_CORE, hosts: Hosts | None = None,
                layout=None) -> None:
    """Every np of a SweepConfig against `hosts` (default this host). `layout(np)` -> (nodes, ranks per node) for
    Slurm arrays."""
    hosts = hosts or this_host()
    point = config.plan()[0]  # the parameters are the same at every point: only the batch differs
    rank_mib = rank_floor_mib(workload_config(point), config.mem_limit_mib)
    what = f", preset {config.preset}"
    for np in sorted(config.nps, reverse=True):
        nodes, per_node = layout(np) if layout else (0, 0)
        check_launch(np, rank_mib, hosts, flag=flag, ranks_per_core=ranks_per_core, nodes=nodes,
                     ranks_per_node=per_node, what=what)


def check_local_ranks(np: int, data_mib: float, *, flag: str = "--np",
                      ranks_per_core: int = DEFAULT_RANKS_PER_CORE, what: str = "") -> None:
    """`np` ranks on this host, each the runtime plus `data_mib` of its own (a benchmark's buffers)."""
    check_launch(np, RUNTIME_MIB + data_mib, this_host(), flag=flag, ranks_per_core=ranks_per_core, what=what)
