"""The figures of `alure-bench predict`: what the cost model predicts against np, and the sweep's points measured
against predicted."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.results.plots import MODE_COLORS, save_figure  # noqa: E402


def write_prediction_plots(table: pd.DataFrame, crossover: pd.DataFrame, memory_per_rank_bytes: float | None,
                           out: Path, check: pd.DataFrame | None = None, density: float | None = None) -> list[str]:
    """The prediction's figures into `out` (docs/costmodel.md): efficiency, memory per rank against
    `memory_per_rank_bytes`, the compute/exchange breakdown, the crossover density, and the sweep's points measured
    against predicted (`check`); returns the file names written."""
    written = []

    def np_axes(ax, title: str, ylabel: str | None = None, ylog: bool = True) -> None:
        """The look every predicted-against-np panel shares: log2 np, optionally log y, grid and legend. A panel
        with nothing to draw (every step out of memory) says so instead."""
        if not any(len(line.get_xdata()) for line in ax.get_lines() if line.get_label() != "ideal"):
            ax.text(0.5, 0.5, "no step fits in memory", ha="center", transform=ax.transAxes)
        else:
            ax.set_xscale("log", base=2)
            if ylog:
                ax.set_yscale("log")
        ax.set_xlabel("MPI processes (np)")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    def save(fig, name):
        fig.tight_layout()
        save_figure(fig, out / name)
        written.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("weak", "strong")):
        for mode, g in table.dropna(subset=[f"{kind}_efficiency"]).groupby("mode"):
            ax.plot(g["np"], g[f"{kind}_efficiency"], "o-", color=MODE_COLORS.get(mode), label=mode, markersize=3)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
        np_axes(ax, f"predicted {kind} scaling efficiency", ylog=False)
    axes[0].set_ylabel("efficiency")
    save(fig, "predicted-efficiency.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, g in table.groupby("mode"):
        ax.plot(g["np"], g["memory_gib"], "o-", color=MODE_COLORS.get(mode), label=mode, markersize=3)
    if memory_per_rank_bytes:
        ax.axhline(memory_per_rank_bytes / 2**30, color="k", ls=":", label="memory per rank")
    np_axes(ax, "predicted memory per rank", "GiB per rank (weak)")
    save(fig, "predicted-memory.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, g in table.dropna(subset=["weak_step_ms"]).groupby("mode"):
        ax.plot(g["np"], g["weak_compute_ms"], ":", color="gray")
        ax.plot(g["np"], g["weak_exchange_ms"] - g["weak_hidden_ms"], "o-", color=MODE_COLORS.get(mode),
                label=f"{mode} exchange", markersize=3)
    ax.plot([], [], ":", color="gray", label="compute")
    np_axes(ax, "predicted breakdown: compute vs exchange", "ms per step (weak)")
    save(fig, "predicted-breakdown.png")

    if not crossover.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        c = crossover.dropna()
        ax.plot(c["np"], c["crossover_density"], "o-", color="black", label="crossover (model)")
        if density:
            ax.axhline(density, color="tab:green", ls="--", label="this workload's density")
        np_axes(ax, "sparse-gather below, dense-reduce above", "rows touched per rank / V")
        save(fig, "predicted-crossover.png")

    if check is not None and not check.empty:
        fig, ax = plt.subplots(figsize=(5, 5))
        for mode, g in check.groupby("mode"):
            ax.errorbar(g["measured_ms"], g["predicted_ms"],
                        xerr=[g["measured_ms"] - g["measured_p10_ms"], g["measured_p90_ms"] - g["measured_ms"]],
                        fmt="o", color=MODE_COLORS.get(mode), label=mode)
        both = check[["measured_ms", "predicted_ms"]]
        lo, hi = both.min().min() * 0.7, both.max().max() * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
        ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="gray", alpha=0.15,
                        label="within 25%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured ms per step")
        ax.set_ylabel("predicted ms per step")
        ax.set_title("the sweep's points")
        ax.legend(fontsize=8)
        save(fig, "predicted-vs-measured.png")
    return written
