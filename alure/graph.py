"""The user-similarity graph: exact k-NN by cosine over all users, then graph learning over it.

k-NN is computed in blocks of query users (block x all users similarities at a time, so memory stays bounded)
and the queries are sharded across ranks; the ranks then allgather their rows, because propagation reaches
neighbours of neighbours, who may live on any rank. Graph learning weights the edges (softmax of similarity over
a user's neighbours) and propagates engagement signals along them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.data import ranges, shard
from alure.exchange import Exchange

EDGE_TEMPERATURE = 0.05
"""Softmax temperature of edge weights over cosine similarities: the closest neighbours count most."""


@dataclass(kw_only=True, slots=True)
class UserGraph:
    """k nearest neighbours of every user, with the weights of the edges to them."""

    neighbors: np.ndarray
    """(users, k) int64 neighbour ids, nearest first."""
    similarity: np.ndarray
    """(users, k) float32 cosine similarities."""
    weights: np.ndarray
    """(users, k) float32 edge weights; each row sums to 1."""


def nearest_neighbors(embeddings: np.ndarray, queries: range, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of users `queries` among all users (a user is not its own neighbour)."""
    keys = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=1)
    neighbors, similarity = [], []
    for start in range(queries.start, queries.stop, chunk):
        rows = torch.arange(start, min(start + chunk, queries.stop))
        scores = keys[rows] @ keys.T
        scores[torch.arange(len(rows)), rows] = -torch.inf
        top = scores.topk(k, dim=1)
        neighbors.append(top.indices.numpy())
        similarity.append(top.values.numpy())
    if not neighbors:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(neighbors), np.concatenate(similarity)


def edge_weights(similarity: np.ndarray) -> np.ndarray:
    """Softmax over each user's neighbours of similarity / EDGE_TEMPERATURE."""
    return torch.softmax(torch.from_numpy(similarity) / EDGE_TEMPERATURE, dim=1).numpy()


def build_graph(embeddings: np.ndarray, k: int, chunk: int, exchange: Exchange) -> UserGraph:
    """The whole graph on every rank; each rank searches the neighbours of its own block of users."""
    neighbors, similarity = nearest_neighbors(embeddings, shard(len(embeddings), exchange.rank, exchange.size),
                                              k, chunk)
    neighbors, similarity = exchange.allgather_array(neighbors), exchange.allgather_array(similarity)
    return UserGraph(neighbors=neighbors, similarity=similarity, weights=edge_weights(similarity))


@dataclass(kw_only=True, slots=True)
class RowSignal:
    """A sparse signal per user, row by row (CSR): user u has `values[offsets[u]:offsets[u + 1]]` in those columns."""

    offsets: np.ndarray
    """(users + 1,)"""
    columns: np.ndarray
    values: np.ndarray
    width: int
    """Number of columns."""


def propagate(graph: UserGraph, signal: RowSignal, users: np.ndarray, hops: int) -> torch.Tensor:
    """Signal of `users` averaged over their neighbourhood: mean over h = 1..hops of (W^h signal), W the edge weights.

    Walks fan out from `users` only (k^h ends each) and land in a dense (len(users), width) block.
    """
    ends, weights = graph.neighbors[users], graph.weights[users]
    walk_ends, walk_weights = [ends], [weights]
    for _ in range(hops - 1):
        weights = (weights[:, :, None] * graph.weights[ends]).reshape(len(users), -1)
        ends = graph.neighbors[ends].reshape(len(users), -1)
        walk_ends.append(ends)
        walk_weights.append(weights)
    ends, weights = np.concatenate(walk_ends, axis=1), np.concatenate(walk_weights, axis=1)
    # Every walk brings its end user's whole signal row, scaled by the walk's weight.
    counts = np.diff(signal.offsets)[ends]
    index = ranges(signal.offsets[ends].ravel(), counts.ravel())
    rows = np.repeat(np.arange(len(users)), counts.sum(axis=1))
    values = np.repeat(weights.ravel(), counts.ravel()) * signal.values[index] / hops
    return torch.zeros(len(users) * signal.width).index_add_(
        0, torch.from_numpy(rows * signal.width + signal.columns[index]), torch.from_numpy(values.astype(np.float32))
    ).view(len(users), signal.width)


def neighbor_precision(graph: UserGraph, community: np.ndarray, at: int = 10) -> float:
    """Share of users' `at` nearest neighbours that come from their own planted community."""
    return float((community[graph.neighbors[:, :at]] == community[:, None]).mean())
