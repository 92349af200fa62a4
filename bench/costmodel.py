"""The cost model: what one training step costs at P ranks in each exchange mode, calibrated from what was measured
here and carried to clusters of thousands of ranks.

Collectives (Thakur, Rabenseifner & Gropp 2005; docs/design.md "The figures"), n bytes on P ranks:
    ring allreduce   2(P-1) a + 2((P-1)/P) n b + ((P-1)/P) n g
    ring allgather   (P-1) a + ((P-1)/P) n b                      (n: the total gathered bytes)
a (latency), b (seconds per byte moved) and g (seconds per byte reduced) are fitted by non-negative least squares,
in relative error, to the allreduce and allgather rows of `alure-bench comm` (`calibrate`).

One step of the slowest rank (`Model.step`), per mode:
    step = compute + sum over embedding tables of exchange(table) + allreduce(dense parameters) - overlap
    compute       data + forward + backward of the np=1 points, in proportion to the table lookups of the per-rank
                  batch, times the rank's share of a core when ranks outnumber cores (`cpu_factor`)
    exchange      network (a, b, g) + the CPU work each mode adds around it:
      sparse-gather   two allgathers (indices, values) of P x nnz rows; Horovod does not coalesce them (horovod issue
                      #3328), so building, adding and optimising the gathered gradient costs P x nnz x (4d + 8) bytes
      coalesced-gather  the same of P x distinct rows, after one pass over the rank's own rows to coalesce them
      dense-reduce    scatter-add into a kept V x d buffer, an allreduce of 4 V d bytes and a dense (fused) update of
                      the whole table
      sparse-as-dense to_dense, an allreduce of 4 V d bytes and to_sparse (horovod/torch/optimizer.py), whose
                      element-wise result (16 bytes of index per 4-byte value) the optimizer then walks
    overlap       up to `overlap` x backward of exchange time hides behind the backward pass (0 on a CPU-bound
                  machine: the exchange needs the cores the backward pass is using)
At np=1 Horovod exchanges nothing: the step is compute plus the optimizer on the rank's own rows.
The per-byte cost of the optimizer comes from the np=1 points; the per-byte cost of each mode's own CPU work around
its collectives is fitted to the sweep's multi-rank points (`fit_local_work`): comm does not see it.

Memory per rank (`Model.memory_bytes`): the np=1 peak RSS plus what each table's exchange keeps alive at its peak
(`table_memory_bytes`): sparse-gather EXCHANGE_COPIES x P x nnz x (4d + 8), growing with P; coalesced-gather the same
of the distinct rows plus the coalesced copy; dense-reduce the 4 V d buffer, flat in P; sparse-as-dense the dense copy
plus EXCHANGE_COPIES x the re-sparsified union of rows (20 bytes per element), growing with the rows any rank touched.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.errors import UsageError

INDEX_BYTES = 8
"""A gathered row's index: int64 (torch COO)."""
VALUE_BYTES = 4
"""float32."""
ELEMENT_BYTES = 2 * INDEX_BYTES + VALUE_BYTES
"""One entry of `dense.to_sparse()` on a 2-D gradient: two int64 indices and the value (sparse_dim = 2)."""
EXCHANGE_COPIES = 2
"""Copies of the exchanged gradient alive at the memory peak: the collective's result and the gradient rebuilt from it
(`p.grad.zero_().add_(aggregated)`). Checked against the sweep's peak RSS (docs/costmodel.md)."""
THREAD_EXPONENT = 0.0
"""Speed-up of a rank's compute from its intra-op threads, as threads ** THREAD_EXPONENT. Measured here: the default
preset's np=1 step with 2 threads was no faster than an np=2 rank's with 1 (small ops, busy cores)."""
DEFAULT_LOCAL_S_PER_BYTE = {"sparse-gather": 0.6e-9, "dense-reduce": 0.4e-9, "sparse-as-dense": 2.7e-9}
"""Each mode's CPU work around its collectives, seconds per byte, when a sweep has no multi-rank point to fit it
from. sparse-gather and sparse-as-dense (then called dense-reduce): fitted on a default-preset sweep on this 2-core
machine. dense-reduce: a probe of its densify (zero + index_add_ into the kept buffer) and Adagrad(fused=True) update of
one 200,000 x 64 table at 1 thread, about 20 ms for 51 MB on this machine while shared; Horovod's fusion-buffer copies
not included. coalesced-gather uses sparse-gather's cost per gathered byte."""
MODES = ("sparse-gather", "dense-reduce")
"""The fixed modes `alure-bench predict` compares; `auto` picks per table and step among AUTO_CHOICES."""
AUTO_CHOICES = ("sparse-gather", "coalesced-gather", "dense-reduce")
"""What `auto` chooses among, per table and step."""
MODELLED_MODES = ("sparse-gather", "coalesced-gather", "dense-reduce", "sparse-as-dense")
"""Every fixed mode the model prices (bench.config.FIXED_MODES)."""
DENSE_MODES = ("dense-reduce", "sparse-as-dense")
"""Modes that allreduce a table's densified gradient."""


# ---- collectives -------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Link:
    """The alpha-beta-gamma parameters of one kind of link."""

    alpha_s: float
    """Latency of one step of a ring (s)."""
    beta_s_per_byte: float
    """Time to move one byte over the ring's slowest link (s/B); 1/bandwidth."""
    gamma_s_per_byte: float
    """Time to reduce (add) one byte (s/B)."""


def allreduce_s(n_bytes: float, p: int, link: Link) -> float:
    """Ring allreduce of n bytes on p ranks: 2(P-1)a + 2((P-1)/P) n b + ((P-1)/P) n g."""
    if p <= 1:
        return 0.0
    f = (p - 1) / p
    return 2 * (p - 1) * link.alpha_s + 2 * f * n_bytes * link.beta_s_per_byte + f * n_bytes * link.gamma_s_per_byte


def allgather_s(n_total_bytes: float, p: int, link: Link) -> float:
    """Ring allgather of n_total bytes (all ranks' parts together) on p ranks: (P-1)a + ((P-1)/P) n b."""
    if p <= 1:
        return 0.0
    return (p - 1) * link.alpha_s + (p - 1) / p * n_total_bytes * link.beta_s_per_byte


def collective_terms(op: str, p: int, n_bytes: float) -> tuple[float, float, float]:
    """The coefficients of (a, b, g) in the time of `op`: the rows of the least-squares system."""
    f = (p - 1) / p
    if op == "allreduce":
        return 2.0 * (p - 1), 2 * f * n_bytes, f * n_bytes
    if op == "allgather":
        return float(p - 1), f * n_bytes, 0.0
    if op == "sparse-pair":  # two allgathers (indices, values) of n bytes together
        return 2.0 * (p - 1), f * n_bytes, 0.0
    raise ValueError(f"no cost-model terms for op {op!r}")


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares min |a x - y| for a handful of unknowns: the best unconstrained solution over
    every subset of free unknowns that stays non-negative (exact for the 2-3 unknowns used here)."""
    k = a.shape[1]
    best, best_res = np.zeros(k), float(np.sum(y ** 2))
    for r in range(1, k + 1):
        for subset in itertools.combinations(range(k), r):
            cols = list(subset)
            x_sub, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(k)
            x[cols] = x_sub
            res = float(np.sum((a @ x - y) ** 2))
            if res < best_res:
                best, best_res = x, res
    return best


# ---- calibration from `alure-bench comm` ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FitQuality:
    """How well the fitted a, b, g reproduce the rows they were fitted to (and the rows held out)."""

    rows: int
    """allreduce + allgather rows fitted."""
    nps: tuple[int, ...]
    """Process counts among them."""
    r2: float
    """Coefficient of determination of the latencies (1 = perfect)."""
    rms_rel_error: float
    """Root mean square of (predicted - measured) / measured over the fitted rows."""
    max_rel_error: float
    """Largest |predicted - measured| / measured."""
    median_rel_error: float
    """Median |predicted - measured| / measured."""
    holdout_rows: int
    """sparse-pair rows (two allgathers of indices and values), not fitted: predicted from a and b."""
    holdout_median_rel_error: float | None
    """Median |predicted - measured| / measured over the held-out rows; None without them."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """What `alure-bench comm` results say about this machine's links."""

    link: Link
    copy_s_per_byte: float | None
    """One memcpy pass, seconds per byte (memcpy rows of 1 MiB and up); None without memcpy rows."""
    backend: str
    quality: FitQuality
    source: str
    transport: str = "any"
    """What the fitted rows ran over: 'shared-memory', 'tcp', or 'any' (not told apart)."""

    def as_dict(self) -> dict:
        return asdict(self)


COMM_FILES = ("comm.json", "comm.csv")
"""What `alure-bench comm` writes into its folder (bench/comm.py run_comm)."""


def read_comm_rows(folder: str | Path) -> list[dict]:
    """Every comm row under `folder` (its comm.json, else comm.csv; also in sub-folders, e.g. one per np)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"calibration folder {folder} not found: give a folder written by `alure-bench comm`")
    rows: list[dict] = []
    places = sorted({p.parent for name in COMM_FILES for p in folder.rglob(name)})
    for place in places:
        if (place / "comm.json").exists():
            try:
                data = json.loads((place / "comm.json").read_text())
            except json.JSONDecodeError as err:
                raise UsageError(f"{place / 'comm.json'} is not valid JSON ({err.msg}): rerun alure-bench comm") \
                    from None
            found = data.get("rows", []) if isinstance(data, dict) else data
            # A run's network (bench.comm's record: transport, the link as tc configured it) stands for its rows.
            network = (data.get("network") or {}) if isinstance(data, dict) else {}
            told = {"transport": network.get("transport"),
                    "link_rate_gbps": (network.get("link") or {}).get("rate_gbps")}
            rows += [{k: v for k, v in told.items() if v} | r for r in found]
        else:
            with open(place / "comm.csv", newline="") as f:
                rows += list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"no comm.json or comm.csv under {folder}: run `alure-bench comm --out {folder}` first")
    return [_typed_row(r) for r in rows]


def _typed_row(row: dict) -> dict:
    out = dict(row)
    for key in ("np", "size_bytes", "bytes_moved"):
        if out.get(key) not in (None, ""):
            out[key] = int(float(out[key]))
    for key in ("latency_us_median", "latency_us_min", "latency_us_max", "algbw_gbps", "busbw_gbps"):
        if out.get(key) not in (None, ""):
            out[key] = float(out[key])
    return out


def _row_bytes(row: dict) -> float:
    """The n of the cost formula: what the collective reduced or gathered in total."""
    return float(row.get("bytes_moved") or row["size_bytes"])


def row_transport(row: dict) -> str:
    """What a comm row's ranks exchanged through: 'tcp' between hosts, else 'shared-memory' (rows that do not say
    ran on one host)."""
    return "tcp" if row.get("transport") == "tcp" else "shared-memory"


def fit_links_by_transport(rows: Sequence[dict], backend: str = "horovod", source: str = "") -> dict:
    """One Calibration per transport the rows ran over (shared memory, TCP), each with its own fit quality."""
    transports = sorted({row_transport(r) for r in rows if r["backend"] == backend and r["np"] >= 2})
    return {t: fit_link(rows, backend, source, transport=t) for t in transports}


def fit_link(rows: Sequence[dict], backend: str = "horovod", source: str = "",
             transport: str | None = None) -> Calibration:
    """a, b, g by non-negative least squares in relative error, from `backend`'s allreduce and allgather rows at
    np >= 2 (over `transport` only, when given); sparse-pair rows are held out and predicted, memcpy rows give the
    copy cost."""
    if transport is not None:
        rows = [r for r in rows if r["op"] == "memcpy" or row_transport(r) == transport]
    fit_rows = [r for r in rows if r["backend"] == backend and r["op"] in ("allreduce", "allgather")
                and r["np"] >= 2 and r["latency_us_median"] > 0]
    if len(fit_rows) < 3:
        have = sorted({r["backend"] for r in rows if r["op"] in ("allreduce", "allgather")})
        raise UsageError(f"{len(fit_rows)} {backend} allreduce/allgather rows at np >= 2 to calibrate from (backends "
                         f"with such rows: {', '.join(have) or 'none'}): run `alure-bench comm --np 2 --backends "
                         f"{backend}` or choose --backend")
    a = np.array([collective_terms(r["op"], r["np"], _row_bytes(r)) for r in fit_rows])
    t = np.array([r["latency_us_median"] * 1e-6 for r in fit_rows])
    x = nnls(a / t[:, None], np.ones(len(t)))  # divided by t: every row weighs by its relative error
    link = Link(*map(float, x))
    pred = a @ x
    rel = (pred - t) / t
    holdout = [r for r in rows if r["backend"] == backend and r["op"] == "sparse-pair" and r["np"] >= 2]
    h_rel = [abs(float(np.dot(collective_terms("sparse-pair", r["np"], _row_bytes(r)), x))
                 - r["latency_us_median"] * 1e-6) / (r["latency_us_median"] * 1e-6) for r in holdout]
    quality = FitQuality(
        rows=len(fit_rows), nps=tuple(sorted({r["np"] for r in fit_rows})),
        r2=float(1 - np.sum((pred - t) ** 2) / np.sum((t - t.mean()) ** 2)) if len(t) > 1 else float("nan"),
        rms_rel_error=float(np.sqrt(np.mean(rel ** 2))), max_rel_error=float(np.max(np.abs(rel))),
        median_rel_error=float(np.median(np.abs(rel))), holdout_rows=len(holdout),
        holdout_median_rel_error=float(np.median(h_rel)) if h_rel else None)
    copies = [r["latency_us_median"] * 1e-6 / _row_bytes(r) for r in rows
              if r["op"] == "memcpy" and _row_bytes(r) >= 1 << 20]
    return Calibration(link=link, copy_s_per_byte=float(np.median(copies)) if copies else None, backend=backend,
                       quality=quality, source=source, transport=transport or "any")


def calibrate(folder: str | Path, backend: str = "horovod") -> Calibration:
    """The calibration of the comm results under `folder`: of their shared-memory rows where there are any (the
    link within a host), else of the one transport they ran over."""
    rows = read_comm_rows(folder)
    by_transport = fit_links_by_transport(rows, backend, source=str(folder))
    if not by_transport:
        return fit_link(rows, backend, source=str(folder))  # says what is missing
    return by_transport.get("shared-memory") or next(iter(by_transport.values()))


def network_link(latency_us: float, bandwidth_gbps: float, gamma_s_per_byte: float) -> Link:
    """A link from a data sheet: latency in microseconds, bandwidth in gigabits per second (as networks are sold);
    the reduction cost stays the CPU's (from a calibration)."""
    if latency_us < 0 or bandwidth_gbps <= 0:
        raise UsageError(f"latency {latency_us} us and bandwidth {bandwidth_gbps} Gb/s: the latency must not be "
                         f"negative and the bandwidth must be positive")
    return Link(latency_us * 1e-6, 8.0 / (bandwidth_gbps * 1e9), gamma_s_per_byte)


# ---- the exchange of one table (shared by predictions and the `auto` mode's choice) ------------------------------

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

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExchangeCosts":
        return cls(link=Link(**data["link"]), optimizer_s_per_byte=data["optimizer_s_per_byte"],
                   sparse_s_per_byte=data["sparse_s_per_byte"], dense_s_per_byte=data["dense_s_per_byte"],
                   source=data.get("source", ""),
                   sparse_as_dense_s_per_byte=data.get("sparse_as_dense_s_per_byte",
                                                       DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"]))


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
    """What one table's exchange holds, as bench.exchange.ExchangeCounters counts it: the collectives' results and
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
COSTS_ENV = "ALURE_BENCH_COSTS"


def load_costs(path: str | Path | None = None, transport: str = "shared-memory", warn: bool = False) -> ExchangeCosts:
    """The costs `auto` decides with: `path`, else the file named by ALURE_BENCH_COSTS, else the calibration of
    this host and `transport` (bench.calibration_store; DEFAULT_COSTS, with a one-line warning if `warn`, without)."""
    import os
    path = path or os.environ.get(COSTS_ENV)
    if not path:
        from bench.calibration_store import costs_for_this_host
        return costs_for_this_host(transport, warn)
    try:
        return ExchangeCosts.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise UsageError(f"{COSTS_ENV}={path}: no such file; write one with `alure-bench predict --out DIR` "
                         f"(DIR/costs.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is not a costs.json of alure-bench predict ({err}): rewrite it") from None


# ---- the workload, read off a sweep ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Table:
    """One sparse embedding table and what a step's batch does to it."""

    name: str
    rows: int
    """V."""
    dim: int
    """d."""
    lookups_per_sample: float
    """Rows its gradient gets per sample of the per-rank batch (uncoalesced: a row looked up twice counts twice)."""
    lookups_per_step: float
    """Rows its gradient gets per step whatever the batch (the sampled negatives, the same on every rank)."""
    distinct_at_reference: float
    """Distinct rows touched by a batch of `Profile.reference_batch` samples."""

    def lookups(self, batch: float) -> float:
        """nnz of this table's gradient on one rank with `batch` samples."""
        return self.lookups_per_sample * batch + self.lookups_per_step

    def distinct(self, samples: float, reference_batch: int) -> float:
        """Distinct rows touched by `samples` samples (one rank's batch, or all ranks' together), treating each
        reference-batch-sized group as an independent draw: an upper bound where popular rows repeat."""
        share = min(1.0, self.distinct_at_reference / self.rows)
        if share >= 1.0:
            return float(self.rows)
        return self.rows * (1.0 - (1.0 - share) ** (samples / reference_batch))


@dataclass(frozen=True, slots=True)
class Profile:
    """The workload as the cost model sees it: its tables, its dense parameters, and its np=1 step."""

    preset: str
    tables: tuple[Table, ...]
    dense_param_bytes: int
    """Bytes of the parameters that are allreduced densely in both modes."""
    group_size: int
    """A rank's batch must be whole groups of this many samples."""
    reference_batch: int
    """Per-rank batch of the np=1 points."""
    compute_ms: float
    """data + forward + backward at np=1 (medians over the steps of every np=1 point at reference_batch)."""
    backward_ms: float
    """The backward part of compute_ms (the window exchange can overlap with)."""
    optimizer_ms: float
    """The optimizer phase at np=1."""
    base_rss_mib: float
    """Peak RSS of an np=1 rank (median over the np=1 points)."""
    measured_cores: int
    """Cores of the machine that measured it."""
    measured_threads: int
    """Intra-op threads of the np=1 rank."""

    def lookups(self, batch: float) -> float:
        return sum(t.lookups(batch) for t in self.tables)

    def gradient_bytes(self, batch: float) -> float:
        """This rank's sparse gradient bytes (indices and values, uncoalesced)."""
        return sum(t.lookups(batch) * (INDEX_BYTES + VALUE_BYTES * t.dim) for t in self.tables)

    def table_bytes(self) -> int:
        return sum(VALUE_BYTES * t.rows * t.dim for t in self.tables)

    def as_dict(self) -> dict:
        return asdict(self)


def workload_geometry(config, reference_batch: int, steps: int = 3) -> tuple[list[Table], int]:
    """Tables and dense-parameter bytes of an alure WorkloadConfig, with the lookups of real batches of it."""
    import torch
    from torch import nn

    from alure.data import build_world, make_batch
    from alure.model import UserEncoder

    with torch.device("meta"):  # shapes only: no memory for a table of millions of rows
        model = UserEncoder(config)
    sparse = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.sparse}
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in sparse)
    world = build_world(config)
    counts: dict[str, list[tuple[int, int]]] = {n: [] for n in sparse}
    for step in range(steps):
        batch = make_batch(world, step, 0, 1, reference_batch)
        for name, (lookups, distinct) in table_lookups(batch).items():
            counts[f"sources.{name}.weight"].append((lookups, distinct))
    tables = []
    negatives = config.sampled_negatives
    for name, module in sparse.items():
        per_step = negatives * (config.rq_codebooks if name.endswith("codes.weight") else 1)
        lookups = float(np.mean([c[0] for c in counts[name]]))
        tables.append(Table(name=name, rows=module.num_embeddings, dim=module.embedding_dim,
                            lookups_per_sample=max(0.0, (lookups - per_step) / reference_batch),
                            lookups_per_step=float(per_step),
                            distinct_at_reference=float(np.mean([c[1] for c in counts[name]]))))
    return tables, dense_bytes


def table_lookups(batch) -> dict[str, tuple[int, int]]:
    """Per sparse table of alure's model ('<source>.items', '<source>.codes'): (rows its gradient will get, distinct
    rows), from the batch alone, before any forward pass: the item ids of the sequences, targets and negatives, and
    their RQ codes (one row per level and code)."""
    import torch
    out = {}
    for name, seq in batch.sequences.items():
        parts = [seq.items] + [group[name] for group in (batch.targets, batch.negatives) if group is not None]
        ids = torch.cat([p.ids.reshape(-1) for p in parts])
        codes = torch.cat([p.codes for p in parts])
        levels = codes + torch.arange(codes.shape[1]) * (int(codes.max()) + 1)  # one row per (level, code)
        out[f"{name}.items"] = (int(ids.numel()), _distinct(ids))
        out[f"{name}.codes"] = (int(codes.numel()), _distinct(levels))
    return out


def _distinct(ids) -> int:
    """Distinct values of a non-negative int tensor: a mark per value (ten times faster than a sort: `auto` counts
    them every step)."""
    import torch
    if ids.numel() == 0:
        return 0
    seen = torch.zeros(int(ids.max()) + 1, dtype=torch.bool)
    seen[ids.reshape(-1)] = True
    return int(seen.sum())


@lru_cache(maxsize=8)
def _geometry_cached(config_json: str, reference_batch: int) -> tuple[tuple[Table, ...], int]:
    from alure.config import SourceConfig, WorkloadConfig
    data = json.loads(config_json)
    data["sources"] = tuple(SourceConfig(**s) for s in data["sources"])
    tables, dense = workload_geometry(WorkloadConfig(**data), reference_batch)
    return tuple(tables), dense


def profile_from_records(records: list[dict], environment: dict | None = None) -> Profile:
    """The Profile of a sweep: its workload from the np=1 points' config, its np=1 step from their phases."""
    from bench.plan.config import PointConfig
    from bench.plan.workload import workload_config

    base = [r for r in records if r["status"] == "ok" and r["np"] == 1]
    if not base:
        raise UsageError("the sweep has no ok np=1 point: the model's compute comes from np=1; run the sweep with "
                         "np 1 among --nps")
    # Every np=1 point runs the same computation per lookup (Horovod exchanges nothing at np=1, whatever the mode):
    # pool the steps of all of them, scaled to the weak batch, so one point hit by a neighbour's job does not set the
    # compute.
    weak = [r["batch_per_rank"] for r in base if r["point"]["scaling"] == "weak"]
    batches = weak or [r["batch_per_rank"] for r in base]
    batch = max(set(batches), key=batches.count)  # weak's batch: the one weak predictions keep at every P
    point = PointConfig.from_dict(next(r for r in base if r["batch_per_rank"] == batch)["point"])
    config = workload_config(replace(point, scaling="weak", batch_per_rank=batch))
    tables, dense_bytes = _geometry_cached(json.dumps(asdict(config), sort_keys=True, default=list), batch)
    lookups = lambda b: sum(t.lookups(b) for t in tables)  # noqa: E731
    compute, backward, optimizer = [], [], []
    for r in base:
        scale = lookups(batch) / lookups(r["batch_per_rank"])
        phases = r["ranks"][0]["phase_ms"]
        for s in range(len(phases["data"])):
            compute.append(sum(phases[p][s] for p in ("data", "forward", "backward")) * scale)
            backward.append(phases["backward"][s] * scale)
            optimizer.append(phases["optimizer"][s] * scale)
    env = environment or {}
    return Profile(
        preset=point.preset, tables=tables, dense_param_bytes=dense_bytes, group_size=config.group_size,
        reference_batch=batch, compute_ms=float(np.median(compute)), backward_ms=float(np.median(backward)),
        optimizer_ms=float(np.median(optimizer)),
        base_rss_mib=float(np.median([r["metrics"]["peak_rss_mib"] for r in base if r["batch_per_rank"] == batch])),
        measured_cores=int(env.get("cores") or env.get("cpu_count") or _cores()),
        measured_threads=int(np.median([r.get("threads_per_rank") or 1 for r in base])))


def _cores() -> int:
    from bench.launch.mpirun import physical_cores
    return physical_cores()


# ---- the machine the prediction is for ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Machine:
    """Where the ranks run: the links within and between nodes, cores and memory."""

    local: Link
    """This machine's calibrated link: every link of the ring when no network is given."""
    network: Link | None = None
    """Between nodes; None: the local link at every scale. Given, it stands for every link of the ring, within a
    node too: a node's shared memory is at least as fast as its network, and this machine's is no guide to it."""
    ranks_per_node: int = 1
    cores_per_node: int = 1
    memory_per_rank_bytes: float | None = None
    """A rank's share of its node's memory; None: unlimited."""
    cpu_speedup: float = 1.0
    """How much faster a rank there computes than the rank that was measured here (all CPU work is divided by it)."""
    overlap: float = 0.0
    """Share of the backward pass that exchange time can hide behind (0: none, 1: all of it)."""

    def __post_init__(self):
        if self.ranks_per_node < 1 or self.cores_per_node < 1:
            raise UsageError(f"ranks per node ({self.ranks_per_node}) and cores per node ({self.cores_per_node}) "
                             f"must be at least 1")
        if self.cpu_speedup <= 0:
            raise UsageError(f"cpu speedup {self.cpu_speedup} must be positive (1 = as fast as this machine)")
        if not 0 <= self.overlap <= 1:
            raise UsageError(f"overlap {self.overlap} must be in [0, 1]: the share of backward that hides exchange")
        if self.memory_per_rank_bytes is not None and self.memory_per_rank_bytes <= 0:
            raise UsageError(f"memory per rank {self.memory_per_rank_bytes} must be positive")

    def link(self, p: int) -> Link:
        """The ring's slowest link: the network's where one is given, else this machine's."""
        return self.network if self.network is not None else self.local

    def nodes(self, p: int) -> int:
        return math.ceil(p / self.ranks_per_node)


def cpu_factor(p: int, machine: Machine, measured_threads: int) -> float:
    """How much longer a rank's CPU work takes at p ranks than the np=1 rank's did: its core share (ranks beyond the
    node's cores time-share them, as bench.launch shares threads out) over the machine's speed-up."""
    on_node = min(p, machine.ranks_per_node)
    threads = max(1, machine.cores_per_node // on_node)
    sharing = max(1.0, on_node * threads / machine.cores_per_node)
    return sharing * (measured_threads / threads) ** THREAD_EXPONENT / machine.cpu_speedup


# ---- the model ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StepPrediction:
    """One predicted step of the slowest rank, with its parts (milliseconds) and memory."""

    p: int
    mode: str
    batch_per_rank: float
    compute_ms: float
    exchange_ms: float
    """Tables' exchanges (network + CPU work + optimizer) and the dense parameters' allreduce."""
    network_ms: float
    """The part of exchange_ms spent in collectives."""
    hidden_ms: float
    """Exchange time hidden behind the backward pass (the overlap term)."""
    step_ms: float
    memory_bytes: float
    exchange_bytes_held: float
    dense_tables: int
    """Tables exchanged dense this step (all in dense-reduce, none in sparse-gather, the cheaper choice in auto)."""


@dataclass(frozen=True, slots=True)
class LocalFit:
    """The per-byte CPU work of each mode around its collectives, fitted to the sweep's multi-rank points."""

    s_per_byte: dict
    """Mode -> seconds per byte (sparse-gather: per gathered byte; dense-reduce: per table byte)."""
    points: dict
    """Mode -> multi-rank points it was fitted to (0: the built-in default was used)."""
    rms_rel_error: dict
    """Mode -> rms relative error of the fitted model's step time over those points."""


@dataclass(frozen=True, slots=True)
class Model:
    """A profile, a calibration and the fitted CPU costs: predicts any mode at any rank count on any Machine."""

    profile: Profile
    calibration: Calibration
    local: LocalFit

    def costs(self, machine: Machine | None = None) -> ExchangeCosts:
        """The per-byte costs as measured here (CPU work unscaled: `step` applies `cpu_factor`), on the machine's
        link when one is given."""
        prof = self.profile
        optimizer = prof.optimizer_ms * 1e-3 / prof.gradient_bytes(prof.reference_batch)
        return ExchangeCosts(link=(machine.link(2) if machine else self.calibration.link),
                             optimizer_s_per_byte=optimizer,
                             sparse_s_per_byte=self.local.s_per_byte["sparse-gather"],
                             dense_s_per_byte=self.local.s_per_byte["dense-reduce"],
                             source=f"{self.calibration.source} + sweep {prof.preset}",
                             sparse_as_dense_s_per_byte=self.local.s_per_byte.get(
                                 "sparse-as-dense", DEFAULT_LOCAL_S_PER_BYTE["sparse-as-dense"]))

    def costs_for(self, machine: Machine) -> ExchangeCosts:
        """What `auto` should decide with on `machine`: its link, and CPU work at its speed."""
        c = self.costs(machine)
        return replace(c, optimizer_s_per_byte=c.optimizer_s_per_byte / machine.cpu_speedup,
                       sparse_s_per_byte=c.sparse_s_per_byte / machine.cpu_speedup,
                       dense_s_per_byte=c.dense_s_per_byte / machine.cpu_speedup,
                       sparse_as_dense_s_per_byte=c.sparse_as_dense_s_per_byte / machine.cpu_speedup)

    def step(self, machine: Machine, p: int, mode: str, batch_per_rank: float) -> StepPrediction:
        prof = self.profile
        costs = self.costs(machine)
        link = machine.link(p)
        cpu = cpu_factor(p, machine, prof.measured_threads)
        work = prof.lookups(batch_per_rank) / prof.lookups(prof.reference_batch)
        compute = prof.compute_ms * 1e-3 * work * cpu
        exchange = network = 0.0
        held = table_memory = 0.0
        dense_tables = 0
        # auto's budget: what the machine gives a rank beyond the np=1 peak and the dense parameters' copies
        budget = None if machine.memory_per_rank_bytes is None else \
            machine.memory_per_rank_bytes - prof.base_rss_mib * 2**20 - EXCHANGE_COPIES * prof.dense_param_bytes
        for t in prof.tables:
            rows_total = p * t.lookups(batch_per_rank)
            distinct_total = p * min(t.lookups(batch_per_rank), t.distinct(batch_per_rank, prof.reference_batch))
            union = t.distinct(p * batch_per_rank, prof.reference_batch)
            how = mode if p > 1 else "sparse-gather"  # Horovod exchanges nothing at np=1, whatever the mode
            if mode == "auto":
                how, added = choose_mode(costs, p, t.rows, t.dim, rows_total, distinct_total, cpu, budget, link)
                budget = None if budget is None else budget - added
            dense_tables += p > 1 and how in DENSE_MODES
            exchange += table_exchange_s(how, costs, p, t.rows, t.dim, rows_total, distinct_total, union, cpu, link)
            network += table_network_s(how, p, t.rows, t.dim, rows_total, distinct_total, link) if p > 1 else 0.0
            held += table_held_bytes(how, p, t.rows, t.dim, rows_total, distinct_total, union)
            table_memory += table_memory_bytes(how, p, t.rows, t.dim, rows_total, distinct_total, union)
        dense_params = allreduce_s(prof.dense_param_bytes, p, link)
        exchange += dense_params
        network += dense_params
        held += prof.dense_param_bytes if p > 1 else 0.0
        # Exchange overlaps the backward pass (Horovod starts a gradient's collective as soon as it is ready); the
        # optimizer's share of `exchange` cannot, it runs after synchronize.
        hidden = min(machine.overlap * prof.backward_ms * 1e-3 * work * cpu, network) if p > 1 else 0.0
        step = compute + exchange - hidden
        memory = prof.base_rss_mib * 2**20 + table_memory + (EXCHANGE_COPIES * prof.dense_param_bytes if p > 1 else 0.0)
        return StepPrediction(p=p, mode=mode, batch_per_rank=batch_per_rank, compute_ms=compute * 1e3,
                              exchange_ms=exchange * 1e3, network_ms=network * 1e3, hidden_ms=hidden * 1e3,
                              step_ms=step * 1e3, memory_bytes=memory, exchange_bytes_held=held,
                              dense_tables=dense_tables)

    def memory_bytes(self, machine: Machine, p: int, mode: str, batch_per_rank: float) -> float:
        return self.step(machine, p, mode, batch_per_rank).memory_bytes

    def oom_rank_count(self, machine: Machine, mode: str, batch_per_rank: float, limit: int = 1 << 24) -> int | None:
        """The smallest rank count whose per-rank memory exceeds the machine's memory per rank; None if none up to
        `limit` (or no limit is known)."""
        cap = machine.memory_per_rank_bytes
        if cap is None:
            return None
        fits = lambda p: self.memory_bytes(machine, p, mode, batch_per_rank) <= cap  # noqa: E731
        if not fits(1):
            return 1
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > limit:
                return None
        while hi - lo > 1:  # memory grows with p: the first p that does not fit lies in (lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return hi

    def crossover_density(self, machine: Machine, p: int) -> float | None:
        """The density (distinct rows per rank / V, each touched once) above which dense-reduce is cheaper than
        sparse-gather for the workload's largest table at p ranks; None if sparse-gather is cheaper up to density 1,
        0.0 if dense-reduce is cheaper already at density 1e-7."""
        if p <= 1:
            return None
        t = max(self.profile.tables, key=lambda t: t.rows)
        costs = self.costs(machine)
        cpu = cpu_factor(p, machine, self.profile.measured_threads)
        link = machine.link(p)

        def gap(density: float) -> float:  # dense - sparse: positive while sparse is cheaper
            rows = density * t.rows
            union = t.rows * (1 - (1 - density) ** p)
            return (dense_table_s(costs, p, t.rows, t.dim, union, cpu, link)
                    - sparse_table_s(costs, p, t.dim, p * rows, cpu, link))
        lo, hi = 1e-7, 1.0
        if gap(lo) <= 0:
            return 0.0
        if gap(hi) > 0:
            return None
        for _ in range(60):  # bisection on a log scale
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
        return hi


def fit_local_work(records: list[dict], profile: Profile, calibration: Calibration, machine: Machine) -> LocalFit:
    """Each mode's CPU work around its collectives, seconds per byte, by least squares in relative error over the
    sweep's ok multi-rank points of that mode: what the step model leaves unexplained, against the bytes the work
    scales with (gathered bytes; table bytes)."""
    s_per_byte, used, rms = {}, {}, {}
    zero = LocalFit(s_per_byte={m: 0.0 for m in MODELLED_MODES}, points={}, rms_rel_error={})
    model0 = Model(profile, calibration, zero)
    for mode in ("sparse-gather", "dense-reduce", "sparse-as-dense"):  # coalesced-gather uses sparse-gather's
        points = [r for r in records if r["status"] == "ok" and r["np"] > 1 and r["point"]["mode"] == mode]
        xs, ys, ts = [], [], []
        for r in points:
            p, batch = r["np"], r["batch_per_rank"]
            pred = model0.step(machine, p, mode, batch)
            cpu = cpu_factor(p, machine, profile.measured_threads)
            if mode not in DENSE_MODES:
                scale = p * profile.gradient_bytes(batch)
            else:
                scale = profile.table_bytes()
            measured = r["metrics"]["step_time_ms"] * 1e-3
            xs.append(cpu * scale)
            ys.append(measured - pred.step_ms * 1e-3)
            ts.append(measured)
        if xs:
            x, y, t = np.array(xs), np.array(ys), np.array(ts)
            lam = max(0.0, float(np.sum(x * y / t**2) / np.sum(x**2 / t**2)))
            s_per_byte[mode] = lam
            rms[mode] = float(np.sqrt(np.mean(((lam * x - y) / t) ** 2)))
        else:
            s_per_byte[mode] = DEFAULT_LOCAL_S_PER_BYTE[mode]
        used[mode] = len(xs)
    return LocalFit(s_per_byte=s_per_byte, points=used, rms_rel_error=rms)


def this_machine(calibration: Calibration, profile: Profile, ranks: int, memory_per_rank_bytes=None) -> Machine:
    """The machine that measured: every rank on its one node, its cores time-shared beyond their number."""
    return Machine(local=calibration.link, ranks_per_node=max(1, ranks), cores_per_node=profile.measured_cores,
                   memory_per_rank_bytes=memory_per_rank_bytes)


def build_model(sweep_dir: str | Path, comm_dir: str | Path, backend: str = "horovod") -> Model:
    """Calibrate everything from a sweep folder and a comm folder."""
    from bench.results.records import read_records
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"results folder {sweep_dir} not found: give a folder written by `alure-bench sweep`")
    records = read_records(sweep_dir)
    env_path = sweep_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    profile = profile_from_records(records, env)
    calibration = calibrate(comm_dir, backend)
    ranks = max([r["np"] for r in records] + [1])
    local = fit_local_work(records, profile, calibration, this_machine(calibration, profile, ranks))
    return Model(profile, calibration, local)


# ---- the #554 arithmetic -------------------------------------------------------------------------------------------

def gathered_bytes(rows_per_rank: Sequence[float] | float, p: int | None, dim: int, value_bytes: int = VALUE_BYTES,
                   index_bytes: int = INDEX_BYTES) -> float:
    """What every rank holds after an uncoalesced sparse allgather: all ranks' rows, values and indices. Give one
    count per rank, or one count and p (the same on every rank)."""
    total = float(sum(rows_per_rank)) if isinstance(rows_per_rank, Sequence) else float(rows_per_rank) * p
    return total * (value_bytes * dim + index_bytes)


def tied_embedding_rows(vocab: int, source_tokens: int, target_tokens: int) -> int:
    """Rows of one rank's gradient of a Transformer's tied embedding as TensorFlow accumulates it (IndexedSlices):
    the output projection's dense gradient as all V rows, plus one row per source and per target token."""
    return vocab + source_tokens + target_tokens
