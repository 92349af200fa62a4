"""Gradient exchange over Horovod, in the modes the suite compares, with byte counters read off the tensors.

Each sparse embedding table's gradient is exchanged in one of these ways (dense parameters are allreduced in all):
- sparse-gather: the gradient as torch's embedding backward made it, allgathered as (indices, values); Horovod does
  not coalesce it, so what each rank holds afterwards grows as P x lookups x (4d + 8) (horovod issue #3328).
- coalesced-gather: each rank sums its duplicate rows first (`coalesce()`), so P x distinct rows travel and are held.
- dense-reduce: the paper's densification. The gradient is scatter-added into a V x d buffer kept across steps, the
  buffer is allreduced in place and becomes the gradient, and the optimizer updates the table densely (alure.train
  switches the table's Adagrad group to the fused implementation). Nothing is turned back into a sparse tensor.
- sparse-as-dense: Horovod-PyTorch's own `sparse_as_dense=True`, the control: to_dense, allreduce, then Horovod turns
  the reduced V x d tensor back into an element-wise sparse tensor (`to_sparse()`, 20 bytes per element) that sparse
  Adagrad walks.
- auto: per table and step, the cheapest of sparse-gather, coalesced-gather and dense-reduce the cost model predicts
  (bench.model.table_costs.choose_mode) whose memory fits the rank's budget. The counts it decides from (rows and distinct rows
  per table, from the batch) and every rank's budget are allgathered in the data phase, so every rank chooses alike
  before any gradient's collective starts.
At np=1 Horovod registers no hooks and exchanges nothing: every mode is the bare model there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.plan.config import MODES


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a sparse COO tensor its indices plus its values."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return t.numel() * t.element_size()


def ring_allreduce_bytes(n_bytes: int, size: int) -> float:
    """What each rank sends (and as much receives) when n bytes are allreduced by the ring algorithm: 2(P-1)/P x n
    (not rounded: a sum over many collectives stays exact)."""
    return 2 * (size - 1) * n_bytes / size if size > 1 else 0.0


@dataclass(slots=True)
class ExchangeCounters:
    """What one rank's gradient exchanges moved and made since the last reset (normally: one training step)."""

    allgather_calls: int = 0
    """Allgather collectives started (two per gathered table: indices and values)."""
    allreduce_calls: int = 0
    """Allreduce collectives started (one per dense parameter, and per densified table)."""
    allgather_bytes_sent: int = 0
    """Bytes of this rank's tensors handed to allgather."""
    allgather_bytes_held: int = 0
    """Bytes of the gathered tensors this rank holds after the exchange (P x what each rank sent)."""
    allgather_rows_sent: int = 0
    """Rows (index entries) of this rank's gradients handed to allgather."""
    allgather_rows_held: int = 0
    """Rows of the gathered gradients this rank holds: every rank's rows."""
    allreduce_bytes_sent: int = 0
    """Bytes of this rank's tensors handed to allreduce (read from the tensor the collective returned: in place)."""
    allreduce_bytes_held: int = 0
    """Bytes of the reduced tensors this rank holds after the exchange (the same size as sent)."""
    allreduce_ring_bytes: float = 0.0
    """What this rank sends, and as much receives, under the ring algorithm: 2(P-1)/P x the allreduced bytes."""
    densify_bytes: int = 0
    """Dense V x d copies of table gradients (dense-reduce's kept buffer, sparse-as-dense's to_dense). They are the
    tensors the allreduce reduces, so they are part of allreduce_bytes_held, not added to it again."""
    coalesced_bytes: int = 0
    """coalesced-gather's coalesced copies of this rank's table gradients (what it then hands to allgather)."""
    resparsified_bytes: int = 0
    """sparse-as-dense's gradients rebuilt sparse after the allreduce (Horovod's `to_sparse()`, added into p.grad):
    read from p.grad afterwards. Horovod's to_sparse() result it was added from is as large and freed right after."""

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    @property
    def bytes_sent(self) -> int:
        """Bytes of this rank's tensors handed to collectives."""
        return self.allgather_bytes_sent + self.allreduce_bytes_sent

    @property
    def bytes_held(self) -> int:
        """Bytes of every tensor the exchange made and holds: the collectives' results and the copies the mode makes
        (the coalesced and re-sparsified gradients; the dense copies are the allreduced tensors themselves)."""
        return self.allgather_bytes_held + self.allreduce_bytes_held + self.coalesced_bytes + self.resparsified_bytes

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
        """The sparse embedding tables, parameter -> parameter name."""
        self.table_mode: dict[torch.nn.Parameter, str] = {}
        """This step's mode per table (fixed modes: the mode; auto: chosen in `start_step`)."""
        self.buffers: dict[torch.nn.Parameter, torch.Tensor] = {}
        """dense-reduce: each table's V x d gradient buffer, made on first use and kept across steps."""
        self.costs = self.costs_origin = None
        """auto: what it decides with, and where that came from (bench.model.calibration_store.costs_origin)."""
        if mode == "auto":
            from bench.model.calibration_store import load_costs_and_origin
            transport = "shared-memory" if hvd.local_size() == self.size else "tcp"  # this host's calibration of it
            self.costs, self.costs_origin = load_costs_and_origin(transport=transport,
                                                                  warn=self.rank == 0 and self.size > 1)

    def wrap_optimizer(self, optimizer, model):
        hvd = self._hvd
        opt = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                       sparse_as_dense=self.mode == "sparse-as-dense")
        self.tables = {m.weight: f"{name}.weight" for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Embedding) and m.sparse}
        if self.mode != "auto":
            self.table_mode = dict.fromkeys(self.tables, self.mode)
        # Horovod's hooks call `self._allreduce_grad_async(p)`; an instance attribute shadows the class method,
        # so every collective Horovod starts for a gradient passes through `exchange` first.
        start_collective = opt._allreduce_grad_async
        counters = self.counters

        def exchange(p):
            grad = p.grad
            how = self.table_mode.get(p) if grad is not None and grad.is_sparse else None
            if how == "dense-reduce":
                return self._dense_reduce(opt, p, grad)
            if how == "coalesced-gather":
                p.grad = grad.coalesce()  # sums repeated rows: Horovod gathers the distinct ones
                counters.coalesced_bytes += tensor_bytes(p.grad)
            if how in ("sparse-gather", "coalesced-gather"):
                sent = p.grad
                handle, ctx = start_collective(p)
                counters.allgather_calls += 2
                counters.allgather_bytes_sent += tensor_bytes(sent)
                counters.allgather_rows_sent += sent._nnz()

                def gathered():
                    out = handle()
                    counters.allgather_bytes_held += tensor_bytes(out)
                    counters.allgather_rows_held += out._nnz()
                    return out
                return gathered, ctx
            handle, ctx = start_collective(p)

            def reduced():  # the allreduce runs in place: its result is the very tensor it was handed
                out = hvd.synchronize(handle)
                n = tensor_bytes(out)
                counters.allreduce_bytes_sent += n
                counters.allreduce_bytes_held += n
                counters.allreduce_ring_bytes += ring_allreduce_bytes(n, self.size)
                if how == "sparse-as-dense":  # Horovod's to_dense() copy
                    counters.densify_bytes += n
                return out
            counters.allreduce_calls += 1
            return reduced, ctx

        opt._allreduce_grad_async = exchange
        return opt

    def _dense_reduce(self, opt, p: torch.nn.Parameter, grad: torch.Tensor):
        """dense-reduce: this rank's sparse gradient summed into the table's kept V x d buffer (repeated rows add),
        allreduced (averaged) in place under the parameter's name. The buffer becomes p.grad only when the reduction
        is collected in `synchronize`, so until then p.grad stays this rank's own gradient, as in the other modes;
        Horovod's synchronize then finds a dense gradient and keeps it dense."""
        hvd, counters = self._hvd, self.counters
        buffer = self.buffers.get(p)
        if buffer is None:
            buffer = self.buffers[p] = torch.zeros(p.shape, dtype=p.dtype)
        buffer.zero_()
        buffer.index_add_(0, grad._indices()[0], grad._values())
        handle = hvd.allreduce_async_(buffer, name=opt._parameter_names[p], op=hvd.Average,
                                      process_set=opt.process_set)
        counters.allreduce_calls += 1

        def reduced():
            out = hvd.synchronize(handle)
            n = tensor_bytes(out)
            counters.allreduce_bytes_sent += n
            counters.allreduce_bytes_held += n
            counters.allreduce_ring_bytes += ring_allreduce_bytes(n, self.size)
            counters.densify_bytes += n
            p.grad = out
            return out
        return reduced, None

    def start_step(self, batch):
        """auto: count the rows each table's gradient will get from this batch, gather every rank's counts and memory
        budget, and choose per table."""
        if self.mode != "auto" or self.size == 1:
            return
        from bench.launch.mpirun import physical_cores
        from bench.model.profile import table_lookups
        from bench.model.table_costs import choose_mode
        from bench.ranks.memory import memory_budget_bytes
        counts = table_lookups(batch)
        names = list(self.tables.values())
        hvd = self._hvd
        mine = [c for name in names for c in counts[name.removeprefix("sources.").removesuffix(".weight")]]
        every = self.allgather_array(np.array([mine + [memory_budget_bytes(hvd.local_size())]], dtype=np.float64))
        total = every[:, :-1].sum(axis=0).reshape(len(names), 2)  # (rows, distinct rows of each rank) summed
        budget = float(every[:, -1].min())  # the tightest rank decides: every rank must choose alike
        cpu = max(1.0, hvd.local_size() / physical_cores())  # ranks time-sharing this host's cores
        self.table_mode = {}
        for param, (rows, distinct) in zip(self.tables, total):
            paid = ("dense-reduce",) if param in self.buffers else ()
            mode, added = choose_mode(self.costs, self.size, param.shape[0], param.shape[1], rows, distinct, cpu,
                                      budget, paid=paid)
            self.table_mode[param] = mode
            budget -= added

    def broadcast_model(self, model, optimizer):
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def synchronize(self, optimizer):
        optimizer.synchronize()
        if self.mode == "sparse-as-dense" and self.size > 1:
            for p in self.tables:  # Horovod rebuilt these sparse from the reduced dense tensor
                if p.grad is not None and p.grad.is_sparse:
                    self.counters.resparsified_bytes += tensor_bytes(p.grad)

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
