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
tables = {name: m.weight for name, m in trainer.model.named_modules()
          if isinstance(m, torch.nn.Embedding) and m.sparse}
repeated_ids = sparse_grads = True
sparse_to_optimizer = False
counters, distinct, table_modes = [], [], []
for _ in range(steps):
    exchange.counters.reset()
    batch = trainer.next_batch()
    ids = torch.cat([batch.sequences[name].items.ids for name in batch.sequences])
    repeated_ids &= ids.unique().numel() < ids.numel()
    loss = trainer.forward(batch)
    trainer.backward(loss)
    # dense-reduce's hooks have already swapped the gradient for its buffer (being reduced in place now): the
    # layout says which, and the distinct rows are only counted where the gradient is still this rank's own
    sparse_grads &= all(t.grad is not None and t.grad.is_sparse for t in tables.values())
    distinct.append(sum(int(t.grad.coalesce()._nnz()) for t in tables.values()) if sparse_grads else -1)
    trainer.synchronize()
    # what the optimizer is about to be handed
    sparse_to_optimizer |= any(p.grad is not None and p.grad.is_sparse
                               for group in trainer.optimizer.param_groups for p in group["params"])
    table_modes.append(sorted(set(exchange.table_mode.values())))
    trainer.step()
    c = exchange.counters
    counters.append({**c.as_dict(), "bytes_held": c.bytes_held, "bytes_sent": c.bytes_sent})
torch.save(trainer.model.state_dict(), out / f"{mode}-rank{exchange.rank}.pt")
print("RANK_RECORD " + json.dumps({"rank": exchange.rank, "size": exchange.size, "repeated_ids": bool(repeated_ids),
                                   "sparse_grads": bool(sparse_grads), "sparse_to_optimizer": sparse_to_optimizer,
                                   "distinct_rows": distinct, "counters": counters, "table_modes": table_modes}))
exchange.shutdown()
