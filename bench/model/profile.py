"""The workload as the model sees it, read off a sweep: its tables, dense parameters and np=1 step."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from alure.config import SourceConfig, WorkloadConfig
from bench.errors import UsageError
from bench.host import physical_cores
from bench.model.table_costs import INDEX_BYTES, VALUE_BYTES
from bench.plan.config import PointConfig
from bench.plan.workload import workload_config


@dataclass(frozen=True, slots=True)
class Table:
    """One sparse embedding table and what a step's batch does to it."""

    name: str
    rows: int
    """V."""
    dim: int
    """d."""
    lookups_per_sample: float
    """Rows its gradient gets per sample of the per-rank batch (uncoalesced: a row looked up twice counts twice)."""
    lookups_per_step: float
    """Rows its gradient gets per rank and step whatever the batch: the negatives the rank scores (every row under
    full_softmax), times the code levels for a codes table."""
    distinct_at_reference: float
    """Distinct rows the samples of a `Profile.reference_batch`-sized batch touch (sequences and targets, negatives
    apart)."""
    negatives_distinct: float = 0.0
    """Distinct rows of one rank's negatives in a step."""
    negatives_shared: bool = True
    """The negatives are the same rows on every rank (full_softmax, or shared_negatives); else each rank draws its
    own, and the rows some rank touched grow with P."""

    def lookups(self, batch: float) -> float:
        """nnz of this table's gradient on one rank with `batch` samples."""
        return self.lookups_per_sample * batch + self.lookups_per_step

    def distinct(self, samples: float, reference_batch: int, ranks: int = 1) -> float:
        """Distinct rows touched by `samples` samples of `ranks` ranks together (one rank's batch: ranks=1) and the
        negatives those ranks scored. Samples are taken as reference-batch-sized independent draws, and negatives
        as uniform draws independent of them: an upper bound where popular rows repeat."""
        sample_share = min(1.0, self.distinct_at_reference / self.rows)
        negative_share = min(1.0, self.negatives_distinct / self.rows)
        draws = 1 if self.negatives_shared else max(1, ranks)
        missed = (1.0 - sample_share) ** (samples / reference_batch) * (1.0 - negative_share) ** draws
        return self.rows * (1.0 - missed)


@dataclass(frozen=True, slots=True)
class Profile:
    """The workload as the cost model sees it: its tables, its dense parameters, and its np=1 step."""

    preset: str
    tables: tuple[Table, ...]
    dense_param_bytes: int
    """Bytes of the parameters that are allreduced densely in both modes."""
    group_size: int
    """A rank's batch must be whole groups of this many samples."""
    reference_batch: int
    """Per-rank batch of the np=1 points."""
    compute_ms: float
    """data + forward + backward at np=1 (medians over the steps of every np=1 point at reference_batch)."""
    backward_ms: float
    """The backward part of compute_ms (the window exchange can overlap with)."""
    optimizer_ms: float
    """The optimizer phase at np=1."""
    base_rss_mib: float
    """Peak RSS of an np=1 rank (median over the np=1 points)."""
    measured_cores: int
    """Cores of the machine that measured it."""
    measured_threads: int
    """Intra-op threads of the np=1 rank."""
    train_growth_mib: float = 0.0
    """What training added to an np=1 rank's resident set at reference_batch (rss_growth_mib: activations, gradients,
    optimizer temporaries); the model scales it with the rank's lookups."""
    measured_memory_mib: float | None = None
    """Memory of the machine that measured (environment.json's memory_mib); None where the sweep does not say."""

    def lookups(self, batch: float) -> float:
        return sum(t.lookups(batch) for t in self.tables)

    def gradient_bytes(self, batch: float) -> float:
        """This rank's sparse gradient bytes (indices and values, uncoalesced)."""
        return sum(t.lookups(batch) * (INDEX_BYTES + VALUE_BYTES * t.dim) for t in self.tables)

    def table_bytes(self) -> int:
        return sum(VALUE_BYTES * t.rows * t.dim for t in self.tables)

    def as_dict(self) -> dict:
        return asdict(self)


def workload_geometry(config, reference_batch: int, steps: int = 3) -> tuple[list[Table], int]:
    """Tables and dense-parameter bytes of an alure WorkloadConfig, with the lookups of real batches of it: the
    samples' rows and the negatives' rows counted apart, since the one grows with the batch and the other does not."""
    import torch
    from torch import nn

    from alure.data import build_world, make_batch, negatives_per_step  # imports torch: only where a workload is built
    from alure.model import UserEncoder  # imports torch: only where a model is built

    with torch.device("meta"):  # shapes only: no memory for a table of millions of rows
        model = UserEncoder(config)
    sparse = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.sparse}
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in sparse)
    world = build_world(config)
    samples: dict[str, list[tuple[int, int]]] = {n: [] for n in sparse}
    negatives: dict[str, list[tuple[int, int]]] = {n: [] for n in sparse}
    for step in range(steps):
        batch = make_batch(world, step, 0, 1, reference_batch)
        for name, counts in table_lookups(replace(batch, negatives=None)).items():
            samples[f"sources.{name}.weight"].append(counts)
        if batch.negatives is not None:
            for name, counts in table_lookups(batch, parts=("negatives",)).items():
                negatives[f"sources.{name}.weight"].append(counts)
    sources = {s.name: s for s in config.sources}
    tables = []
    for name, module in sparse.items():
        source = sources[name.split(".")[1]]
        per_step = negatives_per_step(config, source) * (config.rq_codebooks if name.endswith("codes.weight") else 1)
        tables.append(Table(name=name, rows=module.num_embeddings, dim=module.embedding_dim,
                            lookups_per_sample=float(np.mean([c[0] for c in samples[name]])) / reference_batch,
                            lookups_per_step=float(per_step),
                            distinct_at_reference=float(np.mean([c[1] for c in samples[name]])),
                            negatives_distinct=float(np.mean([c[1] for c in negatives[name]] or [0])),
                            negatives_shared=bool(config.full_softmax or config.shared_negatives)))
    return tables, dense_bytes


def table_lookups(batch, parts: Sequence[str] = ("sequences", "targets", "negatives")) -> dict[str, tuple[int, int]]:
    """Per sparse table of alure's model ('<source>.items', '<source>.codes'): (rows its gradient will get, distinct
    rows), from the batch alone, before any forward pass: the item ids of the sequences, targets and negatives (or of
    the `parts` named), and their RQ codes (one row per level and code)."""
    import torch
    out = {}
    for name, seq in batch.sequences.items():
        groups = {"sequences": {name: seq.items}, "targets": batch.targets, "negatives": batch.negatives}
        chosen = [groups[part][name] for part in parts if groups[part] is not None]
        ids = torch.cat([p.ids.reshape(-1) for p in chosen])
        codes = torch.cat([p.codes for p in chosen])
        levels = codes + torch.arange(codes.shape[1]) * (int(codes.max()) + 1)  # one row per (level, code)
        out[f"{name}.items"] = (int(ids.numel()), _distinct(ids))
        out[f"{name}.codes"] = (int(codes.numel()), _distinct(levels))
    return out


def _distinct(ids) -> int:
    """Distinct values of a non-negative int tensor: a mark per value (ten times faster than a sort: `auto` counts
    them every step)."""
    import torch
    if ids.numel() == 0:
        return 0
    seen = torch.zeros(int(ids.max()) + 1, dtype=torch.bool)
    seen[ids.reshape(-1)] = True
    return int(seen.sum())


@lru_cache(maxsize=8)
def _geometry_cached(config_json: str, reference_batch: int) -> tuple[tuple[Table, ...], int]:
    data = json.loads(config_json)
    data["sources"] = tuple(SourceConfig(**s) for s in data["sources"])
    tables, dense = workload_geometry(WorkloadConfig(**data), reference_batch)
    return tuple(tables), dense


def profile_from_records(records: list[dict], environment: dict | None = None) -> Profile:
    """The Profile of a sweep: its workload from the np=1 points' config, its np=1 step from their phases."""

    base = [r for r in records if r["status"] == "ok" and r["np"] == 1]
    if not base:
        raise UsageError("the sweep has no ok np=1 point: the model's compute comes from np=1; run the sweep with "
                         "np 1 among --nps")
    # Every np=1 point runs the same computation per lookup (Horovod exchanges nothing at np=1, whatever the mode):
    # pool the steps of all of them, scaled to the weak batch, so one point hit by a neighbour's job does not set the
    # compute.
    weak = [r["batch_per_rank"] for r in base if r["point"]["scaling"] == "weak"]
    batches = weak or [r["batch_per_rank"] for r in base]
    batch = max(set(batches), key=batches.count)  # weak's batch: the one weak predictions keep at every P
    point = PointConfig.from_dict(next(r for r in base if r["batch_per_rank"] == batch)["point"])
    config = workload_config(replace(point, scaling="weak", batch_per_rank=batch))
    tables, dense_bytes = _geometry_cached(json.dumps(asdict(config), sort_keys=True, default=list), batch)
    lookups = lambda b: sum(t.lookups(b) for t in tables)  # noqa: E731
    compute, backward, optimizer = [], [], []
    for r in base:
        scale = lookups(batch) / lookups(r["batch_per_rank"])
        phases = r["ranks"][0]["phase_ms"]
        for s in range(len(phases["data"])):
            compute.append(sum(phases[p][s] for p in ("data", "forward", "backward")) * scale)
            backward.append(phases["backward"][s] * scale)
            optimizer.append(phases["optimizer"][s] * scale)
    env = environment or {}
    return Profile(
        preset=point.preset, tables=tables, dense_param_bytes=dense_bytes, group_size=config.group_size,
        reference_batch=batch, compute_ms=float(np.median(compute)), backward_ms=float(np.median(backward)),
        optimizer_ms=float(np.median(optimizer)),
        base_rss_mib=float(np.median([r["metrics"]["peak_rss_mib"] for r in base if r["batch_per_rank"] == batch])),
        measured_cores=int(env.get("cores") or _cores()),
        measured_threads=int(np.median([r.get("threads_per_rank") or 1 for r in base])),
        train_growth_mib=float(np.median([r["metrics"].get("rss_growth_mib") or 0.0 for r in base
                                          if r["batch_per_rank"] == batch])),
        measured_memory_mib=env.get("memory_mib"))


def _cores() -> int:
    return physical_cores()
