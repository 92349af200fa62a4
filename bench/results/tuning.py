"""The tuning table (tune.csv, tune.md): per knob setting and mode, the training step under the setting (B) against
the launcher's settings (A) of the same interleaved sweep (bench.plan.tuning), with paired intervals.

Per setting and mode: the step time and the exchange wait (the pace-setting rank's exchange_wait phase) of A and of
B, each the median over ok repeats with its 95% block-bootstrap interval (bench.results.scaling.bootstrap_step_time);
B / A of both, paired by round (bench.results.scaling.paired_medians: what slowed the machine in a round slowed
both); exchange_efficiency of A and B with its interval (bench.results.summary.add_exchange_intervals' bootstrap);
and whether the setting reached the ranks (every B record's horovod_settings holds its variables, no A record's
does). Per mode, the settings are one family of tests: a setting is preferred only when Holm's step-down
procedure over that family rejects "B is not faster" at a family-wise PREFER_ALPHA (preferred), so that trying ten
settings does not make one look faster by chance alone.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.results.records import atomic_write_text, read_records
from bench.results.scaling import bootstrap_step_time, interval, pace_phase_steps, paired_ratio, paired_sign_flip_p
from bench.results.summary import exchange_efficiency_steps

TUNE_COLUMNS = ["knob", "setting", "mode", "repeats_ok_a", "repeats_ok_b", "reached_ranks",
                "a_step_time_ms", "a_step_time_ms_ci_low", "a_step_time_ms_ci_high",
                "b_step_time_ms", "b_step_time_ms_ci_low", "b_step_time_ms_ci_high",
                "step_ratio", "step_ratio_ci_low", "step_ratio_ci_high", "step_ratio_p_not_faster",
                "a_exchange_wait_ms", "a_exchange_wait_ms_ci_low", "a_exchange_wait_ms_ci_high",
                "b_exchange_wait_ms", "b_exchange_wait_ms_ci_low", "b_exchange_wait_ms_ci_high",
                "wait_ratio", "wait_ratio_ci_low", "wait_ratio_ci_high",
                "a_exchange_efficiency", "a_exchange_efficiency_ci_low", "a_exchange_efficiency_ci_high",
                "b_exchange_efficiency", "b_exchange_efficiency_ci_low", "b_exchange_efficiency_ci_high", "folder"]
"""tune.csv: one row per knob setting and mode (ratios are B / A: below 1, the setting is faster)."""
NOT_TOLD_APART = "no setting told apart"
PREFER_ALPHA = 0.025
"""Family-wise error rate of the preferred setting, per mode: the chance that a setting no faster than A is named. A
one-sided 0.025 is what 'the whole 95% interval lies below 1' meant for one setting alone."""


def reached(records: list[dict], variables: dict[str, str]) -> bool:
    """Every record ran under `variables` (an empty value: unset), as its ranks read their own environment."""
    def holds(record: dict) -> bool:
        ran = record.get("horovod_settings") or {}
        return all((name not in ran) if value == "" else ran.get(name) == value for name, value in variables.items())
    return bool(records) and all(holds(r) for r in records)


def _knob_variables(variables: dict[str, str]) -> dict[str, str]:
    """The variables a record's horovod_settings can show (what a rank reads of HOROVOD_* and the grouped gather)."""
    return {k: v for k, v in variables.items() if k.startswith("HOROVOD_") or k.startswith("ALURE_BENCH_")}


def _series(records: list[dict], what: str) -> dict[int, list[float]]:
    """Per repeat, the per-step values: `step` (the slowest rank's step time) or `wait` (the pace-setting rank's
    exchange wait)."""
    if what == "step":
        return {r["point"]["repeat"]: r["step_time_ms_slowest_rank"] for r in records}
    return {r["point"]["repeat"]: list(pace_phase_steps(r["ranks"])["exchange_wait"]) for r in records}


def _median_ci(series: dict[int, list[float]], rng: np.random.Generator) -> list[float]:
    if not series:
        return [np.nan] * 3
    medians = [float(np.median(v)) for v in series.values()]
    return [float(np.median(medians)), *interval(bootstrap_step_time(list(series.values()), rng))]


def _efficiency_ci(records: list[dict], rng: np.random.Generator) -> list[float]:
    steps = [s for s in (exchange_efficiency_steps(r) for r in records) if s]
    if not steps:
        return [np.nan] * 3
    value = float(np.median([r["metrics"]["exchange_efficiency"] for r in records
                             if r["metrics"].get("exchange_efficiency") is not None]))
    return [value, *interval(bootstrap_step_time(steps, rng))]


def setting_rows(knob: str, label: str, variables: dict[str, str], folder: Path, seed: int = 0) -> list[dict]:
    """The table's rows of one setting's sweep folder, one per training mode it measured."""
    records = [r for r in read_records(folder) if r["point"].get("stage", "train") == "train"
               and not r["point"].get("corun")]
    rng = np.random.default_rng(seed)
    rows = []
    for mode in sorted({r["point"]["mode"] for r in records}):
        of_mode = [r for r in records if r["point"]["mode"] == mode]
        a = [r for r in of_mode if not r["point"].get("launch_env") and r["status"] == "ok"]
        b = [r for r in of_mode if r["point"].get("launch_env") and r["status"] == "ok"]
        knobs = _knob_variables(variables)
        ok_reached = reached(b, knobs) and not any(reached([r], {k: v}) for r in a for k, v in knobs.items()
                                                      if v != "")
        row = {"knob": knob, "setting": label, "mode": mode,
               "repeats_ok_a": f"{len(a)}/{sum(not r['point'].get('launch_env') for r in of_mode)}",
               "repeats_ok_b": f"{len(b)}/{sum(bool(r['point'].get('launch_env')) for r in of_mode)}",
               "reached_ranks": ok_reached, "folder": Path(folder).name}
        for what, column in (("step", "step_time_ms"), ("wait", "exchange_wait_ms")):
            sa, sb = _series(a, what), _series(b, what)
            for side, series in (("a", sa), ("b", sb)):
                row |= dict(zip([f"{side}_{column}", f"{side}_{column}_ci_low", f"{side}_{column}_ci_high"],
                                _median_ci(series, rng)))
            ratio = "step_ratio" if what == "step" else "wait_ratio"
            row |= dict(zip([ratio, f"{ratio}_ci_low", f"{ratio}_ci_high"], paired_ratio(sa, sb, rng)))
            if what == "step":  # what the preferred setting is decided on (preferred)
                row["step_ratio_p_not_faster"] = paired_sign_flip_p(sa, sb, rng)
        for side, sel in (("a", a), ("b", b)):
            row |= dict(zip([f"{side}_exchange_efficiency", f"{side}_exchange_efficiency_ci_low",
                             f"{side}_exchange_efficiency_ci_high"], _efficiency_ci(sel, rng)))
        rows.append(row)
    return rows


def rounds_to_tell_apart(settings: int, alpha: float = PREFER_ALPHA) -> int:
    """The fewest rounds with which Holm over `settings` settings can prefer one: n rounds all in B's favour give
    the sign-flip test's smallest p, 2^-n, and the smallest p of the family is held to alpha / settings."""
    return max(2, math.ceil(math.log2(max(1, settings) / alpha) - 1e-9))


def holm_faster(p_values: pd.Series, alpha: float = PREFER_ALPHA) -> pd.Series:
    """Holm's step-down over one family: the smallest p is held to alpha / m, the next to alpha / (m - 1), and so on
    until one fails; those before it are rejected ("not faster" is rejected: faster). A NaN p is never rejected but
    counts in m. Returns a boolean Series on p_values' index."""
    m = len(p_values)
    faster = pd.Series(False, index=p_values.index)
    for k, (index, p) in enumerate(p_values.sort_values(na_position="last").items()):
        if pd.isna(p) or p > alpha / (m - k):
            break
        faster[index] = True
    return faster


def tuning_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TUNE_COLUMNS)


def _rounds(text: str) -> int:
    """The ok repeats of 'ok/run'."""
    return int(str(text).split("/")[0])


def preferred(table: pd.DataFrame, alpha: float = PREFER_ALPHA) -> dict[str, str]:
    """Per mode, the setting the step prefers: the family is the mode's settings that reached the ranks and have at
    least two ok rounds of A and of B (one round's interval is of its steps' noise only, not of the noise between
    runs); of those Holm's step-down finds faster at family-wise `alpha` (holm_faster on step_ratio_p_not_faster),
    the one with the lowest ratio; else NOT_TOLD_APART."""
    out = {}
    for mode, rows in table.groupby("mode", sort=True):
        rounds = np.minimum(rows["repeats_ok_a"].map(_rounds), rows["repeats_ok_b"].map(_rounds))
        family = rows[rows["reached_ranks"].astype(bool) & (rounds >= 2)]
        faster = family[holm_faster(family["step_ratio_p_not_faster"], alpha)]
        out[mode] = faster.sort_values("step_ratio")["setting"].iloc[0] if not faster.empty else NOT_TOLD_APART
    return out


def autotune_choice(log: Path) -> dict | None:
    """What Horovod's autotune log says: {"samples": rows logged, "best": the highest-scoring row (the setting its
    search keeps), "last": the last row}, each row as {column: value}; None where there is no log or it
    holds no sample."""
    try:
        text = Path(log).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    header, *rows = [[cell.strip() for cell in r] for r in csv.reader(io.StringIO(text)) if r] or [[]]
    samples = [dict(zip(header, r)) for r in rows]
    if not samples:
        return None

    def score(sample: dict) -> float:
        try:
            return float(sample.get("score", "nan"))
        except ValueError:
            return float("-inf")
    return {"samples": len(samples), "best": max(samples, key=score), "last": samples[-1]}


def autotune_line(slug: str, choice: dict | None) -> str:
    """tune.md's sentence on an autotune setting: how far its search got in the warm-up, and what it keeps."""
    if choice is None:
        return (f"Autotune ({slug}): no row in its log: no stage of Horovod's search ended in the warm-up (give "
                f"more --autotune-warmup).")
    best = ", ".join(f"{k}={v}" for k, v in choice["best"].items())
    return (f"Autotune ({slug}): {choice['samples']} rows logged (one as each stage of Horovod's search ended); the "
            f"best-scoring, what it keeps: {best}.")


def _fmt(value, low, high, fmt: str) -> str:
    if pd.isna(value):
        return "-"
    return fmt.format(value) + (f" [{fmt.format(low)}, {fmt.format(high)}]" if not pd.isna(low) else "")


def tuning_text(table: pd.DataFrame, autotune: dict[str, dict | None], context: str) -> str:
    """tune.md: what was run, the table a person reads, the preferred setting per mode and what autotune kept."""
    shown = pd.DataFrame({
        "setting": table["setting"], "mode": table["mode"],
        "ok A/B": [f"{a} {b}" for a, b in zip(table["repeats_ok_a"], table["repeats_ok_b"])],
        "reached": ["yes" if r else "NO" for r in table["reached_ranks"]],
        **{f"{label} {side.upper()}": [_fmt(v, lo, hi, fmt) for v, lo, hi in zip(
            table[f"{side}_{column}"], table[f"{side}_{column}_ci_low"], table[f"{side}_{column}_ci_high"])]
           for label, column, fmt in (("step ms", "step_time_ms", "{:.1f}"), ("wait ms", "exchange_wait_ms", "{:.1f}"),
                                      ("exch eff", "exchange_efficiency", "{:.2f}"))
           for side in ("a", "b")},
        "step B/A": [_fmt(v, lo, hi, "{:.3f}") for v, lo, hi in
                     zip(table["step_ratio"], table["step_ratio_ci_low"], table["step_ratio_ci_high"])],
        "p(B>=A)": ["-" if pd.isna(p) else f"{p:.3f}" for p in table["step_ratio_p_not_faster"]],
        "wait B/A": [_fmt(v, lo, hi, "{:.3f}") for v, lo, hi in
                     zip(table["wait_ratio"], table["wait_ratio_ci_low"], table["wait_ratio_ci_high"])],
    })
    column_order = ["setting", "mode", "ok A/B", "reached", "step ms A", "step ms B", "step B/A", "p(B>=A)",
                    "wait ms A", "wait ms B", "wait B/A", "exch eff A", "exch eff B"]
    lines = ["# Horovod's knobs on the training step", "", context, "",
             "A: the launcher's settings (bench/launch/mpirun.py HOROVOD_SETTINGS); B: the setting, on top of them, "
             "in the same shuffled rounds. step / wait: the median over ok repeats of the slowest rank's step time "
             "and of the pace-setting rank's exchange wait, [95% block-bootstrap interval]; B/A: their ratio, its "
             "interval paired by round (below 1: B faster); p(B>=A): the one-sided p of B not being faster, a "
             "paired sign-flip test over the rounds (n rounds can give no less than 2^-n); exch eff: "
             "exchange_efficiency, the priced collectives over exchange wait + the exchange's own work; reached: "
             "every B record's horovod_settings holds the setting and no A record's does. docs/tuning.md says how "
             "to read it.", "",
             "```", shown[column_order].to_string(index=False), "```", "",
             f"The step prefers (of the settings that reached the ranks with two ok rounds or more, those Holm's "
             f"step-down over the mode's settings finds faster at a family-wise {PREFER_ALPHA:g}, the lowest B/A):", ""]
    lines += [f"- {mode}: {choice}" for mode, choice in preferred(table).items()]
    for slug, choice in autotune.items():
        lines += ["", autotune_line(slug, choice)]
    return "\n".join(lines) + "\n"


def write_tuning(out: Path, table: pd.DataFrame, autotune: dict[str, dict | None], context: str) -> None:
    """tune.csv and tune.md into `out`, each written whole or not at all."""
    atomic_write_text(Path(out) / "tune.csv", table.to_csv(index=False))
    atomic_write_text(Path(out) / "tune.md", tuning_text(table, autotune, context))
