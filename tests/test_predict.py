"""`alure-bench predict` end to end on a results folder and a comm folder; bad input as one line.

The folders are written with the harness's own writers (bench.worker.build_record, bench.comm.comm_row), with
made-up timings, so these tests take seconds; tests/test_costmodel.py checks the model against real measurements.
"""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.plan.config import PointConfig, SweepConfig
from bench.ranks.exchange import ExchangeCounters
from bench.results.records import atomic_write_json, write_record
from bench.results.scaling import PHASES
from tests.test_costmodel import LINK, synthetic_rows
from tests.helpers import assert_one_line_error

CLI = [sys.executable, "-m", "bench.cli"]


def cli(*args, timeout=180):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def point_record(point: PointConfig, step_ms: float, rss_mib: float = 400.0, held: float = 0.0) -> dict:
    """A point's record as the worker writes it, for made-up per-rank measurements."""
    from bench.ranks.worker import build_record
    steps = 5
    phases = {"data": 0.05, "forward": 0.3, "backward": 0.45, "exchange_wait": 0.1 if point.np > 1 else 0.0,
              "optimizer": 0.1}
    scale = step_ms / sum(phases.values())
    ranks = []
    for r in range(point.np):
        jitter = [1.0 + 0.05 * ((s + r) % 3 - 1) for s in range(steps)]
        phase_ms = {p: [phases[p] * scale * j for j in jitter] for p in PHASES}
        exchange = {**ExchangeCounters().as_dict(), "allgather_bytes_held": held, "bytes_received": 0}
        ranks.append({"rank": r, "host": "test", "pid": 1000 + r, "host_cores": 2,
                      "step_time_ms": [sum(phase_ms[p][s] for p in PHASES) for s in range(steps)],
                      "phase_ms": phase_ms, "baseline_rss_mib": rss_mib - 20, "peak_rss_mib": rss_mib,
                      "rss_growth_mib": 20.0, "build_peak_rss_mib": rss_mib - 10, "train_peak_rss_mib": rss_mib,
                      "phase_peak_rss_mib": dict.fromkeys(PHASES, rss_mib), "memory_probe": "vmhwm-reset",
                      "memory_probe_ms": [0.1] * steps, "exchange": exchange, "exchange_bytes_held": held,
                      "exchange_bytes_sent": held / max(1, point.np), "exchange_bytes_received": 0.0,
                      "gradient_density": 0.05, "gradient_density_tables": {"items": 0.05}})
    return build_record(point, ranks, 10.0, "2025-01-01T00:00:00+00:00")


def make_sweep(folder: Path, nps=(1, 2, 4), slowdown: dict | None = None, failed: set | None = None) -> Path:
    """A tiny-preset sweep folder: weak and strong, both modes, made-up step times that grow with np (dense-reduce
    more), optionally some points slower by a factor or failed."""
    config = SweepConfig(name="test", preset="tiny", nps=list(nps), steps=5, global_batch=64)
    atomic_write_json(folder / "sweep.json", config.as_dict())
    atomic_write_json(folder / "environment.json", {"cores": 2, "memory_mib": 8192, "cpu_model": "test"})
    for point in config.plan():
        key = (point.scaling, point.mode, point.np)
        if failed and key in failed:
            from bench.plan.sweep import failure_record
            write_record(folder, failure_record(point, "oom", "rank 1: MemoryError", 1.0, "2025-01-01"))
            continue
        base = 40.0 if point.scaling == "weak" else 40.0 / point.np
        grow = {"sparse-gather": 6.0, "dense-reduce": 12.0}[point.mode] * (point.np - 1)
        step = (base + grow) * (slowdown or {}).get(key, 1.0)
        write_record(folder, point_record(point, step, 400 + 5 * point.np, 1e5 * point.np))
    return folder


def make_comm(folder: Path) -> Path:
    atomic_write_json(folder / "comm.json", {"kind": "comm", "rows": synthetic_rows(LINK, nps=(2,))})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return make_sweep(root / "sweep"), make_comm(root / "comm")


def test_predict_writes_the_table_summary_and_plots(folders, tmp_path):
    sweep, comm = folders
    out = tmp_path / "out"
    run = cli("predict", "--results", str(sweep), "--calibration", str(comm), "--max-np", "4096", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "prediction.csv")
    assert sorted(table["np"].unique()) == [1 << k for k in range(13)]
    assert set(table["mode"]) == {"sparse-gather", "dense-reduce", "auto"}
    one = table[table["np"] == 1]
    assert (one["weak_efficiency"] == 1).all() and (one["strong_efficiency"] == 1).all()
    # auto is never predicted slower than the better fixed mode (it picks per table)
    wide = table.pivot(index="np", columns="mode", values="weak_step_ms")
    assert (wide["auto"] <= wide[["sparse-gather", "dense-reduce"]].min(axis=1) * (1 + 1e-9)).all()
    # sparse-gather's memory grows with P, dense-reduce's does not
    mem = table.pivot(index="np", columns="mode", values="memory_gib")
    assert mem["sparse-gather"].is_monotonic_increasing and mem["sparse-gather"].iloc[-1] > mem["sparse-gather"].iloc[1]
    assert mem["dense-reduce"].iloc[1:].nunique() == 1
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


def test_predict_for_a_cluster_from_its_data_sheet(folders, tmp_path):
    sweep, comm = folders
    out = tmp_path / "cluster"
    run = cli("predict", "--results", str(sweep), "--calibration", str(comm), "--latency-us", "1.5",
              "--bandwidth-gbps", "100", "--ranks-per-node", "4", "--memory-per-rank-gib", "24", "--cpu-speedup", "3",
              "--max-np", "1200", "--nps", "400", "--global-batch", "3200", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "prediction.csv")
    assert {400, 1024, 1200} <= set(table["np"])
    assert (table.loc[table["np"] == 1200, "nodes"] == 300).all()
    assert "network a = 1.50 us, 100 Gb/s" in run.stdout
    assert table.loc[table["np"] == 1024, "strong_step_ms"].isna().all()  # 3200 / 1024 < one group of 8
    machine = json.loads((out / "prediction.json").read_text())["machine"]
    assert machine["network"]["beta_s_per_byte"] == pytest.approx(8 / 100e9)


def test_predict_bad_input_is_one_line(folders, tmp_path):
    sweep, comm = folders
    assert_one_line_error(cli("predict", "--results", str(tmp_path / "none"), "--calibration", str(comm)),
                          "--results", "alure-bench sweep")
    assert_one_line_error(cli("predict", "--results", str(sweep), "--calibration", str(tmp_path)), "alure-bench comm")
    assert_one_line_error(cli("predict", "--results", str(sweep), "--calibration", str(comm), "--latency-us", "2"),
                          "--bandwidth-gbps")
    assert_one_line_error(cli("predict", "--results", str(sweep), "--calibration", str(comm), "--backend", "gloo"),
                          "--backend")
    assert_one_line_error(cli("predict", "--results", str(sweep), "--calibration", str(comm), "--overlap", "2"),
                          "overlap")
    no_base = make_sweep(tmp_path / "nobase", nps=(2,))
    assert_one_line_error(cli("predict", "--results", str(no_base), "--calibration", str(comm)), "np=1")
