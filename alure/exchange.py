"""The seam between the workload and whoever runs it across processes.

The workload never imports MPI or Horovod: a launcher hands it an object with this shape. `LocalExchange` is the
single-process one, so the whole pipeline runs as one plain process with no MPI at all.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Exchange(Protocol):
    """What the workload needs from a multi-process runtime."""

    rank: int
    """This process's index, 0 .. size-1."""
    size: int
    """How many processes take part."""

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Return an optimizer whose gradients are exchanged across ranks (averaged) before they are applied."""

    def plan_tables(self, first_batch) -> None:
        """Called once before the model is built, with a callable that returns this rank's batch of the first step
        (the one `start_step` will see first): the moment a runtime that decides once how to hold each table (whole
        or sharded) can agree on it with the other ranks, before `embedding_lookup` is offered the tables. Most do
        nothing."""

    def embedding_lookup(self, spec) -> torch.nn.Module | None:
        """Offered each sparse embedding table (an alure.model.TableSpec) as the model is built, before the table is
        made. A runtime that keeps a table's rows on several ranks returns the module that does its lookups: an
        `nn.Embedding` whose weight holds the rows this rank keeps (`spec.initial_rows` of them), called with ids
        like the whole table. None: the whole table, as usual."""

    def prepare_lookups(self, lookups: dict[str, list[torch.Tensor]]) -> None:
        """Called at the start of each training forward, only when `embedding_lookup` made some table, with
        every id each table will look up in this step (module path -> id tensors, in the order of lookup;
        `UserEncoder.table_lookups`): the moment a runtime whose rows live on other ranks fetches them all at
        once."""

    def start_step(self, batch) -> None:
        """Called in the data phase with this rank's batch, before any gradient exists: the moment a runtime that
        chooses per step how to exchange gradients can agree on it with the other ranks. Most do nothing."""

    def broadcast_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank start from rank 0's parameters and optimizer state."""

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait until this step's gradient exchange has finished; afterwards `.grad` holds the averaged gradient."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update after `synchronize`, without exchanging again."""

    def allgather_array(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every rank's array along axis 0, in rank order (shapes may differ in axis 0 only)."""

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Elementwise sum of every rank's array of the same shape."""

    def barrier(self) -> None:
        """Block until every rank has arrived."""

    def start_ring_shift(self, array: np.ndarray) -> Transfer:
        """Start sending `array` to the next rank (rank + 1, wrapping) and receiving the previous rank's array
        (its shape may differ in axis 0 only; dtype and the other axes must agree). Returns at once: the caller
        works on while the bytes travel, then `wait`s. `array` must not be changed until then."""


class Transfer(Protocol):
    """A point-to-point transfer in flight."""

    def test(self) -> bool:
        """Let the transfer progress (MPI moves large messages only while some MPI call runs); True once done."""

    def wait(self) -> np.ndarray:
        """Block until the transfer is done; return the array received."""


class Arrived:
    """A transfer that was complete when it started (a ring of one rank hands its array to itself)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def test(self) -> bool:
        return True

    def wait(self) -> np.ndarray:
        return self.array


def ring_shift(exchange: Exchange, array: np.ndarray) -> np.ndarray:
    """Blocking ring shift: send `array` to rank + 1, return rank - 1's."""
    return exchange.start_ring_shift(array).wait()


class LocalExchange:
    """One process, nothing to exchange: the identity for every collective."""

    rank = 0
    size = 1

    def wrap_optimizer(self, optimizer, model):
        return optimizer

    def plan_tables(self, first_batch):
        pass

    def embedding_lookup(self, spec):
        return None

    def prepare_lookups(self, lookups):
        pass

    def start_step(self, batch):
        pass

    def broadcast_model(self, model, optimizer):
        pass

    def synchronize(self, optimizer):
        pass

    def step(self, optimizer):
        optimizer.step()

    def allgather_array(self, array):
        return np.asarray(array)

    def allreduce_sum(self, array):
        return np.asarray(array)

    def barrier(self):
        pass

    def start_ring_shift(self, array):
        return Arrived(np.asarray(array))
