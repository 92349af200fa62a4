"""One embedding table's exchange in each mode: its time, its bytes, its memory; and `auto`'s choice."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.model.collectives import Link, allgather_s, allreduce_s
from bench.plan.config import REPLICATED_MODES, SHARDED_MODES

INDEX_BYTES = 8
"""A gathered row's index: int64 (torch COO)."""
VALUE_BYTES = 4
"""float32."""
ELEMENT_BYTES = 2 * INDEX_BYTES + VALUE_BYTES
"""One entry of `dense.to_sparse()` on a 2-D gradient: two int64 indices and the value (sparse_dim = 2)."""
EXCHANGE_COPIES = 2
"""Copies of the exchanged gradient alive at the memory peak: the collective's result and the gradient rebuilt from it
(`p.grad.zero_().add_(aggregated)`). Checked against the sweep's peak RSS (docs/costmodel.md)."""
DEFAULT_LOCAL_S_PER_BYTE = {"sparse-gather": 0.6e-9, "dense-reduce": 0.4e-9, "sparse-as-dense": 2.7e-9,
                            "row-wise": 0.6e-9, "table-wise": 0.6e-9}
"""Each mode's CPU work around its collectives, seconds per byte, when a sweep has no multi-rank point to fit it
from. sparse-gather and sparse-as-dense (then called dense-reduce): fitted on a default-preset sweep on this 2-core
machine. dense-reduce: a probe of its densify (zero + index_add_ into the kept buffer) and Adagrad(fused=True) update of
one 200,000 x 64 table at 1 thread (docs/costmodel.md "The model"); Horovod's fusion-buffer copies not included.
coalesced-gather uses sparse-gather's cost per gathered byte. row-wise and table-wise (per byte of the rank's ids,
rows and gradients: bucketing, the owner's lookups, putting rows back in order): until a sharded point is fitted,
sparse-gather's, the nearest work (rows built from indices)."""
AUTO_CHOICES = ("sparse-gather", "coalesced-gather", "dense-reduce")
"""What `auto` chooses among, per table and step, for the tables it keeps whole (it may shard others row-wise, once:
bench.model.shard_costs.choose_sharding)."""
MODELLED_MODES = (*REPLICATED_MODES, *SHARDED_MODES)
"""Every fixed mode the suite measures: the replicated ones priced per table by `table_exchange_s`, the sharded ones
over all tables at once (bench.model.shard_costs)."""
DENSE_MODES = ("dense-reduce", "sparse-as-dense")
"""Modes that allreduce a table's densified gradient."""

@dataclass(frozen=True, slots=True)
class ExchangeCosts:
    """What deciding between the modes needs: a link and the per-byte CPU costs around the collectives."""

    link: Link
    optimizer_s_per_byte: float
    """The optimizer's cost per byte of the sparse gradient it is handed (from the np=1 points)."""
    sparse_s_per_byte: float
    """sparse-gather's CPU work per gathered byte: building and adding the gathered gradient."""
    dense_s_per_byte: float
    """dense-reduce's CPU work per byte of the dense table: scatter-add into the buffer, fusion copies, dense update."""
    source: str = ""
    sparse_as_dense_s_per_byte: float = DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"]
    """sparse-as-dense's CPU work per byte of the dense table: to_dense, fusion copies, to_sparse."""
    alltoall_link: Link | None = None
    """The all-to-all's a and b (the comm rows of alltoall, bench.model.calibration.fit_alltoall); None: `link`."""
    row_wise_s_per_byte: float = DEFAULT_LOCAL_S_PER_BYTE["row-wise"]
    """row-wise's CPU work per byte of a rank's ids, rows and gradients (auto's sharding decision)."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExchangeCosts:
        return cls(link=Link(**data["link"]), optimizer_s_per_byte=data["optimizer_s_per_byte"],
                   sparse_s_per_byte=data["sparse_s_per_byte"], dense_s_per_byte=data["dense_s_per_byte"],
                   source=data.get("source", ""),
                   sparse_as_dense_s_per_byte=data.get("sparse_as_dense_s_per_byte",
                                                       DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"]),
                   alltoall_link=Link(**data["alltoall_link"]) if data.get("alltoall_link") else None,
                   row_wise_s_per_byte=data.get("row_wise_s_per_byte", DEFAULT_LOCAL_S_PER_BYTE["row-wise"]))


def sparse_table_s(costs: ExchangeCosts, p: int, dim: int, rows_total: float, cpu: float = 1.0,
                   link: Link | None = None) -> float:
    """sparse-gather of one table: `rows_total` rows over all ranks (uncoalesced), gathered by every rank, then
    built, added and optimised by every rank. At p=1 only the optimizer runs."""
    gathered = rows_total * (INDEX_BYTES + VALUE_BYTES * dim)
    if p <= 1:
        return cpu * costs.optimizer_s_per_byte * gathered
    return (sparse_network_s(p, dim, rows_total, link or costs.link)
            + cpu * (costs.sparse_s_per_byte + costs.optimizer_s_per_byte) * gathered)


def sparse_network_s(p: int, dim: int, rows_total: float, link: Link) -> float:
    """The two allgathers of sparse-gather (indices, then values): two latencies, the gathered bytes once."""
    if p <= 1:
        return 0.0
    gathered = rows_total * (INDEX_BYTES + VALUE_BYTES * dim)
    return allgather_s(gathered, p, link) + (p - 1) * link.alpha_s


def dense_table_s(costs: ExchangeCosts, p: int, rows: int, dim: int, rows_union: float, cpu: float = 1.0,
                  link: Link | None = None) -> float:
    """dense-reduce of one V x d table: scatter-add into the kept buffer, allreduce, and the dense update of all V
    rows. At p=1 Horovod exchanges nothing: the optimizer walks the `rows_union` rows the rank touched."""
    table = VALUE_BYTES * rows * dim
    if p <= 1:  # Horovod exchanges nothing at np=1: the mode makes no difference
        return cpu * costs.optimizer_s_per_byte * min(rows_union, rows) * (INDEX_BYTES + VALUE_BYTES * dim)
    return allreduce_s(table, p, link or costs.link) + cpu * costs.dense_s_per_byte * table


def sparse_as_dense_table_s(costs: ExchangeCosts, p: int, rows: int, dim: int, rows_union: float, cpu: float = 1.0,
                            link: Link | None = None) -> float:
    """sparse-as-dense of one V x d table: to_dense, allreduce, to_sparse, and the optimizer over the element-wise
    sparse gradient of the `rows_union` rows some rank touched."""
    if p <= 1:
        return dense_table_s(costs, p, rows, dim, rows_union, cpu, link)
    table = VALUE_BYTES * rows * dim
    elements = min(rows_union, rows) * dim * ELEMENT_BYTES
    return allreduce_s(table, p, link or costs.link) + cpu * (costs.sparse_as_dense_s_per_byte * table
                                                               + costs.optimizer_s_per_byte * elements)


def coalesced_table_s(costs: ExchangeCosts, p: int, dim: int, rows_total: float, distinct_total: float,
                      cpu: float = 1.0, link: Link | None = None) -> float:
    """coalesced-gather of one table: each rank coalesces its own rows (one pass over them), then sparse-gather of
    the `distinct_total` rows (each rank's distinct rows, summed over ranks)."""
    if p <= 1:  # no exchange at np=1, so no coalescing either
        return sparse_table_s(costs, p, dim, rows_total, cpu, link)
    own = rows_total / p * (INDEX_BYTES + VALUE_BYTES * dim)
    return sparse_table_s(costs, p, dim, distinct_total, cpu, link) + cpu * costs.sparse_s_per_byte * own


def table_exchange_s(mode: str, costs: ExchangeCosts, p: int, rows: int, dim: int, rows_total: float,
                     distinct_total: float, union: float, cpu: float = 1.0, link: Link | None = None) -> float:
    """One table's exchange and update in `mode` (one of MODELLED_MODES): `rows_total` rows over all ranks as
    looked up, `distinct_total` each rank's distinct rows summed over ranks, `union` the rows some rank touched."""
    if mode == "sparse-gather":
        return sparse_table_s(costs, p, dim, rows_total, cpu, link)
    if mode == "coalesced-gather":
        return coalesced_table_s(costs, p, dim, rows_total, distinct_total, cpu, link)
    if mode == "dense-reduce":
        return dense_table_s(costs, p, rows, dim, union, cpu, link)
    if mode == "sparse-as-dense":
        return sparse_as_dense_table_s(costs, p, rows, dim, union, cpu, link)
    raise ValueError(f"no cost model for mode {mode!r}")


def table_network_s(mode: str, p: int, rows: int, dim: int, rows_total: float, distinct_total: float,
                    link: Link) -> float:
    """The collectives' part of `table_exchange_s`."""
    if mode in DENSE_MODES:
        return allreduce_s(VALUE_BYTES * rows * dim, p, link)
    return sparse_network_s(p, dim, distinct_total if mode == "coalesced-gather" else rows_total, link)


def table_held_bytes(mode: str, p: int, rows: int, dim: int, rows_total: float, distinct_total: float,
                     union: float) -> float:
    """What one table's exchange holds, as bench.ranks.exchange.ExchangeCounters counts it: the collectives' results and
    the copies the mode makes (coalesced tensor, re-sparsified gradient). Nothing at p=1 (no exchange)."""
    if p <= 1:
        return 0.0
    row = INDEX_BYTES + VALUE_BYTES * dim
    if mode == "sparse-gather":
        return rows_total * row
    if mode == "coalesced-gather":
        return distinct_total * row + distinct_total / p * row
    dense = VALUE_BYTES * rows * dim
    if mode == "dense-reduce":
        return float(dense)
    if mode == "sparse-as-dense":
        return dense + min(union, rows) * dim * ELEMENT_BYTES
    raise ValueError(f"no memory model for mode {mode!r}")


def table_memory_bytes(mode: str, p: int, rows: int, dim: int, rows_total: float, distinct_total: float,
                       union: float) -> float:
    """What one table's exchange keeps alive at the rank's memory peak: a gathered or re-sparsified gradient exists
    twice (the collective's result and the gradient rebuilt from it, `p.grad.zero_().add_()`); dense-reduce's buffer
    is the gradient itself."""
    if p <= 1:
        return 0.0
    row = INDEX_BYTES + VALUE_BYTES * dim
    if mode == "sparse-gather":
        return EXCHANGE_COPIES * rows_total * row
    if mode == "coalesced-gather":
        return EXCHANGE_COPIES * distinct_total * row + distinct_total / p * row
    dense = VALUE_BYTES * rows * dim
    if mode == "dense-reduce":
        return float(dense)
    if mode == "sparse-as-dense":
        return dense + EXCHANGE_COPIES * min(union, rows) * dim * ELEMENT_BYTES
    raise ValueError(f"no memory model for mode {mode!r}")


def choose_mode(costs: ExchangeCosts, p: int, rows: int, dim: int, rows_total: float, distinct_total: float,
                cpu: float = 1.0, budget_bytes: float | None = None, link: Link | None = None,
                paid: Sequence[str] = ()) -> tuple[str, float]:
    """The `auto` mode's rule for one table and step: the cheapest of AUTO_CHOICES whose predicted memory fits in
    `budget_bytes` (None: no limit); if none fits, the one that needs least. Modes in `paid` already hold their
    memory (dense-reduce's buffer, once made) and need none more. Returns (mode, the memory it adds). Every rank calls
    it with the same sums over ranks and the same budget, so every rank decides alike."""
    if p <= 1:
        return "sparse-gather", 0.0
    union = min(rows, distinct_total)
    options = []
    for mode in AUTO_CHOICES:
        seconds = table_exchange_s(mode, costs, p, rows, dim, rows_total, distinct_total, union, cpu, link)
        memory = 0.0 if mode in paid else table_memory_bytes(mode, p, rows, dim, rows_total, distinct_total, union)
        options.append((seconds, memory, mode))
    fits = [o for o in options if budget_bytes is None or o[1] <= budget_bytes]
    seconds, memory, mode = min(fits) if fits else min(options, key=lambda o: o[1])
    return mode, memory


def choose_dense(costs: ExchangeCosts, p: int, rows: int, dim: int, rows_total: float, rows_distinct_total: float,
                 cpu: float = 1.0) -> bool:
    """Whether dense-reduce is predicted cheaper than sparse-gather for one table and step (the crossover rule)."""
    if p <= 1:
        return False
    union = min(rows, rows_distinct_total)
    return dense_table_s(costs, p, rows, dim, union, cpu) < sparse_table_s(costs, p, dim, rows_total, cpu)


DEFAULT_COSTS = ExchangeCosts(
    link=Link(alpha_s=6.7e-4, beta_s_per_byte=2.3e-9, gamma_s_per_byte=1.5e-9),
    optimizer_s_per_byte=4.2e-9, sparse_s_per_byte=DEFAULT_LOCAL_S_PER_BYTE["sparse-gather"],
    dense_s_per_byte=DEFAULT_LOCAL_S_PER_BYTE["dense-reduce"],
    sparse_as_dense_s_per_byte=DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"],
    source="built-in: Horovod np=2 comm run and a default-preset sweep on the 2-core reference machine")
"""What `auto` decides with when ALURE_BENCH_COSTS names no costs.json (written by `alure-bench predict --out`)."""
