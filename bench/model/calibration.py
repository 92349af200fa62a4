"""Fitting a, b and g to the rows of `alure-bench comm`, per transport (shared memory, TCP)."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.errors import UsageError
from bench.model.collectives import Link, collective_terms, nnls


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
    within_burst_rows: int = 0
    """Rows left out because each rank sent no more than the link shaper's burst (`link_burst_bytes`, a tc token
    bucket's): such a message crosses at line speed, not at the shaped rate the link is fitted for."""
    oversubscribed_rows: int = 0
    """Rows left out because their ranks outnumbered their host's cores: their latencies include waiting for a core,
    which the link's a, b, g do not model."""


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
    alltoall: Link | None = None
    """The sharded modes' all-to-all (a, b; g unused) fitted to the alltoall and alltoall-zipf rows alone (their
    pairwise exchange is not a ring); None without such rows: `link` stands for it."""
    alltoall_rows: int = 0
    """alltoall and alltoall-zipf rows `alltoall` was fitted to."""

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
            # A run's network (alure-bench comm's record: transport, the link as tc configured it) stands for its rows.
            network = (data.get("network") or {}) if isinstance(data, dict) else {}
            told = {"transport": network.get("transport"),
                    "link_rate_gbps": (network.get("link") or {}).get("rate_gbps"),
                    "link_burst_bytes": (network.get("link") or {}).get("burst_bytes")}
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
    measured = [r for r in rows if r["backend"] == backend and r["op"] in ("allreduce", "allgather")
                and r["np"] >= 2 and r["latency_us_median"] > 0]
    candidates = [r for r in measured if not row_oversubscribed(r)]
    fit_rows = [r for r in candidates if not _within_burst(r)]
    if len(fit_rows) < 3:
        have = sorted({r["backend"] for r in rows if r["op"] in ("allreduce", "allgather")})
        left = len(measured) - len(candidates)
        raise UsageError(f"{len(fit_rows)} {backend} allreduce/allgather rows at np >= 2 to calibrate from (backends "
                         f"with such rows: {', '.join(have) or 'none'}"
                         f"{f'; {left} oversubscribed rows left out' if left else ''}): run `alure-bench comm --np 2 "
                         f"--backends {backend}` (np no more than the cores) or choose --backend")
    a = np.array([collective_terms(r["op"], r["np"], _row_bytes(r)) for r in fit_rows])
    t = np.array([r["latency_us_median"] * 1e-6 for r in fit_rows])
    x = nnls(a / t[:, None], np.ones(len(t)))  # divided by t: every row weighs by its relative error
    link = Link(*map(float, x))
    pred = a @ x
    rel = (pred - t) / t
    holdout = [r for r in rows if r["backend"] == backend and r["op"] == "sparse-pair" and r["np"] >= 2
               and not _within_burst(r) and not row_oversubscribed(r)]
    h_rel = [abs(float(np.dot(collective_terms("sparse-pair", r["np"], _row_bytes(r)), x))
                 - r["latency_us_median"] * 1e-6) / (r["latency_us_median"] * 1e-6) for r in holdout]
    quality = FitQuality(
        rows=len(fit_rows), nps=tuple(sorted({r["np"] for r in fit_rows})),
        r2=float(1 - np.sum((pred - t) ** 2) / np.sum((t - t.mean()) ** 2)) if len(t) > 1 else float("nan"),
        rms_rel_error=float(np.sqrt(np.mean(rel ** 2))), max_rel_error=float(np.max(np.abs(rel))),
        median_rel_error=float(np.median(np.abs(rel))), holdout_rows=len(holdout),
        holdout_median_rel_error=float(np.median(h_rel)) if h_rel else None,
        within_burst_rows=len(candidates) - len(fit_rows), oversubscribed_rows=len(measured) - len(candidates))
    copies = [r["latency_us_median"] * 1e-6 / _row_bytes(r) for r in rows
              if r["op"] == "memcpy" and _row_bytes(r) >= 1 << 20]
    alltoall, alltoall_rows = fit_alltoall(rows, backend)
    return Calibration(link=link, copy_s_per_byte=float(np.median(copies)) if copies else None, backend=backend,
                       quality=quality, source=source, transport=transport or "any", alltoall=alltoall,
                       alltoall_rows=alltoall_rows)


ALLTOALL_OPS = ("alltoall", "alltoall-zipf")
"""The comm ops the all-to-all link is fitted to (bench.ranks.comm_rank)."""


def fit_alltoall(rows: Sequence[dict], backend: str = "horovod") -> tuple[Link | None, int]:
    """a and b of the all-to-all, by non-negative least squares in relative error over `backend`'s alltoall and
    alltoall-zipf rows at np >= 2 (each priced by the most bytes a rank sends or receives: the zipf rows' hot owner);
    (None, rows) with fewer than 2 such rows."""
    fit_rows = [r for r in rows if r["backend"] == backend and r["op"] in ALLTOALL_OPS and r["np"] >= 2
                and r["latency_us_median"] > 0 and not row_oversubscribed(r) and not _within_burst(r)]
    if len(fit_rows) < 2:
        return None, len(fit_rows)
    a = np.array([collective_terms(r["op"], r["np"], _row_bytes(r))[:2] for r in fit_rows])
    t = np.array([r["latency_us_median"] * 1e-6 for r in fit_rows])
    alpha, beta = map(float, nnls(a / t[:, None], np.ones(len(t))))
    return Link(alpha, beta, 0.0), len(fit_rows)


def row_oversubscribed(row: dict) -> bool:
    """Whether a comm row's ranks outnumbered their host's cores (comm flags it; a CSV row says 'True'/'true')."""
    flag = row.get("oversubscribed")
    return flag is True or str(flag).lower() == "true"


def _within_burst(row: dict) -> bool:
    """Whether each rank sent no more than the burst of the token bucket shaping its link (emulated hosts, tc tbf):
    the bucket passes that much at line speed, so the row says nothing of the shaped rate."""
    burst = row.get("link_burst_bytes")
    return bool(burst) and collective_terms(row["op"], row["np"], _row_bytes(row))[1] <= burst


def calibrate(folder: str | Path, backend: str = "horovod") -> Calibration:
    """The calibration of the comm results under `folder`: of their shared-memory rows where there are any (the
    link within a host), else of the one transport they ran over."""
    return calibrate_rows(read_comm_rows(folder), backend, source=str(folder))


def calibrate_rows(rows: Sequence[dict], backend: str = "horovod", source: str = "") -> Calibration:
    """`calibrate` of comm rows already read: their shared-memory rows' fit where there are any, else the one
    transport's they ran over."""
    by_transport = fit_links_by_transport(rows, backend, source=source)
    if not by_transport:
        return fit_link(rows, backend, source=source)  # says what is missing
    return by_transport.get("shared-memory") or next(iter(by_transport.values()))


def network_link(latency_us: float, bandwidth_gbps: float, gamma_s_per_byte: float) -> Link:
    """A link from a data sheet: latency in microseconds, bandwidth in gigabits per second (as networks are sold);
    the reduction cost stays the CPU's (from a calibration)."""
    if latency_us < 0 or bandwidth_gbps <= 0:
        raise UsageError(f"latency {latency_us} us and bandwidth {bandwidth_gbps} Gb/s: the latency must not be "
                         f"negative and the bandwidth must be positive")
    return Link(latency_us * 1e-6, 8.0 / (bandwidth_gbps * 1e9), gamma_s_per_byte)
