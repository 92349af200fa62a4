"""The alure workload a point trains: its preset with the point's overrides, seed and per-rank batch. The sweep
checks a plan with it before launching, the rank programs build their shard from it, the capacity check and the
cost model size a rank from it: one definition beside the configs, imported by all of them."""
from __future__ import annotations

from dataclasses import replace

from alure.config import preset
from bench.errors import UsageError
from bench.plan.config import PointConfig


def batch_sizes(point: PointConfig, preset_batch: int) -> tuple[int, int]:
    """(per-rank, global) batch: weak keeps the per-rank batch, strong the global one."""
    if point.scaling == "weak":
        per_rank = point.batch_per_rank or preset_batch
        return per_rank, per_rank * point.np
    global_batch = point.global_batch or preset_batch
    if global_batch % point.np:
        raise UsageError(f"global batch {global_batch} does not split over {point.np} ranks: choose a global "
                         f"batch divisible by every np")
    return global_batch // point.np, global_batch


def preset_batch(point: PointConfig) -> int:
    """The batch size of the point's preset (what batch_per_rank/global_batch = 0 stand for)."""
    return preset(point.preset).batch_size


def workload_config(point: PointConfig):
    """The alure config this point trains: its preset, its overrides (setting B's on top), its seed and per-rank
    batch."""
    base = preset(point.preset)
    # A stage other than train covers every user whatever the ranks: it keeps the preset's batch.
    per_rank = batch_sizes(point, base.batch_size)[0] if point.stage == "train" else base.batch_size
    return replace(base, **{**point.workload, **point.workload_b, "seed": point.seed, "batch_size": per_rank})
