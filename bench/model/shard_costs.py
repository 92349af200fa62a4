"""The sharded modes (row-wise, table-wise) as the cost model sees them: what each rank sends, receives, serves and
holds in one step, and what that costs (bench.ranks.sharded runs them).

Per step, all tables in one tensor each time (Horovod never fuses all-to-alls), three all-to-alls:
    ids        8 bytes per lookup a rank asks of another rank
    rows       4d bytes per such lookup, back from the owner
    gradients  4d bytes per such lookup, back to the owner (the reverse all-to-all of the backward)
so a rank sends (P-1)/P x lookups x (8 + 2 x 4d) per step when its rows are spread evenly over the owners. Each
all-to-all costs (P-1) a + b x the most bytes a rank sends or receives (pairwise exchange), on the link the comm
rows of `alltoall` calibrate. The owners then update the rows they lent (sparse Adagrad on their shard): the rank
that serves most lookups sets the pace.
Row-wise serves evenly up to the splits' imbalance (max / mean of what a rank serves: `alltoall_imbalance` of the
records, 1 without any); table-wise serves what the greedy placement gives it, computed from the tables here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.model.collectives import Link, alltoall_s
from bench.model.table_costs import (
    INDEX_BYTES,
    VALUE_BYTES,
    ExchangeCosts,
    choose_mode,
    table_exchange_s,
    table_memory_bytes,
)

SHARDED_CALLS = 3
"""All-to-alls per step: ids, rows, gradients."""
ADAGRAD_STATE_COPIES = 1
"""Adagrad keeps one sum of squares per element of the rows it updates."""


def place_tables(weights: dict[str, float], size: int) -> dict[str, int]:
    """table-wise placement: the heaviest table first, each on the rank with the least weight so far (ties: the
    lowest rank), so every rank computes the same placement."""
    load = [0.0] * size
    placement = {}
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        rank = min(range(size), key=lambda r: (load[r], r))
        placement[name] = rank
        load[rank] += weights[name]
    return placement


@dataclass(frozen=True, slots=True)
class ShardTable:
    """One table as the sharded step needs it."""

    name: str
    rows: int
    dim: int
    lookups: float
    """Lookups per rank and step (ids sent, every lookup; or the distinct ones under shard_dedup)."""


@dataclass(frozen=True, slots=True)
class ShardedStep:
    """What the most loaded rank moves, serves and holds in one sharded step (bytes, lookups)."""

    sent_bytes: tuple[float, float, float]
    """ids, rows, gradients: the most any rank sends to (or receives from) other ranks in each all-to-all."""
    mean_sent_bytes: float
    """What a rank sends to other ranks in all three, on average over ranks: the record's alltoall_bytes_sent."""
    served_lookups: float
    """Lookups the most loaded owner serves (its own included): the rows its shard's sparse update walks."""
    served_row_bytes: float
    """Those lookups' sparse gradient rows, bytes (index and values)."""
    shard_bytes: float
    """The table rows the most loaded rank holds, bytes (their Adagrad state again as much)."""
    buffer_bytes: float
    """The all-to-alls' results on that rank: the ids asked of it, the rows it received, the gradients it got."""
    work_bytes: float
    """The rank's own lookups' ids, rows and gradients, its own part included (`work_per_lookup_bytes`): what the CPU
    work around the all-to-alls (bucketing, putting rows back in order) walks."""


def work_per_lookup_bytes(dim: int) -> int:
    """An id and its row there and back: 8 + 2 x 4d bytes."""
    return INDEX_BYTES + 2 * VALUE_BYTES * dim


def sharded_step(mode: str, p: int, tables: Sequence[ShardTable], imbalance: float = 1.0) -> ShardedStep:
    """The sharded step of `tables` at p ranks in `mode` (row-wise: rows spread evenly over the ranks up to
    `imbalance`; table-wise: the greedy placement by rows x lookups)."""
    if mode not in ("row-wise", "table-wise"):
        raise ValueError(f"no sharded model for mode {mode!r}")
    if p <= 1:  # the bare model: every table whole, nothing travels
        return ShardedStep((0.0, 0.0, 0.0), 0.0, sum(t.lookups for t in tables),
                           sum(t.lookups * (INDEX_BYTES + VALUE_BYTES * t.dim) for t in tables),
                           sum(VALUE_BYTES * t.rows * t.dim for t in tables), 0.0, 0.0)
    far = (p - 1) / p
    work = sum(t.lookups * work_per_lookup_bytes(t.dim) for t in tables)
    if mode == "row-wise":
        ids = far * sum(t.lookups for t in tables) * INDEX_BYTES
        rows = far * sum(t.lookups * VALUE_BYTES * t.dim for t in tables)
        served = imbalance * sum(t.lookups for t in tables)
        served_bytes = imbalance * sum(t.lookups * (INDEX_BYTES + VALUE_BYTES * t.dim) for t in tables)
        shard = sum(VALUE_BYTES * math.ceil(t.rows / p) * t.dim for t in tables)
        # asked ids and lent gradients on the owner side (imbalanced), the received rows on the asker side
        buffer = served_bytes + sum(t.lookups * VALUE_BYTES * t.dim for t in tables)
        return ShardedStep((imbalance * ids, imbalance * rows, imbalance * rows), ids + 2 * rows, served,
                           served_bytes, shard, buffer, work)
    placement = place_tables({t.name: t.rows * t.lookups for t in tables}, p)
    held = [[t for t in tables if placement[t.name] == r] for r in range(p)]
    # rank r receives the other ranks' lookups of its tables and sends its own of everyone else's
    ids_in = [(p - 1) * sum(t.lookups for t in mine) * INDEX_BYTES for mine in held]
    ids_out = [sum(t.lookups for t in tables if placement[t.name] != r) * INDEX_BYTES for r in range(p)]
    rows_out = [(p - 1) * sum(t.lookups * VALUE_BYTES * t.dim for t in mine) for mine in held]
    rows_in = [sum(t.lookups * VALUE_BYTES * t.dim for t in tables if placement[t.name] != r) for r in range(p)]
    served = [p * sum(t.lookups for t in mine) for mine in held]
    served_bytes = [p * sum(t.lookups * (INDEX_BYTES + VALUE_BYTES * t.dim) for t in mine) for mine in held]
    shard = [sum(VALUE_BYTES * t.rows * t.dim for t in mine) for mine in held]
    own_rows = sum(t.lookups * VALUE_BYTES * t.dim for t in tables)
    buffer = [served_bytes[r] + own_rows for r in range(p)]
    rows_max = max(max(rows_out), max(rows_in))
    return ShardedStep((max(max(ids_in), max(ids_out)), rows_max, rows_max),
                       (sum(ids_out) + 2 * sum(rows_in)) / p, max(served), max(served_bytes), max(shard),
                       max(buffer), work)


def sharded_network_s(step: ShardedStep, p: int, link: Link) -> float:
    """The three all-to-alls of a sharded step: each (P-1) a plus its largest per-rank bytes x b."""
    return sum(alltoall_s(n, p, link) for n in step.sent_bytes)


def sharded_memory_bytes(step: ShardedStep) -> float:
    """What the sharded tables take on the most loaded rank: its rows and their Adagrad state, the all-to-alls'
    buffers and its shard's sparse gradient."""
    return (1 + ADAGRAD_STATE_COPIES) * step.shard_bytes + step.buffer_bytes + step.served_row_bytes


def replicated_tables_bytes(tables: Sequence[ShardTable]) -> float:
    """Whole tables and their Adagrad state: what every replicated rank (and an np=1 rank) holds of them."""
    return (1 + ADAGRAD_STATE_COPIES) * sum(VALUE_BYTES * t.rows * t.dim for t in tables)


def sharded_tables_s(step: ShardedStep, p: int, link: Link, work_s_per_byte: float, optimizer_s_per_byte: float,
                     cpu: float = 1.0) -> float:
    """A sharded step's exchange and update: the three all-to-alls, the CPU work around them, and the most loaded
    owner's sparse update of the rows it lent."""
    if p <= 1:
        return cpu * optimizer_s_per_byte * step.served_row_bytes
    return (sharded_network_s(step, p, link)
            + cpu * (work_s_per_byte * step.work_bytes + optimizer_s_per_byte * step.served_row_bytes))


@dataclass(frozen=True, slots=True)
class ShardingChoice:
    """auto's decision for one table, made once at its first step, and why."""

    table: str
    sharded: bool
    reason: str
    """'memory': no replicated mode fits the budget (and the shard does, or needs least); 'time': the shard is
    predicted cheaper; 'replicated': a replicated mode fits and is cheaper."""
    replicated_mode: str
    """The replicated mode `choose_mode` picked for that step (what the table is exchanged with if kept whole)."""
    replicated_ms: float
    row_wise_ms: float
    replicated_bytes: float
    """The whole table, its Adagrad state and the replicated mode's exchange memory."""
    row_wise_bytes: float
    """The shard, its Adagrad state, the all-to-alls' buffers and the shard's gradient."""
    budget_bytes: float | None
    """What the rank could still allocate when this table was decided (None: no limit)."""
    rows_total: float
    """The first step's lookups of the table, summed over ranks (what it was decided from)."""
    distinct_total: float
    """Each rank's distinct rows of it in that step, summed over ranks."""
    cpu: float
    """The ranks' share of a core it was priced with (bench.model.step.cpu_factor's time-sharing)."""


def choose_sharding(costs: ExchangeCosts, p: int, table: str, rows: int, dim: int, rows_total: float,
                    distinct_total: float, cpu: float = 1.0, budget_bytes: float | None = None) -> ShardingChoice:
    """The `auto` rule for one table, once: shard it row-wise when no replicated mode (whole table, its state and
    its exchange) fits `budget_bytes`, or when row-wise is predicted cheaper than the replicated mode `choose_mode`
    picks; keep it whole otherwise. `rows_total` and `distinct_total` are the first step's lookups and each rank's
    distinct rows, summed over ranks (every rank decides with the same sums, so alike). The table is priced as if
    its all-to-alls were its own (their latency counted per table: an upper bound once several tables share them),
    with rows spread evenly."""
    whole = replicated_tables_bytes([ShardTable(table, rows, dim, 0.0)])
    exchange_budget = None if budget_bytes is None else budget_bytes - whole
    mode, added = choose_mode(costs, p, rows, dim, rows_total, distinct_total, cpu, exchange_budget)
    union = min(rows, distinct_total)
    replicated_s = table_exchange_s(mode, costs, p, rows, dim, rows_total, distinct_total, union, cpu)
    replicated_bytes = whole + table_memory_bytes(mode, p, rows, dim, rows_total, distinct_total, union)
    step = sharded_step("row-wise", p, [ShardTable(table, rows, dim, rows_total / p)])
    row_wise_s = sharded_tables_s(step, p, costs.alltoall_link or costs.link, costs.row_wise_s_per_byte,
                                  costs.optimizer_s_per_byte, cpu)
    row_wise_bytes = sharded_memory_bytes(step)
    fits = lambda need: budget_bytes is None or need <= budget_bytes  # noqa: E731
    if p <= 1:
        sharded, reason = False, "replicated"
    elif not fits(replicated_bytes):
        sharded, reason = row_wise_bytes < replicated_bytes, "memory"
    elif row_wise_s < replicated_s and fits(row_wise_bytes):
        sharded, reason = True, "time"
    else:
        sharded, reason = False, "replicated"
    return ShardingChoice(table=table, sharded=sharded, reason=reason, replicated_mode=mode,
                          replicated_ms=replicated_s * 1e3, row_wise_ms=row_wise_s * 1e3,
                          replicated_bytes=replicated_bytes, row_wise_bytes=row_wise_bytes, budget_bytes=budget_bytes,
                          rows_total=rows_total, distinct_total=distinct_total, cpu=cpu)
