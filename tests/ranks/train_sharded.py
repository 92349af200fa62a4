"""Rank script: train the tiny workload a few steps in each of the given modes in turn (replicated or sharded), each
from the same seed, with V not divisible by the rank count in some table; save each rank's sparse tables as full
tables (a shard's rows at their global ids, NaN elsewhere) and its dense parameters; report the exchange counters
and, per step, the lookups of every sharded table counted from the batch. Args: MODES STEPS OUT_DIR [KEY=VALUE ...]
(workload overrides, e.g. shard_rows=range shard_dedup=true); a mode auto@BYTES is auto deciding under a memory
budget of BYTES."""
import os
import sys
from dataclasses import replace
from pathlib import Path

import horovod.torch as hvd
import torch

import bench.ranks.sharded
from alure.config import tiny
from alure.train import Trainer
from bench.launch.handback import hand_back
from bench.ranks.memory import memory_budget_bytes
from bench.ranks.sharded import ShardedTable, exchange_for


def full_tables(model) -> dict:
    """Every parameter; a shard spread over its table's rows (NaN where another rank holds the row)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ShardedTable):
            full = torch.full((module.spec.rows, module.embedding_dim), float("nan"))
            full[module.owned] = module.weight.detach()
            state[f"{name}.weight"] = full
    for name, p in model.named_parameters():
        state.setdefault(name, p.detach().clone())
    return state


def lookups(batch, config) -> dict:
    """Per sparse table: the ids this step looks up, read off the batch (sequence tokens, targets and negatives;
    the codes table's row of each RQ level and code), every lookup or (shard_dedup) the distinct ones."""
    out = {}
    for name in batch.sequences:
        parts = [batch.sequences[name].items, batch.targets[name], batch.negatives[name]]
        ids = torch.cat([p.ids.reshape(-1) for p in parts])
        codes = torch.cat([(p.codes + torch.arange(p.codes.shape[1]) * config.rq_codes).reshape(-1) for p in parts])
        for table, looked_up in (("items", ids), ("codes", codes)):
            out[f"sources.{name}.{table}"] = (torch.unique(looked_up) if config.shard_dedup else looked_up).tolist()
    return out


def train(run: str, steps: int, out: Path, config) -> dict:
    """One run: `run` is a mode, or auto@BYTES for auto deciding under a memory budget of BYTES in place of what this
    host has free."""
    mode, _, budget = run.partition("@")
    # auto reads the budget through the name bench.ranks.sharded imported
    bench.ranks.sharded.memory_budget_bytes = (lambda ranks_on_host: float(budget)) if budget else host_budget
    exchange = exchange_for(mode, config)
    trainer = Trainer(config, exchange)
    counters, asked = [], []
    for _ in range(steps):
        exchange.counters.reset()
        batch = trainer.next_batch()
        asked.append(lookups(batch, config))
        loss = trainer.forward(batch)
        trainer.backward(loss)
        trainer.synchronize()
        trainer.step()
        counters.append(exchange.counters.as_dict())
    torch.save(full_tables(trainer.model), out / f"{run}-rank{exchange.rank}.pt")
    shards = {name: m for name, m in trainer.model.named_modules() if isinstance(m, ShardedTable)}
    return {"rank": exchange.rank, "size": exchange.size, "counters": counters, "lookups": asked, "dim": config.dim,
            "rows": {name: m.spec.rows for name, m in shards.items()},
            "table_rows": {name: m.num_embeddings if name not in shards else m.spec.rows
                           for name, m in trainer.model.named_modules()
                           if isinstance(m, torch.nn.Embedding) and m.sparse},
            "sharding": getattr(exchange, "sharding", None),
            "costs": exchange.costs.as_dict() if exchange.costs else None}


def parse(value: str):
    return {"true": True, "false": False}.get(value.lower(), value)


modes, steps, out = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
host_budget = memory_budget_bytes
overrides = {k: parse(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
torch.set_num_threads(1)
# 4801 ads: not divisible by 2 or 3, so the shards are uneven at every P the test runs
base = tiny()
sources = (replace(base.sources[0], items=4801), *base.sources[1:])
config = replace(base, sources=sources, **overrides)
runs = {mode: train(mode, steps, out, config) for mode in modes}
hand_back(os.environ["RANK_HANDBACK_DIR"], hvd.rank(), {"rank": hvd.rank(), "modes": runs})
hvd.shutdown()
