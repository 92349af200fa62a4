"""The sweep's PNG plots. Oversubscribed points are drawn hollow (bars hatched) with a legend entry, never hidden;
every figure names the hosts it ran on and the link between them (docs/figures.md)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench.errors import MachineFault  # noqa: E402
from bench.host import np_label  # noqa: E402
from bench.plan.config import stage_label  # noqa: E402
from bench.results.scaling import PHASES  # noqa: E402
from bench.results.summary import setting_text  # noqa: E402

MODE_COLORS = {"sparse-gather": "tab:red", "dense-reduce": "tab:blue", "auto": "tab:green",
               "coalesced-gather": "tab:orange", "sparse-as-dense": "tab:purple", "row-wise": "tab:brown",
               "table-wise": "tab:pink"}
PHASE_COLORS = dict(zip(PHASES, ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green")))
BACKEND_STYLES = {"horovod": "-", "mpi": "--"}
"""The line of each exchange backend (bench.plan.config.EXCHANGE_BACKENDS); a point under a launch setting B
(launch_env) is drawn dash-dotted."""
OVERSUBSCRIBED_LABEL = "oversubscribed (np > cores)"
OVERSUBSCRIBED_HATCH = "///"
"""How an oversubscribed bar is drawn (a point is drawn hollow)."""


def oversubscribed_handle(bar: bool = False):
    """The legend entry of oversubscribed points: a hollow marker, or a hatched bar."""
    if bar:
        return Patch(facecolor="white", edgecolor="black", hatch=OVERSUBSCRIBED_HATCH, label=OVERSUBSCRIBED_LABEL)
    return Line2D([], [], marker="o", linestyle="none", color="gray", markerfacecolor="none",
                  label=OVERSUBSCRIBED_LABEL)


def run_context(df: pd.DataFrame) -> str:
    """Where the points ran: the hosts, and the rate their link was shaped to when the ranks spanned hosts."""
    hosts = sorted({h for cell in df["hosts"].dropna() for h in str(cell).split(",") if h})
    where = (f"hosts {', '.join(hosts)}" if len(hosts) > 1 else f"one host ({hosts[0]})" if hosts
             else "hosts not recorded")
    rates = sorted({float(r) for r in df.get("link_rate_gbps", pd.Series(dtype=float)).dropna()})
    if rates:
        return f"{where}; link between hosts shaped to {' / '.join(f'{r:g}' for r in rates)} Gbit/s (tc)"
    return where + ("; no shaped link recorded" if len(hosts) > 1 else "; ranks talk over shared memory")


def series_label(mode: str, backend, launch_env) -> str:
    """What a line or bar group is: the mode, its exchange backend unless Horovod ('dense-reduce (mpi)'), and its
    launch setting where it has one ('[B: HOROVOD_CYCLE_TIME=1]'); points of different backends or settings are
    never pooled into one line."""
    backend = backend if isinstance(backend, str) and backend else "horovod"
    setting = launch_env if isinstance(launch_env, str) and launch_env else ""
    return mode + ("" if backend == "horovod" else f" ({backend})") + (f" [B: {setting}]" if setting else "")


def with_series(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `series` column (series_label of each row) and the line style it is drawn with."""
    backends = df.get("exchange_backend", pd.Series("horovod", index=df.index))
    settings = [setting_text(row) for row in df.to_dict("records")]
    labels = [series_label(m, b, e) for m, b, e in zip(df["mode"], backends, settings)]
    styles = ["-." if isinstance(e, str) and e else BACKEND_STYLES.get(b, ":") for b, e in zip(backends, settings)]
    return df.assign(series=labels, series_style=styles)


def _per_np(df: pd.DataFrame, column: str, interval: tuple[str, str] | None = None) -> pd.DataFrame:
    """Median over repeats of `column` per np, with the oversubscribed flag (and the point's interval, the same on
    every repeat's row)."""
    extra = {"low": (interval[0], "first"), "high": (interval[1], "first")} if interval else {}
    return df.groupby("np").agg(value=(column, "median"), oversubscribed=("oversubscribed", "max"),
                                **extra).reset_index()


def _line(ax, df: pd.DataFrame, column: str, interval: tuple[str, str] | None = None) -> None:
    """One series' line against np (the rows of one with_series label: colour by mode, style by exchange backend
    and setting); with `interval` (the columns of its low and high ends), error bars."""
    points = _per_np(df, column, interval)
    color = MODE_COLORS.get(df["mode"].iloc[0], "black")
    ax.plot(points["np"], points["value"], df["series_style"].iloc[0], color=color, label=df["series"].iloc[0])
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
    fig, axes = plt.subplots(1, len(scalings), figsize=(width * len(scalings), 4.3), sharey=True, squeeze=False)
    return fig, list(zip(axes[0], scalings))


def efficiency_figure(df: pd.DataFrame):
    ok = df[df["status"] == "ok"]
    fig, panels = _scaling_axes(ok, 5.5)
    for ax, scaling in panels:
        part = ok[ok["scaling"] == scaling]
        for _, rows in with_series(part).groupby("series"):
            _line(ax, rows, "point_efficiency", ("efficiency_ci_low", "efficiency_ci_high"))
        if not part.empty:
            nps = sorted(part["np"].unique())
            ax.plot(nps, [1.0] * len(nps), "k--", linewidth=1, label="ideal")
        ax.set_title(f"{scaling} scaling efficiency", fontsize=10)
        ax.set_xticks(sorted(ok["np"].unique()))
        ax.set_xlabel("MPI processes (np)")
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel("efficiency (1 = ideal)")
    panels[0][0].set_ylim(bottom=0)  # once every panel is drawn: the panels share the axis
    _figure_legend(fig, ok["oversubscribed"].any(), title="error bars: 95% interval\n(np=1 and np=P paired by round)")
    return fig


def efficiency_plot(df: pd.DataFrame, path: Path) -> None:
    _save(efficiency_figure(df), path, run_context(df))


def breakdown_bars(df: pd.DataFrame) -> pd.DataFrame:
    """Per point (series, np: the mode with its exchange backend and setting, with_series): the mean phase times of
    its repeats (bench.results.summary's <phase>_mean_ms, which add up to the mean step time), that sum as
    mean_step_ms, the median step time the tables quote, and the oversubscribed flag."""
    columns = [f"{p}_mean_ms" for p in PHASES]
    bars = with_series(df).groupby(["series", "np"]).agg(**{c: (c, "mean") for c in columns},
                                          median_step_ms=("point_step_time_ms", "first"),
                                          oversubscribed=("oversubscribed", "max")).reset_index()
    return bars.assign(mean_step_ms=bars[columns].sum(axis=1, min_count=1))


def breakdown_figure(df: pd.DataFrame):
    """One row of grouped bars per scaling kind: per mode (and exchange backend and setting), one bar per np, stacked by phase (breakdown_bars), with
    the median step time the tables quote marked on each."""
    ok = df[df["status"] == "ok"]
    scalings = [s for s in ("weak", "strong") if (ok["scaling"] == s).any()] or ["weak"]
    count = max([len(breakdown_bars(ok[ok["scaling"] == s])) for s in scalings] + [1])
    fig, axes = plt.subplots(len(scalings), 1, figsize=(max(8.0, 0.42 * count + 3), 3.4 * len(scalings)),
                             squeeze=False)
    for ax, scaling in zip(axes[:, 0], scalings):
        bars = breakdown_bars(ok[ok["scaling"] == scaling])
        # A gap of one bar between modes; mode names under their group, np under each bar.
        x = np.arange(len(bars)) + pd.factorize(bars["series"])[0]
        bottom = np.zeros(len(bars))
        for phase in PHASES:
            heights = bars[f"{phase}_mean_ms"].fillna(0).to_numpy()
            ax.bar(x, heights, bottom=bottom, color=PHASE_COLORS[phase], label=phase, edgecolor="white",
                   linewidth=0.5, hatch=[OVERSUBSCRIBED_HATCH if o else "" for o in bars["oversubscribed"]])
            bottom += heights
        ax.plot(x, bars["median_step_ms"], "_", color="black", markersize=14, markeredgewidth=2,
                label="median step time (the tables')")
        ax.set_xticks(x, [np_label(n, o) for n, o in zip(bars["np"], bars["oversubscribed"])],
                      fontsize=8)
        for series in bars["series"].unique():
            centre = x[(bars["series"] == series).to_numpy()].mean()
            ax.annotate(series, (centre, 0), xycoords=("data", "axes fraction"), xytext=(0, -24),
                        textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.set_title(f"{scaling}: step time by phase, mean over timed steps of the rank that set each step's pace "
                     f"(the phases add up to the mean step)", fontsize=9)
        ax.set_ylabel("ms per step")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.7, (x.max() if len(x) else 0) + 0.7)
    _figure_legend(fig, ok["oversubscribed"].any(), bar=True, title="bars: phases (ticks: np,\n* = oversubscribed)")
    return fig


def breakdown_plot(df: pd.DataFrame, path: Path) -> None:
    _save(breakdown_figure(df), path, run_context(df))


def memory_figure(df: pd.DataFrame):
    ok = df[df["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    ok = ok.assign(exchange_mib_held=ok["exchange_bytes_held"] / 2**20)
    weak = ok[ok["scaling"] == "weak"]  # weak keeps the per-rank work fixed: growth with P is the exchange's
    for ax, column, label, title in ((axes[0], "peak_rss_mib", "peak RSS, largest rank (MiB)", "peak RSS"),
                                     (axes[1], "exchange_mib_held", "exchange MiB held per rank per step",
                                      "exchange MiB held")):
        for _, rows in with_series(weak).groupby("series"):
            _line(ax, rows, column)
        ax.set_xticks(sorted(ok["np"].unique()))
        ax.set_xlabel("MPI processes (np)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title} vs P (weak scaling)", fontsize=10)
        ax.grid(alpha=0.3)
    _figure_legend(fig, weak["oversubscribed"].any())
    return fig


def memory_plot(df: pd.DataFrame, path: Path) -> None:
    _save(memory_figure(df), path, run_context(df))


def _legend(ax, oversubscribed: bool = False, bar: bool = False, **kwargs) -> None:
    """The axes' legend, with the entry of oversubscribed points when the axes show any."""
    handles, labels = ax.get_legend_handles_labels()
    if oversubscribed:
        handles.append(oversubscribed_handle(bar))
        labels.append(OVERSUBSCRIBED_LABEL)
    if handles:
        ax.legend(handles, labels, **kwargs)


def _figure_legend(fig, oversubscribed: bool = False, bar: bool = False, title: str | None = None) -> None:
    """One legend for all the figure's panels, right of them (where it hides no point), with the entry of
    oversubscribed points when the figure shows any."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if oversubscribed:
        entries[OVERSUBSCRIBED_LABEL] = oversubscribed_handle(bar)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, title=title, title_fontsize=7, frameon=False)


def _save(fig, path: Path, context: str = "") -> None:
    """Write the figure atomically; `context` (where the points ran) as a line above the panels."""
    if context:
        fig.suptitle(context, fontsize=8, color="dimgray")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.1 / fig.get_figheight()))
    else:
        fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")  # "tight": the figure legend right of the panels included


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """Write `fig` to `path` atomically and close it: a reader sees the old image or the new one, and a savefig
    that fails partway (no space, a read-only folder) leaves no temporary file behind and is a MachineFault
    naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110, **savefig_kwargs)
        tmp.replace(path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only or failing file system may refuse even this
            tmp.unlink(missing_ok=True)
        fault = MachineFault.from_os_error(err, path)
        if fault is not None:
            raise fault from err
        raise
    finally:
        plt.close(fig)


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
    ok = with_series(ok)
    for (stage, strategy, series), rows in ok.groupby(["stage", "graph_strategy", "series"], sort=False):
        # the stage's mode plays no part in it: the series' backend and setting do
        label = stage_label(stage, strategy) + series[len(rows["mode"].iloc[0]):]
        color = STAGE_COLORS.get(stage, "black")
        style = ":" if strategy == "replicate" else rows["series_style"].iloc[0]
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
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _legend(axes[0], ok["oversubscribed"].any(), title="error bars p10-p90", title_fontsize=7, fontsize=7)
    _step_to_retrieval(axes[3], df)
    _save(fig, path, run_context(df))


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
            bars.append((f"np={np_label(n, over)}" + (f"\n{strategy}" if strategy else ""), parts, over))
    labels = [label for label, _, _ in bars]
    hatches = [OVERSUBSCRIBED_HATCH if over else "" for _, _, over in bars]
    bottom = [0.0] * len(bars)
    for stage in ("train", "refresh", "graph", "retrieval"):
        heights = [0.0 if pd.isna(parts[stage]) else parts[stage] / 1000 for _, parts, _ in bars]
        ax.bar(labels, heights, bottom=bottom, color=STAGE_COLORS[stage], hatch=hatches, edgecolor="white",
               linewidth=0.5, label="train (one step)" if stage == "train" else stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds (slowest rank, median)")
    ax.set_title("one training step, then refresh -> graph -> retrieval", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, any(over for _, _, over in bars), bar=True, fontsize=7, title="* = oversubscribed",
            title_fontsize=7)
