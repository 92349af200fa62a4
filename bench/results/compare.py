"""Two results folders side by side, per point: the table behind `alure-bench compare A B` (bench/cli/compare.py,
whose docstring says how a point is judged slower or regressed)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.host import np_label
from bench.plan.config import stage_label
from bench.results.summary import POINT_KEY, SETTING_KEY

VALUES = ["a_ms", "b_ms", "ratio", "band_low", "band_high", "rss_ratio", "verdict"]


def _points(df: pd.DataFrame) -> pd.DataFrame:
    """Per point (bench.results.summary.POINT_KEY): medians over the ok repeats with the interval of the step time's
    (bench.results.summary), the status if none was ok, the oversubscribed flag."""
    rows = []
    # dropna=False: a key column an older summary lacks the value of (NaN) still names a point.
    for key, g in df.groupby(POINT_KEY, dropna=False):
        ok = g[g["status"] == "ok"]
        rows.append(dict(zip(POINT_KEY, key), ok=not ok.empty,
                         status="ok" if not ok.empty else ",".join(sorted(set(g["status"]))),
                         ms=ok["step_time_ms"].median(), low=ok["step_time_ms_ci_low"].median(),
                         high=ok["step_time_ms_ci_high"].median(), rss=ok["peak_rss_mib"].median(),
                         oversubscribed=bool(g["oversubscribed"].any())))
    return pd.DataFrame(rows, columns=[*POINT_KEY, "ok", "status", "ms", "low", "high", "rss", "oversubscribed"])


def point_label(row) -> str:
    """'weak dense-reduce np=2', 'graph ring np=4': the point a row of the comparison table stands for."""
    what = f"{row.scaling} {row.mode}" if row.stage == "train" else stage_label(row.stage, row.graph_strategy)
    return f"{what} np={row.np}"


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The comparison table of two summaries (bench.results.records.load), one row per point of either."""
    if threshold < 0:
        raise UsageError(f"--threshold {threshold} is negative: give the tolerated slow-down, e.g. 0.1 for 10%")
    for name, df in (("A", a), ("B", b)):
        runs = df[["exchange_backend", *SETTING_KEY]].drop_duplicates()
        if len(runs) > 1:  # a point would be matched with another backend's or setting's point of the same name
            raise UsageError(f"folder {name} mixes exchange backends or launch settings ({len(runs)} of them): "
                             f"compare folders of one each, or read the folder's own report.md, which splits them")
    merged = _points(a).merge(_points(b), on=POINT_KEY, how="outer", suffixes=("_a", "_b"))
    rows = []
    for r in merged.itertuples(index=False):
        row = {**{k: getattr(r, k) for k in POINT_KEY}, "np": int(r.np),
               "oversubscribed": any(v is True or v == 1 for v in (r.oversubscribed_a, r.oversubscribed_b)),
               "a_ms": r.ms_a, "b_ms": r.ms_b, "ratio": np.nan, "band_low": np.nan, "band_high": np.nan,
               "rss_ratio": np.nan}
        if pd.isna(r.ok_a) or pd.isna(r.ok_b):
            row["verdict"] = "only in A" if pd.isna(r.ok_b) else "only in B"
        elif r.ok_a and not r.ok_b:
            row["verdict"] = f"REGRESSED: now {r.status_b}"
        elif not r.ok_a:
            row["verdict"] = "fixed" if r.ok_b else f"failed in both ({r.status_b})"
        else:
            ratio = r.ms_b / r.ms_a
            low, high = r.low_b / r.high_a, r.high_b / r.low_a
            row.update(ratio=ratio, band_low=low, band_high=high, rss_ratio=r.rss_b / r.rss_a)
            if ratio > 1 + threshold and low > 1:
                row["verdict"] = "SLOWER"
            elif ratio < 1 / (1 + threshold) and high < 1:
                row["verdict"] = "faster"
            elif ratio > 1 + threshold or ratio < 1 / (1 + threshold):
                row["verdict"] = "within noise"
            else:
                row["verdict"] = "same"
        rows.append(row)
    return pd.DataFrame(rows, columns=[*POINT_KEY, "oversubscribed", *VALUES]).sort_values(POINT_KEY,
                                                                                         ignore_index=True)


def regressions(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["verdict"].str.startswith(("SLOWER", "REGRESSED"))]


def format_table(table: pd.DataFrame) -> str:
    """The table as text: scaling, mode and np always, the other columns of the point key where they differ
    between points (stage and graph strategy, preset, threads per rank, ...)."""
    t = table.copy()
    t["np"] = [np_label(n, o) for n, o in zip(t["np"], t["oversubscribed"])]
    t["band"] = [f"[{lo:.2f}, {hi:.2f}]" if not np.isnan(lo) else "-" for lo, hi in zip(t["band_low"], t["band_high"])]
    varying = [k for k in POINT_KEY if k not in ("scaling", "mode", "np") and t[k].nunique(dropna=False) > 1]
    cols = [*varying, "scaling", "mode", "np", "a_ms", "b_ms", "ratio", "band", "rss_ratio", "verdict"]
    text = t[cols].to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}")
    if t["oversubscribed"].any():
        text += "\n* oversubscribed: more ranks than cores"
    return text
