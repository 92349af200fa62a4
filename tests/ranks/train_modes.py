"""Rank script: train the tiny workload a few steps in one exchange mode; save this rank's weights and report
what the exchange did. Args: MODE STEPS OUT_DIR [SAMPLED_NEGATIVES]."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from alure.config import tiny
from alure.train import Trainer
from bench.exchange import HorovodExchange

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
negatives = int(sys.argv[4]) if len(sys.argv) > 4 else None
torch.set_num_threads(1)
exchange = HorovodExchange(mode)
config = tiny() if negatives is None else replace(tiny(), sampled_negatives=negatives)
trainer = Trainer(config, exchange)
torch.save(trainer.model.state_dict(), out / f"initial-rank{exchange.rank}.pt")
repeated_ids = sparse_grads = True
held, calls = [], []
for _ in range(steps):
    exchange.counters.reset()
    batch = trainer.next_batch()
    ids = torch.cat([batch.sequences[name].items.ids for name in batch.sequences])
    repeated_ids &= ids.unique().numel() < ids.numel()
    loss = trainer.forward(batch)
    trainer.backward(loss)
    tables = [enc.items.weight for enc in trainer.model.sources.values()]
    sparse_grads &= all(t.grad is not None and t.grad.is_sparse for t in tables)
    trainer.synchronize()
    trainer.step()
    c = exchange.counters
    held.append({"allgather": c.allgather_bytes_held, "allreduce": c.allreduce_bytes_held,
                 "allgather_sent": c.allgather_bytes_sent})
    calls.append({"allgather": c.allgather_calls, "allreduce": c.allreduce_calls})
torch.save(trainer.model.state_dict(), out / f"{mode}-rank{exchange.rank}.pt")
print("RANK_RECORD " + json.dumps({"rank": exchange.rank, "size": exchange.size, "repeated_ids": bool(repeated_ids),
                  "sparse_grads": bool(sparse_grads), "held": held, "calls": calls}))
exchange.shutdown()
