"""The whole ALURE pipeline, one stage after another: train -> refresh -> graph -> retrieval.

Every rank runs every stage on its share and returns the same dictionary: quality metrics are reduced over ranks
and stage times are the slowest rank's.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from alure.config import WorkloadConfig
from alure.data import build_world
from alure.exchange import Exchange
from alure.graph import build_graph, neighbor_precision
from alure.refresh import refresh
from alure.retrieval import evaluate
from alure.train import train

@contextmanager
def _timed(seconds: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start


def run_pipeline(config: WorkloadConfig, exchange: Exchange) -> dict:
    """Run every stage; keys: loss_start, loss_end, neighbor_precision_at_10, recall_at_<top_k> (per ranking),
    stage_seconds (per stage), gradient_density (rank 0's last step), refresh_bytes (all users, compressed)."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "data"):
        world = build_world(config)
    with _timed(seconds, "train"):
        trained = train(config, exchange, world=world)
    with _timed(seconds, "refresh"):
        store = refresh(trained.trainer.model, world, exchange)
    with _timed(seconds, "graph"):
        graph = build_graph(store.dequantize(), config.knn_k, config.graph_chunk, exchange)
    with _timed(seconds, "retrieval"):
        recall = evaluate(world, graph, exchange)
    # The slowest rank sets each stage's time; rank 0's density stands for all.
    slowest = exchange.allgather_array(np.array([list(seconds.values())])).max(axis=0)
    density = exchange.allgather_array(np.array([list(trained.gradient_density.values())]))[0]
    return {
        "loss_start": trained.loss_start,
        "loss_end": trained.loss_end,
        "neighbor_precision_at_10": neighbor_precision(graph, world.community, at=10),
        f"recall_at_{config.top_k}": recall,
        "stage_seconds": dict(zip(seconds, map(float, slowest))),
        "gradient_density": dict(zip(trained.gradient_density, map(float, density))),
        "refresh_bytes": store.nbytes,
    }
