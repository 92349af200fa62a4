"""Rank script: refresh, graph (both strategies) and retrieval of the tiny workload from saved weights, sharded over
the ranks through Horovod (and mpi4py for the ring). Rank 0 saves the gathered graph of each strategy; every rank
reports the quality metrics and what its collectives moved. Args: WEIGHTS OUT_DIR."""
import os
import sys
from pathlib import Path

import numpy as np
import torch

from alure.config import tiny
from alure.data import build_world
from alure.model import UserEncoder
from alure.pipeline import graph_stage, neighbor_precision_sharded, refresh_stage, retrieval_stage
from alure.stages import GRAPH_STRATEGIES
from bench.launch.handback import hand_back
from bench.ranks.exchange import HorovodExchange
from bench.ranks.stage_worker import CountingExchange, StageCounters

weights, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
horovod = HorovodExchange("dense-reduce")
exchange = CountingExchange(horovod)
config = tiny()
world = build_world(config)
model = UserEncoder(config)
model.load_state_dict(torch.load(weights))
record = {"rank": exchange.rank, "size": exchange.size}
store = refresh_stage(model, world, exchange)
for strategy in GRAPH_STRATEGIES:
    exchange.counters = StageCounters()
    graph = graph_stage(store, config, exchange, strategy)
    moved, exchange.counters = exchange.counters, StageCounters()
    whole, recall = retrieval_stage(world, graph, exchange)
    if exchange.rank == 0:
        np.savez(out / f"{strategy}-np{exchange.size}.npz", neighbors=whole.neighbors, similarity=whole.similarity)
    record[strategy] = {"recall": recall, "precision": neighbor_precision_sharded(graph, world.community, exchange),
                        "users": [graph.users.start, graph.users.stop], "allgather_calls": moved.allgather_calls,
                        "sendrecv_calls": moved.sendrecv_calls, "bytes_received": moved.bytes_received}
hand_back(os.environ["RANK_HANDBACK_DIR"], exchange.rank, record)
horovod.shutdown()
