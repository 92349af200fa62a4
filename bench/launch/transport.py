"""Which shared-memory copy mechanism the ranks of this host use: probed once, cached per host, recorded everywhere.

Open MPI's shared-memory transport (the vader BTL) moves large messages either with one direct copy between the
two processes' memories (cross-memory attach, CMA: the kernel's process_vm_readv, which needs ptrace permission
between the ranks) or through a shared bounce buffer (copy-in/copy-out, `none`: two copies, always works). One copy
is about twice as fast from 1 MiB up, but sandboxes refuse it: Docker's default seccomp profile blocks
process_vm_readv, and Yama's ptrace_scope 2 or 3 forbids attaching to a sibling.

`mechanism(base)` answers with the fastest one that works here. It asks a tiny two-rank check once per
host and Open MPI version (`probe`: two ranks read each other's memory with process_vm_readv directly, then
allgather 1 MiB with CMA forced and check the data and Open MPI's complaints; each rank hands its findings back
through bench.launch.handback), caches the answer in the suite's cache folder, and falls back to `none` only where
CMA is refused, saying so in one line.

The probe's ranks can be made to refuse CMA on purpose: ALURE_BENCH_PROBE_DENY_CMA=1 installs a seccomp filter in
the probe's ranks only (process_vm_readv/writev fail with EPERM, as under Docker's default profile), so the
fallback runs for real; its answer is cached under a key of its own.

    python -m bench.launch.transport            probe now (ignoring the cache), print the answer as JSON
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.launch.handback import collect, hand_back
from bench.launch.mpirun import SHARED_MEMORY_VARIABLE as VARIABLE
from bench.launch.mpirun import run_ranks
from bench.launch.rank_program import python_module_argv
from bench.results.records import atomic_write_json, utc_now

DENY_HOOK = "ALURE_BENCH_PROBE_DENY_CMA"
"""Set to 1: the probe's ranks refuse CMA (a seccomp filter), to exercise the fallback."""
PROBE_BYTES = 1 << 20
"""Allgathered by the probe: far above vader's eager limit (4 KiB), so the single-copy path really runs."""
_said: set[str] = set()  # fallback lines already printed by this process


def cache_dir() -> Path:
    """The suite's per-user cache (ALURE_BENCH_CACHE, else $XDG_CACHE_HOME/alure-bench, else ~/.cache/...): the
    same folder scripts/setup.sh keeps the Horovod wheel in."""
    root = os.environ.get("ALURE_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alure-bench")
    return Path(root) / "transport"


@functools.cache
def open_mpi_version() -> str | None:
    """'4.1.4' from `mpirun --version`; None when there is no mpirun. Read once per process: every launch keys
    the transport cache by it, and the installed MPI does not change under a running command."""
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first.split()[-1] if first else None


def cache_path(host: str, version: str, denied: bool) -> Path:
    return cache_dir() / f"{host}-ompi{version}{'-denycma' if denied else ''}.json"


def mechanism(base: dict[str, str] | None = None) -> str:
    """The value for VARIABLE: what `base` (default: this process's environment) already says, else the probed
    choice of this host. A command asks once and hands the answer to every launch it makes (bench.launch.mpirun)."""
    env = os.environ if base is None else base
    return env.get(VARIABLE) or choice()["single_copy_mechanism"]


def choice() -> dict:
    """This host's probed choice, from the cache when it holds one for this host and Open MPI version:
    {single_copy_mechanism: cma|none, cma_works, reason, host, open_mpi, probed_at, source: probe|cache}."""
    host, version = socket.gethostname(), open_mpi_version()
    denied = os.environ.get(DENY_HOOK) == "1"
    if version is None:
        return _say({"single_copy_mechanism": "none", "cma_works": None, "host": host, "open_mpi": None,
                     "reason": "mpirun not found, nothing probed", "source": "default"})
    path = cache_path(host, version, denied)
    try:
        cached = json.loads(path.read_text())
        if cached.get("single_copy_mechanism") in ("cma", "none"):
            return _say(cached | {"source": "cache"})
    except (OSError, ValueError):
        pass
    record = probe(host, version, denied)
    if record["cma_works"] is not None:  # a probe that could not run is not an answer to keep
        _write_cache(path, record)
    return _say(record | {"source": "probe"})


def probe(host: str, version: str, denied: bool = False, timeout_s: float = 60) -> dict:
    """Run the two-rank check with CMA forced; `none` unless every rank read its peer and the data came through with
    no complaint from Open MPI."""
    env = dict(os.environ, **{VARIABLE: "cma"})
    with tempfile.TemporaryDirectory(prefix="alure-transport-") as results:
        argv = python_module_argv("bench.launch.transport", "--rank", results, *(["--deny-cma"] if denied else []))
        run = run_ranks(2, argv, shared_memory="cma", timeout_s=timeout_s, env=env)
        records = [h["result"] for h in collect(results) if h["status"] == "ok"]
    complaint = next((line.strip() for line in run.stderr.splitlines()
                      if "errno" in line.lower() or "cross-memory" in line.lower() or "CMA" in line), None)
    refused = next((r["read_error"] for r in records if r.get("read_error")), None)
    if run.timed_out or run.returncode is None:
        works, reason = None, f"the probe ran past {timeout_s:.0f} s"
    elif refused:
        works, reason = False, f"process_vm_readv refused: {refused}"
    elif complaint or (len(records) == 2 and not all(r.get("data_ok") for r in records)):
        works, reason = False, f"Open MPI's CMA copy failed: {complaint or 'gathered data wrong'}"
    elif run.returncode != 0 or len(records) != 2:
        # Not an answer about CMA (no slots for two ranks inside an allocation, a broken MPI): not cached.
        last = next((line for line in reversed(run.stderr.strip().splitlines()) if line.strip()), "no output")
        works, reason = None, f"the probe could not run two ranks (exit {run.returncode}): {last.strip()[:200]}"
    else:
        works, reason = True, "cross-memory attach works between ranks here"
    return {"single_copy_mechanism": "cma" if works else "none", "cma_works": works, "reason": reason,
            "host": host, "open_mpi": version, "deny_hook": denied,
            "probed_at": utc_now()}


def _write_cache(path: Path, record: dict) -> None:
    try:
        atomic_write_json(path, record)
    except OSError:
        pass  # an unwritable cache costs a probe per command, nothing else


def _say(record: dict) -> dict:
    """One line on stderr, once per process, where CMA was refused."""
    if record["single_copy_mechanism"] == "none" and record["host"] not in _said:
        _said.add(record["host"])
        print(f"alure-bench: cross-memory attach unavailable on {record['host']} ({record['reason']}): shared memory "
              f"uses copy-in/copy-out ({VARIABLE}=none), about half the bandwidth from 1 MiB up", file=sys.stderr,
              flush=True)
    return record


# --- the probe's rank side ----------------------------------------------------------------------------------------

_SYSCALLS = {"x86_64": (0xC000003E, 310, 311), "aarch64": (0xC00000B7, 270, 271)}
"""audit arch, process_vm_readv, process_vm_writev."""


def deny_cma() -> None:
    """Make this process's process_vm_readv/writev fail with EPERM from now on (a seccomp filter, as a container
    runtime installs), so Open MPI's CMA path is refused by the kernel, not by a flag."""
    arch, readv, writev = _SYSCALLS[platform.machine()]
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    prog = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, allow),  # another ABI: leave it alone
            (ld_abs, 0, 0, 0), (jeq, 1, 0, readv), (jeq, 0, 1, writev),
            (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, None, 0, 0) or libc.prctl(pr_set_seccomp, seccomp_mode_filter,
                                                                     ctypes.byref(fprog), 0, 0):
        raise OSError(ctypes.get_errno(), "could not install the seccomp filter that refuses CMA")


def read_peer(pid: int, address: int, nbytes: int) -> str | None:
    """Read `nbytes` at `address` of process `pid` with process_vm_readv: None if it worked, else why not."""

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    dst = ctypes.create_string_buffer(nbytes)
    local, remote = IoVec(ctypes.addressof(dst), nbytes), IoVec(address, nbytes)
    got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got == nbytes:
        return None
    err = ctypes.get_errno()
    return f"[Errno {err}] {os.strerror(err)}" if got < 0 else f"short read {got} of {nbytes} bytes"


def rank_main(results: str, deny: bool) -> None:
    if deny:
        deny_cma()
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    n = PROBE_BYTES // 4 // comm.size
    mine = np.full(n, comm.rank + 1, np.float32)
    peer = (comm.rank + 1) % comm.size
    pids = comm.allgather((os.getpid(), mine.ctypes.data))
    read_error = read_peer(*pids[peer], 4096) if comm.size > 1 else None
    gathered = np.empty(n * comm.size, np.float32)
    comm.Allgather(mine, gathered)
    data_ok = bool(all((gathered[i * n:(i + 1) * n] == i + 1).all() for i in range(comm.size)))
    comm.Barrier()  # nobody leaves (and unmaps its buffer) while a peer may still read it
    hand_back(results, comm.rank, {"rank": comm.rank, "read_error": read_error, "data_ok": data_ok})


if __name__ == "__main__":
    if "--rank" in sys.argv[1:]:  # --rank RESULTS_FOLDER [--deny-cma]
        rank_main(sys.argv[sys.argv.index("--rank") + 1], deny="--deny-cma" in sys.argv[1:])
    else:
        version = open_mpi_version()
        if version is None:
            sys.exit("alure-bench: mpirun not found: run `make setup` first")
        record = probe(socket.gethostname(), version, os.environ.get(DENY_HOOK) == "1")
        if record["cma_works"] is not None:
            _write_cache(cache_path(record["host"], version, record["deny_hook"]), record)
        print(json.dumps(record, indent=2))
