"""Per-rank memory: resident set probes and an operating-system cap."""
from __future__ import annotations

import os
import resource

import psutil

MIB = 2**20


def rss_mib() -> float:
    """Resident set size now."""
    return psutil.Process().memory_info().rss / MIB


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; nothing elsewhere). The launcher's
    allocator keeps freed memory for reuse (bench.launch.mpirun ALLOCATORS), so without this what the build allocated and
    freed would stay resident and be counted as the training's own."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mib() -> float:
    """The kernel's high-water mark of the resident set (ru_maxrss, KiB on Linux) since the process began."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakProbe:
    """The kernel's high-water mark of this process's resident set, resettable, so that a window of the run (one
    phase of one step) gets its own peak instead of the process's lifetime one.

    Linux keeps the mark in VmHWM (/proc/self/status); writing "5" to /proc/self/clear_refs resets it to the resident
    set of the moment. Where the reset is refused (no /proc, an older kernel, a sandbox), the probe falls back to
    sampling the resident set at each read: a lower bound of the peak, and `method` says so. A reset and a read cost
    tens of microseconds (the `memory_probe_ms` of a record shows what they cost per step)."""

    def __init__(self, clear_refs: str = "/proc/self/clear_refs", status: str = "/proc/self/status"):
        self._clear = self._status = None
        self.method = "vmhwm-reset"
        """How peaks are read: vmhwm-reset, or rss-sampled with the reason the reset was refused."""
        release_free_heap()  # the window opens on what the process holds, not on what it freed
        try:  # the files stay open: a step reads them ten times
            self._status = os.open(status, os.O_RDONLY)
            self._clear = os.open(clear_refs, os.O_WRONLY)
            os.write(self._clear, b"5")
            if self._read_hwm_kib() is None:
                raise OSError(f"no VmHWM line in {status}")
        except OSError as err:
            self.close()
            self.method = f"rss-sampled: high-water mark reset refused ({err})"

    @property
    def resets(self) -> bool:
        """True where the kernel resets the mark (method vmhwm-reset); False where peaks are sampled."""
        return self._clear is not None

    def reset(self, release_heap: bool = False) -> None:
        """Start a new window: the mark drops to the resident set of now (with `release_heap`, after the heap's
        free pages went back to the kernel, so the window does not start on memory the last one freed)."""
        if release_heap:
            release_free_heap()
        if self._clear is not None:
            os.write(self._clear, b"5")

    def peak_mib(self) -> float:
        """The largest resident set since the last reset (sampled: the resident set now)."""
        if self._status is None:
            return rss_mib()
        return self._read_hwm_kib() / 1024

    def _read_hwm_kib(self) -> int | None:
        for line in os.pread(self._status, 8192, 0).split(b"\n"):
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
        return None

    def close(self) -> None:
        for fd in (self._clear, self._status):
            if fd is not None:
                os.close(fd)
        self._clear = self._status = None


def vm_data_bytes() -> int | None:
    """This process's data segment (VmData): what RLIMIT_DATA caps; None where /proc does not say."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget_bytes(ranks_on_host: int) -> float:
    """What this rank may still allocate: under a cap (RLIMIT_DATA, e.g. --mem-limit) the cap minus the data segment
    in use; without one, its share of the host's available memory."""
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    used = vm_data_bytes()
    if soft != resource.RLIM_INFINITY and used is not None:
        return float(soft - used)
    return psutil.virtual_memory().available / max(1, ranks_on_host)


def apply_mem_limit(limit_mib: int) -> None:
    """Cap this process's data address space (RLIMIT_DATA): past it the kernel refuses the allocation, and torch
    or Horovod fail with an out-of-memory error. Unlike RLIMIT_AS it ignores file mappings and shared memory, so
    the cap tracks heap and tensors; it runs a few hundred MiB above the resident set (thread stacks, arenas)."""
    if limit_mib > 0:
        limit = int(limit_mib) * MIB
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def apply_training_mem_limit(allowance_mib: int, data_base_bytes: int | None) -> None:
    """Cap the data segment (RLIMIT_DATA) at `data_base_bytes` (its size once the workload is built, vm_data_bytes)
    plus `allowance_mib`: it limits what training adds, whatever the build took. The same base is what a record's
    `data_growth_mib` counts from, so a cap derived from measured growth caps the quantity that was measured. Linux
    only (the size comes from VmData)."""
    if allowance_mib > 0:
        if data_base_bytes is None:
            raise RuntimeError("the training memory cap needs VmData from /proc/self/status, which this system lacks")
        limit = data_base_bytes + int(allowance_mib) * MIB
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
