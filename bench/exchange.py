"""Gradient exchange over Horovod, in the two modes the suite compares, with byte counters read off the tensors.

- sparse-gather: sparse embedding gradients are allgathered as (indices, values); Horovod does not coalesce them,
  so what each rank holds afterwards grows as P x nnz x (4d + 8) (horovod issue #3328).
- dense-reduce: `sparse_as_dense=True`: each sparse gradient is densified and allreduced, 4 x V x d bytes, flat in P.
- auto: per step and table, the one of the two the cost model predicts cheaper (bench.costmodel.choose_dense), from
  the rows this step's batches will touch, summed over ranks by one small allreduce in the data phase, so every rank
  chooses alike before any gradient's collective starts.
Dense parameters are allreduced in all modes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.config import MODES


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a sparse COO tensor its indices plus its values."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return t.numel() * t.element_size()


@dataclass(slots=True)
class ExchangeCounters:
    """What one rank's gradient exchanges moved since the last reset (normally: one training step)."""

    allgather_calls: int = 0
    """Allgather collectives started (two per sparse table in sparse-gather: indices and values)."""
    allreduce_calls: int = 0
    """Allreduce collectives started (one per dense parameter, and per table in dense-reduce)."""
    allgather_bytes_sent: int = 0
    """Bytes of this rank's tensors handed to allgather."""
    allgather_bytes_held: int = 0
    """Bytes of the gathered tensors this rank holds after the exchange (P x what each rank sent)."""
    allreduce_bytes_sent: int = 0
    """Bytes of this rank's tensors handed to allreduce."""
    allreduce_bytes_held: int = 0
    """Bytes of the reduced tensors this rank holds after the exchange (the same size as sent)."""

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    @property
    def bytes_sent(self) -> int:
        return self.allgather_bytes_sent + self.allreduce_bytes_sent

    @property
    def bytes_held(self) -> int:
        return self.allgather_bytes_held + self.allreduce_bytes_held

    def bytes_received(self, size: int) -> int:
        """Bytes of the results that came from other ranks: the peers' part of a gather, all of a reduction."""
        if size == 1:
            return 0
        return (self.allgather_bytes_held - self.allgather_bytes_sent) + self.allreduce_bytes_held

    def as_dict(self) -> dict:
        return asdict(self)


class HorovodExchange:
    """The `alure.exchange.Exchange` seam over Horovod, in one of `MODES`."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown exchange mode {mode!r}: use one of {', '.join(MODES)}")
        import horovod.torch as hvd
        hvd.init()
        self._hvd = hvd
        self.mode = mode
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.counters = ExchangeCounters()
        self.tables: dict[torch.nn.Parameter, str] = {}
        """auto: the sparse embedding tables, parameter -> module name."""
        self.dense: dict[torch.nn.Parameter, bool] = {}
        """auto: this step's choice per table (True: densify and allreduce)."""
        self.costs = None
        if mode == "auto":
            from bench.costmodel import load_costs
            self.costs = load_costs()

    def wrap_optimizer(self, optimizer, model):
        hvd = self._hvd
        opt = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                       sparse_as_dense=self.mode == "dense-reduce")
        # Horovod's hooks call `self._allreduce_grad_async(p)`; an instance attribute shadows the class method,
        # so every collective Horovod starts for a gradient passes through `counted` first.
        start_collective = opt._allreduce_grad_async
        counters = self.counters
        if self.mode == "auto":
            self.tables = {m.weight: name for name, m in model.named_modules()
                           if isinstance(m, torch.nn.Embedding) and m.sparse}

        def counted(p):
            if self.mode == "auto":  # Horovod reads the flag right here, per gradient
                opt.sparse_as_dense = self.dense.get(p, False)
            grad = p.grad
            handle, ctx = start_collective(p)
            if grad is not None and grad.is_sparse and not opt.sparse_as_dense:
                counters.allgather_calls += 2
                counters.allgather_bytes_sent += tensor_bytes(grad)
                gather = handle

                def gathered():
                    out = gather()
                    counters.allgather_bytes_held += tensor_bytes(out)
                    return out
                return gathered, ctx
            dense_bytes = (grad.numel() * grad.element_size()) if grad is not None else \
                p.numel() * p.element_size()
            counters.allreduce_calls += 1
            counters.allreduce_bytes_sent += dense_bytes
            counters.allreduce_bytes_held += dense_bytes  # reduced in place: the result is the same buffer size
            return handle, ctx

        opt._allreduce_grad_async = counted
        return opt

    def start_step(self, batch):
        """auto: count the rows each table's gradient will get from this batch, sum over ranks, choose per table."""
        if self.mode != "auto" or self.size == 1:
            return
        from bench.costmodel import choose_dense, table_lookups
        from bench.launch import physical_cores
        counts = table_lookups(batch)
        names = list(self.tables.values())
        mine = np.array([counts[name.removeprefix("sources.")] for name in names], dtype=np.float64)
        total = self.allreduce_sum(mine)  # (rows, distinct rows) per table, summed over ranks
        cpu = max(1.0, self._hvd.local_size() / physical_cores())  # ranks time-sharing this host's cores
        self.dense = {param: choose_dense(self.costs, self.size, param.shape[0], param.shape[1], rows, distinct, cpu)
                      for param, (rows, distinct) in zip(self.tables, total)}

    def broadcast_model(self, model, optimizer):
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def synchronize(self, optimizer):
        optimizer.synchronize()

    def step(self, optimizer):
        with optimizer.skip_synchronize():
            optimizer.step()

    def allgather_array(self, array):
        return self._hvd.allgather(torch.from_numpy(np.ascontiguousarray(array))).numpy()

    def allreduce_sum(self, array):
        return self._hvd.allreduce(torch.from_numpy(np.ascontiguousarray(array)), op=self._hvd.Sum).numpy()

    def barrier(self):
        self._hvd.barrier()

    def allgather_object(self, obj):
        """Every rank's picklable object, in rank order (for per-rank results, not for the hot loop)."""
        return self._hvd.allgather_object(obj)

    def shutdown(self):
        self._hvd.shutdown()

    # ---- point-to-point (the ring k-NN): Horovod has none, so mpi4py's COMM_WORLD over the same MPI ----------

    def start_ring_shift(self, array):
        """Send `array` to rank + 1 and receive rank - 1's, nonblocking (alure.exchange.Exchange). Horovod
        initialised MPI; mpi4py finds it initialised and neither re-initialises nor finalises it. The shapes
        travel first in one small blocking exchange, so each receiver can allocate its block."""
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        array = np.ascontiguousarray(array)
        if self.size == 1:
            from alure.exchange import Arrived
            return Arrived(array)
        following, previous = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        shape, dtype = comm.sendrecv((array.shape, array.dtype.str), dest=following, source=previous)
        incoming = np.empty(shape, dtype=np.dtype(dtype))
        # As bytes: MPI has no half-precision type, and the receiver knows the dtype already.
        requests = [comm.Irecv([incoming, MPI.BYTE], source=previous, tag=RING_TAG),
                    comm.Isend([array, MPI.BYTE], dest=following, tag=RING_TAG)]
        return MpiTransfer(requests, incoming, array)


RING_TAG = 15
"""MPI tag of ring-shift messages (Horovod issues only collectives, which never match point-to-point messages)."""


class MpiTransfer:
    """A ring shift in flight: the receive and the send, and the buffers they use until both are done."""

    def __init__(self, requests, incoming: np.ndarray, outgoing: np.ndarray):
        self.requests, self.incoming, self.outgoing = requests, incoming, outgoing

    def test(self) -> bool:
        from mpi4py import MPI
        return MPI.Request.Testall(self.requests)

    def wait(self) -> np.ndarray:
        from mpi4py import MPI
        MPI.Request.Waitall(self.requests)
        self.outgoing = None  # the send buffer is free again
        return self.incoming
