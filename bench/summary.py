"""Point records -> the summary table (summary.csv): one row per point, efficiency against np=1."""
from __future__ import annotations

import numpy as np
import pandas as pd

from alure.stages import STAGES
from bench.scaling import PHASES, efficiency

SUMMARY_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10",
                   "step_time_ms_p90", "throughput_samples_per_s", "efficiency", "peak_rss_mib",
                   "exchange_bytes_held", "oversubscribed"]
"""The names DESIGN.md "Results" promises; other parts (notebook, Slurm collect, cost model) rely on them."""
EXTRA_COLUMNS = ["preset", "reason", "rss_growth_mib", "exchange_bytes_sent", "exchange_bytes_received",
                 "rank_skew", "gradient_density", "batch_per_rank", "global_batch", "threads_per_rank",
                 "allgather_calls", "allreduce_calls", "allgather_bytes_held", "allreduce_bytes_held", "hosts",
                 "wall_seconds",
                 *[f"{p}_ms" for p in PHASES],
                 "stage", "graph_strategy", "efficiency_p10", "efficiency_p90", "sendrecv_calls", "memory_probe"]
"""stage: train (step_time_ms is a training step) or refresh, graph, retrieval (step_time_ms is the whole stage,
strong scaling of the preset's users, throughput in users/s); graph_strategy: replicate or ring for the graph
stage. efficiency_p10/p90: the efficiency at the point's p90/p10 time, the np=1 median kept: its noise band."""


def record_row(record: dict) -> dict:
    point = record["point"]
    metrics = record.get("metrics") or {}
    row = {"scaling": point["scaling"], "mode": point["mode"], "np": point["np"], "repeat": point["repeat"],
           "status": record["status"], "oversubscribed": bool(record.get("oversubscribed")),
           "preset": point["preset"], "reason": record.get("reason"),
           "batch_per_rank": record.get("batch_per_rank"), "global_batch": record.get("global_batch"),
           "threads_per_rank": record.get("threads_per_rank"), "hosts": ",".join(record.get("hosts") or []),
           "wall_seconds": record.get("wall_seconds"),
           # Records from before stages existed are training points.
           "stage": point.get("stage", "train"), "graph_strategy": point.get("graph_strategy", ""),
           "memory_probe": metrics.get("memory_probe")}
    for key in ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90", "throughput_samples_per_s",
                "peak_rss_mib", "rss_growth_mib", "exchange_bytes_held", "exchange_bytes_sent",
                "exchange_bytes_received", "rank_skew", "gradient_density", "allgather_calls", "allreduce_calls",
                "allgather_bytes_held", "allreduce_bytes_held", "sendrecv_calls"):
        row[key] = metrics.get(key, np.nan)
    for phase in PHASES:
        row[f"{phase}_ms"] = (metrics.get("phase_ms") or {}).get(phase, np.nan)
    return row


BASELINE_KEY = ["stage", "graph_strategy", "scaling", "mode"]
"""What a point and its np=1 baseline share."""


def add_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Efficiency of each ok point against the median np=1 time of the same stage, strategy, scaling kind and
    mode; and at the point's own p90 and p10 times (its noise band)."""
    df = df.copy()
    for column in ("efficiency", "efficiency_p10", "efficiency_p90"):
        df[column] = np.nan
    ok = df["status"] == "ok"
    base = df[ok & (df["np"] == 1)].groupby(BASELINE_KEY)["step_time_ms"].median()
    for i, row in df[ok].iterrows():
        t1 = base.get(tuple(row[BASELINE_KEY]))
        if t1 is not None and not np.isnan(t1):
            for column, time in (("efficiency", "step_time_ms"), ("efficiency_p10", "step_time_ms_p90"),
                                 ("efficiency_p90", "step_time_ms_p10")):
                df.at[i, column] = efficiency(row["scaling"], t1, row[time], int(row["np"]))
    return df


def summarize(records: list[dict]) -> pd.DataFrame:
    """The summary table: DESIGN's columns first, then the extras, sorted by scaling, mode, np, repeat."""
    df = pd.DataFrame([record_row(r) for r in records], columns=[c for c in SUMMARY_COLUMNS if c != "efficiency"]
                      + EXTRA_COLUMNS)
    df = add_efficiency(df)
    df = df[SUMMARY_COLUMNS + EXTRA_COLUMNS]
    order = df["stage"].map({s: i for i, s in enumerate(STAGES)})
    return df.assign(_order=order).sort_values(["_order", "graph_strategy", "scaling", "mode", "np", "repeat"],
                                               ignore_index=True).drop(columns="_order")
