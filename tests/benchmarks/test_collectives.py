"""Collectives on 2 real ranks under mpirun, timed by pytest-benchmark itself.

How it is timed, and why that is honest:
- The two ranks are launched through bench.launch.mpirun (run_ranks, in a background thread) and run
  collective_server.py: each connects back to this pytest process over loopback TCP and waits for orders.
- One benchmark round = this process tells both ranks "run K calls", the ranks make K back-to-back calls of the
  collective (the nccl-tests way: no barrier between calls, the collective itself keeps the ranks in step), and
  both answer. pytest-benchmark's own timer measures that round trip here, so every figure in the saved JSON
  is a real, directly timed call of real collectives, never a number the ranks measured and handed over.
- The timed round therefore also holds one control round trip (two small TCP messages). It is measured on its
  own as test_control_round_trip, and K is chosen per size so that the collectives dominate the round; divide
  by K (extra_info["calls_per_round"]) for the time of one call. extra_info also carries the per-call latency
  and busbw derived from the round median, for reading next to `alure-bench comm`, and the launch settings the
  ranks saw (shared-memory mechanism, allocator, Horovod knobs), as comm rows do.
- K is fixed per size (not calibrated at run time), so saved runs stay comparable with --benchmark-compare.

Quick mode (the normal test run): Horovod and mpi4py, allreduce and allgather, 64 KiB and 4 MiB, 5 rounds.
Full mode (ALURE_BENCH_FULL=1): also gloo and sparse-pair, 1 KiB to 64 MiB, 20 rounds.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from bench.launch import transport
from bench.launch.mpirun import run_ranks
from bench.plan.sizes import format_bytes
from bench.results.scaling import busbw_factor
from tests.benchmarks.mode import pick

pytestmark = pytest.mark.mpi

NP = 2
BACKENDS = pick(("mpi4py", "horovod"), ("mpi4py", "horovod", "gloo"))
OPS = pick(("allreduce", "allgather"), ("allreduce", "allgather", "sparse-pair"))
SIZES = pick((64 << 10, 4 << 20), (1 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20))
ROUNDS = pick(5, 20)
CALLS_PER_ROUND = {1 << 10: 50, 64 << 10: 20, 1 << 20: 10, 4 << 20: 5, 16 << 20: 2, 64 << 20: 1}
SERVER = Path(__file__).with_name("collective_server.py")


class Ranks:
    """Two ranks of collective_server.py, driven from this process."""

    def __init__(self, backend: str, timeout_s: float = 600):
        self.backend = backend
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(timeout_s)
        host, port = listener.getsockname()
        env = dict(os.environ)
        if backend == "gloo":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        self.run = None
        self._thread = threading.Thread(target=self._launch, args=(host, port, env, timeout_s), daemon=True)
        self._thread.start()
        self.streams = []
        try:
            for _ in range(NP):
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.streams.append(conn.makefile("rw"))
        except TimeoutError:
            self._thread.join(5)
            raise RuntimeError(f"{backend} ranks did not connect: {self.run and self.run.stderr[-2000:]}")
        finally:
            listener.close()
        hellos = [self._read(s) for s in self.streams]
        assert sorted(h["rank"] for h in hellos) == list(range(NP)), hellos
        self.launch = hellos[0]["launch"]  # what the ranks ran with, saved beside every figure

    def _launch(self, host, port, env, timeout_s):
        self.run = run_ranks(NP, shared_memory=transport.mechanism(), argv=[sys.executable, str(SERVER), host, str(port), self.backend], timeout_s=timeout_s,
                             env=env, cwd=str(SERVER.parents[2]))

    @staticmethod
    def _read(stream) -> dict:
        line = stream.readline()
        if not line:
            raise RuntimeError("a rank hung up (see the ranks' stderr in the fixture teardown)")
        return json.loads(line)

    def ask(self, **msg) -> list[dict]:
        """Send `msg` to every rank, then wait for every answer."""
        text = json.dumps(msg) + "\n"
        for s in self.streams:
            s.write(text)
            s.flush()
        return [self._read(s) for s in self.streams]

    def stop(self) -> None:
        try:
            self.ask(cmd="stop")
        finally:
            self._thread.join(120)
        assert self.run is not None and self.run.returncode == 0, self.run and self.run.stderr[-3000:]


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request):
    r = Ranks(request.param)
    yield r
    r.stop()


def test_control_round_trip(benchmark, ranks):
    """What the control messages alone cost in every round of the tests below."""
    benchmark.extra_info.update(backend=ranks.backend, np=NP)
    benchmark.pedantic(ranks.ask, kwargs={"cmd": "noop"}, rounds=pick(20, 100), warmup_rounds=2)


@pytest.mark.parametrize("size", SIZES, ids=[format_bytes(s).replace(" ", "") for s in SIZES])
@pytest.mark.parametrize("op", OPS)
def test_collective(benchmark, ranks, op, size):
    calls = CALLS_PER_ROUND[size]
    moved = ranks.ask(cmd="prepare", op=op, size=size, warmup=2)[0]["bytes_moved"]
    benchmark.extra_info.update(backend=ranks.backend, op=op, np=NP, size_bytes=size, bytes_moved=moved,
                                calls_per_round=calls, **ranks.launch)
    benchmark.pedantic(ranks.ask, kwargs={"cmd": "run", "calls": calls}, rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        per_call = stats.median / calls
        benchmark.extra_info.update(latency_us_median=round(per_call * 1e6, 3),
                                    busbw_gbps=round(moved / per_call / 1e9 * busbw_factor(op, NP), 6))
