"""`alure-bench predict` end to end on a results folder and a comm folder; bad input as one line.

The folders are made up (tests/synthetic.py), so these tests take seconds; tests/test_validation.py checks the
model against real measurements.
"""
import json

import pandas as pd
import pytest

from bench.plan.config import MODES
from tests.helpers import assert_one_line_error, cli, cli_here
from tests.synthetic import LINK, make_comm, make_sweep


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return make_sweep(root / "sweep"), make_comm(root / "comm")


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_predict_writes_the_table_summary_and_plots(folders, tmp_path):
    sweep, comm = folders
    out = tmp_path / "out"
    run = cli("predict", "--results", str(sweep), "--calibration", str(comm), "--max-np", "4096", "--draws", "20",
              "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "prediction.csv")
    # every figure with its fit interval and its link spread, each around the figure
    for figure in ("weak_step_ms", "weak_efficiency", "strong_efficiency", "memory_gib"):
        has = table[figure].notna() & table[f"{figure}_fit_low"].notna()
        assert has.any()
        for suffix in ("fit", "link"):
            assert (table.loc[has, f"{figure}_{suffix}_low"] <= table.loc[has, figure] * (1 + 1e-9)).all(), figure
            assert (table.loc[has, f"{figure}_{suffix}_high"] >= table.loc[has, figure] * (1 - 1e-9)).all(), figure
    assert (table["weak_step_ms_fit_high"] > table["weak_step_ms_fit_low"]).any()  # the draws do differ
    # the validated range is read off the validation run here (np 1-4 on one host): beyond it, extrapolation
    far = table[table["np"] > 4]
    assert (far["extrapolation"].fillna("").str.len() > 0).all() and (out / "validation.csv").stat().st_size > 0
    assert "validated range" in run.stdout and "extrapolation: " in run.stdout
    assert sorted(table["np"].unique()) == [1 << k for k in range(13)]
    assert set(table["mode"]) == set(MODES)  # every mode is priced, the sharded ones too
    one = table[table["np"] == 1]
    assert (one["weak_efficiency"] == 1).all() and (one["strong_efficiency"] == 1).all()
    # auto is never predicted slower than the better fixed mode (it picks per table)
    wide = table.pivot(index="np", columns="mode", values="weak_step_ms")
    assert (wide["auto"] <= wide[["sparse-gather", "dense-reduce"]].min(axis=1) * (1 + 1e-9)).all()
    # sparse-gather's memory grows with P, dense-reduce's does not
    mem = table.pivot(index="np", columns="mode", values="memory_gib")
    assert mem["sparse-gather"].is_monotonic_increasing and mem["sparse-gather"].iloc[-1] > mem["sparse-gather"].iloc[1]
    assert mem["dense-reduce"].iloc[1:].nunique() == 1
    # a row-wise shard holds 1/P of the tables: below the replicated modes' memory beyond np=1
    assert (mem["row-wise"].iloc[1:] < mem["dense-reduce"].iloc[1:]).all()
    for line in ("calibration (horovod", "fit: ", "runs out of memory at np =", "crossover density",
                 "the sweep's own"):
        assert line in run.stdout, run.stdout
    result = json.loads((out / "prediction.json").read_text())
    assert result["calibration"]["link"]["beta_s_per_byte"] == pytest.approx(LINK.beta_s_per_byte, rel=1e-4)
    assert result["oom_rank_count_sparse_gather"] > 1
    for name in ("costs.json", "prediction.txt", "crossover.csv", "measured-vs-predicted.csv",
                 "predicted-efficiency.png", "predicted-memory.png", "predicted-breakdown.png",
                 "predicted-crossover.png", "predicted-vs-measured.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_predict_for_a_cluster_from_its_data_sheet(folders, tmp_path):
    sweep, comm = folders
    out = tmp_path / "cluster"
    run = cli("predict", "--results", str(sweep), "--calibration", str(comm), "--latency-us", "1.5",
              "--bandwidth-gbps", "100", "--ranks-per-node", "4", "--memory-per-rank-gib", "0.5", "--cpu-speedup", "3",
              "--max-np", "1200", "--nps", "400", "--global-batch", "3200", "--draws", "0", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "prediction.csv")
    assert {400, 1024, 1200} <= set(table["np"])
    assert (table.loc[table["np"] == 1200, "nodes"] == 300).all()
    assert "network a = 1.50 us, 100 Gb/s" in run.stdout
    assert table.loc[table["np"] == 1024, "strong_step_ms"].isna().all()  # 3200 / 1024 < one group of 8
    # a data-sheet link was never validated; a point beyond the memory per rank has no step time and no efficiency
    held = json.loads((out / "prediction.json").read_text())["validated_range"]
    validated = table["mode"].isin(list(held))
    assert validated.any() and table.loc[validated, "extrapolation"].str.contains("link not validated").all()
    assert table.loc[~validated, "extrapolation"].str.contains("no validation of this mode held").all()
    oom = table[~table["fits_memory"]]
    assert len(oom) and (oom["weak_status"] == "out of memory").all() and oom["weak_efficiency"].isna().all()
    assert (oom["memory_gib"] > 0.5).all() and "OUT OF MEMORY" in run.stdout
    machine = json.loads((out / "prediction.json").read_text())["machine"]
    assert machine["network"]["beta_s_per_byte"] == pytest.approx(8 / 100e9)


def test_predict_bad_input_is_one_line(folders, tmp_path):
    sweep, comm = folders
    assert_one_line_error(cli_here("predict", "--results", str(tmp_path / "none"), "--calibration", str(comm)),
                          "--results", "alure-bench sweep")
    assert_one_line_error(cli_here("predict", "--results", str(sweep), "--calibration", str(tmp_path)), "alure-bench comm")
    assert_one_line_error(cli_here("predict", "--results", str(sweep), "--calibration", str(comm), "--latency-us", "2"),
                          "--bandwidth-gbps")
    assert_one_line_error(cli_here("predict", "--results", str(sweep), "--calibration", str(comm), "--backend", "gloo"),
                          "--backend")
    assert_one_line_error(cli_here("predict", "--results", str(sweep), "--calibration", str(comm), "--overlap", "2"),
                          "overlap")
    assert_one_line_error(cli_here("predict", "--results", str(sweep), "--calibration", str(comm), "--link-factor",
                                   "0.5"), "--link-factor")
    no_base = make_sweep(tmp_path / "nobase", nps=(2,))
    assert_one_line_error(cli_here("predict", "--results", str(no_base), "--calibration", str(comm)), "np=1")
