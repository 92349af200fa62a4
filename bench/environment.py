"""What a result was measured on: software versions, Horovod's build, the MPI library, the machine, the commit."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import psutil

ENV_PREFIXES = ("HOROVOD_", "OMPI_", "SLURM_", "OMP_", "MKL_")
REPO = Path(__file__).resolve().parent.parent


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


def capture_environment() -> dict:
    """The environment record of DESIGN.md "Results" (environment.json)."""
    import torch
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
        "emulated_cluster": emulated_cluster_record(),
    }


def emulated_cluster_record() -> dict | None:
    """The emulated cluster of slurm/cluster.sh running on this machine (hosts, subnet, the shaping it was started
    with), or None: a result measured across its hosts says so in its environment too."""
    from bench.hosts import emulated_cluster
    cluster = emulated_cluster()
    return None if cluster is None else {"hosts": list(cluster.hosts), "subnet": cluster.subnet,
                                         "interface": cluster.interface, "link_rate": cluster.link_rate}


def register(sub) -> None:
    """`alure-bench env`."""
    def run(args):
        print(json.dumps(capture_environment(), indent=2))
    parser = sub.add_parser("env", help="print the environment record (versions, Horovod build, MPI library, CPU, "
                                        "git state, HOROVOD_/OMPI_/SLURM_ variables) as JSON")
    parser.set_defaults(func=run)
