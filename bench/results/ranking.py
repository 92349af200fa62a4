"""Which exchange modes a sweep tells apart: at each scaling and np, the modes in order with the pairs whose 95%
intervals overlap (report.md's "Modes told apart"; docs/figures.md says how to read it); and, in a sweep with a
setting B (--compare-env, --compare-set), whether each point's two settings are told apart."""
from __future__ import annotations

import pandas as pd

from bench.host import np_label
from bench.results.scaling import overlapping
from bench.results.summary import POINT_KEY, SETTING_KEY, setting_text

MEASURES = (("step time", "point_step_time_ms", "step_time_ms_ci_low", "step_time_ms_ci_high", "<", False),
            ("efficiency", "point_efficiency", "efficiency_ci_low", "efficiency_ci_high", ">", True))
"""What the modes are ranked by: name, the point's value and its interval's ends, the sign between ranks, and
whether larger is better."""


def mode_ranking(df: pd.DataFrame) -> list[str]:
    """One line per scaling, np > 1 and measure (of ok training points, one per point of the summary): the modes
    best first, then the pairs not distinguished (intervals overlap). Nothing where fewer than two modes ran."""
    ok = df[(df["status"] == "ok") & (df["stage"] == "train") & (df["np"] > 1)]
    points = ok.groupby(POINT_KEY, dropna=False).first().reset_index()
    group_by = [k for k in POINT_KEY if k != "mode"]
    lines = []
    for _, group in points.groupby(group_by, dropna=False, sort=False):
        if group["mode"].nunique() < 2:
            continue
        first = group.iloc[0]
        where = f"{first['scaling']} np={np_label(first['np'], group['oversubscribed'].any())}"
        where += "".join(f" {k}={first[k]}" for k in ("preset", "threads_per_rank")
                         if points[k].nunique(dropna=False) > 1) + _setting_mark(first)
        for name, value, low, high, sign, larger_better in MEASURES:
            rows = group.dropna(subset=[value]).sort_values(value, ascending=not larger_better)
            if len(rows) < 2:
                continue
            pairs = overlapping({r["mode"]: (r[low], r[high]) for _, r in rows.iterrows()})
            same = ", ".join(f"{a} ~ {b}" for a, b in pairs) if pairs else "none (every pair told apart)"
            lines.append(f"{where} {name}: {f' {sign} '.join(rows['mode'])}; not distinguished: {same}")
    return sorted(lines, key=lambda line: (not line.startswith("weak"), line)) + setting_ranking(points)


def _setting_mark(row) -> str:
    return f" [B: {setting}]" if (setting := setting_text(row)) else ""


def setting_ranking(points: pd.DataFrame) -> list[str]:
    """Per point measured under both settings of the sweep, one line per measure: A and B best first and whether
    their intervals overlap (then the sweep does not tell the settings apart there)."""
    lines = []
    group_by = [k for k in POINT_KEY if k not in SETTING_KEY]
    for _, group in points.groupby(group_by, dropna=False, sort=False):
        if len(group) < 2:
            continue
        first = group.iloc[0]
        where = f"{first['scaling']} {first['mode']} np={np_label(first['np'], group['oversubscribed'].any())}"
        for name, value, low, high, sign, larger_better in MEASURES:
            rows = group.dropna(subset=[value]).sort_values(value, ascending=not larger_better)
            if len(rows) < 2:
                continue
            label = {i: f"B ({setting_text(r)})" if setting_text(r) else "A" for i, r in rows.iterrows()}
            pairs = overlapping({label[i]: (r[low], r[high]) for i, r in rows.iterrows()})
            told = "not distinguished (intervals overlap)" if pairs else "told apart"
            lines.append(f"{where} {name}: {f' {sign} '.join(label[i] for i in rows.index)}; {told}")
    return lines


RANKING_TEXT = ("Modes told apart: at each scaling and np, the modes best first by the point's step time and by its "
                "efficiency; `a ~ b` where the two 95% intervals overlap, which this sweep does not distinguish (their "
                "order there may be noise). In a sweep with a setting B, each point's settings A and B the same way.")
