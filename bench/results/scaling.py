"""The suite's figures (step time, efficiency, their intervals), as plain functions over numbers (unit-tested by
hand)."""
from __future__ import annotations

import numpy as np

PHASES = ("data", "forward", "backward", "exchange_wait", "optimizer")
"""The phases of one training step, in order; their times add up to the step time."""
USEFUL_PHASES = ("data", "forward", "backward", "optimizer")
"""The phases whose time is useful work (bench.results.pop), once the exchange's own work inside them (work_ms) is
taken out."""


def slowest_rank_per_step(step_ms: np.ndarray) -> np.ndarray:
    """[ranks, steps] step times -> per step the slowest rank's time: the slowest rank sets the pace."""
    return np.asarray(step_ms, dtype=float).max(axis=0)


def spread(values) -> dict[str, float]:
    """Median with the p10/p90 noise band."""
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def rank_skew(step_ms: np.ndarray) -> float:
    """Median over steps of (slowest - fastest) / slowest rank: how much the ranks wait for each other."""
    t = np.asarray(step_ms, dtype=float)
    return float(np.median((t.max(axis=0) - t.min(axis=0)) / t.max(axis=0)))


def efficiency(scaling: str, t1_ms, tp_ms, np_: int):
    """Weak: E(P) = T(1)/T(P). Strong: E(P) = T(1)/(P x T(P)). T is the median step time (numbers or arrays of
    bootstrap draws alike)."""
    if scaling == "weak":
        return t1_ms / tp_ms
    if scaling == "strong":
        return t1_ms / (np_ * tp_ms)
    raise ValueError(f"unknown scaling {scaling!r}: use weak or strong")


CONFIDENCE = 0.95
"""Coverage of every interval the suite reports."""
BOOTSTRAP_DRAWS = 2000
"""Bootstrap resamples per interval: the 2.5% and 97.5% quantiles then move by well under 1% between seeds."""


def bootstrap_step_time(repeats: list, rng: np.random.Generator, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """Bootstrap distribution of a point's step time, the median over its repeats of each repeat's median step.

    `repeats` holds each repeat's per-step times (slowest rank). Each draw resamples the repeats, then the steps
    within every repeat, so the interval covers the noise between runs as well as between steps; with a single
    repeat it can only cover the latter."""
    per_repeat = np.stack([np.median(rng.choice(np.asarray(r, dtype=float), (draws, len(r))), axis=1)
                           for r in repeats])  # [repeats, draws]
    pick = rng.integers(0, len(repeats), (draws, len(repeats)))
    return np.median(per_repeat[pick, np.arange(draws)[:, None]], axis=1)


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` interval of a bootstrap distribution (percentile method)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def throughput_samples_per_s(global_batch: int, step_ms: float) -> float:
    return global_batch / (step_ms / 1000.0)


def busbw_factor(op: str, np_: int) -> float:
    """nccl-tests: busbw = algbw x factor, the bandwidth a ring's busiest link sees: 2(P-1)/P for allreduce,
    (P-1)/P for allgather (and sparse-pair, which is two allgathers) and all-to-all, 1 for memcpy (one copy, no peers)."""
    if op == "allreduce":
        return 2.0 * (np_ - 1) / np_
    if op in ("allgather", "sparse-pair", "alltoall", "alltoall-zipf"):  # all-to-all: (P-1)/P of a rank's bytes leave
        return (np_ - 1) / np_
    if op == "memcpy":
        return 1.0
    raise ValueError(f"no bus-bandwidth factor for op {op!r}")


def useful_ms(rank: dict) -> np.ndarray:
    """One rank's useful time per timed step: its useful phases minus the exchange's own work in them."""
    phases = sum(np.asarray(rank["phase_ms"][p], dtype=float) for p in USEFUL_PHASES)
    return phases - np.asarray(rank["work_ms"], dtype=float)


def useful_metrics(ranks: list[dict]) -> dict:
    """A record's useful-time metrics: each rank's median over steps, their mean and their largest."""
    per_rank = [float(np.median(useful_ms(r))) for r in ranks]
    return {"useful_ms_per_rank": per_rank, "useful_ms_mean": float(np.mean(per_rank)),
            "useful_ms_max": float(np.max(per_rank))}
