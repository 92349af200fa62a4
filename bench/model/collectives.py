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
