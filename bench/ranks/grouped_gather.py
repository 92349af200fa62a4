"""An option of the Horovod exchange: a step's sparse tables gathered in one grouped allgather instead of one
sparse allreduce (two allgathers) per table.

Horovod negotiates every collective it is handed (each cycle, rank 0 learns which tensors every rank has ready);
handed separately, a step's tables are negotiated one by one as backward makes them. `hvd.grouped_allgather_async`
hands all of them over at once, as one negotiated group, at the moment the last gathered table of the step is
ready: fewer hand-offs, but no gather starts before that moment. Which one a training step prefers is a
measurement: `alure-bench sweep --compare-env 'ALURE_BENCH_GROUPED_ALLGATHER=1'` (docs/exchange-backends.md).

Every rank must group the same tables each step; in this workload every table gets a gradient every step (each
source's tables are looked up by every batch), and auto chooses alike on every rank.
"""
from __future__ import annotations

import os

import torch

VARIABLE = "ALURE_BENCH_GROUPED_ALLGATHER"
"""Set to 1 in the ranks' environment to group the tables' gathers (any other value, or unset: one per table)."""


def grouped_gathers_asked() -> bool:
    return os.environ.get(VARIABLE, "") == "1"


class GroupedGather:
    """This step's gathered tables, handed to Horovod as one grouped allgather once the last of them is ready."""

    def __init__(self, hvd, process_set):
        self._hvd, self._process_set = hvd, process_set
        self.expected = 0
        """How many tables this step gathers (set by the exchange before backward)."""
        self.groups_started = 0
        """Grouped allgathers started since the exchange was made (for tests and logs)."""
        self._filling: _Group | None = None

    def add(self, grad: torch.Tensor):
        """Take one table's sparse gradient; return the callable that gives its gathered, averaged gradient (what
        Horovod's sparse allreduce handle gives)."""
        group = self._filling = self._filling or _Group()
        group.grads.append(grad)
        i = len(group.grads) - 1
        if len(group.grads) == self.expected:
            self._start(group)

        def gathered() -> torch.Tensor:
            if group.handle is None:  # synchronize came before the group was full: start it with what it has
                self._start(group)
            if group.outputs is None:
                group.outputs = self._hvd.synchronize(group.handle)
            indices, values = group.outputs[2 * i], group.outputs[2 * i + 1]
            # as Horovod's sparse allreduce with op=Average builds it
            return grad.new(indices.transpose(0, 1), values / self._process_set.size(), grad.size())
        return gathered

    def _start(self, group: _Group) -> None:
        tensors = [t for g in group.grads for t in (g._indices().transpose(0, 1).contiguous(), g._values())]
        group.handle = self._hvd.grouped_allgather_async(tensors, name="alure.tables", process_set=self._process_set)
        self.groups_started += 1
        self._filling = None


class _Group:
    """One step's grouped gather: the gradients handed over, Horovod's handle, and its outputs once collected."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []
        self.handle = None
        self.outputs = None
