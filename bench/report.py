"""A sweep folder's derived files: summary.csv, report.md and the plots, rebuilt from the point records alone."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.plots import breakdown_plot, efficiency_plot, memory_plot, stage_label, stages_plot
from bench.results import atomic_write_text, load

TABLE_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10", "step_time_ms_p90",
                 "efficiency", "throughput_samples_per_s", "peak_rss_mib", "exchange_bytes_held"]


def efficiency_table(df: pd.DataFrame) -> str:
    """The table a person reads at the end of a sweep; oversubscribed np marked *, failures with their reason.
    Points of stages other than train follow in a table of their own."""
    train, stages = df[df["stage"] == "train"], df[df["stage"] != "train"]
    tables = ([_train_table(train)] if not train.empty else []) + ([stage_table(stages)] if not stages.empty else [])
    notes = []
    if df["oversubscribed"].any():
        notes.append("* oversubscribed: more ranks than cores; timings include time-sharing of cores")
    for _, row in df[df["status"] != "ok"].iterrows():
        what = f"{row['scaling']} {row['mode']}" if row["stage"] == "train" else \
            stage_label(row["stage"], row["graph_strategy"])
        notes.append(f"{what} np={row['np']} r{row['repeat']}: {row['status']}: {row['reason']}")
    return "\n\n".join(tables) + ("\n" + "\n".join(notes) if notes else "")


def _with_np_marks(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(np=[f"{n}{'*' if o else ''}" for n, o in zip(df["np"], df["oversubscribed"])])


def _numbers(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def _train_table(df: pd.DataFrame) -> str:
    t = _with_np_marks(df)
    t["exchange_bytes_held"] = t["exchange_bytes_held"].map(_mib)
    t = t.rename(columns={"exchange_bytes_held": "exchange_held_mib"})
    cols = [c if c != "exchange_bytes_held" else "exchange_held_mib" for c in TABLE_COLUMNS]
    return t[cols].to_string(index=False, float_format=_numbers, na_rep="-")


STAGE_COLUMNS = ["stage", "np", "repeat", "status", "stage_ms", "stage_ms_p10", "stage_ms_p90", "efficiency",
                 "efficiency_p10", "efficiency_p90", "stage_peak_mib", "sent_mib", "received_mib"]


def stage_table(df: pd.DataFrame) -> str:
    """Points of refresh, graph and retrieval: the whole stage's time, strong efficiency with its band, the
    stage's own peak memory per rank and what its collectives moved per rank."""
    t = _with_np_marks(df)
    t["stage"] = [stage_label(s, g) for s, g in zip(t["stage"], t["graph_strategy"])]
    t = t.rename(columns={"step_time_ms": "stage_ms", "step_time_ms_p10": "stage_ms_p10",
                          "step_time_ms_p90": "stage_ms_p90", "rss_growth_mib": "stage_peak_mib"})
    t["sent_mib"] = t["exchange_bytes_sent"].map(_mib)
    t["received_mib"] = t["exchange_bytes_received"].map(_mib)
    return t[STAGE_COLUMNS].to_string(index=False, float_format=_numbers, na_rep="-")


STAGES_TEXT = ("Stages refresh, graph and retrieval: the whole stage over the preset's users, strong scaling (the "
               "users split over the ranks); stage_ms is the median over timed repetitions of the slowest rank's "
               "time (p10/p90 band), efficiency T1/(P TP) against np=1 of the same stage and graph strategy, with "
               "its band at the p90/p10 time; stage_peak_mib: the largest rank's resident high-water mark during "
               "the stage above its resident set when the stage began; sent/received: what the stage's "
               "collectives and ring transfers moved per rank.")


def _mib(v) -> float:
    return v / 2**20


def write_report(sweep_dir: str | Path) -> pd.DataFrame:
    """Rebuild summary.csv, report.md and the PNGs of a sweep folder; return the summary table."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    atomic_write_text(sweep_dir / "summary.csv", df.to_csv(index=False))
    train = df[df["stage"] == "train"]
    efficiency_plot(train, sweep_dir / "efficiency.png")
    breakdown_plot(train, sweep_dir / "breakdown.png")
    memory_plot(train, sweep_dir / "memory.png")
    has_stages = (df["stage"] != "train").any()
    if has_stages:
        stages_plot(df, sweep_dir / "stages.png")
    env_path = sweep_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
             f"{env.get('memory_mib', '?')} MiB; torch {env.get('torch', '?')}, "
             f"Horovod {env.get('horovod', {}).get('version', '?')}; "
             f"{env.get('mpi', {}).get('library', '?')}; commit {(env.get('git') or {}).get('commit') or '?'}"
             f"{' (dirty)' if (env.get('git') or {}).get('dirty') else ''}.", "",
             "Step time: median over timed steps of the slowest rank's step (p10/p90 band); efficiency against "
             "np=1 of the same mode (weak T1/TP, strong T1/(P TP)); exchange held: bytes of the gradient "
             "exchange results each rank holds per step.", "",
             *([STAGES_TEXT, ""] if has_stages else []),
             "```", efficiency_table(df), "```", "",
             "![efficiency](efficiency.png)", "", "![breakdown](breakdown.png)", "", "![memory](memory.png)", "",
             *(["![stages](stages.png)", ""] if has_stages else [])]
    atomic_write_text(sweep_dir / "report.md", "\n".join(lines))
    return df
