"""Rank side of `alure-bench comm` and `alure-bench crossover`: one communication backend per process, timed calls.

`bench.cli.comm` launches `python -m bench.ranks.comm_rank SPEC.json` on every rank through `bench.launch.mpirun`; each
rank hands its own per-iteration times back in `spec["work_dir"]` (bench.launch.handback) and the launcher takes the
maximum over ranks.
torch, Horovod and mpi4py are imported inside the backend that needs them, so the launcher imports the geometry
and the timing loop from here at no cost, and a Horovod process never loads mpi4py (its background thread competes
with mpi4py's collectives for the cores and slows them down several-fold; docs/collectives.md).

How a nominal size S becomes buffers (`geometry`):
- allreduce: one float32 tensor of S bytes, summed in place (as Horovod's optimizer reduces gradients).
- allgather: each rank contributes S/P bytes of float32; S is the total gathered.
- sparse-pair: what sparse-gather sends for a d-column embedding gradient: an allgather of int64 row indices and one
  of float32 values, with rows chosen so the gathered values total S; the bytes counted for bandwidth are the
  values plus the indices actually gathered (`bytes_moved`).
- alltoall: what the sharded modes send: each rank sends S bytes of float32 in all, S/P to every rank (itself
  included), as one all-to-all with splits (Horovod `alltoall`, MPI `Alltoallv`, gloo `all_to_all_single`).
- alltoall-zipf: the same S per rank, split over the destinations by a Zipf law (rank k gets a share
  proportional to 1/(k+1)^s, s = bench.model.collectives.ZIPF_SPLIT_EXPONENT, alike from every sender): the owner
  of hot rows receives most.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.host import threads_per_rank
from bench.launch.environment import launch_settings
from bench.launch.handback import hand_back, hand_back_failure, launched_rank
from bench.model.collectives import zipf_split_shares  # the cost model prices these very splits
from bench.plan.comm_config import SPARSE_DIM


@dataclass(frozen=True, slots=True)
class Geometry:
    """The buffers one (op, nominal size, P) point uses on each rank."""

    per_rank: int
    """allreduce: float32 elements of the tensor; allgather: float32 elements each rank sends; sparse-pair: table
    rows each rank sends."""
    bytes_moved: int
    """The S of algbw = S/t: the reduced bytes (allreduce) or the total gathered bytes (allgather, sparse-pair)."""


def geometry(op: str, size_bytes: int, np: int, dim: int = SPARSE_DIM) -> Geometry:
    """Buffers for a nominal size; at least one element or row per rank, so tiny sizes still run."""
    if op == "allreduce":
        n = max(1, size_bytes // 4)
        return Geometry(n, 4 * n)
    if op == "allgather":
        n = max(1, size_bytes // (4 * np))
        return Geometry(n, 4 * n * np)
    if op == "sparse-pair":
        rows = max(1, size_bytes // (4 * dim * np))
        return Geometry(rows, rows * np * (8 + 4 * dim))
    if op in ("alltoall", "alltoall-zipf"):
        n = max(np, size_bytes // 4)
        return Geometry(n, 4 * n)
    if op == "memcpy":
        return Geometry(size_bytes, size_bytes)
    raise ValueError(f"unknown op {op!r}")


def alltoall_splits(op: str, n: int, np: int) -> list[int]:
    """float32 elements a rank sends to each rank (n in all): equal, or (alltoall-zipf) Zipf-skewed towards rank
    0, at least one to every rank."""
    if op == "alltoall":
        return split_sizes(n, np)
    splits = [max(1, int(n * share)) for share in zipf_split_shares(np)]
    splits[0] += n - sum(splits)
    return splits


def timed(call: Callable[[], object], barrier: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls on this rank, each after a barrier (so every rank starts together)."""
    for _ in range(warmup):
        barrier()
        call()
    times = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def split_sizes(n: int, parts: int) -> list[int]:
    """n elements in `parts` near-equal pieces (the first ones one larger), none empty."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


# --- backends: each has rank, size, barrier(), prepare(op, geometry, tensors) -> call, settings(), close() --------

class HorovodBackend:
    """Horovod as the harness runs it: its environment comes from bench.launch.mpirun.mpi_environment (HOROVOD_SETTINGS),
    gradients are reduced in place with allreduce_async_ + synchronize, sparse ones through sparse_allreduce_async."""

    name = "horovod"

    def __init__(self):
        import horovod.torch as hvd
        import torch
        from horovod.torch.mpi_ops import sparse_allreduce_async
        hvd.init()
        self.hvd, self.torch, self.sparse_allreduce_async = hvd, torch, sparse_allreduce_async
        self.rank, self.size = hvd.rank(), hvd.size()
        torch.set_num_threads(threads_per_rank(self.size))

    def barrier(self):
        self.hvd.barrier()

    def prepare(self, op: str, geo: Geometry, tensors: int, dim: int = SPARSE_DIM) -> Callable[[], object]:
        hvd, torch = self.hvd, self.torch
        tag = f"{op}.{geo.bytes_moved}.{tensors}"  # a fixed name per point, so Horovod's response cache hits
        if op == "allreduce":
            buf = torch.zeros(geo.per_rank)  # zeros stay zeros under repeated in-place sums
            chunks = torch.split(buf, split_sizes(geo.per_rank, tensors))

            def call():
                handles = [hvd.allreduce_async_(c, name=f"{tag}.{i}", op=hvd.Sum) for i, c in enumerate(chunks)]
                for h in handles:
                    hvd.synchronize(h)
            return call
        if op == "allgather":
            part = torch.zeros(geo.per_rank)
            return lambda: hvd.allgather(part, name=tag)  # Horovod allocates the gathered tensor on every call
        if op == "sparse-pair":
            grad = sparse_gradient(torch, self.rank, geo.per_rank, geo.per_rank * self.size, dim)
            return lambda: self.sparse_allreduce_async(grad, tag, hvd.Sum)()
        if op in ("alltoall", "alltoall-zipf"):
            send = torch.zeros(geo.per_rank)
            splits = torch.tensor(alltoall_splits(op, geo.per_rank, self.size), dtype=torch.int32)
            return lambda: hvd.alltoall(send, splits=splits, name=tag)  # as the sharded modes call it
        raise ValueError(f"unknown op {op!r}")

    def settings(self) -> dict:
        return {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOROVOD_")}

    def close(self):
        self.hvd.shutdown()


def page_aligned(make, n: int, dtype):
    """`make(n, dtype)` (np.zeros, np.empty) starting on a page boundary. Where numpy's buffers land depends on
    the allocator (16-byte aligned in glibc's heap), and a copy between a send and a receive buffer whose addresses
    differ modulo 64 is several times slower (docs/collectives.md "A trap in the baseline"): the baseline must not
    hinge on that."""
    import numpy as np
    itemsize = np.dtype(dtype).itemsize
    raw = make(n + 4096 // itemsize, dtype)
    skip = (-raw.ctypes.data) % 4096 // itemsize
    return raw[skip:skip + n]


class Mpi4pyBackend:
    """Raw MPI through mpi4py on numpy buffers allocated once: the baseline Horovod is held against."""

    name = "mpi4py"

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def barrier(self):
        self.comm.Barrier()

    def prepare(self, op: str, geo: Geometry, tensors: int, dim: int = SPARSE_DIM) -> Callable[[], object]:
        import numpy as np
        comm, MPI = self.comm, self.MPI
        if op == "allreduce":
            buf = page_aligned(np.zeros, geo.per_rank, np.float32)
            bounds = np.cumsum([0, *split_sizes(geo.per_rank, tensors)])
            chunks = [buf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

            def call():
                for c in chunks:
                    comm.Allreduce(MPI.IN_PLACE, c, op=MPI.SUM)
            return call
        if op == "allgather":
            part = page_aligned(np.zeros, geo.per_rank, np.float32)
            out = page_aligned(np.empty, geo.per_rank * self.size, np.float32)
            return lambda: comm.Allgather(part, out)
        if op == "sparse-pair":
            rows = geo.per_rank
            idx = page_aligned(np.empty, rows, np.int64).reshape(rows, 1)
            idx[:, 0] = np.arange(rows) + self.rank * rows
            val = page_aligned(np.zeros, rows * dim, np.float32).reshape(rows, dim)
            idx_out = page_aligned(np.empty, rows * self.size, np.int64).reshape(rows * self.size, 1)
            val_out = page_aligned(np.empty, rows * self.size * dim, np.float32).reshape(rows * self.size, dim)

            def call():
                comm.Allgather(idx, idx_out)
                comm.Allgather(val, val_out)
            return call
        if op in ("alltoall", "alltoall-zipf"):
            counts = alltoall_splits(op, geo.per_rank, self.size)
            received = [counts[self.rank]] * self.size
            send = page_aligned(np.zeros, geo.per_rank, np.float32)
            out = page_aligned(np.empty, sum(received), np.float32)
            send_spec = [send, (counts, np.cumsum([0, *counts[:-1]]).tolist()), MPI.FLOAT]
            recv_spec = [out, (received, np.cumsum([0, *received[:-1]]).tolist()), MPI.FLOAT]
            return lambda: comm.Alltoallv(send_spec, recv_spec)
        raise ValueError(f"unknown op {op!r}")

    def settings(self) -> dict:
        return {}

    def close(self):
        pass


class GlooBackend:
    """torch.distributed with gloo: rank and size from Open MPI's variables, rendezvous on MASTER_ADDR/PORT."""

    name = "gloo"

    def __init__(self):
        import torch
        import torch.distributed as dist
        self.rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        self.size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=self.rank, world_size=self.size)
        self.torch, self.dist = torch, dist
        torch.set_num_threads(threads_per_rank(self.size))

    def barrier(self):
        self.dist.barrier()

    def prepare(self, op: str, geo: Geometry, tensors: int, dim: int = SPARSE_DIM) -> Callable[[], object]:
        torch, dist = self.torch, self.dist
        if op == "allreduce":
            buf = torch.zeros(geo.per_rank)
            chunks = torch.split(buf, split_sizes(geo.per_rank, tensors))

            def call():
                for c in chunks:
                    dist.all_reduce(c)
            return call
        if op == "allgather":
            part = torch.zeros(geo.per_rank)
            out = torch.empty(geo.per_rank * self.size)
            return lambda: dist.all_gather_single(out, part)
        if op == "sparse-pair":
            rows = geo.per_rank
            idx = torch.arange(rows, dtype=torch.int64).reshape(rows, 1) + self.rank * rows
            val = torch.zeros(rows, dim)
            idx_out = torch.empty(rows * self.size, 1, dtype=torch.int64)
            val_out = torch.empty(rows * self.size, dim)

            def call():
                dist.all_gather_single(idx_out, idx)
                dist.all_gather_single(val_out, val)
            return call
        if op in ("alltoall", "alltoall-zipf"):
            counts = alltoall_splits(op, geo.per_rank, self.size)
            received = [counts[self.rank]] * self.size
            send, out = torch.zeros(geo.per_rank), torch.empty(sum(received))
            return lambda: dist.all_to_all_single(out, send, output_split_sizes=received, input_split_sizes=counts)
        raise ValueError(f"unknown op {op!r}")

    def settings(self) -> dict:
        return {"MASTER_ADDR": os.environ.get("MASTER_ADDR"), "MASTER_PORT": os.environ.get("MASTER_PORT"),
                "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME")}

    def close(self):
        self.dist.destroy_process_group()


BACKEND_CLASSES = {"horovod": HorovodBackend, "mpi4py": Mpi4pyBackend, "gloo": GlooBackend}


def memcpy_call(size_bytes: int) -> Callable[[], object]:
    """One single-threaded copy of `size_bytes` between two buffers allocated (and touched) once: the ceiling."""
    import numpy as np
    src = np.ones(size_bytes, np.uint8)
    dst = np.zeros(size_bytes, np.uint8)
    return lambda: np.copyto(dst, src)


def sparse_gradient(torch, rank: int, rows: int, table_rows: int, dim: int, seed: int = 0, lookups_per_row: int = 1):
    """A sparse COO embedding gradient touching `rows` distinct rows of a table_rows x dim table, left uncoalesced
    as nn.Embedding(sparse=True) leaves it: one entry per lookup, each touched row looked up `lookups_per_row`
    times (in shuffled order); each rank touches its own random rows."""
    gen = torch.Generator().manual_seed(seed * 100003 + rank)
    touched = torch.randperm(table_rows, generator=gen)[:rows]
    idx = touched.repeat(lookups_per_row)[torch.randperm(rows * lookups_per_row, generator=gen)]
    val = torch.randn(len(idx), dim, generator=gen)
    return torch.sparse_coo_tensor(idx.reshape(1, -1), val, (table_rows, dim), check_invariants=False)


# --- the two programs a rank runs ---------------------------------------------------------------------------------

def run_comm(spec: dict) -> dict:
    """Every (op, size) of the spec on one backend; returns this rank's per-iteration seconds, the page faults of
    the process per timed call (an allocation per call that the allocator does not reuse faults every page in
    again), and the fraction of the timed wall time the calling thread spent on a CPU (a wait that spins shows
    as a fraction near 1, and on a core shared with the thread doing the copy it slows that thread)."""
    backend = BACKEND_CLASSES[spec["backend"]]()
    results = []
    for op in spec["ops"]:
        for size in spec["sizes"]:
            geo = geometry(op, size, backend.size, spec["dim"])
            call = backend.prepare(op, geo, spec["tensors"] if op == "allreduce" else 1, spec["dim"])
            timed(call, backend.barrier, spec["warmup"], 0)
            faults, busy = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
            times = timed(call, backend.barrier, 0, spec["iters"])
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            results.append({"op": op, "size_bytes": size, "bytes_moved": geo.bytes_moved, "times_s": times,
                            "minor_faults_per_call": faults / spec["iters"],
                            "caller_busy_fraction": (time.thread_time() - busy) / max(sum(times), 1e-9)})
            del call  # free this point's buffers before the next one allocates
    record = {"rank": backend.rank, "size": backend.size, "backend": backend.name, "settings": backend.settings(),
              "launch": launch_settings(dict(os.environ)), "results": results}
    backend.close()
    return record


def run_crossover(spec: dict) -> dict:
    """sparse-gather vs dense-reduce of one V x d embedding gradient per density, with Horovod as the optimizer
    calls it (op Average); the two modes alternate iteration by iteration so noise falls on both alike."""
    from bench.ranks.exchange import tensor_bytes  # imports torch: the launcher imports this module without it
    backend = HorovodBackend()
    hvd, torch = backend.hvd, backend.torch
    rows_total, dim = spec["rows"], spec["dim"]
    results = []
    for k, density in enumerate(spec["densities"]):
        touched = max(1, round(density * rows_total))
        grad = sparse_gradient(torch, backend.rank, touched, rows_total, dim, seed=k,
                               lookups_per_row=spec["lookups_per_row"])
        sent, held = {"sparse-gather": tensor_bytes(grad)}, {}

        def sparse_gather():
            out = backend.sparse_allreduce_async(grad, f"sparse.{k}", hvd.Average)()
            held["sparse-gather"] = tensor_bytes(out)

        def dense_reduce():
            dense = grad.to_dense()
            hvd.synchronize(hvd.allreduce_async_(dense, name=f"dense.{k}", op=hvd.Average))
            sent["dense-reduce"] = held["dense-reduce"] = tensor_bytes(dense)  # reduced in place

        times = {"sparse-gather": [], "dense-reduce": []}
        for i in range(spec["warmup"] + spec["iters"]):
            for mode, call in (("sparse-gather", sparse_gather), ("dense-reduce", dense_reduce)):
                backend.barrier()
                start = time.perf_counter()
                call()
                if i >= spec["warmup"]:
                    times[mode].append(time.perf_counter() - start)
        results.append({"density": density, "rows_touched_per_rank": touched, "nnz_per_rank": grad._nnz(),
                        "bytes_sent_per_rank": sent, "bytes_held_per_rank": held, "times_s": times})
    record = {"rank": backend.rank, "size": backend.size, "backend": "horovod", "settings": backend.settings(),
              "results": results}
    backend.close()
    return record


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        record = run_crossover(spec) if spec["program"] == "crossover" else run_comm(spec)
    except BaseException as err:  # noqa: BLE001 - the launcher reports the failing rank's reason
        hand_back_failure(spec["work_dir"], launched_rank(), err)
        return 1
    hand_back(spec["work_dir"], record["rank"], record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
