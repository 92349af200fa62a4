"""What a result was measured on: software versions, Horovod's build, the MPI library, the machine, the commit."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from bench.launch import transport
from bench.launch.hosts import emulated_cluster
from bench.launch.mpirun import LOCAL, SHARED_MEMORY_VARIABLE, Launcher, mpi_environment

ENV_PREFIXES = ("HOROVOD_", "OMPI_", "SLURM_", "OMP_", "MKL_", "MALLOC_", "LD_PRELOAD", "GLIBC_TUNABLES",
                "ALURE_BENCH_ALLOCATOR")
REPO = Path(__file__).resolve().parents[2]


def horovod_build() -> dict:
    """Horovod's version and what it was built with; {'installed': False} when it does not import."""
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as err:
        return {"installed": False, "error": str(err)}
    return {
        "installed": True,
        "version": horovod.__version__,
        "frameworks": {"pytorch": True},
        "controllers": {"mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built())},
        "tensor_operations": {"mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built()),
                              "nccl": bool(hvd.nccl_built()), "ddl": bool(hvd.ddl_built()),
                              "ccl": bool(hvd.ccl_built())},
    }


def mpi_library() -> dict:
    """The MPI library mpi4py loads (its version string), and mpi4py's own version."""
    try:
        import mpi4py
        mpi4py.rc.initialize = False  # asking for the version must not start MPI
        from mpi4py import MPI
        return {"mpi4py": mpi4py.__version__, "library": MPI.Get_library_version().strip("\x00 \n").splitlines()[0],
                "standard": "%d.%d" % MPI.Get_version()}
    except Exception as err:  # a broken MPI is a fact to record, not a reason to lose the rest
        return {"mpi4py": None, "error": str(err)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(repo: Path = REPO) -> dict:
    """Commit and dirty flag of the checkout the code runs from; None when it is not a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
"""What decides how the ranks allocate memory (glibc's malloc knobs, or another allocator preloaded)."""
HOROVOD_KNOBS = {"HOROVOD_CYCLE_TIME": "horovod_cycle_time_ms", "HOROVOD_FUSION_THRESHOLD":
                 "horovod_fusion_threshold_bytes", "HOROVOD_CACHE_CAPACITY": "horovod_cache_capacity",
                 "HOROVOD_AUTOTUNE": "horovod_autotune"}
"""Horovod's performance knobs as launch fields (empty: Horovod's own default)."""


def allocator(env: dict[str, str]) -> str:
    """The allocator setting of a launch environment with the malloc variables it set ('glibc-reuse
    MALLOC_ARENA_MAX=1 ...'), or 'jemalloc' / 'tcmalloc' where LD_PRELOAD names one."""
    preload = env.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc"):
        if name in preload:
            return name
    knobs = [f"{k}={env[k]}" for k in ALLOCATOR_VARIABLES[1:] if env.get(k)]
    return " ".join([env.get("ALURE_BENCH_ALLOCATOR") or "glibc", *knobs])


def launch_settings(env: dict[str, str]) -> dict:
    """What a launch ran with, as flat fields for result rows: the shared-memory mechanism, the allocator and
    Horovod's knobs, read from the environment the ranks got."""
    fields = {"single_copy_mechanism": env.get(SHARED_MEMORY_VARIABLE, "") or "open-mpi-default", "allocator": allocator(env)}
    for name, field in HOROVOD_KNOBS.items():
        fields[field] = env.get(name, "")
    return fields


def shared_memory_record() -> dict:
    """The shared-memory mechanism launches use here and where it came from (the environment, or the probe of
    bench.launch.transport with its reason)."""
    if os.environ.get(SHARED_MEMORY_VARIABLE):
        return {"single_copy_mechanism": os.environ[SHARED_MEMORY_VARIABLE], "source": "environment",
                "reason": f"{SHARED_MEMORY_VARIABLE} was set before launch"}
    return transport.choice()


THP_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")


def transparent_hugepages(settings: Path = THP_SETTINGS) -> dict:
    """The kernel's transparent huge page modes ('always', 'madvise' or 'never': the bracketed choice of each file),
    each None where the kernel has no THP: the launch's allocator asks for huge pages, which only 'always' and 'madvise'
    grant."""
    def mode(name: str) -> str | None:
        try:
            text = (settings / name).read_text()
        except OSError:
            return None
        return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()
    return {"enabled": mode("enabled"), "defrag": mode("defrag")}


def capture_environment() -> dict:
    """The environment record of docs/design.md "Results" (environment.json)."""
    import torch  # only the command's process records torch; the launch modules never need it
    shared_memory = shared_memory_record()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "horovod": horovod_build(),
        "mpi": mpi_library(),
        "cpu_model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "logical_cpus": psutil.cpu_count(logical=True),
        "memory_mib": round(psutil.virtual_memory().total / 2**20),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "git": git_state(),
        "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "shared_memory": shared_memory,
        "transparent_hugepages": transparent_hugepages(),
        "launch_settings": launch_settings(mpi_environment(2, shared_memory=shared_memory["single_copy_mechanism"])),
        "emulated_cluster": emulated_cluster_record(),
    }


LAUNCH_PREFIXES = ("HOROVOD_", "OMPI_", "GLOO_")


def launch_environment(nps: list[int], launcher: Launcher = LOCAL, *, shared_memory: str) -> dict[str, dict[str, str]]:
    """Per rank count, the HOROVOD_/OMPI_/GLOO_ variables exactly as the launcher hands them to mpirun (its own
    settings on top of this process's environment): what the ranks of a point ran with."""
    return {str(n): {k: v for k, v in sorted(launcher.environment(n, shared_memory=shared_memory).items())
                     if k.startswith(LAUNCH_PREFIXES)}
            for n in nps}


def emulated_cluster_record() -> dict | None:
    """The emulated cluster of slurm/cluster.sh running on this machine (hosts, subnet, the shaping it was started
    with), or None: a result measured across its hosts says so in its environment too."""
    cluster = emulated_cluster()
    return None if cluster is None else {"hosts": list(cluster.hosts), "subnet": cluster.subnet,
                                         "interface": cluster.interface, "link_rate": cluster.link_rate}
