"""The alpha-beta-gamma cost of a ring collective (Thakur, Rabenseifner & Gropp 2005; docs/costmodel.md)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


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


ZIPF_SPLIT_EXPONENT = 1.0
"""`alure-bench comm`'s alltoall-zipf: how skewed its splits are (the exponent of ids' popularity in the default
workload is near it)."""


def zipf_split_shares(p: int, exponent: float = ZIPF_SPLIT_EXPONENT) -> list[float]:
    """The share of what every rank sends that goes to rank k under alltoall-zipf: proportional to 1/(k+1)^s."""
    weights = [1 / (k + 1) ** exponent for k in range(p)]
    return [w / sum(weights) for w in weights]


def alltoall_s(far_bytes: float, p: int, link: Link) -> float:
    """Pairwise all-to-all on p ranks: (P-1) a + b x `far_bytes`, the most bytes a rank sends to (or receives from)
    the other ranks."""
    if p <= 1:
        return 0.0
    return (p - 1) * link.alpha_s + far_bytes * link.beta_s_per_byte


def alltoall_far_bytes(op: str, p: int, n_bytes: float) -> float:
    """The most bytes a rank sends to or receives from other ranks when each rank sends n bytes in all (its own part
    included) with `alltoall`'s equal splits or `alltoall-zipf`'s skewed ones."""
    if op == "alltoall":
        return (p - 1) / p * n_bytes
    shares = zipf_split_shares(p)
    return max((p - 1) * n_bytes * max(shares), n_bytes * (1 - min(shares)))


def collective_terms(op: str, p: int, n_bytes: float) -> tuple[float, float, float]:
    """The coefficients of (a, b, g) in the time of `op`: the rows of the least-squares system. alltoall and
    alltoall-zipf: n is what each rank sends in all; alltoall-sent: n is what a rank sent to other ranks."""
    f = (p - 1) / p
    if op == "allreduce":
        return 2.0 * (p - 1), 2 * f * n_bytes, f * n_bytes
    if op == "allgather":
        return float(p - 1), f * n_bytes, 0.0
    if op == "sparse-pair":  # two allgathers (indices, values) of n bytes together
        return 2.0 * (p - 1), f * n_bytes, 0.0
    if op in ("alltoall", "alltoall-zipf"):
        return float(p - 1), alltoall_far_bytes(op, p, n_bytes), 0.0
    if op == "alltoall-sent":
        return float(p - 1), float(n_bytes), 0.0
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
