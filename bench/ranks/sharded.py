"""Sharded embedding tables: the model-parallel exchange modes, over Horovod's all-to-all.

- row-wise: every sparse table's rows are split over the ranks, by range (row i on rank i // ceil(V/P), as TorchRec;
  the default) or by residue (row i on rank i % P); the workload's `shard_rows`.
- table-wise: whole tables placed on ranks, greedily by rows x lookups per step (largest first, each to the rank
  with the least so far), as DLRM and TorchRec's table-wise sharding place them.

A rank holds only its rows and Adagrad's state for them. Each step, in the forward (`prepare_lookups`), every id
any table will look up (all tables in one tensor, ids offset per table: Horovod never fuses all-to-alls) goes to its
owner by one all-to-all; the owners look the rows up in their shards and send them back by a second. Horovod's
alltoall is autograd-aware: in the backward the rows' gradients return to their owners by the reverse all-to-all,
so each owner's shard gets a sparse gradient of exactly the rows it lent, summed over ranks; scaled by 1/P on the
way back it is the data-parallel average, and sparse Adagrad updates the shard. Dense parameters stay on Horovod's
allreduce. With the workload's `shard_dedup`, each rank sends each distinct id once per step instead of every
lookup. At np=1 no table is sharded: both modes are the bare model.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from alure.data import negatives_per_step
from bench.host import physical_cores
from bench.model.profile import table_lookups
from bench.model.shard_costs import choose_sharding, place_tables
from bench.plan.config import SHARDED_MODES
from bench.ranks.exchange import HorovodExchange, tensor_bytes
from bench.ranks.memory import memory_budget_bytes

ID_BYTES = 8
"""Bytes of one id on the wire (int64)."""


class RowOwners:
    """Which rank owns each row of one table, and where the row sits in its owner's shard."""

    def __init__(self, rows: int, size: int, how: str, rank_of_table: int | None = None):
        self.rows, self.size, self.how, self.rank_of_table = rows, size, how, rank_of_table
        self.chunk = math.ceil(rows / size)

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "table":
            return torch.full_like(ids, self.rank_of_table)
        return ids % self.size if self.how == "residue" else torch.div(ids, self.chunk, rounding_mode="floor")

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Row index in the owner's shard of each (owned) id."""
        if self.how == "table":
            return ids
        return torch.div(ids, self.size, rounding_mode="floor") if self.how == "residue" else ids % self.chunk

    def owned(self, rank: int) -> torch.Tensor:
        """The table's rows `rank` holds, in shard order."""
        if self.how == "table":
            return torch.arange(self.rows if rank == self.rank_of_table else 0)
        if self.how == "residue":
            return torch.arange(rank, self.rows, self.size)
        return torch.arange(rank * self.chunk, min(self.rows, (rank + 1) * self.chunk))


def table_weights(config) -> dict[str, float]:
    """rows x lookups per rank and step of each sparse table of the workload, from its config (before any batch):
    sequence tokens (mean length, capped), targets and negatives; each RQ level looks up the codes table once."""
    weights = {}
    for s in config.sources:
        lookups = config.batch_size * (min(s.mean_length, s.max_length) + 1) + negatives_per_step(config, s)
        weights[f"sources.{s.name}.items"] = s.items * lookups
        weights[f"sources.{s.name}.codes"] = config.rq_codebooks * config.rq_codes * config.rq_codebooks * lookups
    return weights


class ShardedTable(torch.nn.Embedding):
    """One sparse table of which this rank holds some rows (`weight`, rows `owned` in order); called with ids like
    the whole table, it hands out the rows fetched for this step by `ShardedExchange.prepare_lookups`."""

    def __init__(self, spec, owners: RowOwners, rank: int):
        owned = owners.owned(rank)
        super().__init__(len(owned), spec.dim, sparse=True, _weight=spec.initial_rows(owned))
        self.spec, self.owners = spec, owners
        self.register_buffer("owned", owned, persistent=False)
        self.fetched_ids: torch.Tensor | None = None
        """This step's ids, sorted and distinct (dedup) or every lookup in order."""
        self.fetched_rows: torch.Tensor | None = None
        """Their rows, from their owners (autograd reaches back to the owners' shards)."""
        self.dedup = False
        self.cursor = 0

    def fetched(self, ids: torch.Tensor, rows: torch.Tensor, dedup: bool) -> None:
        self.fetched_ids, self.fetched_rows, self.dedup, self.cursor = ids, rows, dedup, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.fetched_ids is None:
            raise RuntimeError(f"{self.spec.name}: rows looked up before prepare_lookups fetched them")
        if self.dedup:
            at = torch.searchsorted(self.fetched_ids, flat).clamp_max(max(len(self.fetched_ids) - 1, 0))
            ok = len(self.fetched_ids) > 0 or flat.numel() == 0
            if not ok or not torch.equal(self.fetched_ids[at], flat):
                raise RuntimeError(f"{self.spec.name}: looked up ids that prepare_lookups did not fetch")
            rows = self.fetched_rows.index_select(0, at)
        else:
            end = self.cursor + flat.numel()
            if not torch.equal(self.fetched_ids[self.cursor:end], flat):
                raise RuntimeError(f"{self.spec.name}: lookups differ from what prepare_lookups was told "
                                   f"(UserEncoder.table_lookups must list them in the order the model makes them)")
            rows, self.cursor = self.fetched_rows[self.cursor:end], end
        return rows.view(*ids.shape, self.embedding_dim)


class ShardedExchange(HorovodExchange):
    """The `alure.exchange.Exchange` seam in a mode of SHARDED_MODES: it makes the sparse tables as shards and
    fetches their rows by all-to-all; everything else as HorovodExchange (dense parameters allreduced)."""

    def __init__(self, mode: str, config, replicated: str = "sparse-gather"):
        if mode not in SHARDED_MODES and not (mode == "auto" == replicated):
            raise ValueError(f"{mode!r} is not a sharded mode: use one of {', '.join(SHARDED_MODES)}")
        # the exchange of what is not sharded: the dense parameters (and, under auto, the tables it keeps whole)
        super().__init__(replicated)
        self.mode = mode
        self.config = config
        self.shards: list[ShardedTable] = []
        """The tables this exchange made, in the order the model made them (the same on every rank)."""
        self.placement = place_tables(table_weights(config), self.size) if mode == "table-wise" else None
        """table-wise: table -> the rank holding it."""

    @property
    def sharding(self) -> dict:
        """What the record says of how the tables were split."""
        return {"mode": self.mode, "rows": self.config.shard_rows if self.mode == "row-wise" else None,
                "dedup": self.config.shard_dedup, "placement": self.placement,
                "tables": [t.spec.name for t in self.shards]}

    def embedding_lookup(self, spec):
        if self.size == 1:
            return None  # the bare model
        if self.mode == "table-wise":
            owners = RowOwners(spec.rows, self.size, "table", self.placement[spec.name])
        else:
            owners = RowOwners(spec.rows, self.size, self.config.shard_rows)
        table = ShardedTable(spec, owners, self.rank)
        self.shards.append(table)
        return table

    def wrap_optimizer(self, optimizer, model):
        opt = super().wrap_optimizer(optimizer, model)
        shards = {t.weight for t in self.shards}
        exchange_others = opt._allreduce_grad_async

        def exchange(p):
            return (self._keep(p), None) if p in shards else exchange_others(p)
        opt._allreduce_grad_async = exchange
        return opt

    @staticmethod
    def _keep(p):
        """A shard's gradient is complete when the backward ends (the reverse all-to-all brought every rank's part):
        the 'collective' Horovod waits for hands it back as it is. Horovod then adds what the handle returns into
        p.grad zeroed, so p.grad is swapped for an empty one first (else it would be added to its own zeroing)."""
        def kept():
            grad = p.grad if p.grad is not None else empty_sparse(p)
            p.grad = empty_sparse(p)
            return grad
        return kept

    def broadcast_model(self, model, optimizer):
        """Rank 0's dense parameters; each shard is already at its rows' initial values (TableSpec.initial_rows),
        and the optimizer state is new (zeros) on every rank, shaped by each rank's shard."""
        shard_names = {f"{t.spec.name}.weight" for t in self.shards}
        self._hvd.broadcast_parameters({k: v for k, v in model.state_dict().items() if k not in shard_names},
                                       root_rank=0)

    def prepare_lookups(self, lookups):
        """One all-to-all of every table's ids to their owners, one of the rows back (see the module's doc); all of
        it is the exchange's own work inside the forward, timed into the counters' work_ms as the replicated
        modes' hooks are (their reverse all-to-all in the backward: RowsAlltoall)."""
        started = time.perf_counter()
        try:
            self._fetch_rows(lookups)
        finally:
            self.counters.work_ms += (time.perf_counter() - started) * 1000

    def _fetch_rows(self, lookups):
        hvd, counters, size = self._hvd, self.counters, self.size
        dedup = self.config.shard_dedup
        ids = [torch.cat([x.reshape(-1) for x in lookups[t.spec.name]]) for t in self.shards]
        if dedup:
            ids = [torch.unique(i) for i in ids]
        offsets = torch.tensor([0] + [t.spec.rows for t in self.shards]).cumsum(0)
        keys = torch.cat([i + offsets[k] for k, i in enumerate(ids)])
        owners = torch.cat([t.owners.owner(i) for t, i in zip(self.shards, ids)])
        order = torch.argsort(owners, stable=True)
        splits = torch.bincount(owners, minlength=size).to(torch.int32)
        asked, asked_splits = hvd.alltoall(keys[order], splits=splits, name="sharded.ids")
        # The owner: each asked id's table and row, looked up in its shard (sparse gradient for the shard).
        table = torch.searchsorted(offsets, asked, right=True) - 1
        parts, where = [], []
        for k, t in enumerate(self.shards):
            at = (table == k).nonzero().squeeze(1)
            if len(at):
                parts.append(F.embedding(t.owners.local(asked[at] - offsets[k]), t.weight, sparse=True))
                where.append(at)
        if not parts:  # nothing asked of this rank: still in the graph, so its backward joins the reverse all-to-all
            parts = [F.embedding(torch.zeros(0, dtype=torch.long), self.shards[0].weight, sparse=True)]
        lent = torch.cat(parts)
        if where:
            lent = lent.index_select(0, torch.argsort(torch.cat(where)))  # back in the order the ids were asked
        rows = RowsAlltoall.apply(lent, asked_splits, hvd, counters)
        counters.alltoall_calls += 2
        self._count_forward(splits, asked_splits, asked, rows)
        rows.register_hook(self._gradient_out(splits))
        lent.register_hook(self._gradient_in(asked_splits))
        mine = rows.index_select(0, torch.argsort(order))  # in the order of `keys`
        for t, i, r in zip(self.shards, ids, mine.split([len(i) for i in ids])):
            t.fetched(i, r, dedup)

    def _count_forward(self, splits, asked_splits, asked, rows):
        c, rank = self.counters, self.rank
        row_bytes = rows.shape[1] * rows.element_size()
        to_others, from_others = int(splits.sum() - splits[rank]), int(asked_splits.sum() - asked_splits[rank])
        c.alltoall_ids_bytes_sent += to_others * ID_BYTES
        c.alltoall_ids_bytes_received += from_others * ID_BYTES
        c.alltoall_rows_bytes_sent += from_others * row_bytes
        c.alltoall_rows_bytes_received += to_others * row_bytes
        c.alltoall_bytes_sent += to_others * ID_BYTES + from_others * row_bytes
        c.alltoall_bytes_received += from_others * ID_BYTES + to_others * row_bytes
        c.alltoall_lookups_served += len(asked)
        c.alltoall_buffer_bytes += tensor_bytes(asked) + tensor_bytes(rows)

    def _gradient_out(self, splits):
        """Hook on the rows received: their gradient is what the reverse all-to-all sends back (averaged: 1/P)."""
        c, size, rank = self.counters, self.size, self.rank

        def hook(grad):
            row_bytes = grad.shape[1] * grad.element_size()
            sent = int(splits.sum() - splits[rank]) * row_bytes
            c.alltoall_calls += 1
            c.alltoall_grad_bytes_sent += sent
            c.alltoall_bytes_sent += sent
            return grad / size
        return hook

    def _gradient_in(self, asked_splits):
        """Hook on the rows lent: their gradient is what the reverse all-to-all brought from the askers."""
        c, rank = self.counters, self.rank

        def hook(grad):
            row_bytes = grad.shape[1] * grad.element_size()
            received = int(asked_splits.sum() - asked_splits[rank]) * row_bytes
            c.alltoall_grad_bytes_received += received
            c.alltoall_bytes_received += received
            c.alltoall_buffer_bytes += tensor_bytes(grad)
        return hook


class RowsAlltoall(torch.autograd.Function):
    """The rows' all-to-all, as Horovod's autograd-aware hvd.alltoall (its backward: the reverse all-to-all of the
    rows' gradients, with the splits received), whose backward is timed into the counters' work_ms: the exchange's
    own time inside the backward. Timing hooks either side of Horovod's own backward node would also time whatever
    other backward nodes the engine runs between them."""

    @staticmethod
    def forward(ctx, lent, splits, hvd, counters):
        rows, received = hvd.alltoall(lent, splits=splits, name="sharded.rows")
        ctx.hvd, ctx.counters, ctx.received = hvd, counters, received
        return rows

    @staticmethod
    def backward(ctx, grad):
        started = time.perf_counter()
        back, _ = ctx.hvd.alltoall(grad.contiguous(), splits=ctx.received, name="sharded.rows.grad")
        ctx.counters.work_ms += (time.perf_counter() - started) * 1000
        return back, None, None, None


def empty_sparse(p: torch.Tensor) -> torch.Tensor:
    """A sparse gradient of `p`'s shape with no rows."""
    return torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, *p.shape[1:]), p.shape)


class AutoExchange(ShardedExchange):
    """`auto` over Horovod: each sparse table, once, as it is made, sharded row-wise or kept whole
    (bench.model.shard_costs.choose_sharding, from the first step's batch, this host's costs and the tightest rank's
    memory budget; every rank alike); the whole tables then choose among the replicated modes per step, as
    bench.ranks.exchange.ModeExchange does. Sharding is decided once: moving a table's rows between steps is not what
    a trainer does."""

    def __init__(self, config):
        super().__init__("auto", config, replicated="auto")
        self.choices: dict[str, dict] = {}
        """Table -> its ShardingChoice (as a dict), in the order the model made the tables."""
        self._first_counts: dict | None = None
        """Table -> (rows, distinct rows) of the first step, summed over ranks (`plan_tables`)."""
        self._budget: float | None = None
        """What the tightest rank may still allocate, less what the tables decided so far take."""

    @property
    def sharding(self) -> dict:
        """The sharded modes' fields (tables: the ones auto sharded) and, per table, what auto decided and why."""
        return {**super().sharding, "rows": self.config.shard_rows, "auto": self.choices}

    def find_tables(self, model) -> None:
        super().find_tables(model)
        shards = {t.weight for t in self.shards}
        self.tables = {p: name for p, name in self.tables.items() if p not in shards}  # auto's per-step choice

    def embedding_lookup(self, spec):
        if self.size == 1:
            return None
        if self._first_counts is None:
            raise RuntimeError("auto was offered a table before plan_tables saw the first batch")
        budget = self._budget
        rows_total, distinct_total = self._first_counts[spec.name.removeprefix("sources.")]
        cpu = max(1.0, self.local_size / physical_cores())  # ranks time-sharing this host's cores
        choice = choose_sharding(self.costs, self.size, spec.name, spec.rows, spec.dim, rows_total, distinct_total,
                                 cpu, budget)
        self.choices[spec.name] = asdict(choice)
        self._budget -= choice.row_wise_bytes if choice.sharded else choice.replicated_bytes
        if self.rank == 0:
            verdict = "sharded row-wise" if choice.sharded else f"kept whole ({choice.replicated_mode} this step)"
            why = {"memory": "no replicated mode fits the memory budget", "time": "row-wise is predicted cheaper",
                   "replicated": "a replicated mode fits and is predicted cheaper"}[choice.reason]
            print(f"auto: {spec.name} {verdict}: {why} (row-wise {choice.row_wise_ms:.3g} ms, "
                  f"{choice.row_wise_bytes / 2**20:.3g} MiB; replicated {choice.replicated_ms:.3g} ms, "
                  f"{choice.replicated_bytes / 2**20:.3g} MiB; budget {budget / 2**20:.4g} MiB)",
                  file=sys.stderr, flush=True)
        return super().embedding_lookup(spec) if choice.sharded else None

    def synchronize(self, optimizer):
        super().synchronize(optimizer)
        self.counters.count_tables([*self.tables, *(t.weight for t in self.shards)], optimizer)  # whole and shards

    def plan_tables(self, first_batch):
        """Agree, by one allgather, on the first step's counts (table -> rows and distinct rows of every rank's
        batch, summed) and on the tightest rank's memory budget, which the tables decided then draw on in turn."""
        if self.size == 1:
            return
        counts = table_lookups(first_batch())
        names = sorted(counts)
        mine = [c for name in names for c in counts[name]] + [memory_budget_bytes(self.local_size)]
        every = self.allgather_array(np.array([mine], dtype=np.float64))
        total = every[:, :-1].sum(axis=0).reshape(len(names), 2)
        self._first_counts = {name: (float(r), float(d)) for name, (r, d) in zip(names, total)}
        self._budget = float(every[:, -1].min())  # the tightest rank decides: every rank must choose alike


def exchange_for(mode: str, config):
    """The exchange a point of `mode` trains with (`config`: the alure workload it trains)."""
    if mode == "auto":
        return AutoExchange(config)
    return ShardedExchange(mode, config) if mode in SHARDED_MODES else HorovodExchange(mode)
