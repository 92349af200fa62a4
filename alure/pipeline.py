"""The whole ALURE pipeline, one stage after another: train -> refresh -> graph -> retrieval.

Every rank runs every stage on its share of the users and returns the same dictionary: quality metrics are reduced
over ranks and stage times are the slowest rank's. The stages are functions of their own, so that a harness can
time one stage alone with exactly the code the pipeline runs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from alure.config import WorkloadConfig
from alure.data import World, build_world
from alure.exchange import Exchange
from alure.graph import LocalGraph, UserGraph, check_strategy, gather_graph, local_graph, same_community
from alure.model import UserEncoder
from alure.refresh import EmbeddingStore, refresh_local
from alure.retrieval import evaluate
from alure.stages import DEFAULT_GRAPH_STRATEGY
from alure.train import train


@contextmanager
def _timed(seconds: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start


def refresh_stage(model: UserEncoder, world: World, exchange: Exchange) -> EmbeddingStore:
    """Each rank embeds and compresses its own users; the store stays sharded."""
    return refresh_local(model, world, exchange)


def graph_stage(store: EmbeddingStore, config: WorkloadConfig, exchange: Exchange, strategy: str) -> LocalGraph:
    """Each rank finds the exact k nearest neighbours of its own users, sharing embeddings by `strategy`."""
    return local_graph(store, config.users, config.knn_k, config.graph_chunk, exchange, strategy)


def retrieval_stage(world: World, graph: LocalGraph, exchange: Exchange) -> tuple[UserGraph, dict[str, float]]:
    """Each rank ranks the ads for its own users, after gathering the graph rows propagation walks over."""
    whole = gather_graph(graph, exchange)
    return whole, evaluate(world, whole, exchange)


def neighbor_precision_sharded(graph: LocalGraph, community: np.ndarray, exchange: Exchange, at: int = 10) -> float:
    """Share of all users' `at` nearest neighbours in their own planted community, from each rank's rows."""
    hits = same_community(graph.neighbors, graph.users, community, at)
    total = exchange.allreduce_sum(np.array([hits.sum(), hits.size], dtype=np.float64))
    return float(total[0] / total[1])


def run_pipeline(config: WorkloadConfig, exchange: Exchange,
                 graph_strategy: str = DEFAULT_GRAPH_STRATEGY) -> dict:
    """Run every stage; keys: loss_start, loss_end, neighbor_precision_at_10, recall_at_<top_k> (per ranking),
    stage_seconds (per stage), gradient_density (rank 0's last step), refresh_bytes (all users, compressed),
    graph_strategy."""
    check_strategy(graph_strategy)  # before training, not after it
    seconds: dict[str, float] = {}
    with _timed(seconds, "data"):
        world = build_world(config)
    with _timed(seconds, "train"):
        trained = train(config, exchange, world=world)
    with _timed(seconds, "refresh"):
        store = refresh_stage(trained.trainer.model, world, exchange)
    with _timed(seconds, "graph"):
        graph = graph_stage(store, config, exchange, graph_strategy)
    with _timed(seconds, "retrieval"):
        _, recall = retrieval_stage(world, graph, exchange)
    # The slowest rank sets each stage's time; rank 0's density stands for all.
    slowest = exchange.allgather_array(np.array([list(seconds.values())])).max(axis=0)
    density = exchange.allgather_array(np.array([list(trained.gradient_density.values())]))[0]
    return {
        "loss_start": trained.loss_start,
        "loss_end": trained.loss_end,
        "neighbor_precision_at_10": neighbor_precision_sharded(graph, world.community, exchange, at=10),
        f"recall_at_{config.top_k}": recall,
        "stage_seconds": dict(zip(seconds, map(float, slowest))),
        "gradient_density": dict(zip(trained.gradient_density, map(float, density))),
        "refresh_bytes": int(exchange.allreduce_sum(np.array([store.nbytes], dtype=np.int64))[0]),
        "graph_strategy": graph_strategy,
    }
