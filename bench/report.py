"""A sweep folder's derived files: summary.csv, report.md and the plots, rebuilt from the point records alone."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.plots import breakdown_plot, efficiency_plot, memory_plot
from bench.results import atomic_write_text, load

TABLE_COLUMNS = ["scaling", "mode", "np", "repeat", "status", "step_time_ms", "step_time_ms_p10", "step_time_ms_p90",
                 "efficiency", "throughput_samples_per_s", "peak_rss_mib", "exchange_bytes_held"]


def efficiency_table(df: pd.DataFrame) -> str:
    """The table a person reads at the end of a sweep; oversubscribed np marked *, failures with their reason."""
    t = df.copy()
    t["np"] = [f"{n}{'*' if o else ''}" for n, o in zip(t["np"], t["oversubscribed"])]
    t["exchange_bytes_held"] = t["exchange_bytes_held"].map(_mib)
    t = t.rename(columns={"exchange_bytes_held": "exchange_held_mib"})
    cols = [c if c != "exchange_bytes_held" else "exchange_held_mib" for c in TABLE_COLUMNS]
    text = t[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}",
                             na_rep="-")
    notes = []
    if df["oversubscribed"].any():
        notes.append("* oversubscribed: more ranks than cores; timings include time-sharing of cores")
    for _, row in df[df["status"] != "ok"].iterrows():
        notes.append(f"{row['scaling']} {row['mode']} np={row['np']} r{row['repeat']}: {row['status']}: "
                     f"{row['reason']}")
    return text + ("\n" + "\n".join(notes) if notes else "")


def _mib(v) -> float:
    return v / 2**20


def write_report(sweep_dir: str | Path) -> pd.DataFrame:
    """Rebuild summary.csv, report.md and the PNGs of a sweep folder; return the summary table."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    atomic_write_text(sweep_dir / "summary.csv", df.to_csv(index=False))
    efficiency_plot(df, sweep_dir / "efficiency.png")
    breakdown_plot(df, sweep_dir / "breakdown.png")
    memory_plot(df, sweep_dir / "memory.png")
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
             "```", efficiency_table(df), "```", "",
             "![efficiency](efficiency.png)", "", "![breakdown](breakdown.png)", "", "![memory](memory.png)", ""]
    atomic_write_text(sweep_dir / "report.md", "\n".join(lines))
    return df
