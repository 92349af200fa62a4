"""Facts of the host a command runs on, which every layer may use: how many cores it has, and whether a rank count
oversubscribes them. Nothing here launches or imports anything of the project."""
from __future__ import annotations

import os


def physical_cores() -> int:
    """Cores a rank can run on without sharing (hyperthreads count as the OS shows them)."""
    return len(os.sched_getaffinity(0))


def is_oversubscribed(np: int, cores: int | None = None) -> bool:
    """More ranks than cores: still runnable, but flagged in every table and plot."""
    return np > (cores or physical_cores())


def threads_per_rank(np: int, cores: int | None = None) -> int:
    """Torch intra-op threads per rank: the cores shared out, at least one."""
    return max(1, (cores or physical_cores()) // np)


def hosts_oversubscribed(ranks: list[dict]) -> bool:
    """More ranks on some host than that host has cores (counted per host, so multi-node runs are judged right)."""
    per_host: dict[str, list[dict]] = {}
    for r in ranks:
        per_host.setdefault(r["host"], []).append(r)
    return any(len(rs) > rs[0]["host_cores"] for rs in per_host.values())


def point_oversubscribed(np: int, ranks: list[dict] | None = None, *, one_machine: bool) -> bool:
    """Whether a point's ranks time-shared cores, the one rule every record follows: more ranks on some host than
    that host has cores (from the ranks' own reports, where they handed any back), or, where every rank ran on this
    one machine (a single-host launch, or the emulated cluster's namespaces), more ranks than its cores."""
    return bool(ranks) and hosts_oversubscribed(ranks) or one_machine and is_oversubscribed(np)


OVERSUBSCRIBED_MARK = "*"
"""Follows an oversubscribed rank count in every table, plot label and progress line ('4*')."""


def np_label(np, oversubscribed) -> str:
    """A rank count as tables show it: '4', or '4*' where the point was oversubscribed."""
    return f"{np}{OVERSUBSCRIBED_MARK if oversubscribed else ''}"
