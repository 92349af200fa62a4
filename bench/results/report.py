"""A sweep folder's derived files: summary.csv, report.md and the plots, rebuilt from the point records alone."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.host import np_label
from bench.plan.config import stage_label
from bench.results.backends import BACKENDS_TEXT, backend_table, format_backends
from bench.results.plots import breakdown_plot, efficiency_plot, memory_plot, stages_plot
from bench.results.pop import FACTORS
from bench.results.pop_plot import pop_plot
from bench.results.ranking import RANKING_TEXT, mode_ranking
from bench.results.records import atomic_write_text, load, read_records
from bench.results.summary import EXCHANGE_INTERVAL_COLUMNS, POINT_KEY, SETTING_KEY


def point_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per point (bench.results.summary.POINT_KEY, showing scaling, mode and np, and the key's other
    columns where a folder mixes them): its ok repeats, the median step time over them with its 95% interval, the
    efficiency of that median with its interval, and the medians of throughput, peak memory and bytes held."""
    mixed = [c for c in POINT_KEY if c not in ("scaling", "mode", "np") and df[c].nunique(dropna=False) > 1]
    shown = ["scaling", "mode", "np", *mixed]
    rows = []
    # The key's constant columns leave the grouping as it is: grouping by `shown` is grouping by POINT_KEY.
    for key, g in df.groupby(shown, sort=True, dropna=False):
        ok = g[g["status"] == "ok"]
        first = ok.iloc[0] if not ok.empty else g.iloc[0]
        rows.append({**dict(zip(shown, key)), "oversubscribed": bool(g["oversubscribed"].any()),
                     "ok": f"{len(ok)}/{len(g)}", "step_time_ms": first["point_step_time_ms"],
                     "step_ci_low": first["step_time_ms_ci_low"], "step_ci_high": first["step_time_ms_ci_high"],
                     "efficiency": first["point_efficiency"], "eff_ci_low": first["efficiency_ci_low"],
                     "eff_ci_high": first["efficiency_ci_high"],
                     "throughput_samples_per_s": ok["throughput_samples_per_s"].median(),
                     "peak_rss_mib": ok["peak_rss_mib"].median(),
                     "exchange_held_mib": _mib(ok["exchange_bytes_held"].median())})
    return pd.DataFrame(rows)


def efficiency_table(df: pd.DataFrame) -> str:
    """The table a person reads at the end of a sweep: one row per training point with the 95% intervals of its
    step time and efficiency, then the points of the other stages in a table of their own; oversubscribed np marked
    *, failures with their reason."""
    train, stages = df[df["stage"] == "train"], df[df["stage"] != "train"]
    tables, notes = [], []
    if not train.empty:
        tables.append(_train_table(train))
        notes.append("step_time_ms and efficiency: median over the ok repeats [95% bootstrap interval]")
        if (train.loc[train["status"] == "ok", "repeats_ok"] == 1).any():
            notes.append("a point with one ok repeat has an interval of its steps' noise only, not of the noise "
                         "between runs: use --repeats 8 for figures to quote")
    if not stages.empty:
        tables.append(stage_table(stages))
    if not tables:
        return "no points"
    if df["corun"].any():
        notes.append("mode corun: the co-run baseline, P independent np=1 trainings run at once with no exchange "
                     "(docs/efficiency.md); it has no efficiency of its own")
    if df["oversubscribed"].any():
        notes.append("* oversubscribed: more ranks than cores; timings include time-sharing of cores")
    for _, row in df[df["status"] != "ok"].iterrows():
        what = f"{row['scaling']} {row['mode']}" if row["stage"] == "train" else \
            stage_label(row["stage"], row["graph_strategy"])
        notes.append(f"{what} np={row['np']} r{row['repeat']}: {row['status']}: {row['reason']}")
    return "\n\n".join(tables) + "\n" + "\n".join(notes)


def _train_table(df: pd.DataFrame) -> str:
    t = point_table(df)
    t["np"] = [np_label(n, o) for n, o in zip(t["np"], t["oversubscribed"])]
    t["step_time_ms"] = [_with_interval(v, lo, hi, "{:.1f}") for v, lo, hi in
                         zip(t["step_time_ms"], t["step_ci_low"], t["step_ci_high"])]
    t["efficiency"] = [_with_interval(v, lo, hi, "{:.2f}") for v, lo, hi in
                       zip(t["efficiency"], t["eff_ci_low"], t["eff_ci_high"])]
    t = t.drop(columns=["oversubscribed", "step_ci_low", "step_ci_high", "eff_ci_low", "eff_ci_high"])
    return t.to_string(index=False, float_format=_numbers, na_rep="-")


def _with_interval(value, low, high, fmt: str) -> str:
    if pd.isna(value):
        return "-"
    return fmt.format(value) + (f" [{fmt.format(low)}, {fmt.format(high)}]" if not pd.isna(low) else "")


def _with_np_marks(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(np=[np_label(n, o) for n, o in zip(df["np"], df["oversubscribed"])])


def _numbers(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


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
    # A folder's exchange backends and launch settings are told apart, as in the training table (point_table).
    mixed = [c for c in ("exchange_backend", *SETTING_KEY) if t[c].nunique(dropna=False) > 1]
    t = t.sort_values(["stage", *mixed, "np", "repeat"], kind="stable")
    columns = [*STAGE_COLUMNS[:1], *mixed, *STAGE_COLUMNS[1:]]
    return t[columns].to_string(index=False, float_format=_numbers, na_rep="-")


STAGES_TEXT = ("Stages refresh, graph and retrieval: the whole stage over the preset's users, strong scaling (the "
               "users split over the ranks); stage_ms is the median over timed repetitions of the slowest rank's "
               "time (p10/p90 band), efficiency T1/(P TP) against np=1 of the same stage and graph strategy, with "
               "its band at the p90/p10 time; stage_peak_mib: the largest rank's resident high-water mark during "
               "the stage above its resident set when the stage began; sent/received: what the stage's "
               "collectives and ring transfers moved per rank.")


POP_TEXT = ("Where efficiency goes (docs/efficiency.md): efficiency = corun_share x load_balance x "
            "communication_efficiency x computational_scaling, each per point (median over ok repeats) with its 95% "
            "bootstrap interval. corun_share: the lone np=1 step time against a rank of P independent np=1 "
            "processes run together (the co-run baseline); load_balance: mean / max useful time over ranks; "
            "communication_efficiency: max useful time / step time; computational_scaling: co-run useful time / "
            "mean useful time at P. Useful time = data + forward + backward + optimizer - work_ms (the exchange's own "
            "work). exchange_ms: exchange wait + work_ms of the pace-setting rank; exchange_ideal_ms: the collectives "
            "its counters saw, priced with the collective model below; exchange_eff = ideal / exchange_ms, median over ok "
            "repeats [95% block-bootstrap interval over each repeat's per-step ideal / exchange_ms].")


def pop_table(df: pd.DataFrame) -> str | None:
    """One row per training point with factors or a priced exchange: the four factors [95% interval] and the
    exchange's ideal against its measured time; None where no point has either."""
    ok = df[(df["status"] == "ok") & (df["stage"] == "train") & ~df["corun"].astype(bool)]
    ok = ok[ok["point_load_balance"].notna() | ok["exchange_ideal_ms"].notna()]
    if ok.empty:
        return None
    columns = ["oversubscribed", "point_efficiency", "exchange_ms", "exchange_ideal_ms", "exchange_efficiency",
               *EXCHANGE_INTERVAL_COLUMNS, *[c for f in FACTORS for c in (f"point_{f}", f"{f}_ci_low", f"{f}_ci_high")]]
    medians = ["exchange_ms", "exchange_ideal_ms", "exchange_efficiency"]
    t = ok.groupby(POINT_KEY).agg({c: "median" if c in medians else "first" for c in columns}).reset_index()
    out = _with_np_marks(t)[POINT_KEY + ["point_efficiency"]].rename(columns={"point_efficiency": "efficiency"})
    for factor in FACTORS:
        out[factor] = [_with_interval(v, lo, hi, "{:.2f}") for v, lo, hi in
                       zip(t[f"point_{factor}"], t[f"{factor}_ci_low"], t[f"{factor}_ci_high"])]
    out["exchange_ms"], out["exchange_ideal_ms"] = t["exchange_ms"], t["exchange_ideal_ms"]
    out["exchange_eff"] = [_with_interval(v, lo, hi, "{:.2f}") for v, lo, hi in
                           zip(t["point_exchange_efficiency"], t["exchange_efficiency_ci_low"],
                               t["exchange_efficiency_ci_high"])]
    return out.to_string(index=False, float_format=_numbers, na_rep="-")


def collective_models(df: pd.DataFrame) -> list[str]:
    """What priced the points' exchanges: each collective model named once."""
    return sorted(set(df["exchange_model"].dropna()))


def _mib(v) -> float:
    return v / 2**20


def _threads(df: pd.DataFrame) -> str:
    threads = sorted({int(t) for t in df["threads_per_rank"].dropna()})
    return "here " + " and ".join(map(str, threads)) + (" thread" if threads == [1] else " threads") + " per rank" \
        if threads else "none recorded"


def _order(sweep_dir: Path) -> str:
    path = sweep_dir / "sweep.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if config.get("interleave", False):
        return "ran interleaved: round r measured every point once, in a seeded shuffled order"
    return "ran back to back, point by point" if config else "ran in an unrecorded order"


def auto_costs_note(records: list[dict]) -> str | None:
    """What the sweep's auto points decided with (bench.model.calibration_store.costs_origin), said plainly where
    any ran on the built-in costs (uncalibrated) or does not say; None without auto points."""
    auto = [r for r in records if r["point"]["mode"] == "auto" and r["status"] == "ok"]
    if not auto:
        return None
    origins = [r.get("auto_costs") or {} for r in auto]
    builtin = sum(o.get("kind") == "built-in" for o in origins)
    unsaid = sum(not o for o in origins)
    used = sorted({f"{o['kind']} {o.get('path')} of {o.get('created') or 'no recorded date'}"
                   for o in origins if o and o.get("kind") != "built-in"})
    parts = []
    if builtin:
        parts.append(f"**auto ran uncalibrated** in {builtin} of {len(auto)} auto records: it decided with the "
                     f"built-in DEFAULT_COSTS (run `alure-bench calibrate` on the host first)")
    if unsaid:
        parts.append(f"{unsaid} of {len(auto)} auto records do not say what costs they decided with (recorded "
                     f"before records named them)")
    if used:
        parts.append("auto decided with: " + "; ".join(used))
    return "Auto's costs: " + ". ".join(parts) + "."


def write_report(sweep_dir: str | Path) -> pd.DataFrame:
    """Rebuild summary.csv, report.md and the PNGs of a sweep folder; return the summary table."""
    sweep_dir = Path(sweep_dir)
    df = load(sweep_dir)
    atomic_write_text(sweep_dir / "summary.csv", df.to_csv(index=False))
    train = df[(df["stage"] == "train") & ~df["corun"].astype(bool)]  # the co-run baseline has its own plot
    efficiency_plot(train, sweep_dir / "efficiency.png")
    breakdown_plot(train, sweep_dir / "breakdown.png")
    memory_plot(train, sweep_dir / "memory.png")
    has_stages = (df["stage"] != "train").any()
    if has_stages:
        stages_plot(df, sweep_dir / "stages.png")
    has_pop = pop_plot(df, sweep_dir / "pop.png")
    pop = pop_table(df)
    records = read_records(sweep_dir)  # auto's costs and the backend table read them; read once
    env_path = sweep_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"Machine: {env.get('cpu_model', '?')}, {env.get('cores', '?')} cores, "
             f"{env.get('memory_mib', '?')} MiB; torch {env.get('torch', '?')}, "
             f"Horovod {env.get('horovod', {}).get('version', '?')}; "
             f"{env.get('mpi', {}).get('library', '?')}; commit {(env.get('git') or {}).get('commit') or '?'}"
             f"{' (dirty)' if (env.get('git') or {}).get('dirty') else ''}.", "",
             "Step time: per repeat, the median over timed steps of the slowest rank's step; per point, the median "
             "over its repeats, with a 95% block-bootstrap confidence interval (whole repeats resampled: steps of "
             "one run are correlated, repeats are the independent units; docs/figures.md). Efficiency (weak "
             "T1/TP, strong T1/(P TP)) divides a point only by the np=1 point of the same scaling, mode, exchange backend, launch setting, preset and "
             "torch threads per rank "
             f"({_threads(df)}); its interval resamples rounds, taking np=1 and np=P from the same rounds. Repeats "
             f"{_order(sweep_dir)}. Exchange held: bytes of the gradient exchange results each rank holds per step. "
             "Every repeat's figures are in summary.csv.", "",
             *([STAGES_TEXT, ""] if has_stages else []),
             *([note, ""] if (note := auto_costs_note(records)) else []),
             "```", efficiency_table(df), "```", "",
             *([RANKING_TEXT, "", "```", *ranking, "```", ""] if (ranking := mode_ranking(df)) else []),
             "![efficiency](efficiency.png)", "", "![breakdown](breakdown.png)", "", "![memory](memory.png)", "",
             *(["![stages](stages.png)", ""] if has_stages else []),
             *(["## Where efficiency goes", "", POP_TEXT, "",
                "Collective model: " + ("; ".join(collective_models(df)) or "none (no multi-rank point)") + ".", "",
                "```", pop, "```", ""] if pop else []),
             *(["![efficiency breakdown](pop.png)", ""] if has_pop else []),
             *(["## Horovod against raw MPI", "", BACKENDS_TEXT, "", "```", format_backends(backends), "```", ""]
               if len(backends := backend_table(records)) else [])]
    atomic_write_text(sweep_dir / "report.md", "\n".join(lines))
    return df
