"""The user-similarity graph: exact k-NN by cosine over all users, then graph learning over it.

Each rank searches the neighbours of its own block of users (`shard`), scoring a block of `chunk` query users
against a block of keys at a time and keeping a running top-k, so memory is bounded by chunk x keys floats. Where
the keys come from is the strategy:
- replicate: the ranks allgather every rank's compressed embeddings; each scores its users against all users at
  once. Memory per rank O(users), whatever the number of ranks.
- ring: the blocks travel around the ring of ranks. In each of P steps a rank scores its users against the block
  in hand while it already sends that block to the next rank and receives the previous rank's; after P steps every
  block has passed every rank. Memory per rank O(users / P): its own block, the one arriving, and chunk x block
  scores.
Both give the same neighbours (exact k-NN; only the order of equal similarities may differ). Propagation reaches
neighbours of neighbours, who may live on any rank, so retrieval gathers the graph's rows (`gather_graph`): k ids
and similarities per user, far less than the embeddings.
Graph learning weights the edges (softmax of similarity over a user's neighbours) and propagates engagement
signals along them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.data import ranges, shard
from alure.exchange import Exchange
from alure.refresh import EmbeddingStore, dequantize
from alure.stages import GRAPH_STRATEGIES

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


@dataclass(kw_only=True, slots=True)
class LocalGraph:
    """The k nearest neighbours of one rank's block of users."""

    users: range
    """The users whose rows these are (this rank's shard)."""
    neighbors: np.ndarray
    """(len(users), k) int64 neighbour ids, nearest first."""
    similarity: np.ndarray
    """(len(users), k) float32 cosine similarities."""


class RunningTopK:
    """The best k keys so far of each query row, merged block of keys by block of keys."""

    def __init__(self, queries: int, k: int):
        self.k = k
        # Placeholders lose to every real candidate; by the end each row has seen users - 1 >= k real ones.
        self.similarity = torch.full((queries, k), -torch.inf)
        self.neighbors = torch.full((queries, k), -1, dtype=torch.int64)

    def add(self, rows: slice, similarity: torch.Tensor, neighbors: torch.Tensor) -> None:
        """Merge candidates (similarity and ids, one row per query in `rows`) into the running best k."""
        top = torch.cat([self.similarity[rows], similarity], dim=1).topk(self.k, dim=1)
        self.neighbors[rows] = torch.cat([self.neighbors[rows], neighbors], dim=1).gather(1, top.indices)
        self.similarity[rows] = top.values

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, similarities), nearest first."""
        return self.neighbors.numpy(), self.similarity.numpy()


def unit_rows(embeddings: np.ndarray) -> torch.Tensor:
    """Rows scaled to length 1: cosine similarity becomes a dot product."""
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(embeddings)), dim=1)


def score_block(queries: torch.Tensor, query_ids: torch.Tensor, keys: torch.Tensor, first_key: int, k: int,
                buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(k, keys) cosine similarities of unit `queries` (users `query_ids`) among unit `keys` (users
    first_key ..), a user never its own neighbour; returns (similarity, neighbour ids). The scores are written
    into `buffer` (at least queries x keys floats)."""
    scores = torch.matmul(queries, keys.T, out=buffer[:len(queries) * len(keys)].view(len(queries), len(keys)))
    own = (query_ids >= first_key) & (query_ids < first_key + len(keys))
    scores[own.nonzero().squeeze(1), query_ids[own] - first_key] = -torch.inf
    top = scores.topk(min(k, len(keys)), dim=1)
    return top.values, top.indices + first_key


def search_block(topk: RunningTopK, queries: torch.Tensor, users: range, keys: torch.Tensor, first_key: int,
                 chunk: int, buffer: torch.Tensor, between_chunks=None) -> None:
    """Score every chunk of `queries` against `keys` into `topk`; `between_chunks()` runs after each chunk.
    One score buffer serves every chunk and block: the peak is one chunk x block of floats, whatever the
    allocator would have made of a fresh matrix each time."""
    for start in range(0, len(queries), chunk):
        rows = slice(start, min(start + chunk, len(queries)))
        ids = torch.arange(users.start + rows.start, users.start + rows.stop)
        topk.add(rows, *score_block(queries[rows], ids, keys, first_key, topk.k, buffer))
        if between_chunks is not None:
            between_chunks()


def score_buffer(queries: int, keys: int, chunk: int) -> torch.Tensor:
    """Room for one chunk of query rows against `keys` keys."""
    return torch.empty(min(chunk, queries) * keys)


def nearest_neighbors(embeddings: np.ndarray, queries: range, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of users `queries` among all users (a user is not its own neighbour)."""
    keys = unit_rows(embeddings)
    topk = RunningTopK(len(queries), k)
    search_block(topk, keys[queries.start:queries.stop], queries, keys, 0, chunk,
                 score_buffer(len(queries), len(keys), chunk))
    return topk.result()


def replicate_neighbors(local: EmbeddingStore, users: int, k: int, chunk: int, exchange: Exchange) -> LocalGraph:
    """replicate: allgather every rank's compressed block, score this rank's users against all users."""
    mine = shard(users, exchange.rank, exchange.size)
    values = exchange.allgather_array(local.values)
    scales = None if local.scales is None else exchange.allgather_array(local.scales)
    neighbors, similarity = nearest_neighbors(dequantize(values, scales), mine, k, chunk)
    return LocalGraph(users=mine, neighbors=neighbors, similarity=similarity)


def ring_neighbors(local: EmbeddingStore, users: int, k: int, chunk: int, exchange: Exchange) -> LocalGraph:
    """ring: P steps; in each, this rank scores its users against the block in hand while that block moves on to
    the next rank and the previous rank's block arrives. Holds at most two blocks at once."""
    rank, size = exchange.rank, exchange.size
    mine = shard(users, rank, size)
    queries = unit_rows(dequantize(local.values, local.scales))
    topk = RunningTopK(len(mine), k)
    buffer = score_buffer(len(mine), max(len(shard(users, r, size)) for r in range(size)), chunk)
    block = [local.values] + ([] if local.scales is None else [local.scales])
    for step in range(size):
        owner = (rank - step) % size
        # Start passing the block on before scoring it: its bytes travel while this rank computes.
        transfers = [exchange.start_ring_shift(a) for a in block] if step < size - 1 else []

        def progress():
            for t in transfers:
                t.test()
        keys = unit_rows(dequantize(block[0], block[1] if len(block) > 1 else None))
        search_block(topk, queries, mine, keys, shard(users, owner, size).start, chunk, buffer, progress)
        del keys
        block = [t.wait() for t in transfers]
    neighbors, similarity = topk.result()
    return LocalGraph(users=mine, neighbors=neighbors, similarity=similarity)


def check_strategy(strategy: str) -> None:
    if strategy not in GRAPH_STRATEGIES:
        raise ValueError(f"unknown graph strategy {strategy!r}: use one of {', '.join(GRAPH_STRATEGIES)}")


def local_graph(local: EmbeddingStore, users: int, k: int, chunk: int, exchange: Exchange,
                strategy: str) -> LocalGraph:
    """This rank's rows of the exact k-NN graph, by `strategy` (one of GRAPH_STRATEGIES)."""
    check_strategy(strategy)
    search = replicate_neighbors if strategy == "replicate" else ring_neighbors
    return search(local, users, k, chunk, exchange)


def gather_graph(local: LocalGraph, exchange: Exchange) -> UserGraph:
    """Every rank's rows of the graph, on every rank (what propagation over neighbours of neighbours needs)."""
    neighbors, similarity = exchange.allgather_array(local.neighbors), exchange.allgather_array(local.similarity)
    return UserGraph(neighbors=neighbors, similarity=similarity, weights=edge_weights(similarity))


def edge_weights(similarity: np.ndarray) -> np.ndarray:
    """Softmax over each user's neighbours of similarity / EDGE_TEMPERATURE."""
    return torch.softmax(torch.from_numpy(similarity) / EDGE_TEMPERATURE, dim=1).numpy()


def build_graph(embeddings: np.ndarray, k: int, chunk: int, exchange: Exchange) -> UserGraph:
    """The whole graph on every rank; each rank searches the neighbours of its own block of users."""
    mine = shard(len(embeddings), exchange.rank, exchange.size)
    neighbors, similarity = nearest_neighbors(embeddings, mine, k, chunk)
    return gather_graph(LocalGraph(users=mine, neighbors=neighbors, similarity=similarity), exchange)


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


def same_community(neighbors: np.ndarray, users: range | np.ndarray, community: np.ndarray, at: int) -> np.ndarray:
    """(len(users), at) whether each of the `at` nearest neighbours of `users` is in the user's planted community."""
    return community[neighbors[:, :at]] == community[np.asarray(users)][:, None]


def neighbor_precision(graph: UserGraph, community: np.ndarray, at: int = 10) -> float:
    """Share of users' `at` nearest neighbours that come from their own planted community."""
    return float(same_community(graph.neighbors, np.arange(len(graph.neighbors)), community, at).mean())
