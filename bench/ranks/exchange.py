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
  before any gradient's collective starts. Over Horovod, auto may first shard some tables row-wise, once, as the
  model is built (bench.ranks.sharded.AutoExchange); it chooses per step for the tables it keeps whole.
`ModeExchange` holds what the modes need whatever carries them (the counting above all), so bench.ranks.mpi_exchange
runs the same modes over raw MPI, counted alike.
At np=1 Horovod registers no hooks and exchanges nothing: every mode is the bare model there.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from alure.exchange import Arrived
from bench.host import physical_cores
from bench.model.calibration_store import load_costs_and_origin
from bench.model.profile import table_lookups
from bench.model.table_costs import choose_mode
from bench.plan.config import MODES, SHARDED_MODES
from bench.ranks.grouped_gather import GroupedGather, grouped_gathers_asked
from bench.ranks.memory import memory_budget_bytes


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
    """Allreduce collectives started: one per densified table, and under Horovod one per dense parameter (which its
    fusion may send together), under the raw-MPI backend one per bucket of dense parameters."""
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
    alltoall_calls: int = 0
    """All-to-all collectives (row-wise, table-wise: ids and rows in the forward, gradients in the backward)."""
    alltoall_bytes_sent: int = 0
    """Bytes this rank's all-to-alls sent to other ranks (ids, rows and gradients; its part for itself is a copy)."""
    alltoall_bytes_received: int = 0
    """Bytes this rank's all-to-alls received from other ranks."""
    alltoall_ids_bytes_sent: int = 0
    """Of alltoall_bytes_sent: the ids this rank asked other ranks for (8 bytes each)."""
    alltoall_ids_bytes_received: int = 0
    """Of alltoall_bytes_received: the ids other ranks asked this rank for."""
    alltoall_rows_bytes_sent: int = 0
    """Of alltoall_bytes_sent: the embedding rows this rank looked up for other ranks."""
    alltoall_rows_bytes_received: int = 0
    """Of alltoall_bytes_received: the embedding rows other ranks looked up for this rank."""
    alltoall_grad_bytes_sent: int = 0
    """Of alltoall_bytes_sent: the gradients of the received rows, back to their owners."""
    alltoall_grad_bytes_received: int = 0
    """Of alltoall_bytes_received: the gradients other ranks sent back for the rows this rank owns."""
    alltoall_lookups_served: int = 0
    """Ids this rank looked up in its shard for every rank, itself included (the work the splits give it)."""
    alltoall_buffer_bytes: int = 0
    """Bytes of the tensors the all-to-alls returned on this rank (its own part included)."""
    table_bytes: int = 0
    """Bytes of the sparse tables' rows this rank holds (whole tables when replicated, its shard when sharded)."""
    table_state_bytes: int = 0
    """Bytes of the optimizer state of those rows."""
    work_ms: float = 0.0
    """Time spent in the exchange's own code outside exchange_wait: the gradient hooks inside backward (bookkeeping,
    coalesce, dense-reduce's buffer zero and index_add, Horovod's to_dense and enqueue) and auto's agreement in the
    data phase. What runs inside synchronize (Horovod's to_sparse, collecting results) is exchange_wait already."""

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    @property
    def bytes_sent(self) -> int:
        """Bytes of this rank's tensors handed to collectives."""
        return self.allgather_bytes_sent + self.allreduce_bytes_sent + self.alltoall_bytes_sent

    @property
    def bytes_held(self) -> int:
        """Bytes of every tensor the exchange made and holds: the collectives' results and the copies the mode makes
        (the coalesced and re-sparsified gradients; the dense copies are the allreduced tensors themselves)."""
        return (self.allgather_bytes_held + self.allreduce_bytes_held + self.coalesced_bytes + self.resparsified_bytes
                + self.alltoall_buffer_bytes)

    def bytes_received(self, size: int) -> int:
        """Bytes of the results that came from other ranks: the peers' part of a gather, all of a reduction."""
        if size == 1:
            return 0
        return ((self.allgather_bytes_held - self.allgather_bytes_sent) + self.allreduce_bytes_held
                + self.alltoall_bytes_received)

    def as_dict(self) -> dict:
        return asdict(self)

    def count_tables(self, tables, optimizer) -> None:
        """Fill table_bytes and table_state_bytes from the tables' weights and their optimizer state."""
        self.table_bytes = sum(tensor_bytes(p) for p in tables)
        self.table_state_bytes = sum(tensor_bytes(v) for p in tables for v in optimizer.state.get(p, {}).values()
                                     if isinstance(v, torch.Tensor) and v.dim() > 0)


class ModeExchange:
    """What every backend of the modes shares (this module's Horovod one, bench.ranks.mpi_exchange's raw MPI one):
    the sparse tables and each one's mode this step, dense-reduce's kept buffers, auto's choice, and the counting,
    so a byte counted by one backend means the same in the other. A backend adds the collectives (auto's choice
    calls its `allgather_array`)."""

    def __init__(self, mode: str, rank: int, size: int, local_size: int):
        if mode not in MODES or mode in SHARDED_MODES:
            raise ValueError(f"{mode!r} is not a data-parallel mode: use one of {', '.join(MODES)} "
                             f"(bench.ranks.sharded.exchange_for makes the sharded ones)")
        self.mode = mode
        self.rank = rank
        self.size = size
        self.local_size = local_size
        """Ranks on this rank's host."""
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
            transport = "shared-memory" if local_size == size else "tcp"  # this host's calibration of it
            self.costs, self.costs_origin = load_costs_and_origin(transport=transport, warn=rank == 0 and size > 1)

    def find_tables(self, model: torch.nn.Module) -> None:
        """Record the model's sparse embedding tables (and, for a fixed mode, their mode)."""
        self.tables = {m.weight: f"{name}.weight" for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Embedding) and m.sparse}
        if self.mode != "auto":
            self.table_mode = dict.fromkeys(self.tables, self.mode)

    def dense_buffer(self, p: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """dense-reduce: this rank's sparse gradient summed into the table's kept V x d buffer (repeated rows
        add)."""
        buffer = self.buffers.get(p)
        if buffer is None:
            buffer = self.buffers[p] = torch.zeros(p.shape, dtype=p.dtype)
        buffer.zero_()
        buffer.index_add_(0, grad._indices()[0], grad._values())
        return buffer

    def coalesce(self, p: torch.nn.Parameter) -> None:
        """coalesced-gather: p.grad with its repeated rows summed, so only the distinct rows travel."""
        p.grad = p.grad.coalesce()
        self.counters.coalesced_bytes += tensor_bytes(p.grad)

    def count_gather_started(self, sent: torch.Tensor) -> None:
        """A sparse gradient handed to allgather (its indices and values: two collectives)."""
        self.counters.allgather_calls += 2
        self.counters.allgather_bytes_sent += tensor_bytes(sent)
        self.counters.allgather_rows_sent += sent._nnz()

    def count_gathered(self, out: torch.Tensor) -> None:
        """The gathered sparse gradient this rank now holds."""
        self.counters.allgather_bytes_held += tensor_bytes(out)
        self.counters.allgather_rows_held += out._nnz()

    def count_reduced(self, out: torch.Tensor, densified: bool) -> None:
        """An allreduce's result (in place: the very tensor it was handed); `densified`: a table's dense copy."""
        n = tensor_bytes(out)
        self.counters.allreduce_bytes_sent += n
        self.counters.allreduce_bytes_held += n
        self.counters.allreduce_ring_bytes += ring_allreduce_bytes(n, self.size)
        if densified:
            self.counters.densify_bytes += n

    def count_resparsified(self) -> None:
        """sparse-as-dense, after the exchange: the tables' gradients rebuilt sparse from the reduced dense
        tensors."""
        if self.mode == "sparse-as-dense" and self.size > 1:
            for p in self.tables:
                if p.grad is not None and p.grad.is_sparse:
                    self.counters.resparsified_bytes += tensor_bytes(p.grad)

    def plan_tables(self, first_batch):
        pass  # the replicated modes hold every table whole (bench.ranks.sharded.AutoExchange decides here)

    def embedding_lookup(self, spec):
        return None  # every table whole (bench.ranks.sharded makes shards)

    def prepare_lookups(self, lookups):
        pass

    def start_step(self, batch):
        """auto: count the rows each table's gradient will get from this batch, gather every rank's counts and memory
        budget, and choose per table (timed as the exchange's own work)."""
        if self.mode != "auto" or self.size == 1:
            return
        started = time.perf_counter()
        self._choose_modes(batch)
        self.counters.work_ms += (time.perf_counter() - started) * 1000

    def _choose_modes(self, batch):
        counts = table_lookups(batch)
        names = list(self.tables.values())
        mine = [c for name in names for c in counts[name.removeprefix("sources.").removesuffix(".weight")]]
        every = self.allgather_array(np.array([mine + [memory_budget_bytes(self.local_size)]], dtype=np.float64))
        total = every[:, :-1].sum(axis=0).reshape(len(names), 2)  # (rows, distinct rows of each rank) summed
        budget = float(every[:, -1].min())  # the tightest rank decides: every rank must choose alike
        cpu = max(1.0, self.local_size / physical_cores())  # ranks time-sharing this host's cores
        self.table_mode = {}
        for param, (rows, distinct) in zip(self.tables, total):
            paid = ("dense-reduce",) if param in self.buffers else ()
            mode, added = choose_mode(self.costs, self.size, param.shape[0], param.shape[1], rows, distinct, cpu,
                                      budget, paid=paid)
            self.table_mode[param] = mode
            budget -= added


class HorovodExchange(ModeExchange):
    """The `alure.exchange.Exchange` seam over Horovod, in one of `MODES`."""

    def __init__(self, mode: str):
        import horovod.torch as hvd
        hvd.init()
        self._hvd = hvd
        super().__init__(mode, hvd.rank(), hvd.size(), hvd.local_size())
        self.grouped = None

    def wrap_optimizer(self, optimizer, model):
        hvd = self._hvd
        opt = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                       sparse_as_dense=self.mode == "sparse-as-dense")
        self.find_tables(model)
        self.grouped = GroupedGather(hvd, opt.process_set) if grouped_gathers_asked() else None
        """The option of bench.ranks.grouped_gather (ALURE_BENCH_GROUPED_ALLGATHER=1), or None."""
        # Horovod's hooks call `self._allreduce_grad_async(p)`; an instance attribute shadows the class method,
        # so every collective Horovod starts for a gradient passes through `exchange` first.
        start_collective = opt._allreduce_grad_async
        counters = self.counters

        def exchange(p):
            started = time.perf_counter()
            try:
                return start(p)
            finally:
                counters.work_ms += (time.perf_counter() - started) * 1000

        def start(p):
            grad = p.grad
            how = self.table_mode.get(p) if grad is not None and grad.is_sparse else None
            if how == "dense-reduce":
                return self._dense_reduce(opt, p, grad)
            if how == "coalesced-gather":
                self.coalesce(p)  # Horovod gathers the distinct rows
            if how in ("sparse-gather", "coalesced-gather"):
                sent = p.grad
                handle, ctx = (self.grouped.add(sent), None) if self.grouped else start_collective(p)
                self.count_gather_started(sent)

                def gathered():
                    out = handle()
                    self.count_gathered(out)
                    return out
                return gathered, ctx
            handle, ctx = start_collective(p)

            def reduced():  # the allreduce runs in place: its result is the very tensor it was handed
                out = hvd.synchronize(handle)
                self.count_reduced(out, densified=how == "sparse-as-dense")  # Horovod's to_dense() copy
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
        hvd = self._hvd
        buffer = self.dense_buffer(p, grad)
        handle = hvd.allreduce_async_(buffer, name=opt._parameter_names[p], op=hvd.Average,
                                      process_set=opt.process_set)
        self.counters.allreduce_calls += 1

        def reduced():
            out = hvd.synchronize(handle)
            self.count_reduced(out, densified=True)
            p.grad = out
            return out
        return reduced, None

    def start_step(self, batch):
        super().start_step(batch)
        if self.grouped is not None:  # the group starts when this step's last gathered table is ready
            self.grouped.expected = sum(m in ("sparse-gather", "coalesced-gather") for m in self.table_mode.values())

    def broadcast_model(self, model, optimizer):
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def synchronize(self, optimizer):
        optimizer.synchronize()
        self.counters.count_tables(self.tables, optimizer)
        self.count_resparsified()  # Horovod rebuilt the tables' gradients sparse from the reduced dense tensors

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
        initialised MPI; mpi4py finds it initialised and neither re-initialises nor finalises it."""
        from mpi4py import MPI
        return start_mpi_ring_shift(MPI.COMM_WORLD, array)


def start_mpi_ring_shift(comm, array) -> MpiTransfer:
    """A nonblocking ring shift over the mpi4py communicator `comm`: send `array` to rank + 1, receive rank - 1's.
    The shapes travel first in one small blocking exchange, so each receiver can allocate its block."""
    from mpi4py import MPI
    array = np.ascontiguousarray(array)
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return Arrived(array)
    following, previous = (rank + 1) % size, (rank - 1) % size
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
