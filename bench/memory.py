"""Per-rank memory: resident set probes and an operating-system cap."""
from __future__ import annotations

import resource

import psutil

MIB = 2**20
OOM_MARKERS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "out of memory",
               "std::bad_alloc", "memoryerror")
"""Lower-case fragments by which torch, Horovod's C++ core, MPI and Python say an allocation failed."""


def rss_mib() -> float:
    """Resident set size now."""
    return psutil.Process().memory_info().rss / MIB


def peak_rss_mib() -> float:
    """The kernel's high-water mark of the resident set (ru_maxrss, KiB on Linux) since the process began."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def apply_mem_limit(limit_mib: int) -> None:
    """Cap this process's data address space (RLIMIT_DATA): past it the kernel refuses the allocation, and torch
    or Horovod fail with an out-of-memory error. Unlike RLIMIT_AS it ignores file mappings and shared memory, so
    the cap tracks heap and tensors; it runs a few hundred MiB above the resident set (thread stacks, arenas)."""
    if limit_mib > 0:
        limit = int(limit_mib) * MIB
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def looks_like_oom(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in OOM_MARKERS)


def apply_training_mem_limit(allowance_mib: int, status: str = "/proc/self/status") -> None:
    """Cap the data segment (RLIMIT_DATA) at its size now plus `allowance_mib`: called once the workload is built,
    it limits what training adds, whatever the build took. Linux only (the size comes from VmData)."""
    if allowance_mib > 0:
        with open(status) as f:
            used_kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
        limit = used_kib * 1024 + int(allowance_mib) * MIB
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
