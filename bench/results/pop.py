"""Where a point's efficiency goes, as the POP Centre of Excellence's multiplicative metrics (docs/efficiency.md):

    efficiency = corun_share x load_balance x communication_efficiency x computational_scaling

with, for a point at P ranks (T1: the np=1 point's step time; TP: this point's; U_r: rank r's useful time per step,
data + forward + backward + optimizer minus the exchange's own work; Tc: the mean useful time of a rank of the co-run
baseline, P independent np=1 processes on the same cores):
- corun_share = T1 / Tc (weak) or T1 / (P Tc) (strong): what sharing the machine costs P ranks with no exchange;
- load_balance = mean_r U_r / max_r U_r;
- communication_efficiency = max_r U_r / TP;
- computational_scaling = Tc / mean_r U_r: the useful work at P against the same work co-run without an exchange.
The factors telescope, so their product is the efficiency exactly (weak T1/TP, strong T1/(P TP)).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.results.scaling import BOOTSTRAP_DRAWS, bootstrap_step_time, efficiency, interval, useful_ms

FACTORS = ("corun_share", "load_balance", "communication_efficiency", "computational_scaling")
"""The loss factors, in the order they multiply back to the efficiency."""
POP_COLUMNS = [*FACTORS, *[c for f in FACTORS for c in (f"point_{f}", f"{f}_ci_low", f"{f}_ci_high")]]
"""summary.csv columns: each factor per row (repeat), then per point (median over ok repeats) with its 95% interval."""
COUNTERPART_KEY = ["stage", "graph_strategy", "scaling", "preset", "threads_per_rank", "exchange_backend",
                   "launch_env", "workload_b", "np"]
"""What a point and the co-run baseline it is measured against share (the co-run exchanges nothing: no mode; a sweep
runs one per exchange backend and launch setting, so the rounds of each pair up)."""


def pop_factors(scaling: str, np_: int, t1, tp, tc, useful_mean, useful_max) -> dict:
    """The four factors (numbers or arrays of bootstrap draws alike); their product is efficiency(scaling, t1, tp)."""
    return {"corun_share": efficiency(scaling, t1, tc, np_), "load_balance": useful_mean / useful_max,
            "communication_efficiency": useful_max / tp, "computational_scaling": tc / useful_mean}


def _has_useful(record: dict) -> bool:
    ranks = record.get("ranks") or []
    return record.get("status") == "ok" and bool(ranks) and all("work_ms" in r for r in ranks)


def _repeat_draws(record: dict, rng: np.random.Generator, draws: int, together: bool) -> dict:
    """Bootstrap draws of one repeat's step time, mean and largest useful time over ranks. `together`: the ranks'
    steps are the same steps (they wait for each other), so a draw resamples step indices shared by every rank;
    otherwise (the co-run's independent processes) each rank's steps are resampled on their own."""
    useful = np.stack([useful_ms(r) for r in record["ranks"]])  # [ranks, steps]
    steps = useful.shape[1]
    if together:
        pick = rng.integers(0, steps, (draws, steps))
        per_rank = np.median(useful[:, pick], axis=2)  # [ranks, draws]
        slowest = np.asarray(record["step_time_ms_slowest_rank"], dtype=float)
        step = np.median(slowest[pick], axis=1)
    else:
        per_rank = np.stack([np.median(u[rng.integers(0, steps, (draws, steps))], axis=1) for u in useful])
        step = np.full(draws, np.nan)
    return {"step": step, "mean": per_rank.mean(axis=0), "max": per_rank.max(axis=0)}


def _point_draws(records: list[dict], rng: np.random.Generator, draws: int, together: bool = True) -> dict:
    """The repeats resampled, then the steps within each (as bootstrap_step_time): medians over the drawn repeats."""
    each = [_repeat_draws(r, rng, draws, together) for r in records]
    pick = rng.integers(0, len(each), (draws, len(each)))
    cols = np.arange(draws)[:, None]
    return {k: np.median(np.stack([e[k] for e in each])[pick, cols], axis=1) for k in ("step", "mean", "max")}


def add_pop(df: pd.DataFrame, records: list[dict], baseline_key: list[str], seed: int = 0,
            draws: int = BOOTSTRAP_DRAWS) -> pd.DataFrame:
    """POP_COLUMNS of every ok training point with useful-time metrics (records[i] is row i's record), against the
    np=1 point sharing its `baseline_key` (bench.results.summary.BASELINE_KEY) and its co-run baseline. A point
    without a co-run baseline at its np (none was run, or an old sweep) keeps corun_share and computational_scaling
    blank; at np=1 the lone point is its own co-run (both 1 and T1/U)."""
    df = df.copy()
    for column in POP_COLUMNS:
        df[column] = np.nan
    has = np.array([_has_useful(r) for r in records], dtype=bool)
    usable = has & (df["stage"] == "train").to_numpy() & df["useful_ms_mean"].notna().to_numpy()
    corun = usable & df["corun"].to_numpy(dtype=bool)
    real = usable & ~df["corun"].to_numpy(dtype=bool)
    baseline_rows = {k: g for k, g in df[real & (df["np"] == 1).to_numpy()].groupby(baseline_key)}
    corun_rows = {k: g for k, g in df[corun].groupby(COUNTERPART_KEY)}
    rng = np.random.default_rng(seed)
    for key, rows in df[real].groupby(baseline_key + ["np"]):
        base = baseline_rows.get(key[:-1])
        if base is None:
            continue
        scaling, np_ = rows["scaling"].iloc[0], int(key[-1])
        t1 = float(base["step_time_ms"].median())
        counterpart = corun_rows.get(tuple(rows.iloc[0][COUNTERPART_KEY]))
        tc = t1 if np_ == 1 else float(counterpart["useful_ms_mean"].median()) if counterpart is not None else np.nan
        each = pop_factors(scaling, np_, t1, rows["step_time_ms"], tc, rows["useful_ms_mean"],
                           rows["useful_ms_max"])
        for factor in FACTORS:
            df.loc[rows.index, factor] = each[factor]
        point = pop_factors(scaling, np_, t1, float(rows["step_time_ms"].median()), tc,
                            float(rows["useful_ms_mean"].median()), float(rows["useful_ms_max"].median()))
        at = _point_draws([records[i] for i in rows.index], rng, draws)
        t1_draws = bootstrap_step_time([records[i]["step_time_ms_slowest_rank"] for i in base.index], rng, draws)
        if np_ == 1:
            tc_draws = t1_draws
        elif counterpart is not None:
            tc_draws = _point_draws([records[i] for i in counterpart.index], rng, draws, together=False)["mean"]
        else:
            tc_draws = np.full(draws, np.nan)
        drawn = pop_factors(scaling, np_, t1_draws, at["step"], tc_draws, at["mean"], at["max"])
        for factor in FACTORS:
            low, high = interval(drawn[factor]) if np.isfinite(drawn[factor]).all() else (np.nan, np.nan)
            df.loc[rows.index, [f"point_{factor}", f"{factor}_ci_low", f"{factor}_ci_high"]] = \
                [point[factor], low, high]
    return df
