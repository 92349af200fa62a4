"""The shared-memory mechanism: probed with real ranks, cached per host, falling back (and saying so) where the
kernel refuses cross-memory attach, and recorded in environment.json and in every comm row."""
import json
import os
import subprocess
import sys

import pytest

from bench.launch import transport
from bench.launch.mpirun import mpi_environment
from tests.helpers import CLI

pytestmark = pytest.mark.mpi


def clean_env(cache, **extra) -> dict:
    """This process's environment without a mechanism set, with a cache of the test's own."""
    env = {k: v for k, v in os.environ.items() if k not in (transport.VARIABLE, transport.DENY_HOOK)}
    return {**env, "ALURE_BENCH_CACHE": str(cache), **extra}


def fallback_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "cross-memory attach unavailable" in line]


def test_fallback_when_the_kernel_refuses_cma(tmp_path):
    # The probe's ranks run under a seccomp filter that fails process_vm_readv with EPERM (as Docker's default
    # profile does): the launcher must choose copy-in/copy-out, say so once, and record it.
    env = clean_env(tmp_path / "cache", **{transport.DENY_HOOK: "1"})
    run = subprocess.run([*CLI, "env"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout)
    shared = record["shared_memory"]
    assert shared["single_copy_mechanism"] == "none" and shared["cma_works"] is False, shared
    assert "process_vm_readv refused" in shared["reason"] and "Operation not permitted" in shared["reason"]
    assert shared["source"] == "probe" and shared["deny_hook"] is True
    assert record["launch_settings"]["single_copy_mechanism"] == "none"
    lines = fallback_lines(run.stderr)
    assert len(lines) == 1 and "copy-in/copy-out" in lines[0], run.stderr
    # Cached under the hook's own key: the next command reads it, still says so, and does not probe again.
    cached = list((tmp_path / "cache" / "transport").glob("*-denycma.json"))
    assert len(cached) == 1
    # A real launch under the fallback runs and its rows say what ran.
    out = tmp_path / "comm"
    run = subprocess.run([*CLI, "comm", "--backends", "mpi4py", "--ops", "allgather",
                          "--min-bytes", "1M", "--max-bytes", "1M", "--warmup", "1", "--iters", "2", "--rounds", "1",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(fallback_lines(run.stderr)) == 1, run.stderr
    rows = [r for r in json.loads((out / "comm.json").read_text())["rows"] if r["backend"] == "mpi4py"]
    assert rows and all(r["single_copy_mechanism"] == "none" for r in rows)
    saved = json.loads((out / "environment.json").read_text())
    assert saved["shared_memory"]["source"] == "cache" and saved["launch_variables"][transport.VARIABLE] == "none"


def test_probe_runs_once_per_host_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALURE_BENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(transport.DENY_HOOK, raising=False)
    monkeypatch.delenv(transport.VARIABLE, raising=False)
    first = transport.choice()
    assert first["source"] == "probe" and first["single_copy_mechanism"] in ("cma", "none")
    # What the probe found agrees with its own evidence: CMA chosen exactly when it worked.
    assert (first["single_copy_mechanism"] == "cma") == (first["cma_works"] is True), first
    files = list((tmp_path / "transport").glob("*.json"))
    assert [f.name for f in files] == [f"{first['host']}-ompi{first['open_mpi']}.json"]
    second = transport.choice()
    assert second["source"] == "cache" and second["probed_at"] == first["probed_at"]
    assert transport.mechanism({}) == first["single_copy_mechanism"]
    # The launcher only builds: it uses the mechanism handed to it, unless the environment sets one.
    assert mpi_environment(2, base={}, shared_memory="cma")[transport.VARIABLE] == "cma"


def test_a_mechanism_already_set_wins_without_a_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("ALURE_BENCH_CACHE", str(tmp_path))
    assert transport.mechanism({transport.VARIABLE: "none"}) == "none"
    env = mpi_environment(2, base={transport.VARIABLE: "none"}, shared_memory="cma")
    assert env[transport.VARIABLE] == "none"
    assert not (tmp_path / "transport").exists()  # nothing probed, nothing cached


def test_the_deny_hook_really_refuses_process_vm_readv():
    # The hook is a kernel filter, not a flag the probe reads: under it a process cannot even read itself.
    code = ("import ctypes, os; from bench.launch.transport import deny_cma, read_peer; "
            "buf = ctypes.create_string_buffer(b'12345678'); "
            "print(read_peer(os.getpid(), ctypes.addressof(buf), 8)); deny_cma(); "
            "print(read_peer(os.getpid(), ctypes.addressof(buf), 8))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["None", "[Errno 1] Operation not permitted"]
