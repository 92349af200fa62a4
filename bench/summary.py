"""Point records -> the summary table (summary.csv): one row per point, efficiency against np=1."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.scaling import PHASES, bootstrap_step_time, efficiency, interval

SUMMARY_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10",
                   "step_time_ms_p90", "throughput_samples_per_s", "efficiency", "peak_rss_mib",
                   "exchange_bytes_held", "oversubscribed"]
"""The names the results layout promises; other parts (notebook, Slurm collect, cost model) rely on them."""
INTERVAL_COLUMNS = ["repeats_ok", "point_step_time_ms", "step_time_ms_ci_low", "step_time_ms_ci_high",
                    "point_efficiency", "efficiency_ci_low", "efficiency_ci_high"]
"""Per point (all ok repeats of one scaling, mode, np, preset and threads), on each of its rows: the median over
repeats of the step time and its 95% bootstrap interval, and the efficiency of that median with its interval."""
BASELINE_KEY = ["scaling", "mode", "preset", "threads_per_rank"]
"""What a point and the np=1 point it is divided by must share (and the stage, where records have one)."""
EXTRA_COLUMNS = ["preset", "reason", "rss_growth_mib", "exchange_bytes_sent", "exchange_bytes_received",
                 "rank_skew", "gradient_density", "batch_per_rank", "global_batch", "threads_per_rank",
                 "allgather_calls", "allreduce_calls", "allgather_bytes_held", "allreduce_bytes_held", "hosts",
                 "wall_seconds",
                 *[f"{p}_ms" for p in PHASES], *INTERVAL_COLUMNS]


def record_row(record: dict) -> dict:
    point = record["point"]
    metrics = record.get("metrics") or {}
    row = {"scaling": point["scaling"], "mode": point["mode"], "np": point["np"], "repeat": point["repeat"],
           "status": record["status"], "oversubscribed": bool(record.get("oversubscribed")),
           "preset": point["preset"], "reason": record.get("reason"),
           "batch_per_rank": record.get("batch_per_rank"), "global_batch": record.get("global_batch"),
           "threads_per_rank": record.get("threads_per_rank") or point.get("threads_per_rank"),
           "hosts": ",".join(record.get("hosts") or []), "wall_seconds": record.get("wall_seconds")}
    for key in ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90", "throughput_samples_per_s",
                "peak_rss_mib", "rss_growth_mib", "exchange_bytes_held", "exchange_bytes_sent",
                "exchange_bytes_received", "rank_skew", "gradient_density", "allgather_calls", "allreduce_calls",
                "allgather_bytes_held", "allreduce_bytes_held"):
        row[key] = metrics.get(key, np.nan)
    for phase in PHASES:
        row[f"{phase}_ms"] = (metrics.get("phase_ms") or {}).get(phase, np.nan)
    return row


def baseline_key(df: pd.DataFrame) -> list[str]:
    return BASELINE_KEY + (["stage"] if "stage" in df.columns else [])


def add_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Efficiency of each ok point against the median np=1 step time of the same scaling kind, mode, preset and
    threads per rank (never against a baseline run another way)."""
    df = df.copy()
    df["efficiency"] = np.nan
    ok = df["status"] == "ok"
    key = baseline_key(df)
    base = df[ok & (df["np"] == 1)].groupby(key)["step_time_ms"].median()
    for i, row in df[ok].iterrows():
        t1 = base.get(tuple(row[key]))
        if t1 is not None and not np.isnan(t1):
            df.at[i, "efficiency"] = efficiency(row["scaling"], t1, row["step_time_ms"], int(row["np"]))
    return df


def add_intervals(df: pd.DataFrame, steps: list, seed: int = 0) -> pd.DataFrame:
    """The INTERVAL_COLUMNS of every ok point. `steps[i]` is row i's per-step times (slowest rank). The bootstrap is
    seeded, so a report rebuilt from the same records shows the same intervals."""
    df = df.copy()
    for column in INTERVAL_COLUMNS:
        df[column] = np.nan
    ok = (df["status"] == "ok") & np.array([bool(s) for s in steps], dtype=bool)
    key = baseline_key(df)
    rng = np.random.default_rng(seed)
    points = {point: rows for point, rows in df[ok].groupby(key + ["np"])}
    draws = {point: bootstrap_step_time([steps[i] for i in rows.index], rng) for point, rows in points.items()}
    for point, rows in points.items():
        median = float(rows["step_time_ms"].median())
        df.loc[rows.index, ["repeats_ok", "point_step_time_ms", "step_time_ms_ci_low", "step_time_ms_ci_high"]] = \
            [len(rows), median, *interval(draws[point])]
        baseline = (*point[:-1], 1)
        if baseline in points:
            scaling, np_ = point[0], int(point[-1])
            t1 = float(points[baseline]["step_time_ms"].median())
            df.loc[rows.index, ["point_efficiency", "efficiency_ci_low", "efficiency_ci_high"]] = \
                [efficiency(scaling, t1, median, np_), *interval(efficiency(scaling, draws[baseline], draws[point],
                                                                             np_))]
    return df


def summarize(records: list[dict]) -> pd.DataFrame:
    """The summary table: DESIGN's columns first, then the extras, sorted by scaling, mode, np, repeat."""
    df = pd.DataFrame([record_row(r) for r in records], columns=[c for c in SUMMARY_COLUMNS if c != "efficiency"]
                      + [c for c in EXTRA_COLUMNS if c not in INTERVAL_COLUMNS])
    df = add_efficiency(df)
    df = add_intervals(df, [r.get("step_time_ms_slowest_rank") or [] for r in records])
    df = df[SUMMARY_COLUMNS + EXTRA_COLUMNS]
    return df.sort_values(["scaling", "mode", "np", "repeat"], ignore_index=True)
