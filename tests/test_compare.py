"""`alure-bench compare A B`: per-point ratios with their noise band, and the exit code a CI gate reads."""
import pandas as pd
import pytest

from bench.results.compare import compare
from bench.results.records import load
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
