"""The exchange modes over raw MPI (mpi4py's nonblocking collectives), with no Horovod in the process: the reference
that says, in the same sweep, what Horovod's runtime costs a training step.

It does what bench.ranks.exchange.HorovodExchange does with the same tensors, averaged the same way, counted by the
same code (bench.ranks.exchange.ModeExchange):
- every parameter's gradient is handed over as it becomes ready in backward (a post-accumulate-grad hook), and its
  collective starts at once, as Horovod's hooks do;
- a sparse table's gradient: sparse-gather allgathers its (indices, values) as they are, coalesced-gather after
  summing repeated rows: each rank's row count first (one small Iallgather, the part Horovod's negotiation does),
  then Iallgatherv of the indices and of the values; the gathered values divided by P (Horovod's Average);
- dense-reduce: scatter-added into the table's kept V x d buffer, Iallreduce in place, divided by P, kept dense;
- sparse-as-dense: to_dense, Iallreduce, divided by P, then turned back sparse into p.grad as Horovod does;
- the dense parameters: bucketed as PyTorch DDP buckets them (BUCKET_CAP_BYTES), each bucket flattened into one
  buffer as its gradients arrive and reduced by one Iallreduce once all have, then divided by P and copied back.
What differs is only what carries them: no background thread, no negotiation of names between ranks, no fusion
buffer, no cycle time. Without a progress thread MPI moves data while this rank is inside an MPI call, so every hook
tests the collectives in flight (which drives Open MPI's progress engine) before backward goes on.

Each exchange unit (a table, a bucket) runs on a communicator of its own: within one, every rank issues the same
collectives in the same order, as MPI requires, while across units the order may differ between ranks (a unit's
second phase starts whenever its row counts are seen to have arrived). At np=1 nothing is exchanged, as with
Horovod.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.ranks.exchange import ModeExchange, start_mpi_ring_shift

BUCKET_CAP_BYTES = 25 << 20
"""The largest bucket of dense gradients: PyTorch DDP's default `bucket_cap_mb=25`. The reference copies DDP's choice
rather than one tuned here, so it stands for what PyTorch itself would do; a bucket trades one collective's latency
per tensor against starting the reduction before backward ends."""
FIRST_BUCKET_CAP_BYTES = 1 << 20
"""The first bucket (the gradients backward makes first) is capped lower, as DDP caps it (1 MiB), so a reduction
starts early in backward."""


class MpiExchange(ModeExchange):
    """The `alure.exchange.Exchange` seam over mpi4py, in one of `MODES`."""

    def __init__(self, mode: str):
        from mpi4py import MPI
        self._MPI = MPI
        # A communicator of our own: nothing else in the process (a library over COMM_WORLD) can match our
        # collectives.
        self.comm = MPI.COMM_WORLD.Dup()
        host = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_size = host.Get_size()
        host.Free()
        super().__init__(mode, self.comm.Get_rank(), self.comm.Get_size(), local_size)
        self.units: list[TableUnit | BucketUnit] = []
        """Every exchange unit, in the order `synchronize` completes them (the same on every rank)."""
        self.unit_of: dict[torch.nn.Parameter, TableUnit | BucketUnit] = {}

    def wrap_optimizer(self, optimizer, model):
        self.find_tables(model)
        if self.size == 1:
            return optimizer  # as Horovod: nothing to exchange, no hooks
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        # DDP's order: the reverse of the model's, about the order backward makes the gradients in.
        order = {id(p): i for i, p in enumerate(reversed(list(model.parameters())))}
        params.sort(key=lambda p: order.get(id(p), -1))
        dense = [p for p in params if p not in self.tables]
        self.units = [TableUnit(self, p, self.comm.Dup()) for p in params if p in self.tables]
        self.units += [BucketUnit(self, bucket, self.comm.Dup()) for bucket in buckets(dense)]
        for unit in self.units:
            for p in unit.params:
                self.unit_of[p] = unit
                p.register_post_accumulate_grad_hook(self._ready)
        return optimizer

    def _ready(self, p: torch.nn.Parameter) -> None:
        """A post-accumulate-grad hook: p.grad is this rank's whole gradient of p. Timed as the exchange's own work
        (work_ms), as Horovod's hook is."""
        started = time.perf_counter()
        self.unit_of[p].ready(p)
        for unit in self.units:
            unit.advance()
        self.counters.work_ms += (time.perf_counter() - started) * 1000

    def synchronize(self, optimizer):
        for unit in self.units:  # the same order on every rank
            unit.finish()
        self.counters.count_tables(self.tables, optimizer)
        self.count_resparsified()

    def step(self, optimizer):
        optimizer.step()

    def broadcast_model(self, model, optimizer):
        """Rank 0's parameters, buffers, optimizer settings and state, in place (what Horovod's
        broadcast_parameters and broadcast_optimizer_state send)."""
        for _, tensor in sorted(model.state_dict().items()):
            self.comm.Bcast(tensor.numpy(), root=0)
        settings = self.comm.bcast([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                                   root=0)
        for group, chosen in zip(optimizer.param_groups, settings):
            group.update(chosen)
        for group in optimizer.param_groups:
            for p in group["params"]:
                for _, value in sorted(optimizer.state[p].items()):
                    if torch.is_tensor(value):
                        self.comm.Bcast(value.numpy(), root=0)

    def allgather_array(self, array):
        array = np.ascontiguousarray(array)
        rows = self.comm.allgather(array.shape[0])
        out = np.empty((sum(rows), *array.shape[1:]), dtype=array.dtype)
        row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        counts = [r * row_bytes for r in rows]
        # As bytes: any dtype, MPI's own types or not.
        self.comm.Allgatherv([array, self._MPI.BYTE], [out, (counts, np.cumsum([0] + counts[:-1]).tolist()), self._MPI.BYTE])
        return out

    def allreduce_sum(self, array):
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        self.comm.Allreduce(array, out, op=self._MPI.SUM)
        return out

    def barrier(self):
        self.comm.Barrier()

    def allgather_object(self, obj):
        """Every rank's picklable object, in rank order (for per-rank results, not for the hot loop)."""
        return self.comm.allgather(obj)

    def start_ring_shift(self, array):
        return start_mpi_ring_shift(self.comm, array)

    def shutdown(self):
        """Free the communicators (mpi4py finalises MPI as the process exits)."""
        for unit in self.units:
            unit.comm.Free()
        self.units, self.unit_of = [], {}
        self.comm.Free()


def buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """DDP's bucketing: consecutive parameters (in gradient order) of one dtype until the next would pass the cap
    (FIRST_BUCKET_CAP_BYTES for the first bucket, BUCKET_CAP_BYTES after); a parameter larger than the cap is a
    bucket of its own."""
    out, current, size = [], [], 0
    for p in params:
        n = p.numel() * p.element_size()
        cap = BUCKET_CAP_BYTES if out else FIRST_BUCKET_CAP_BYTES
        if current and (size + n > cap or p.dtype != current[0].dtype):
            out.append(current)
            current, size = [], 0
        current.append(p)
        size += n
    return out + ([current] if current else [])


class TableUnit:
    """One sparse table's exchange in the step's mode for it, on a communicator of its own."""

    def __init__(self, exchange: MpiExchange, p: torch.nn.Parameter, comm):
        self.exchange, self.params, self.comm = exchange, [p], comm
        self.requests: list = []
        """The collectives in flight (the row counts, or the gathers, or the reduction)."""
        self.phase = "idle"
        """idle, counting (row counts in flight), gathering, reducing."""
        self.how = ""
        self.held: tuple = ()
        """The buffers the collectives in flight read and write (kept alive until they are done)."""

    def ready(self, p: torch.nn.Parameter) -> None:
        ex, MPI = self.exchange, self.exchange._MPI
        self.how = how = ex.table_mode[p]
        if how in ("dense-reduce", "sparse-as-dense"):
            dense = ex.dense_buffer(p, p.grad) if how == "dense-reduce" else p.grad.to_dense()
            self.requests = [self.comm.Iallreduce(MPI.IN_PLACE, dense.numpy(), op=MPI.SUM)]
            ex.counters.allreduce_calls += 1
            self.held, self.phase = (dense,), "reducing"
            return
        if how == "coalesced-gather":
            ex.coalesce(p)
        sent = p.grad
        indices, values = sent._indices()[0].contiguous(), sent._values().contiguous()
        rows = np.empty(ex.size, dtype=np.int64)
        self.requests = [self.comm.Iallgather(np.array([indices.numel()], dtype=np.int64), rows)]
        ex.count_gather_started(sent)
        self.held, self.phase = (indices, values, rows), "counting"

    @property
    def started(self) -> bool:
        """This step's collectives have started (and not yet been collected)."""
        return self.phase != "idle"

    def advance(self) -> None:
        """Let the collectives in flight progress; once every rank's row count is here, start the gathers."""
        if self.phase == "counting" and self.requests[0].Test():
            self._start_gathers()
        elif self.requests:
            self.exchange._MPI.Request.Testall(self.requests)

    def _start_gathers(self) -> None:
        indices, values, rows = self.held
        width = values.shape[1]
        all_indices = torch.empty(int(rows.sum()), dtype=indices.dtype)
        all_values = torch.empty((int(rows.sum()), width), dtype=values.dtype)
        counts = rows.tolist()
        self.requests = [self.comm.Iallgatherv(indices.numpy(), [all_indices.numpy(), counts]),
                         self.comm.Iallgatherv(values.numpy(), [all_values.numpy(), [c * width for c in counts]])]
        self.held, self.phase = (indices, values, all_indices, all_values), "gathering"

    def finish(self) -> None:
        """Wait for this step's exchange; leave the averaged gradient in p.grad."""
        ex, MPI = self.exchange, self.exchange._MPI
        (p,) = self.params
        if self.phase == "idle":  # no gradient on this rank this step: take part with an empty one
            p.grad = torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.int64), torch.empty((0, p.shape[1])),
                                             p.shape)
            self.ready(p)
        if self.phase == "counting":
            MPI.Request.Waitall(self.requests)
            self._start_gathers()
        MPI.Request.Waitall(self.requests)
        if self.phase == "gathering":
            _, _, all_indices, all_values = self.held
            gathered = torch.sparse_coo_tensor(all_indices.unsqueeze(0), all_values.div_(ex.size), p.shape)
            ex.count_gathered(gathered)
            p.grad = gathered
        else:
            (reduced,) = self.held
            reduced.mul_(1.0 / ex.size)  # Horovod's Average: the sum scaled by 1/P
            ex.count_reduced(reduced, densified=True)
            if self.how == "dense-reduce":
                p.grad = reduced
            else:  # sparse-as-dense: as Horovod's synchronize hands it back
                p.grad.zero_().add_(reduced.to_sparse())
        self.requests, self.held, self.phase = [], (), "idle"


class BucketUnit:
    """Dense gradients reduced together: copied into one flat buffer as they arrive, one Iallreduce once all have."""

    def __init__(self, exchange: MpiExchange, params: list[torch.nn.Parameter], comm):
        self.exchange, self.params, self.comm = exchange, params, comm
        self.offsets = {}
        start = 0
        for p in params:
            self.offsets[p] = (start, start + p.numel())
            start += p.numel()
        self.buffer = torch.zeros(start, dtype=params[0].dtype)
        """Kept across steps, like DDP's bucket."""
        self.pending = set()
        self.requests: list = []

    def ready(self, p: torch.nn.Parameter) -> None:
        if not self.pending and not self.requests:
            self.pending = set(self.params)  # the step's first gradient of this bucket
        start, end = self.offsets[p]
        self.buffer[start:end].copy_(p.grad.reshape(-1))
        self.pending.discard(p)
        if not self.pending:
            self._start()

    def _start(self) -> None:
        MPI = self.exchange._MPI
        self.requests = [self.comm.Iallreduce(MPI.IN_PLACE, self.buffer.numpy(), op=MPI.SUM)]
        self.exchange.counters.allreduce_calls += 1

    @property
    def started(self) -> bool:
        """This step's reduction has started (and not yet been collected)."""
        return bool(self.requests)

    def advance(self) -> None:
        if self.requests:
            self.exchange._MPI.Request.Testall(self.requests)

    def finish(self) -> None:
        ex = self.exchange
        if not self.requests:
            # Gradients backward did not make on this rank this step: zeros, as Horovod submits for them.
            missing = self.pending if self.pending else set(self.params)
            for p in missing:
                start, end = self.offsets[p]
                self.buffer[start:end].zero_()
            self.pending = set()
            self._start()
        ex._MPI.Request.Waitall(self.requests)
        self.buffer.mul_(1.0 / ex.size)  # Horovod's Average: the sum scaled by 1/P
        ex.count_reduced(self.buffer, densified=False)
        for p in self.params:
            start, end = self.offsets[p]
            view = self.buffer[start:end].view_as(p)
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
        self.requests = []
