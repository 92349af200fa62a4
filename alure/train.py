"""Training, one phase at a time so that a harness can time each: data, forward, backward, exchange wait, optimizer.

`Trainer.train_step` is the plain sequence of the phases; `train` is a loop of it. A harness calls the phases
itself, with its timers between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.config import WorkloadConfig
from alure.data import Batch, World, build_world, make_batch
from alure.exchange import Exchange
from alure.model import UserEncoder, next_engagement_loss


class Trainer:
    """Model, optimizer and batch stream of one rank."""

    def __init__(self, config: WorkloadConfig, exchange: Exchange, world: World | None = None):
        self.config = config
        self.exchange = exchange
        self.world = world if world is not None else build_world(config)
        torch.manual_seed(config.seed)  # the same initial weights on every rank, even before the broadcast
        # e.g. the harness's `auto` decides here, from the first step's batch, which tables to shard
        exchange.plan_tables(lambda: make_batch(self.world, 0, exchange.rank, exchange.size, config.batch_size))
        made = []

        def offer(spec):  # a runtime that shards tables makes them: only the rows this rank keeps
            table = exchange.embedding_lookup(spec)
            if table is not None:
                made.append(spec.name)
            return table
        self.model = UserEncoder(config, offer)
        self.remote_tables = tuple(made)
        """The tables the exchange made (their rows are fetched each step by `prepare_lookups`)."""
        # One optimizer over all parameters, so one DistributedOptimizer wraps it; Adagrad takes sparse gradients.
        optimizer = torch.optim.Adagrad(parameter_groups(self.model), lr=config.learning_rate)
        # Say it explicitly: the sparse gradients come from torch's own embedding backward and Horovod's gathers,
        # so per-tensor invariant checks would only cost time (and torch warns when the choice is left implicit).
        torch.sparse.check_sparse_tensor_invariants.disable()
        self.optimizer = exchange.wrap_optimizer(optimizer, self.model)
        exchange.broadcast_model(self.model, self.optimizer)
        self.step_index = 0
        self.density: dict[str, float] | None = None
        """The last density measured by `train_step(measure_density=True)`."""

    def next_batch(self) -> Batch:
        """Phase 'data': this rank's slice of the next global batch."""
        batch = make_batch(self.world, self.step_index, self.exchange.rank, self.exchange.size,
                           self.config.batch_size)
        self.step_index += 1
        self.exchange.start_step(batch)  # e.g. the harness's `auto` mode agrees on this step's exchange here
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        """Phase 'forward': the loss of this rank's samples (sharded tables fetch their rows first)."""
        if self.remote_tables:
            self.exchange.prepare_lookups(self.model.table_lookups(batch))
        return next_engagement_loss(self.model, self.model(batch), batch, self.config.group_size)

    def backward(self, loss: torch.Tensor) -> None:
        """Phase 'backward': this rank's gradients (with Horovod, their exchange starts as they are ready)."""
        # No arguments: Horovod's DistributedOptimizer.zero_grad takes none (torch's default already drops grads).
        self.optimizer.zero_grad()
        loss.backward()

    def synchronize(self) -> None:
        """Phase 'exchange wait': afterwards every rank holds the gradients averaged over ranks."""
        self.exchange.synchronize(self.optimizer)

    def step(self) -> None:
        """Phase 'optimizer': apply the averaged gradients."""
        fuse_dense_tables(self.optimizer)
        self.exchange.step(self.optimizer)

    def train_step(self, measure_density: bool = False) -> float:
        """All phases in order; returns this rank's loss. With `measure_density`, this rank's own gradient density
        (read before the exchange) is left in `self.density`."""
        loss = self.forward(self.next_batch())
        self.backward(loss)
        if measure_density:
            self.density = self.gradient_density()
        self.synchronize()
        self.step()
        return loss.item()

    def gradient_density(self) -> dict[str, float]:
        """Share of rows with a nonzero gradient, per embedding table and over all item tables.

        Read the gradients as they are: between backward and synchronize they are this rank's own; after
        synchronize they are the exchanged ones (the union over ranks, sparse or densified). A table sharded over
        ranks counts the rows this rank holds, whose gradient the backward already brought from every rank (0 where
        it holds none).
        Keys: '<source>/items', '<source>/codes', and 'items' for all item tables together.
        """
        density, touched, rows = {}, 0, 0
        for name, encoder in self.model.sources.items():
            for table in ("items", "codes"):
                weight = getattr(encoder, table).weight
                hit = rows_touched(weight.grad)
                density[f"{name}/{table}"] = hit / weight.shape[0] if weight.shape[0] else 0.0
                if table == "items":
                    touched, rows = touched + hit, rows + weight.shape[0]
        density["items"] = touched / rows if rows else 0.0
        return density


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """The optimizer's parameter groups: one per sparse embedding table (marked `sparse_table`), one for the rest.
    A table alone in its group can take the fused dense update on the steps its gradient arrives dense (an exchange
    that densifies it), which a group mixing sparse and dense gradients cannot."""
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    rest = [p for p in model.parameters() if all(p is not t for t in tables)]
    return [{"params": rest}, *({"params": [t], "sparse_table": True} for t in tables)]


def fuse_dense_tables(optimizer: torch.optim.Optimizer) -> None:
    """Each table's group runs Adagrad's fused implementation exactly when the table's gradient is dense this step;
    a sparse gradient needs torch's sparse path (fused does not take sparse gradients).

    Fused, because a densified table's update is only as cheap as its optimizer, and the fused implementation is
    by far the fastest torch has for a large dense table (docs/modes.md, dense-reduce). Dense and sparse Adagrad agree on rows with no gradient: a zero gradient adds nothing to the
    sum and moves nothing (no weight decay), so every exchange mode trains the same model."""
    for group in optimizer.param_groups:
        if group.get("sparse_table"):
            grad = group["params"][0].grad
            group["fused"] = grad is not None and not grad.is_sparse


def rows_touched(grad: torch.Tensor | None) -> int:
    """Rows of a table gradient that are not all zero (sparse: distinct row indices)."""
    if grad is None:
        return 0
    if grad.is_sparse:
        return int(grad.coalesce().indices().shape[1])  # coalesced: one index per distinct row
    return int(grad.reshape(grad.shape[0], -1).ne(0).any(dim=1).sum())


@dataclass(kw_only=True, slots=True)
class TrainResult:
    """A finished training run."""

    trainer: Trainer
    """Holds the trained model."""
    loss_start: float
    """Mean loss (over ranks) of the first tenth of the steps (at least one step)."""
    loss_end: float
    """Mean loss (over ranks) of the last tenth of the steps."""
    gradient_density: dict[str, float]
    """This rank's `Trainer.gradient_density` at the last step, before the exchange."""


def train(config: WorkloadConfig, exchange: Exchange, steps: int | None = None,
          world: World | None = None) -> TrainResult:
    """Train for `steps` (default: config.steps) with the same phases a harness times."""
    trainer = Trainer(config, exchange, world)
    steps = config.steps if steps is None else steps
    losses = [trainer.train_step(measure_density=step == steps - 1) for step in range(steps)]
    window = max(1, steps // 10)  # single-step losses are noisy; a tenth of the run is not
    local = np.array([np.mean(losses[:window]), np.mean(losses[-window:])])
    start, end = exchange.allreduce_sum(local) / exchange.size
    return TrainResult(trainer=trainer, loss_start=float(start), loss_end=float(end), gradient_density=trainer.density)
