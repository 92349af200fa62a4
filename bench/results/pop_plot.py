"""The efficiency breakdown plot (pop.png): per multi-rank training point, the four POP loss factors with their 95%
intervals beside the measured efficiency they multiply back to (bench.results.pop, docs/efficiency.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.host import np_label
from bench.results.plots import _legend, _save, plt, with_series
from bench.results.pop import FACTORS

FACTOR_COLORS = dict(zip(FACTORS, ("tab:gray", "tab:olive", "tab:red", "tab:blue")))


def pop_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per multi-rank training point (series: mode, exchange backend and setting) with its factors (the per-point columns, the same on every repeat)."""
    ok = df[(df["status"] == "ok") & (df["stage"] == "train") & ~df["corun"].astype(bool) & (df["np"] > 1)
            & df["point_load_balance"].notna()]
    columns = ["point_efficiency", "oversubscribed",
               *[c for f in FACTORS for c in (f"point_{f}", f"{f}_ci_low", f"{f}_ci_high")]]
    return with_series(ok).groupby(["scaling", "series", "np"])[columns].first().reset_index()


def pop_plot(df: pd.DataFrame, path: Path) -> bool:
    """Write the plot; False (nothing written) where no point has factors to show."""
    points = pop_points(df)
    if points.empty:
        return False
    scalings = [s for s in ("weak", "strong") if (points["scaling"] == s).any()]
    fig, axes = plt.subplots(1, len(scalings), squeeze=False, sharey=True,
                             figsize=(max(5.0, 1.3 * len(points)), 3.8))
    width = 0.8 / (len(FACTORS) + 1)
    for ax, scaling in zip(axes[0], scalings):
        part = points[points["scaling"] == scaling].reset_index(drop=True)
        x = np.arange(len(part))
        for k, factor in enumerate(FACTORS):
            value = part[f"point_{factor}"]
            low = (value - part[f"{factor}_ci_low"]).clip(lower=0).fillna(0)
            high = (part[f"{factor}_ci_high"] - value).clip(lower=0).fillna(0)
            ax.bar(x + k * width, value.fillna(0), width, yerr=[low, high], capsize=2, color=FACTOR_COLORS[factor],
                   label=factor.replace("_", " "))
        ax.bar(x + len(FACTORS) * width, part["point_efficiency"], width, color="black",
               label="efficiency (their product)")
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xticks(x + 0.4 - width / 2)
        ax.set_xticklabels([f"{m}\nnp={np_label(n, o)}"
                            for m, n, o in zip(part["series"], part["np"], part["oversubscribed"])], fontsize=8)
        ax.set_title(f"{scaling} scaling (95% intervals)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("factor")
    _legend(axes[0][-1], fontsize=7)
    _save(fig, path)
    return True
