"""How much of a sweep's spread is the machine's: read off its records, nothing run.

At np=1 Horovod exchanges nothing, so every mode's np=1 point runs the same computation: the spread of their repeats
is the machine's own, not the modes'. This module says how large it is, when in the recording it came (per slot of
wall time), whether it follows what ran just before (a lingering process, a cold cache), how much of it np=1 and np=P
of the same round share (the part the paired efficiency interval cancels, docs/figures.md), and how much a longer
timed window would average away (the spread of window medians inside each repeat).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from bench.errors import UsageError


@dataclass(frozen=True)
class Spread:
    """What a set of repeat medians looks like."""

    repeats: int
    """How many repeats."""
    median_ms: float
    """Median of their step-time medians, ms."""
    min_ms: float
    """The fastest repeat's median, ms."""
    max_ms: float
    """The slowest repeat's median, ms."""
    cv: float
    """Coefficient of variation of the repeat medians (standard deviation / mean)."""


def training_points(records: list[dict]) -> list[dict]:
    """The ok training records of single points (co-run points, several independent processes at once, left out)."""
    return [r for r in records if r["status"] == "ok" and not r["point"].get("corun")
            and r["point"].get("stage", "train") == "train"]


def np1_by_scaling(records: list[dict]) -> dict[str, list[dict]]:
    """Scaling -> its np=1 training records. Weak and strong np=1 points run different batches, so they are kept
    apart; a folder with none is bad input."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in training_points(records):
        if r["np"] == 1:
            groups[r["point"]["scaling"]].append(r)
    if not groups:
        raise UsageError("no ok np=1 training point in the folder: the machine's noise is read off the np=1 points "
                         "of a sweep (run one with --nps 1,...)")
    return dict(groups)


def step_ms(record: dict) -> float:
    """A repeat's figure: the median over its timed steps of the slowest rank's step time."""
    return float(record["metrics"]["step_time_ms"])


def spread(values: list[float]) -> Spread:
    v = np.asarray(values, dtype=float)
    return Spread(repeats=len(v), median_ms=float(np.median(v)), min_ms=float(v.min()), max_ms=float(v.max()),
                  cv=float(v.std() / v.mean()) if len(v) > 1 else 0.0)


def relative_speeds(records: list[dict]) -> list[tuple[dict, float]]:
    """Each np=1 record with its step time over its scaling's median np=1 step time (1 is typical, above 1 slower),
    so that weak and strong repeats can be pooled."""
    out = []
    for group in np1_by_scaling(records).values():
        typical = float(np.median([step_ms(r) for r in group]))
        out.extend((r, step_ms(r) / typical) for r in group)
    return out


def started(record: dict) -> datetime:
    return datetime.fromisoformat(record["started_at"])


def by_slot(records: list[dict], minutes: int) -> list[tuple[str, Spread]]:
    """The np=1 repeats' relative speeds per `minutes`-long slot of wall time (UTC, labelled by its start), in time
    order: a slow spell of the machine shows as a slot whose median is above 1."""
    slots: dict[datetime, list[float]] = defaultdict(list)
    for r, rel in relative_speeds(records):
        t = started(r)
        slots[t.replace(minute=t.minute - t.minute % minutes, second=0, microsecond=0)].append(rel)
    return [(f"{t:%H:%M}", spread(v)) for t, v in sorted(slots.items())]


def by_predecessor(records: list[dict]) -> dict[str, Spread]:
    """The np=1 repeats' relative speeds grouped by the point that started just before each ("np 2", "np 2 co-run",
    ...): if what ran before slowed a point (processes outliving it, a cold cache), its group would be slower."""
    ordered = sorted(records, key=started)
    relative = {id(r): rel for r, rel in relative_speeds(records)}
    groups: dict[str, list[float]] = defaultdict(list)
    for before, r in zip(ordered, ordered[1:]):
        if id(r) in relative:
            groups[f"np {before['np']}{' co-run' if before['point'].get('corun') else ''}"].append(relative[id(r)])
    return {k: spread(v) for k, v in sorted(groups.items())}


def round_correlations(records: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(scaling, P) -> mode -> the Pearson correlation, over the rounds both ran in, of np=1's and np=P's repeat
    medians. Near 1: a round that was slow for one was slow for the other, and the paired efficiency interval
    cancels it; near 0: the machine's spells are shorter than a round and the pairing cancels little."""
    medians: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for r in training_points(records):
        medians[(r["point"]["scaling"], r["point"]["mode"], r["np"])][r["point"]["repeat"]] = step_ms(r)
    out: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for (scaling, mode, p), at_p in sorted(medians.items()):
        at_1 = medians.get((scaling, mode, 1), {})
        rounds = sorted(set(at_1) & set(at_p))
        if p == 1 or len(rounds) < 3:
            continue
        a, b = np.array([at_1[k] for k in rounds]), np.array([at_p[k] for k in rounds])
        if a.std() > 0 and b.std() > 0:
            out[(scaling, p)][mode] = float(np.corrcoef(a, b)[0, 1])
    return dict(out)


def window_cv(steps: list[float], window: int) -> float | None:
    """Coefficient of variation of the medians of consecutive `window`-step windows of one repeat's steps (None
    with fewer than two windows): what is left of the machine's noise after a timed window of that length."""
    s = np.asarray(steps, dtype=float)
    medians = np.array([np.median(s[i:i + window]) for i in range(0, len(s) - window + 1, window)])
    return float(medians.std() / medians.mean()) if len(medians) > 1 else None


def windows(records: list[dict]) -> dict[int, tuple[int, float]]:
    """Window length (steps) -> (how many np=1 repeats have two windows of it, the median over them of
    `window_cv`), for windows of 5 steps up to half the longest repeat."""
    repeats = [r for group in np1_by_scaling(records).values() for r in group]
    steps = [r["ranks"][0]["step_time_ms"] for r in repeats]  # one rank at np=1: it is the slowest
    longest = max(len(s) for s in steps)
    out = {}
    for w in (5, 10, 20, 50, 100, 200, 500):
        if 2 * w > longest:
            break
        cvs = [c for s in steps if (c := window_cv(s, w)) is not None]
        out[w] = (len(cvs), float(np.median(cvs)))
    return out


def noise_text(records: list[dict], slot_minutes: int = 10) -> str:
    """What `alure-bench noise` prints."""
    lines = ["np=1 repeats, the same computation in every mode (median step time over the repeats, the fastest and "
             "slowest repeat, CV of the repeat medians):"]
    for scaling, group in sorted(np1_by_scaling(records).items()):
        s = spread([step_ms(r) for r in group])
        modes = len({r["point"]["mode"] for r in group})
        lines.append(f"  {scaling}: {s.repeats} repeats of {modes} modes, median {s.median_ms:.1f} ms, "
                     f"{s.min_ms:.1f}-{s.max_ms:.1f} ms, CV {s.cv:.1%}")
    lines.append(f"by {slot_minutes}-minute slot of the recording (UTC; a repeat's step time over its scaling's np=1 "
                 f"median):")
    lines += [f"  {label}: {s.repeats} repeats, median {s.median_ms:.2f}, {s.min_ms:.2f}-{s.max_ms:.2f}"
              for label, s in by_slot(records, slot_minutes)]
    lines.append("by the point that started just before (the same ratio):")
    lines += [f"  after {k}: {s.repeats} repeats, median {s.median_ms:.2f}, {s.min_ms:.2f}-{s.max_ms:.2f}"
              for k, s in by_predecessor(records).items()]
    correlations = round_correlations(records)
    if correlations:
        lines.append("np=1 against np=P of the same round (Pearson r of their repeat medians over the rounds; near 1, "
                     "the paired efficiency interval cancels the machine's noise, near 0 it cannot):")
        for (scaling, p), by_mode in sorted(correlations.items()):
            r = list(by_mode.values())
            lines.append(f"  {scaling} np {p}: r {min(r):.2f} to {max(r):.2f} over {len(r)} modes")
    lines.append("within a repeat: CV of the medians of consecutive w-step windows (median over the np=1 repeats):")
    lines += [f"  w = {w}: CV {cv:.1%} ({n} repeats)" for w, (n, cv) in windows(records).items()]
    return "\n".join(lines)
