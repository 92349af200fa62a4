"""The sweep's PNG plots. Oversubscribed points are drawn hollow and named in the legend, never hidden."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.plan.config import stage_label  # noqa: E402
from bench.results.scaling import PHASES  # noqa: E402

MODE_COLORS = {"sparse-gather": "tab:red", "dense-reduce": "tab:blue", "auto": "tab:green",
               "coalesced-gather": "tab:orange", "sparse-as-dense": "tab:purple"}
PHASE_COLORS = dict(zip(PHASES, ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green")))
OVERSUBSCRIBED_NOTE = "hollow = oversubscribed (np > cores)"


def _per_np(df: pd.DataFrame, column: str, interval: tuple[str, str] | None = None) -> pd.DataFrame:
    """Median over repeats of `column` per np, with the oversubscribed flag (and the point's interval, the same on
    every repeat's row)."""
    extra = {"low": (interval[0], "first"), "high": (interval[1], "first")} if interval else {}
    return df.groupby("np").agg(value=(column, "median"), oversubscribed=("oversubscribed", "max"),
                                **extra).reset_index()


def _line(ax, df: pd.DataFrame, column: str, mode: str, interval: tuple[str, str] | None = None) -> None:
    """One mode's line against np; with `interval` (the columns of its low and high ends), error bars."""
    points = _per_np(df, column, interval)
    color = MODE_COLORS.get(mode, "black")
    ax.plot(points["np"], points["value"], "-", color=color, label=mode)
    if interval:
        has = points["low"].notna() & points["high"].notna()
        ax.errorbar(points["np"][has], points["value"][has], fmt="none", ecolor=color, capsize=3, linewidth=1,
                    yerr=[(points["value"] - points["low"])[has].clip(lower=0),
                          (points["high"] - points["value"])[has].clip(lower=0)])
    for over, marker_face in ((False, color), (True, "none")):
        sel = points[points["oversubscribed"] == over]
        ax.plot(sel["np"], sel["value"], "o", color=color, markerfacecolor=marker_face, markersize=7)


def _scaling_axes(ok: pd.DataFrame, width: float):
    """One panel per scaling kind that has ok points (at least one panel, so an all-failed sweep still plots)."""
    scalings = [s for s in ("weak", "strong") if (ok["scaling"] == s).any()] or ["weak"]
    fig, axes = plt.subplots(1, len(scalings), figsize=(width * len(scalings), 4), sharey=True, squeeze=False)
    return fig, list(zip(axes[0], scalings))


def efficiency_plot(df: pd.DataFrame, path: Path) -> None:
    ok = df[df["status"] == "ok"]
    fig, panels = _scaling_axes(ok, 5)
    for ax, scaling in panels:
        part = ok[ok["scaling"] == scaling]
        for mode, rows in part.groupby("mode"):
            _line(ax, rows, "point_efficiency", mode, ("efficiency_ci_low", "efficiency_ci_high"))
        if not part.empty:
            nps = sorted(part["np"].unique())
            ax.plot(nps, [1.0] * len(nps), "k--", linewidth=1, label="ideal")
        ax.set_title(f"{scaling} scaling efficiency (bars: 95% interval)")
        ax.set_xticks(sorted(ok["np"].unique()))
        ax.set_xlabel("MPI processes (np)")
        ax.grid(alpha=0.3)
        _legend(ax, title=OVERSUBSCRIBED_NOTE, title_fontsize=7, fontsize=8)
    panels[0][0].set_ylabel("efficiency (1 = ideal)")
    _save(fig, path)


def breakdown_plot(df: pd.DataFrame, path: Path) -> None:
    ok = df[df["status"] == "ok"]
    fig, panels = _scaling_axes(ok, 5.5)
    for ax, scaling in panels:
        part = ok[ok["scaling"] == scaling].groupby(["mode", "np", "oversubscribed"])[
            [f"{p}_ms" for p in PHASES]].median().reset_index()
        labels = [f"{m}\nnp={n}{'*' if o else ''}" for m, n, o in zip(part["mode"], part["np"],
                                                                      part["oversubscribed"])]
        bottom = pd.Series(0.0, index=part.index)
        for phase in PHASES:
            ax.bar(labels, part[f"{phase}_ms"], bottom=bottom, label=phase, color=PHASE_COLORS[phase])
            bottom += part[f"{phase}_ms"]
        ax.set_title(f"{scaling}: step-time breakdown (slowest rank, median)")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    panels[0][0].set_ylabel("ms per step")
    _legend(panels[-1][0], fontsize=8, title="* = oversubscribed", title_fontsize=7)
    _save(fig, path)


def memory_plot(df: pd.DataFrame, path: Path) -> None:
    ok = df[df["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ok = ok.assign(exchange_mib_held=ok["exchange_bytes_held"] / 2**20)
    for ax, column, label in ((axes[0], "peak_rss_mib", "peak RSS, largest rank (MiB)"),
                              (axes[1], "exchange_mib_held", "exchange MiB held per rank per step")):
        for (mode, scaling), rows in ok.groupby(["mode", "scaling"]):
            if scaling == "weak":  # weak keeps the per-rank work fixed: growth with P is the exchange's
                _line(ax, rows, column, mode)
        ax.set_xticks(sorted(ok["np"].unique()))
        ax.set_xlabel("MPI processes (np)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(',')[0].split(' per')[0]} vs P (weak)")
        ax.grid(alpha=0.3)
        _legend(ax, title=OVERSUBSCRIBED_NOTE, title_fontsize=7, fontsize=8)
    _save(fig, path)


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ---- stages other than train ---------------------------------------------------------------------------------------

STAGE_COLORS = {"train": "tab:gray", "refresh": "tab:purple", "graph": "tab:orange", "retrieval": "tab:green"}


def stages_plot(df: pd.DataFrame, path: Path) -> None:
    """Per stage against P: strong efficiency with its p10-p90 band, the stage's own peak memory, the bytes its
    collectives moved per rank; and one bar per np from a training step to retrieval, stage by stage."""
    ok = df[(df["status"] == "ok") & (df["stage"] != "train")]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    columns = (("efficiency", "strong efficiency (1 = ideal)"),
               ("rss_growth_mib", "stage's own peak memory per rank (MiB)"),
               ("moved_mib", "MiB sent + received per rank"))
    ok = ok.assign(moved_mib=(ok["exchange_bytes_sent"] + ok["exchange_bytes_received"]) / 2**20)
    for (stage, strategy), rows in ok.groupby(["stage", "graph_strategy"], sort=False):
        label = stage_label(stage, strategy)
        color = STAGE_COLORS.get(stage, "black")
        style = "--" if strategy == "replicate" else "-"
        for ax, (column, _) in zip(axes, columns):
            points = rows.groupby("np").agg(value=(column, "median"), low=("efficiency_p10", "median"),
                                            high=("efficiency_p90", "median"),
                                            oversubscribed=("oversubscribed", "max")).reset_index()
            ax.plot(points["np"], points["value"], style, color=color, label=label)
            if column == "efficiency":
                ax.errorbar(points["np"], points["value"], yerr=[points["value"] - points["low"],
                                                                 points["high"] - points["value"]],
                            fmt="none", ecolor=color, capsize=3)
            for over, face in ((False, color), (True, "none")):
                sel = points[points["oversubscribed"] == over]
                ax.plot(sel["np"], sel["value"], "o", color=color, markerfacecolor=face, markersize=6)
    for ax, (_, label) in zip(axes, columns):
        ax.set_xticks(sorted(ok["np"].unique()) if not ok.empty else [1])
        ax.set_xlabel("MPI processes (np)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax, title=OVERSUBSCRIBED_NOTE + "; error bars p10-p90" if ax is axes[0] else OVERSUBSCRIBED_NOTE,
                title_fontsize=7, fontsize=7)
    _step_to_retrieval(axes[3], df)
    _save(fig, path)


def _step_to_retrieval(ax, df: pd.DataFrame) -> None:
    """Stacked bars, one per np and graph strategy: a training step (strong, first mode), refresh, graph,
    retrieval, each the median time of its points."""
    ok = df[df["status"] == "ok"]
    train = ok[ok["stage"] == "train"]
    if (train["scaling"] == "strong").any():
        train = train[train["scaling"] == "strong"]
    if not train.empty:
        train = train[train["mode"] == train["mode"].iloc[0]]
    strategies = sorted(s for s in ok.loc[ok["stage"] == "graph", "graph_strategy"].unique() if s) or [""]
    bars = []
    for n in sorted(ok["np"].unique()):
        for strategy in strategies:
            parts = {"train": train.loc[train["np"] == n, "step_time_ms"].median()}
            for stage in ("refresh", "graph", "retrieval"):
                rows = ok[(ok["stage"] == stage) & (ok["np"] == n)]
                if stage == "graph":
                    rows = rows[rows["graph_strategy"] == strategy]
                parts[stage] = rows["step_time_ms"].median()
            over = bool(ok.loc[ok["np"] == n, "oversubscribed"].any())
            bars.append((f"np={n}{'*' if over else ''}" + (f"\n{strategy}" if strategy else ""), parts))
    labels = [label for label, _ in bars]
    bottom = [0.0] * len(bars)
    for stage in ("train", "refresh", "graph", "retrieval"):
        heights = [0.0 if pd.isna(parts[stage]) else parts[stage] / 1000 for _, parts in bars]
        ax.bar(labels, heights, bottom=bottom, color=STAGE_COLORS[stage],
               label="train (one step)" if stage == "train" else stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds (slowest rank, median)")
    ax.set_title("one training step, then refresh -> graph -> retrieval", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, fontsize=7, title="* = oversubscribed", title_fontsize=7)
