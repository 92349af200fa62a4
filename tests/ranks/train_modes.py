"""Rank script: train the tiny workload a few steps in each of the given exchange modes in turn, each from the same
seed (with HOROVOD_TIMELINE=DYNAMIC, Horovod's timeline recorded to a file per mode); save this rank's weights per
mode and report what each exchange did. Args: MODES (comma-separated) STEPS OUT_DIR [SAMPLED_NEGATIVES]."""
import os
import sys
from dataclasses import replace
from pathlib import Path

import horovod.torch as hvd
import torch

from alure.config import tiny
from alure.train import Trainer
from bench.launch.handback import hand_back
from bench.ranks.exchange import HorovodExchange


def train(mode: str, steps: int, out: Path, config) -> dict:
    exchange = HorovodExchange(mode)
    timeline = os.environ.get("HOROVOD_TIMELINE") == "DYNAMIC"
    if timeline:
        hvd.start_timeline(str(out / f"{mode}-timeline.json"))
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
        # until synchronize, p.grad is this rank's own gradient in every mode (coalesced-gather's hook coalesced it)
        sparse_grads &= all(t.grad is not None and t.grad.is_sparse for t in tables.values())
        distinct.append(sum(int(t.grad.coalesce()._nnz()) for t in tables.values()))
        trainer.synchronize()
        # what the optimizer is about to be handed
        sparse_to_optimizer |= any(p.grad is not None and p.grad.is_sparse
                                   for group in trainer.optimizer.param_groups for p in group["params"])
        table_modes.append(sorted(set(exchange.table_mode.values())))
        trainer.step()
        c = exchange.counters
        counters.append({**c.as_dict(), "bytes_held": c.bytes_held, "bytes_sent": c.bytes_sent})
    if timeline:
        hvd.stop_timeline()
    torch.save(trainer.model.state_dict(), out / f"{mode}-rank{exchange.rank}.pt")
    return {"rank": exchange.rank, "size": exchange.size, "repeated_ids": bool(repeated_ids),
            "sparse_grads": bool(sparse_grads), "sparse_to_optimizer": sparse_to_optimizer,
            "distinct_rows": distinct, "counters": counters, "table_modes": table_modes}


modes, steps, out = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
negatives = int(sys.argv[4]) if len(sys.argv) > 4 else None
torch.set_num_threads(1)
config = tiny() if negatives is None else replace(tiny(), sampled_negatives=negatives)
runs = {mode: train(mode, steps, out, config) for mode in modes}
hand_back(os.environ["RANK_HANDBACK_DIR"], hvd.rank(), {"rank": hvd.rank(), "modes": runs})
hvd.shutdown()
