"""Point records -> the summary table (summary.csv): one row per point, efficiency against np=1."""
from __future__ import annotations

import numpy as np
import pandas as pd

from alure.stages import STAGES
from bench.results.pop import POP_COLUMNS, add_pop
from bench.results.scaling import (
    PHASES,
    bootstrap_step_time,
    efficiency,
    interval,
    pace_phase_means,
    pace_phase_steps,
    paired_efficiency,
)

SUMMARY_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10",
                   "step_time_ms_p90", "throughput_samples_per_s", "efficiency", "peak_rss_mib",
                   "exchange_bytes_held", "oversubscribed"]
"""The names the results layout promises; other parts (notebook, Slurm collect, cost model) rely on them."""
INTERVAL_COLUMNS = ["repeats_ok", "point_step_time_ms", "step_time_ms_ci_low", "step_time_ms_ci_high",
                    "point_efficiency", "efficiency_ci_low", "efficiency_ci_high"]
"""Per point (all ok repeats of one POINT_KEY), on each of its rows: the median over repeats of the step time and
its 95% bootstrap interval, and the efficiency of that median with its interval (docs/figures.md)."""
SETTING_KEY = ["launch_env", "workload_b"]
"""What a sweep's setting B changes (--compare-env, --compare-set): its launch variables and its workload overrides,
each as 'KEY=VALUE ...', empty for setting A."""
BASELINE_KEY = ["stage", "graph_strategy", "scaling", "mode", "preset", "threads_per_rank", "exchange_backend",
                *SETTING_KEY]
"""What a point and the np=1 point it is divided by must share."""
POINT_KEY = [*BASELINE_KEY, "np"]
"""What makes one point: its repeats are the rows that share it (summary intervals, compare, report tables)."""
EXCHANGE_INTERVAL_COLUMNS = ["point_exchange_efficiency", "exchange_efficiency_ci_low", "exchange_efficiency_ci_high"]
"""Per point, on each of its rows: the median over ok repeats of exchange_efficiency and its 95% block-bootstrap
interval (add_exchange_intervals)."""
EXTRA_COLUMNS = ["preset", "reason", "rss_growth_mib", "exchange_bytes_sent", "exchange_bytes_received",
                 "rank_skew", "gradient_density", "batch_per_rank", "global_batch", "threads_per_rank",
                 "allgather_calls", "allreduce_calls", "allgather_bytes_held", "allreduce_bytes_held", "hosts",
                 "wall_seconds",
                 *[f"{p}_ms" for p in PHASES],
                 "stage", "graph_strategy", "efficiency_p10", "efficiency_p90", "sendrecv_calls", "memory_probe",
                 *INTERVAL_COLUMNS, "data_growth_mib", *[f"{p}_mean_ms" for p in PHASES], "link_rate_gbps",
                 "exchange_backend", "launch_env",
                 "corun", "work_ms", "useful_ms_mean", "useful_ms_max", "exchange_ms", "exchange_ideal_ms",
                 "exchange_efficiency", "exchange_model", *POP_COLUMNS, *EXCHANGE_INTERVAL_COLUMNS, "workload_b"]
"""stage: train (step_time_ms is a training step) or refresh, graph, retrieval (step_time_ms is the whole stage,
strong scaling of the preset's users, throughput in users/s); graph_strategy: replicate or ring for the graph
stage. efficiency_p10/p90: the efficiency at the point's p90/p10 time, the np=1 median kept: its noise band.
data_growth_mib: what training (warm-up included) added to the data segment, the quantity --train-mem-limit caps.
corun: a co-run baseline row (its mode reads "corun"). work_ms: the exchange's own work per step outside
exchange_wait; useful_ms_mean/_max: useful time per rank per step (data + forward + backward + optimizer - work_ms),
mean and largest over ranks; exchange_ms: the pace-setting rank's exchange_wait + work_ms; exchange_ideal_ms: its
collectives priced by the collective model named in exchange_model ("uncalibrated: ..." for the built-in defaults);
exchange_efficiency = ideal / exchange_ms (per point with its interval: EXCHANGE_INTERVAL_COLUMNS). The POP factors
and their intervals: bench.results.pop, docs/efficiency.md.
<phase>_mean_ms: the mean over timed steps of the pace-setting rank's phase (bench.results.scaling.pace_phase_means:
they add up to the mean step time, where the <phase>_ms medians do not add up to step_time_ms). link_rate_gbps: the
rate each host's egress was shaped to (tc), for points measured across hosts; empty otherwise.
exchange_backend: horovod or mpi (bench.plan.config.EXCHANGE_BACKENDS; records from before backends existed ran
Horovod). launch_env: the point's variables on top of the suite's launch environment ('VAR=VALUE ...', empty for the
launch environment as it is: a sweep's setting B against A). workload_b: setting B's workload overrides ('KEY=VALUE
...', as --compare-set takes them; empty for the sweep's workload as it is)."""


def setting_text(row) -> str:
    """A summary row's setting B as a person reads it, its launch variables then its workload overrides; '' for
    setting A. `row`: anything with .get (a dict, a pandas row)."""
    return " ".join(v for v in (row.get(k, "") for k in SETTING_KEY) if isinstance(v, str) and v)


def record_row(record: dict) -> dict:
    point = record["point"]
    metrics = record.get("metrics") or {}
    corun = bool(point.get("corun"))
    row = {"scaling": point["scaling"], "mode": "corun" if corun else point["mode"], "np": point["np"],
           "repeat": point["repeat"], "corun": corun,
           "status": record["status"], "oversubscribed": bool(record.get("oversubscribed")),
           "preset": point["preset"], "reason": record.get("reason"),
           "batch_per_rank": record.get("batch_per_rank"), "global_batch": record.get("global_batch"),
           "threads_per_rank": record.get("threads_per_rank") or point.get("threads_per_rank"),
           "hosts": ",".join(record.get("hosts") or []), "wall_seconds": record.get("wall_seconds"),
           # Records from before stages existed are training points.
           "stage": point.get("stage", "train"), "graph_strategy": point.get("graph_strategy", ""),
           "memory_probe": metrics.get("memory_probe"),
           "exchange_backend": point.get("exchange_backend", "horovod"),
           # as --compare-env and --compare-set take them
           **{key: " ".join(f"{k}={v}" for k, v in (point.get(key) or {}).items()) for key in SETTING_KEY}}
    for key in ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90", "throughput_samples_per_s",
                "peak_rss_mib", "rss_growth_mib", "exchange_bytes_held", "exchange_bytes_sent",
                "exchange_bytes_received", "rank_skew", "gradient_density", "allgather_calls", "allreduce_calls",
                "allgather_bytes_held", "allreduce_bytes_held", "sendrecv_calls", "data_growth_mib", "work_ms",
                "useful_ms_mean", "useful_ms_max", "exchange_ms", "exchange_ideal_ms", "exchange_efficiency"):
        value = metrics.get(key)
        row[key] = np.nan if value is None else value
    model = metrics.get("exchange_model")
    row["exchange_model"] = (f"{model['source']}{', ' + model['created'] if model.get('created') else ''}"
                             if model else None)
    for phase in PHASES:
        row[f"{phase}_ms"] = (metrics.get("phase_ms") or {}).get(phase, np.nan)
    ranks = record.get("ranks") or []
    means = pace_phase_means(ranks) if ranks and all(r.get("phase_ms") and r.get("step_time_ms") for r in ranks) \
        else {}
    for phase in PHASES:
        row[f"{phase}_mean_ms"] = means.get(phase, np.nan)
    row["link_rate_gbps"] = (record.get("link") or {}).get("rate_gbps", np.nan)
    return row


def add_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Efficiency of each ok point against the median np=1 time of the same stage, strategy, scaling kind, mode,
    preset, threads per rank, exchange backend and launch setting (never against a baseline run another way); and at
    the point's own p90 and p10 times (its noise band)."""
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


def add_intervals(df: pd.DataFrame, steps: list, seed: int = 0) -> pd.DataFrame:
    """The INTERVAL_COLUMNS of every ok point. `steps[i]` is row i's per-step times (slowest rank). Step times by a
    block bootstrap over the point's repeats, efficiencies paired by round with the np=1 point
    (bench.results.scaling). The bootstrap is seeded, so a report rebuilt from the same records shows the same
    intervals."""
    df = df.copy()
    for column in INTERVAL_COLUMNS:
        df[column] = np.nan
    ok = (df["status"] == "ok") & np.array([bool(s) for s in steps], dtype=bool)
    rng = np.random.default_rng(seed)
    points = {point: rows for point, rows in df[ok].groupby(POINT_KEY, dropna=False)}
    runs = {point: {int(r): steps[i] for i, r in rows["repeat"].items()} for point, rows in points.items()}
    for point, rows in points.items():
        median = float(rows["step_time_ms"].median())
        df.loc[rows.index, ["repeats_ok", "point_step_time_ms", "step_time_ms_ci_low", "step_time_ms_ci_high"]] = \
            [len(rows), median, *interval(bootstrap_step_time(list(runs[point].values()), rng))]
        baseline = (*point[:-1], 1)
        if baseline in points:
            scaling, np_ = point[POINT_KEY.index("scaling")], int(point[-1])
            t1 = float(points[baseline]["step_time_ms"].median())
            df.loc[rows.index, ["point_efficiency", "efficiency_ci_low", "efficiency_ci_high"]] = \
                [efficiency(scaling, t1, median, np_),
                 *interval(paired_efficiency(scaling, runs[baseline], runs[point], np_, rng))]
    return df


def exchange_efficiency_steps(record: dict) -> list[float]:
    """A priced record's exchange_efficiency per timed step: its ideal over the pace-setting rank's exchange_wait +
    work_ms in that step (the record's own figure is the ideal over the median of the latter); empty where the
    record has no priced exchange or no per-step work_ms."""
    metrics = record.get("metrics") or {}
    ideal, ranks = metrics.get("exchange_ideal_ms"), record.get("ranks") or []
    if record.get("status") != "ok" or metrics.get("exchange_efficiency") is None or not ideal or not ranks \
            or not all("work_ms" in r and r.get("phase_ms") for r in ranks):
        return []
    pace = pace_phase_steps(ranks, extra=("work_ms",))
    exchange_ms = pace["exchange_wait"] + pace["work_ms"]
    return [ideal / ms for ms in exchange_ms if ms > 0]


def add_exchange_intervals(df: pd.DataFrame, records: list[dict], seed: int = 0) -> pd.DataFrame:
    """EXCHANGE_INTERVAL_COLUMNS of every point with a priced exchange (records[i] is row i's record): the median
    over its ok repeats of exchange_efficiency, and the interval of that median by the block bootstrap of the step
    times (bench.results.scaling.bootstrap_step_time: whole repeats resampled; one repeat, moving blocks of its
    steps) over each repeat's per-step efficiencies. Seeded, like the other intervals."""
    df = df.copy()
    for column in EXCHANGE_INTERVAL_COLUMNS:
        df[column] = np.nan
    steps = [exchange_efficiency_steps(r) for r in records]
    priced = np.array([bool(s) for s in steps], dtype=bool)
    rng = np.random.default_rng(seed)
    for _, rows in df[priced].groupby(POINT_KEY, dropna=False):
        draws = bootstrap_step_time([steps[i] for i in rows.index], rng)
        df.loc[rows.index, EXCHANGE_INTERVAL_COLUMNS] = [float(rows["exchange_efficiency"].median()),
                                                        *interval(draws)]
    return df


def summarize(records: list[dict]) -> pd.DataFrame:
    """The summary table: the columns docs/design.md names first, then the extras, sorted by scaling, mode, np, repeat."""
    df = pd.DataFrame([record_row(r) for r in records], columns=[c for c in SUMMARY_COLUMNS if c != "efficiency"]
                      + [c for c in EXTRA_COLUMNS if c not in INTERVAL_COLUMNS])
    df = add_efficiency(df)
    df = add_intervals(df, [r.get("step_time_ms_slowest_rank") or [] for r in records])
    df = add_pop(df, records, BASELINE_KEY)
    df = add_exchange_intervals(df, records)
    df = df[SUMMARY_COLUMNS + EXTRA_COLUMNS]
    order = df["stage"].map({s: i for i, s in enumerate(STAGES)})
    return df.assign(_order=order).sort_values(["_order", "graph_strategy", "scaling", "mode", "np", "repeat"],
                                               ignore_index=True).drop(columns="_order")
