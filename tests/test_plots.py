"""The sweep's figures read as they claim: the breakdown's phases add up to the step, memory axes start at zero,
oversubscribed points have a legend entry and every figure names where it ran."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from bench.plan.config import PointConfig
from bench.results.plots import (
    OVERSUBSCRIBED_LABEL,
    breakdown_bars,
    breakdown_figure,
    efficiency_figure,
    memory_figure,
    run_context,
)
from bench.results.summary import summarize
from tests.synthetic import point_record


@pytest.fixture(scope="module")
def records():
    """Weak dense-reduce at np 1, 2 and 4 (4 oversubscribed on a 2-core machine), two repeats each."""
    out = []
    for n in (1, 2, 4):
        for r in range(2):
            record = point_record(PointConfig(scaling="weak", mode="dense-reduce", np=n, repeat=r, preset="tiny"),
                                  40.0 + 10 * n + 3 * r, 400 + 5 * n, 1e5 * n)
            record["oversubscribed"] = n > 2
            out.append(record)
    return out


def _legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_the_breakdowns_phases_add_up_to_the_mean_step(records):
    bars = breakdown_bars(summarize(records))
    for n, row in bars.set_index("np").iterrows():
        steps = [s for r in records if r["np"] == n for s in r["step_time_ms_slowest_rank"]]
        assert row["mean_step_ms"] == pytest.approx(np.mean(steps)), f"np={n}"
    fig = breakdown_figure(summarize(records))
    tops = {round(p.get_y() + p.get_height(), 6) for p in fig.axes[0].patches if p.get_height() > 0}
    assert {round(v, 6) for v in bars["mean_step_ms"]} <= tops, "a bar's top is its point's mean step"
    assert "median step time (the tables')" in _legend_labels(fig)
    plt.close(fig)


def test_memory_axes_start_at_zero_and_oversubscribed_points_have_a_legend_entry(records):
    fig = memory_figure(summarize(records))
    assert [ax.get_ylim()[0] for ax in fig.axes] == [0, 0]
    assert OVERSUBSCRIBED_LABEL in _legend_labels(fig)
    plt.close(fig)
    fig = efficiency_figure(summarize([r for r in records if r["np"] <= 2]))
    assert OVERSUBSCRIBED_LABEL not in _legend_labels(fig), "no entry for what the figure does not show"
    plt.close(fig)


def test_a_figure_names_the_hosts_and_the_shaped_link(records):
    df = summarize(records)
    assert run_context(df) == "one host (test); ranks talk over shared memory"
    spread = [dict(r, hosts=[f"node{i + 1}" for i in range(r["np"])],
                   link={"rate_gbps": 1.0, "qdisc": "tbf"}) for r in records]
    assert run_context(summarize(spread)) == ("hosts node1, node2, node3, node4; link between hosts shaped to "
                                              "1 Gbit/s (tc)")


def test_points_of_two_exchange_backends_are_drawn_apart_never_pooled():
    """Horovod and raw-MPI points of one mode (mpi slower): two lines, two groups of bars, two rows per np."""
    records = [point_record(PointConfig(scaling="weak", mode="dense-reduce", np=n, repeat=0, preset="tiny",
                                        exchange_backend=backend), (60.0 if backend == "mpi" else 40.0) + 10 * n)
               for backend in ("horovod", "mpi") for n in (1, 2)]
    df = summarize(records)
    fig = efficiency_figure(df)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert {"dense-reduce", "dense-reduce (mpi)"} <= set(lines)
    assert lines["dense-reduce"].get_linestyle() != lines["dense-reduce (mpi)"].get_linestyle()
    plt.close(fig)
    bars = breakdown_bars(df)
    assert sorted(zip(bars["series"], bars["np"])) == [("dense-reduce", 1), ("dense-reduce", 2),
                                                       ("dense-reduce (mpi)", 1), ("dense-reduce (mpi)", 2)]
    mpi = bars[bars["series"] == "dense-reduce (mpi)"].set_index("np")["median_step_ms"]
    assert mpi[2] == pytest.approx(80.0, rel=0.1), "the mpi bar holds the mpi points only"
    plt.close(breakdown_figure(df))
    fig = memory_figure(df)
    assert {"dense-reduce", "dense-reduce (mpi)"} <= {line.get_label() for line in fig.axes[0].get_lines()}
    plt.close(fig)


def test_the_stage_table_tells_exchange_backends_apart():
    from bench.results.report import stage_table
    records = [point_record(PointConfig(stage="refresh", scaling="strong", np=n, preset="tiny",
                                        exchange_backend=backend), 100.0 * n) for backend in ("horovod", "mpi")
               for n in (1, 2)]
    header, *rows = stage_table(summarize(records)).splitlines()
    assert header.split()[:3] == ["stage", "exchange_backend", "np"]
    assert [r.split()[1] for r in rows] == ["horovod", "horovod", "mpi", "mpi"]
