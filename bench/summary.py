"""Point records -> the summary table (summary.csv): one row per point, efficiency against np=1."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.scaling import PHASES, efficiency

SUMMARY_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10",
                   "step_time_ms_p90", "throughput_samples_per_s", "efficiency", "peak_rss_mib",
                   "exchange_bytes_held", "oversubscribed"]
"""The names DESIGN.md "Results" promises; other parts (notebook, Slurm collect, cost model) rely on them."""
EXTRA_COLUMNS = ["preset", "reason", "rss_growth_mib", "exchange_bytes_sent", "exchange_bytes_received",
                 "rank_skew", "gradient_density", "batch_per_rank", "global_batch", "threads_per_rank",
                 "allgather_calls", "allreduce_calls", "allgather_bytes_held", "allreduce_bytes_held", "hosts",
                 "wall_seconds",
                 *[f"{p}_ms" for p in PHASES]]


def record_row(record: dict) -> dict:
    point = record["point"]
    metrics = record.get("metrics") or {}
    row = {"scaling": point["scaling"], "mode": point["mode"], "np": point["np"], "repeat": point["repeat"],
           "status": record["status"], "oversubscribed": bool(record.get("oversubscribed")),
           "preset": point["preset"], "reason": record.get("reason"),
           "batch_per_rank": record.get("batch_per_rank"), "global_batch": record.get("global_batch"),
           "threads_per_rank": record.get("threads_per_rank"), "hosts": ",".join(record.get("hosts") or []),
           "wall_seconds": record.get("wall_seconds")}
    for key in ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90", "throughput_samples_per_s",
                "peak_rss_mib", "rss_growth_mib", "exchange_bytes_held", "exchange_bytes_sent",
                "exchange_bytes_received", "rank_skew", "gradient_density", "allgather_calls", "allreduce_calls",
                "allgather_bytes_held", "allreduce_bytes_held"):
        row[key] = metrics.get(key, np.nan)
    for phase in PHASES:
        row[f"{phase}_ms"] = (metrics.get("phase_ms") or {}).get(phase, np.nan)
    return row


def add_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Efficiency of each ok point against the median np=1 step time of the same scaling kind and mode."""
    df = df.copy()
    df["efficiency"] = np.nan
    ok = df["status"] == "ok"
    base = df[ok & (df["np"] == 1)].groupby(["scaling", "mode"])["step_time_ms"].median()
    for i, row in df[ok].iterrows():
        t1 = base.get((row["scaling"], row["mode"]))
        if t1 is not None and not np.isnan(t1):
            df.at[i, "efficiency"] = efficiency(row["scaling"], t1, row["step_time_ms"], int(row["np"]))
    return df


def summarize(records: list[dict]) -> pd.DataFrame:
    """The summary table: DESIGN's columns first, then the extras, sorted by scaling, mode, np, repeat."""
    df = pd.DataFrame([record_row(r) for r in records], columns=[c for c in SUMMARY_COLUMNS if c != "efficiency"]
                      + EXTRA_COLUMNS)
    df = add_efficiency(df)
    df = df[SUMMARY_COLUMNS + EXTRA_COLUMNS]
    return df.sort_values(["scaling", "mode", "np", "repeat"], ignore_index=True)
