"""Pricing a point's collectives from measured comm rows instead of the comm fit: each kind's calls at the size they
ran, read off the rows `alure-bench comm` measured for the same op, np and backend, interpolated between measured
sizes.

The counters give a kind's call count and total bytes per step (bench.model.exchange_price.PRICED_KINDS), so the
size a call ran at is their mean: a kind prices as calls x latency(total bytes / calls). Between two measured sizes
the latency is interpolated linearly (a collective's time is close to affine in its bytes between neighbours);
below the smallest size it is that size's latency (the latency floor); above the largest it continues along the
last two sizes' line, and the priced entry says `extrapolated`. A kind the rows do not have (no such op at that np
and backend) is priced by the fallback model, and the entry says so (`priced_by`). Only setting A's rows are read
(a comm run's --compare-env rows are another launch setting's).

Select it for a sweep with ALURE_BENCH_COMM_ROWS=<folder written by alure-bench comm> (host_collective_model).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bench.model.calibration import read_comm_rows
from bench.model.exchange_price import PRICED_KINDS, CollectiveModel

COMM_ROWS_ENV = "ALURE_BENCH_COMM_ROWS"
"""Names a folder of `alure-bench comm` results whose rows price every record's exchange (docs/efficiency.md)."""
ROW_BACKEND = {"horovod": "horovod", "mpi": "mpi4py"}
"""The comm rows' backend that measured each exchange backend's collectives (bench.plan.config.EXCHANGE_BACKENDS)."""
ROW_OP = {"allreduce": "allreduce", "allgather": "allgather", "alltoall": "alltoall"}
"""The comm op each priced kind is read off."""


def call_size(kind: str, calls: float, n_bytes: float, p: int) -> float:
    """The comm row size one call of `kind` ran at: allreduce, the tensor's bytes; allgather, the gathered total
    (the counters' allgather_bytes_held); all-to-all, what the rank sent in all with its own part (the counters
    hold what went to the other ranks, (P-1)/P of it)."""
    size = n_bytes / calls
    return size * p / (p - 1) if kind == "alltoall" else size


def interpolated_us(sizes: np.ndarray, latencies_us: np.ndarray, size: float) -> tuple[float, bool]:
    """(latency in us at `size`, extrapolated?) from measured (size, latency) points sorted by size."""
    if size <= sizes[0] or len(sizes) == 1:
        return float(latencies_us[0] if size <= sizes[0] else latencies_us[-1]), size > sizes[-1]
    if size <= sizes[-1]:
        return float(np.interp(size, sizes, latencies_us)), False
    slope = (latencies_us[-1] - latencies_us[-2]) / (sizes[-1] - sizes[-2])
    return float(latencies_us[-1] + slope * (size - sizes[-1])), True


@dataclass(frozen=True, slots=True)
class MeasuredRows:
    """A collective model of measured latencies per op (one backend and np), with a fallback for the rest."""

    folder: str
    """The comm results folder the rows were read from."""
    backend: str
    """The rows' backend (horovod, mpi4py)."""
    np: int
    """The rows' process count."""
    points: dict = field(default_factory=dict)
    """{op: [[size_bytes, latency_us_median], ...]} sorted by size (the median where a size was measured twice)."""
    fallback: CollectiveModel | None = None
    """What prices a kind the rows lack."""

    def priced(self, counters: dict, p: int) -> dict:
        """{kind: {"calls", "bytes", "ms", "priced_by", ...}} as bench.model.exchange_price.priced_collectives."""
        fitted = self.fallback.priced(counters, p) if self.fallback is not None else {}
        out = {}
        for kind, (calls_key, bytes_key) in PRICED_KINDS.items():
            calls, n = float(counters.get(calls_key) or 0), float(counters.get(bytes_key) or 0)
            measured = self.points.get(ROW_OP[kind])
            if p < 2 or calls <= 0 or n <= 0:
                out[kind] = {"calls": calls, "bytes": n, "ms": 0.0, "priced_by": None}
            elif measured and p == self.np:
                table = np.asarray(measured, dtype=float)
                size = call_size(kind, calls, n, p)
                us, extrapolated = interpolated_us(table[:, 0], table[:, 1], size)
                out[kind] = {"calls": calls, "bytes": n, "ms": calls * us / 1e3, "priced_by": "comm rows",
                             "size_bytes": size, "extrapolated": extrapolated}
            elif kind in fitted:
                out[kind] = {**fitted[kind], "priced_by": "fit"}
            else:
                raise ValueError(f"no comm rows of {ROW_OP[kind]} at np={p} in {self.folder} and no fallback")
        return out

    def as_dict(self) -> dict:
        return {"kind": "comm rows", "calibrated": True, "created": None,
                "source": f"measured comm rows of {self.folder} ({self.backend}, np={self.np}; "
                          f"ops {', '.join(sorted(self.points)) or 'none'}"
                          f"{'; the rest by ' + self.fallback.source if self.fallback else ''})",
                "backend": self.backend, "np": self.np, "points": self.points,
                "fallback": self.fallback.as_dict() if self.fallback else None}


def measured_rows(folder: str, backend: str, p: int, fallback: CollectiveModel | None = None) -> MeasuredRows:
    """The rows of `folder` (bench.model.calibration.read_comm_rows) of the comm backend that measures the exchange
    backend `backend`, at np=p, setting A."""
    wanted = ROW_BACKEND.get(backend, backend)
    by_op: dict[str, dict[int, list[float]]] = {}
    for row in read_comm_rows(folder):
        if row["backend"] == wanted and row["np"] == p and row.get("setting", "A") in ("A", "", None) \
                and row["op"] in ROW_OP.values() and row["latency_us_median"] > 0:
            by_op.setdefault(row["op"], {}).setdefault(row["size_bytes"], []).append(row["latency_us_median"])
    points = {op: [[size, float(np.median(us))] for size, us in sorted(sizes.items())] for op, sizes in by_op.items()}
    return MeasuredRows(str(folder), wanted, p, points, fallback)


def rows_named() -> str | None:
    """The comm folder ALURE_BENCH_COMM_ROWS names, if any."""
    return os.environ.get(COMM_ROWS_ENV) or None
