"""What a point's gradient exchange should cost: the collectives its counters saw, priced with this host's collective
model (Thakur, Rabenseifner & Gropp ring formulas, bench.model.collectives), against what the exchange took.

The counters (bench.ranks.exchange.ExchangeCounters, per rank per step) give each kind's call count and bytes; the
ring cost is linear in the bytes, so a kind's calls price as one sum: calls x latency terms + total bytes x the
bandwidth (and reduction) terms. Bytes per kind:
- allreduce: the bytes handed to allreduce (allreduce_bytes_sent);
- allgather: the total gathered bytes, every rank's parts (allgather_bytes_held);
- all-to-all: the bytes this rank handed to all-to-all (alltoall_bytes_sent; 0 where a mode issues none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.model import calibration_store as store
from bench.model.collectives import Link, collective_terms
from bench.model.table_costs import DEFAULT_COSTS

PRICED_KINDS = {"allreduce": ("allreduce_calls", "allreduce_bytes_sent"),
                "allgather": ("allgather_calls", "allgather_bytes_held"),
                "alltoall": ("alltoall_calls", "alltoall_bytes_sent")}
"""Each collective kind priced, with the counters giving its call count and its n bytes."""
FORMULA = {"allreduce": "allreduce", "allgather": "allgather", "alltoall": "allgather"}
"""The ring formula of each kind: pairwise all-to-all costs (P-1)a + ((P-1)/P) n b, allgather's form."""


@dataclass(frozen=True, slots=True)
class CollectiveModel:
    """The a, b, g a point's collectives are priced with, and where they came from."""

    link: Link
    calibrated: bool
    """True: fitted to collectives measured on this host (`alure-bench calibrate`); False: the built-in defaults,
    measured on another machine."""
    source: str
    """The calibration file (or costs.json) and what it was fitted to; or the built-in defaults' description."""
    created: str | None
    """When the calibration was written (ISO 8601); None for the built-in defaults."""

    def as_dict(self) -> dict:
        return asdict(self)

    def priced(self, counters: dict, p: int) -> dict:
        """The collectives of `counters` priced with this link (priced_collectives); bench.model.row_price's
        MeasuredRows prices from measured comm rows instead."""
        return priced_collectives(counters, p, self.link)


def priced_collectives(counters: dict, p: int, link: Link) -> dict:
    """{kind: {"calls", "bytes", "ms"}} of the collectives in `counters` (missing counters count 0): every call pays
    its kind's latency terms, the kind's bytes pay the bandwidth (and reduction) terms once, summed over its calls."""
    out = {}
    for kind, (calls_key, bytes_key) in PRICED_KINDS.items():
        calls, n = float(counters.get(calls_key) or 0), float(counters.get(bytes_key) or 0)
        ms = 0.0
        if p > 1 and calls > 0:
            latency, per_b, per_g = collective_terms(FORMULA[kind], p, n)
            ms = (calls * latency * link.alpha_s + per_b * link.beta_s_per_byte + per_g * link.gamma_s_per_byte) * 1e3
        out[kind] = {"calls": calls, "bytes": n, "ms": ms}
    return out


def exchange_price(counters: dict, p: int, exchange_ms: float, model) -> dict:
    """The record's fields: exchange_ideal_ms (the priced sum), exchange_efficiency = ideal / exchange_ms (the
    exchange's wait plus its own work; None where nothing was exchanged or nothing waited), the priced collectives
    and the model that priced them (a CollectiveModel, or bench.model.row_price.MeasuredRows)."""
    priced = model.priced(counters, p)
    ideal = sum(k["ms"] for k in priced.values())
    return {"exchange_ideal_ms": ideal, "exchange_ms": exchange_ms,
            "exchange_efficiency": ideal / exchange_ms if ideal > 0 and exchange_ms > 0 else None,
            "exchange_priced": priced, "exchange_model": model.as_dict()}


def host_collective_model(transport: str) -> CollectiveModel:
    """The collective model of this host for ranks exchanging through `transport`: the costs.json named by
    ALURE_BENCH_COSTS, else this host's calibration (bench.model.calibration_store), else the built-in defaults
    (said so: calibrated False)."""
    import os

    named = os.environ.get(store.COSTS_ENV)
    if named:
        costs = store.load_costs(named)
        return CollectiveModel(costs.link, True, f"{named} ({costs.source})", None)
    identity = store.this_host(transport if transport in store.TRANSPORTS else "shared-memory")
    found = store.find_costs(store.default_folder(), identity)
    if found:
        costs, path = found
        return CollectiveModel(costs.link, True, costs.source, store.read_calibration(path).get("created"))
    return CollectiveModel(DEFAULT_COSTS.link, False,
                           f"uncalibrated host ({identity.describe()}): {store.builtin_note()}", None)
