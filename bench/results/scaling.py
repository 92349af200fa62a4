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


def pace_phase_means(ranks: list[dict]) -> dict[str, float]:
    """Per phase, the mean over timed steps of the phase time of the rank that set each step's pace (the slowest).
    A step's phases add up to its time, so these means add up to the mean step time; medians per phase do not add
    up to the median step (each phase's median comes from another step). `ranks`: the record's per-rank
    measurements (step_time_ms and phase_ms, one value per timed step)."""
    return {p: float(np.mean(steps)) for p, steps in pace_phase_steps(ranks).items()}


def pace_phase_steps(ranks: list[dict], extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Per phase (and per `extra` per-step series of the ranks, e.g. work_ms), the values of the rank that set each
    timed step's pace (the slowest), one per step."""
    step_ms = np.array([r["step_time_ms"] for r in ranks], dtype=float)  # [ranks, steps]
    pace = step_ms.argmax(axis=0)
    steps = np.arange(step_ms.shape[1])
    series = {p: [r["phase_ms"][p] for r in ranks] for p in PHASES} | {k: [r[k] for r in ranks] for k in extra}
    return {k: np.array(v, dtype=float)[pace, steps] for k, v in series.items()}


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


def repeat_medians(repeats: list) -> np.ndarray:
    """Each repeat's median step (its per-step times, slowest rank): the figure one run gives of a point."""
    return np.array([np.median(np.asarray(r, dtype=float)) for r in repeats])


def bootstrap_step_time(repeats: list, rng: np.random.Generator, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """Block bootstrap distribution of a point's step time, the median over its repeats of each repeat's median step.

    `repeats` holds each repeat's per-step times (slowest rank). The blocks are whole repeats: the steps of one run
    share its state (where the kernel placed the ranks, the heap, what else the machine ran meanwhile), so they are
    correlated, and resampling them one by one as if independent understates the noise between runs. Repeats of
    an interleaved sweep run apart, in rounds, and are the units that are close to independent. A single repeat has
    no other run to resample: its steps are resampled in moving blocks of consecutive steps instead (which keeps
    their short-range correlation), an interval of that one run's noise only."""
    if len(repeats) == 1:
        return _moving_block_medians(np.asarray(repeats[0], dtype=float), rng, draws)
    medians = repeat_medians(repeats)
    pick = rng.integers(0, len(medians), (draws, len(medians)))
    return np.median(medians[pick], axis=1)


def _moving_block_medians(steps: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """Medians of moving-block resamples of one run's steps (Kunsch's moving-block bootstrap): blocks of
    ceil(n^(1/3)) consecutive steps, the order of block length Hall, Horowitz and Jing (1995) found best for a
    distribution's spread, drawn with replacement until n steps are drawn."""
    n = len(steps)
    block = max(1, int(np.ceil(n ** (1 / 3) - 1e-9)))
    starts = rng.integers(0, n - block + 1, (draws, -(-n // block)))
    index = (starts[:, :, None] + np.arange(block)).reshape(draws, -1)[:, :n]
    return np.median(steps[index], axis=1)


def paired_efficiency(scaling: str, baseline: dict, point: dict, np_: int, rng: np.random.Generator,
                      draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """Bootstrap distribution of a point's efficiency against its np=1 baseline, paired by round.

    `baseline` and `point` map each repeat number to that repeat's per-step times. An interleaved sweep measures
    np=1 and np=P in the same round (repeat r is round r), so what slowed the machine during a round slowed both:
    every draw resamples rounds and takes both medians from the same rounds, and that shared noise cancels in the
    ratio instead of adding to it. Rounds only one of the two has are left out; with fewer than two rounds in
    common the two are bootstrapped apart (bootstrap_step_time)."""
    return efficiency(scaling, *paired_medians(baseline, point, rng, draws), np_)


def paired_medians(a: dict, b: dict, rng: np.random.Generator,
                   draws: int = BOOTSTRAP_DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws of two points' medians over repeats, paired by round (as paired_efficiency explains): `a`
    and `b` map each repeat number to that repeat's per-step values; every draw takes both medians from the same
    resampled rounds. With fewer than two rounds in common the two are bootstrapped apart (bootstrap_step_time).
    A ratio of the two draws is the paired interval of b against a (a setting B against A, np=P against np=1)."""
    rounds = sorted(set(a) & set(b))
    if len(rounds) < 2:
        return bootstrap_step_time(list(a.values()), rng, draws), bootstrap_step_time(list(b.values()), rng, draws)
    ma = repeat_medians([a[r] for r in rounds])
    mb = repeat_medians([b[r] for r in rounds])
    pick = rng.integers(0, len(rounds), (draws, len(rounds)))
    return np.median(ma[pick], axis=1), np.median(mb[pick], axis=1)


EXACT_SIGN_FLIPS = 16
"""Up to this many paired rounds, paired_sign_flip_p enumerates every sign assignment (2^16 = 65,536); above, it
draws BOOTSTRAP_DRAWS of them."""


def paired_sign_flip_p(a: dict, b: dict, rng: np.random.Generator) -> float:
    """One-sided p of "B is not faster than A" from the rounds both have (`a`, `b`: repeat -> per-step values): a
    paired sign-flip permutation test on the rounds' log(B median / A median). Under the null the order of A and B
    within a round is exchangeable (an interleaved sweep shuffles it), so each round's log-ratio is as likely with
    either sign; p is the share of sign assignments whose mean is at or below the observed one. It is exact, so it
    cannot say more than the rounds do: n rounds that all favour B give p = 2^-n, never less (a bootstrap of so few
    rounds would give 0). A setting equal to A (every log-ratio 0) has p = 1; NaN without a common round."""
    rounds = sorted(set(a) & set(b))
    if not rounds:
        return float("nan")
    logs = np.log(repeat_medians([b[r] for r in rounds]) / repeat_medians([a[r] for r in rounds]))
    n = len(logs)
    if n <= EXACT_SIGN_FLIPS:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = rng.choice([-1, 1], size=(BOOTSTRAP_DRAWS, n))
    means = (signs * np.abs(logs)).mean(axis=1)
    return float(np.mean(means <= logs.mean() + 1e-12))


def paired_ratio(a: dict, b: dict, rng: np.random.Generator) -> list[float]:
    """B / A of the medians over repeats (`a`, `b`: repeat -> per-step values), with its 95% interval paired by
    round (paired_medians); NaNs where either side is empty."""
    if not a or not b:
        return [np.nan] * 3
    value = np.median([np.median(v) for v in b.values()]) / np.median([np.median(v) for v in a.values()])
    da, db = paired_medians(a, b, rng, BOOTSTRAP_DRAWS)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = db / da
    return [float(value), *(interval(draws) if np.isfinite(draws).all() else (np.nan, np.nan))]


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` interval of a bootstrap distribution (percentile method)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def overlapping(intervals: dict) -> list[tuple]:
    """The pairs of names whose (low, high) intervals overlap (touching counts): the pairs a figure with those
    intervals does not tell apart. Pairs in the order of `intervals`; a NaN end overlaps nothing."""
    names = [n for n, (low, high) in intervals.items() if not (np.isnan(low) or np.isnan(high))]
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if max(intervals[a][0], intervals[b][0]) <= min(intervals[a][1], intervals[b][1])]


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
