"""`alure-bench compare A B`: per-point ratios with their noise band, and the exit code a CI gate reads."""
import numpy as np
import pandas as pd
import pytest

from bench.results.compare import compare, format_table, point_label
from bench.results.records import load
from bench.results.summary import summarize
from tests.helpers import assert_one_line_error, cli, cli_here
from tests.synthetic import make_sweep


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("compare") / "a")


def test_the_same_results_pass_the_gate(baseline, tmp_path):
    again = make_sweep(tmp_path / "b")
    run = cli("compare", str(baseline), str(again))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no regression: 12 points in both" in run.stdout


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_a_point_slower_beyond_threshold_and_noise_fails_the_gate(baseline, tmp_path):
    slower = make_sweep(tmp_path / "b", slowdown={("weak", "dense-reduce", 2): 1.5})
    csv = tmp_path / "cmp.csv"
    run = cli("compare", str(baseline), str(slower), "--csv", str(csv))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 regressed point(s): weak dense-reduce np=2 SLOWER" in run.stdout
    table = pd.read_csv(csv)
    row = table[(table["scaling"] == "weak") & (table["mode"] == "dense-reduce") & (table["np"] == 2)].iloc[0]
    assert row["ratio"] == pytest.approx(1.5, rel=1e-6)
    assert row["band_low"] > 1 and row["band_high"] > row["ratio"]
    # the same slow-down passes a looser gate
    assert cli("compare", str(baseline), str(slower), "--threshold", "0.6").returncode == 0


def test_a_slow_down_inside_the_noise_band_is_not_a_regression(baseline, tmp_path):
    # The made-up records have a +-5% spread per step: a 3% slow-down with a 1% threshold stays inside the band.
    table = compare(load(baseline), load(make_sweep(tmp_path / "b", slowdown={("weak", "sparse-gather", 2): 1.03})),
                    threshold=0.01)
    row = table[(table["scaling"] == "weak") & (table["mode"] == "sparse-gather") & (table["np"] == 2)].iloc[0]
    assert row["band_low"] < 1 < row["ratio"]
    assert row["verdict"] == "within noise"


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_a_point_that_now_fails_is_a_regression_and_missing_points_are_listed(baseline, tmp_path):
    broken = make_sweep(tmp_path / "b", nps=(1, 2), failed={("strong", "sparse-gather", 2)})
    run = cli("compare", str(baseline), str(broken))
    assert run.returncode == 1
    assert "strong sparse-gather np=2 REGRESSED: now oom" in run.stdout
    assert "only in A" in run.stdout  # the np=4 points B did not run


def test_compare_bad_input_is_one_line(baseline, tmp_path):
    assert_one_line_error(cli_here("compare", str(baseline), str(tmp_path / "none")), "not a folder")
    assert_one_line_error(cli_here("compare", str(baseline), str(baseline), "--threshold", "-1"), "--threshold")
    assert_one_line_error(cli_here("compare", str(baseline)), "usage:")


def _summary(points: dict) -> pd.DataFrame:
    """A summary of made-up records: {(stage, graph_strategy, threads_per_rank): step ms} at strong sparse-gather
    np=2, three repeats each (the scaling and mode a sweep gives its stage points)."""
    records = []
    for (stage, strategy, threads), ms in points.items():
        for r in range(3):
            steps = [ms * (1 + 0.01 * ((s + r) % 3 - 1)) for s in range(5)]
            records.append({"point": {"scaling": "strong", "mode": "sparse-gather", "np": 2, "repeat": r,
                                      "preset": "tiny", "threads_per_rank": threads, "stage": stage,
                                      "graph_strategy": strategy},
                            "status": "ok", "reason": None, "oversubscribed": False, "threads_per_rank": threads,
                            "step_time_ms_slowest_rank": steps,
                            "metrics": {"step_time_ms": float(np.median(steps)), "peak_rss_mib": 100.0,
                                        "exchange_bytes_held": 0.0, "phase_ms": {}}})
    return summarize(records)


def test_stage_points_are_not_pooled_into_the_training_point_of_the_same_scaling_mode_and_np():
    a = _summary({("train", "", 1): 100.0, ("graph", "ring", 1): 3000.0, ("graph", "replicate", 1): 2000.0})
    b = _summary({("train", "", 1): 100.0, ("graph", "ring", 1): 6000.0, ("graph", "replicate", 1): 2000.0})
    table = compare(a, b, threshold=0.1)
    assert len(table) == 3, table
    verdicts = {point_label(r): r.verdict for r in table.itertuples()}
    assert verdicts == {"strong sparse-gather np=2": "same", "graph ring np=2": "SLOWER",
                        "graph replicate np=2": "same"}
    assert "graph_strategy" in format_table(table) and "ring" in format_table(table)


def test_points_run_with_other_threads_per_rank_are_other_points():
    table = compare(_summary({("train", "", 1): 100.0, ("train", "", 2): 60.0}),
                    _summary({("train", "", 1): 100.0, ("train", "", 2): 60.0}), threshold=0.1)
    assert sorted(table["threads_per_rank"]) == [1, 2] and set(table["verdict"]) == {"same"}
