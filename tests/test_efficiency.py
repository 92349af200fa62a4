"""What the exchange should cost (exchange_ideal_ms, priced from the counters) and where efficiency goes (the POP
factors against the co-run baseline): on made-up records, and on a real tiny sweep whose co-run baseline runs its
processes at once with no collective."""
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench.errors import UsageError
from bench.model.table_costs import DEFAULT_COSTS, ExchangeCosts
from bench.plan.config import PointConfig, SweepConfig
from bench.ranks.exchange import ExchangeCounters
from bench.ranks.worker import build_record
from bench.results.pop import FACTORS, POP_COLUMNS
from bench.results.scaling import PHASES
from bench.results.summary import EXCHANGE_INTERVAL_COLUMNS, EXTRA_COLUMNS, summarize

STEPS = 6


def made_up(point: PointConfig, phases: list[dict], work_ms: list[float], counters: dict | None = None) -> dict:
    """A record from per-rank phase times (one dict per rank, jittered per step) and per-rank exchange work."""
    ranks = []
    for r, (ms, work) in enumerate(zip(phases, work_ms)):
        jitter = [1.0 + 0.03 * ((s * (r + 2)) % 5 - 2) for s in range(STEPS)]
        phase_ms = {p: [ms[p] * j for j in jitter] for p in PHASES}
        exchange = {**ExchangeCounters().as_dict(), **(counters or {}), "work_ms": work, "bytes_received": 0}
        ranks.append({"rank": r, "host": "test", "pid": 100 + r, "host_cores": 4,
                      "step_time_ms": [sum(phase_ms[p][s] for p in PHASES) for s in range(STEPS)],
                      "phase_ms": phase_ms, "work_ms": [work * j for j in jitter], "baseline_rss_mib": 100.0,
                      "peak_rss_mib": 120.0, "rss_growth_mib": 20.0, "build_peak_rss_mib": 110.0,
                      "train_peak_rss_mib": 120.0, "phase_peak_rss_mib": dict.fromkeys(PHASES, 120.0),
                      "memory_probe": "vmhwm-reset", "memory_probe_ms": [0.1] * STEPS, "exchange": exchange,
                      "exchange_bytes_held": 0, "exchange_bytes_sent": 0, "exchange_bytes_received": 0,
                      "gradient_density": 0.05, "gradient_density_tables": {"items": 0.05}})
    return build_record(point, ranks, 1.0, "2026-01-01T00:00:00+00:00")


def phases(forward: float, wait: float = 0.0) -> dict:
    return {"data": 2.0, "forward": forward, "backward": 1.5 * forward, "exchange_wait": wait, "optimizer": 3.0}


@pytest.fixture
def uncalibrated(monkeypatch, tmp_path):
    """No costs.json named and an empty calibration folder: the built-in defaults price the exchange."""
    monkeypatch.delenv("ALURE_BENCH_COSTS", raising=False)
    monkeypatch.setenv("ALURE_BENCH_CALIBRATIONS", str(tmp_path / "no-calibrations"))


def priced_by_hand(m: dict, p: int, a: float, b: float, g: float) -> float:
    """The ring formulas over the counters, written out: allreduce 2(P-1)a + 2((P-1)/P) n b + ((P-1)/P) n g per call
    (n summed), allgather (P-1)a + ((P-1)/P) n b with n the gathered bytes, all-to-all (P-1)a + ((P-1)/P) n b."""
    f = (p - 1) / p
    allreduce = m["allreduce_calls"] * 2 * (p - 1) * a + 2 * f * m["allreduce_bytes_sent"] * b \
        + f * m["allreduce_bytes_sent"] * g
    allgather = m["allgather_calls"] * (p - 1) * a + f * m["allgather_bytes_held"] * b
    alltoall = m["alltoall_calls"] * (p - 1) * a + f * m["alltoall_bytes_sent"] * b
    return (allreduce + allgather + alltoall) * 1000


COUNTERS = {"allreduce_calls": 56, "allreduce_bytes_sent": 7e5, "allgather_calls": 12, "allgather_bytes_held": 1.7e7,
            "alltoall_calls": 4, "alltoall_bytes_sent": 3e6, "alltoall_bytes_received": 3e6}


def test_exchange_ideal_is_the_priced_sum_of_the_counted_collectives(uncalibrated):
    point = PointConfig(preset="tiny", mode="sparse-gather", np=2)
    record = made_up(point, [phases(10, wait=8), phases(10, wait=6)], [1.0, 1.5], COUNTERS)
    m = record["metrics"]
    model = m["exchange_model"]
    assert model["calibrated"] is False and model["source"].startswith("uncalibrated host")
    a, b, g = (model["link"][k] for k in ("alpha_s", "beta_s_per_byte", "gamma_s_per_byte"))
    assert (a, b, g) == (DEFAULT_COSTS.link.alpha_s, DEFAULT_COSTS.link.beta_s_per_byte,
                         DEFAULT_COSTS.link.gamma_s_per_byte)
    assert m["exchange_ideal_ms"] == pytest.approx(priced_by_hand(m, 2, a, b, g), rel=1e-12)
    assert m["exchange_ideal_ms"] > 0 and all(m["exchange_priced"][k]["ms"] > 0 for k in m["exchange_priced"])
    assert m["exchange_efficiency"] == pytest.approx(m["exchange_ideal_ms"] / m["exchange_ms"])
    # the pace-setting rank's wait plus its own exchange work (rank 0 waits 8 ms and works 1 ms per step)
    assert m["exchange_ms"] == pytest.approx(9.0, rel=0.1)
    # A mode without all-to-all counters (they count 0) is priced the same way.
    no_alltoall = {k: v for k, v in COUNTERS.items() if not k.startswith("alltoall")}
    m2 = made_up(point, [phases(10, wait=8)] * 2, [1.0] * 2, no_alltoall)["metrics"]
    assert m2["alltoall_calls"] == 0 and m2["exchange_priced"]["alltoall"]["ms"] == 0
    assert m2["exchange_ideal_ms"] == pytest.approx(priced_by_hand(m2, 2, a, b, g), rel=1e-12)


def test_a_named_collective_model_prices_the_exchange_and_is_named_in_the_record(monkeypatch, tmp_path):
    costs = ExchangeCosts.from_dict(DEFAULT_COSTS.as_dict() | {"link": {"alpha_s": 1e-5, "beta_s_per_byte": 2e-10,
                                                                        "gamma_s_per_byte": 1e-10},
                                                               "source": "made up"})
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs.as_dict()))
    monkeypatch.setenv("ALURE_BENCH_COSTS", str(path))
    m = made_up(PointConfig(preset="tiny", mode="dense-reduce", np=3), [phases(10, wait=5)] * 3, [2.0] * 3,
                COUNTERS)["metrics"]
    assert m["exchange_model"]["calibrated"] is True and str(path) in m["exchange_model"]["source"]
    assert m["exchange_ideal_ms"] == pytest.approx(priced_by_hand(m, 3, 1e-5, 2e-10, 1e-10), rel=1e-12)
    row = summarize([made_up(PointConfig(preset="tiny", mode="dense-reduce", np=3), [phases(10, wait=5)] * 3,
                             [2.0] * 3, COUNTERS)]).iloc[0]
    assert str(path) in row["exchange_model"] and row["exchange_ideal_ms"] == pytest.approx(m["exchange_ideal_ms"])


def synthetic_sweep(uneven: float = 1.3) -> list[dict]:
    """np=1, np=2 (rank 1 slower by `uneven`, both waiting and working on the exchange) and the co-run at np=2, weak
    and strong, two repeats."""
    records = []
    for scaling in ("weak", "strong"):
        shrink = 2 if scaling == "strong" else 1
        for r in range(2):
            lone = 20.0 * (1 + 0.02 * r)
            records.append(made_up(PointConfig(preset="tiny", scaling=scaling, np=1, repeat=r, global_batch=64),
                                   [phases(lone)], [0.0]))
            records.append(made_up(PointConfig(preset="tiny", scaling=scaling, np=2, repeat=r, global_batch=64),
                                   [phases(24 / shrink, wait=9), phases(24 * uneven / shrink, wait=3)], [1.0, 2.5]))
            records.append(made_up(PointConfig(preset="tiny", scaling=scaling, np=2, repeat=r, global_batch=64,
                                               corun=True), [phases(22 / shrink), phases(22.5 / shrink)], [0.0, 0.0]))
    return records


def test_the_loss_factors_multiply_back_to_the_efficiency_on_made_up_records(uncalibrated):
    df = summarize(synthetic_sweep())
    assert set(POP_COLUMNS + ["exchange_ideal_ms", "exchange_efficiency", "work_ms", "corun"]) <= set(df.columns)
    appended = POP_COLUMNS + EXCHANGE_INTERVAL_COLUMNS + ["workload_b"]
    assert list(df.columns[-len(appended):]) == appended, "appended after the existing columns"
    corun = df[df["corun"]]
    assert len(corun) == 4 and set(corun["mode"]) == {"corun"}
    assert corun["efficiency"].isna().all(), "the co-run is a baseline, not a point of some mode"
    points = df[~df["corun"]]
    for _, row in points.iterrows():
        assert math.prod(row[f] for f in FACTORS) == pytest.approx(row["efficiency"], rel=1e-9)
        assert math.prod(row[f"point_{f}"] for f in FACTORS) == pytest.approx(row["point_efficiency"], rel=1e-9)
    two = points[points["np"] == 2]
    assert (two["point_load_balance"] < 1).all(), "rank 1 does more useful work"
    assert (two["point_corun_share"] < 1).all() and (two["point_communication_efficiency"] < 1).all()
    for factor in FACTORS:
        assert (two[f"{factor}_ci_low"] <= two[f"point_{factor}"] + 1e-12).all()
        assert (two[f"point_{factor}"] <= two[f"{factor}_ci_high"] + 1e-12).all()
    one = points[points["np"] == 1]
    assert (one["point_corun_share"] == 1).all() and (one["point_load_balance"] == 1).all()
    # useful time takes the exchange's own work out: rank 1 works 2.5 ms per step on the exchange
    weak2 = two[two["scaling"] == "weak"].iloc[0]
    assert weak2["work_ms"] == pytest.approx(2.5, rel=0.1)


def test_exchange_efficiency_has_an_interval_over_repeats_and_none_where_nothing_is_priced(uncalibrated):
    """Repeats whose exchange waited 4, 6 and 8 ms: the point's exchange_efficiency is their median, and its block
    bootstrap interval (whole repeats resampled) reaches from about the 8 ms repeat's to the 4 ms one's."""
    records = [made_up(PointConfig(preset="tiny", mode="sparse-gather", np=2, repeat=r),
                       [phases(10, wait=w), phases(10, wait=w)], [1.0, 1.0], COUNTERS) for r, w in enumerate((4, 6, 8))]
    lone = made_up(PointConfig(preset="tiny", mode="sparse-gather", np=1), [phases(10)], [0.0])
    df = summarize(records + [lone])
    two = df[df["np"] == 2]
    each = sorted(two["exchange_efficiency"])
    assert each[0] < each[1] < each[2]
    assert list(two["point_exchange_efficiency"]) == pytest.approx([each[1]] * 3)
    low, high = two["exchange_efficiency_ci_low"].iloc[0], two["exchange_efficiency_ci_high"].iloc[0]
    assert low < each[1] < high
    assert low == pytest.approx(each[0], rel=0.1) and high == pytest.approx(each[2], rel=0.1)
    one = df[df["np"] == 1]
    assert one[EXCHANGE_INTERVAL_COLUMNS].isna().all().all(), "nothing exchanged at np=1: no interval"
    # one repeat: its steps in moving blocks, an interval around its own figure
    single = summarize(records[:1]).iloc[0]
    assert single["exchange_efficiency_ci_low"] <= single["point_exchange_efficiency"] \
        <= single["exchange_efficiency_ci_high"]


def test_without_a_co_run_baseline_its_factors_stay_blank(uncalibrated):
    df = summarize([r for r in synthetic_sweep() if not r["point"]["corun"]])
    two = df[df["np"] == 2]
    assert two["point_corun_share"].isna().all() and two["point_computational_scaling"].isna().all()
    assert two["point_load_balance"].notna().all() and two["point_communication_efficiency"].notna().all()


def test_sweeps_plan_a_co_run_baseline_per_scaling_at_every_np_above_one():
    ids = [p.point_id for p in SweepConfig(nps=[1, 2, 4], interleave=False).plan() if p.corun]
    assert ids == ["corun-weak-np2-r0", "corun-strong-np2-r0", "corun-weak-np4-r0", "corun-strong-np4-r0"]
    assert not any(p.corun for p in SweepConfig(nps=[1, 2], corun=False).plan())
    assert not any(p.corun for p in SweepConfig(nps=[1]).plan())
    with pytest.raises(UsageError, match="np >= 2"):
        PointConfig(np=1, corun=True)
    assert "corun" in EXTRA_COLUMNS


@pytest.mark.mpi
def test_a_real_tiny_sweep_co_runs_without_collectives_and_its_factors_multiply_back(tmp_path, uncalibrated):
    from bench.results.records import read_records
    from bench.results.report import write_report
    from bench.run.sweep import run_sweep, start_sweep

    config = SweepConfig(name="pop", preset="tiny", nps=[1, 2], modes=["sparse-gather"], scalings=["weak"],
                         steps=4, warmup_steps=1)
    out = tmp_path / "pop"
    start_sweep(config, out)
    said = io.StringIO()
    run_sweep(config, out, out=said)
    df = write_report(out)
    assert (df["status"] == "ok").all(), df[["mode", "np", "status", "reason"]]
    # the sweep said before its first point that the exchange is priced with costs not of this host
    first = said.getvalue().split("\n[")[0]
    assert "note: uncalibrated host" in first and "run `alure-bench calibrate`" in first, said.getvalue()
    records = {r["point_id"]: r for r in read_records(out)}
    # The co-run: P processes at once, none with Horovod or mpi4py loaded, nothing exchanged, timed steps overlapping.
    corun = records["corun-weak-np2-r0"]
    ranks = corun["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and len({r["pid"] for r in ranks}) == 2
    assert all(r["modules_loaded"] == {"horovod": False, "mpi4py": False} for r in ranks), \
        [r["modules_loaded"] for r in ranks]
    assert max(r["timed_start_unix"] for r in ranks) < min(r["timed_end_unix"] for r in ranks)
    m = corun["metrics"]
    assert m["allreduce_calls"] == m["allgather_calls"] == 0 and m["work_ms"] == 0
    # The real np=2 point: its exchange priced from its counters, its factors multiply back to its efficiency.
    real = records["weak-sparse-gather-np2-r0"]["metrics"]
    link = real["exchange_model"]["link"]
    assert real["allgather_calls"] > 0 and real["work_ms"] > 0
    assert real["exchange_ideal_ms"] == pytest.approx(
        priced_by_hand(real, 2, link["alpha_s"], link["beta_s_per_byte"], link["gamma_s_per_byte"]), rel=1e-9)
    row = df[(df["mode"] == "sparse-gather") & (df["np"] == 2)].iloc[0]
    assert row["exchange_efficiency"] == pytest.approx(real["exchange_ideal_ms"] / real["exchange_ms"])
    assert all(np.isfinite(row[f"point_{f}"]) for f in FACTORS)
    assert math.prod(row[f"point_{f}"] for f in FACTORS) == pytest.approx(row["point_efficiency"], rel=0.01)
    summary = pd.read_csv(out / "summary.csv")
    assert set(POP_COLUMNS) <= set(summary.columns)
    report = (out / "report.md").read_text()
    assert "## Where efficiency goes" in report and "exchange_eff" in report and "uncalibrated host" in report
    assert "mode corun: the co-run baseline" in report
    assert (out / "pop.png").stat().st_size > 0


def _comm_folder(folder, backend: str = "horovod", np_: int = 2) -> None:
    """A comm run's rows: allreduce and allgather latencies (us) at 1 KiB, 64 KiB and 1 MiB, no all-to-all; and a
    setting-B row that must not be read."""
    rows = [{"backend": backend, "op": op, "np": np_, "size_bytes": size, "latency_us_median": us, "setting": "A"}
            for op, table in (("allreduce", ((1024, 20.0), (65536, 100.0), (1 << 20, 900.0))),
                              ("allgather", ((1024, 30.0), (65536, 150.0), (1 << 20, 1500.0))))
            for size, us in table]
    rows.append({"backend": backend, "op": "allreduce", "np": np_, "size_bytes": 65536, "latency_us_median": 1e6,
                 "setting": "B"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comm.json").write_text(json.dumps({"rows": rows}))


def test_measured_comm_rows_price_the_calls_at_their_size_and_the_record_names_them(uncalibrated, monkeypatch,
                                                                                       tmp_path):
    _comm_folder(tmp_path / "comm")
    _comm_folder(tmp_path / "comm" / "mpi", backend="mpi4py")
    monkeypatch.setenv("ALURE_BENCH_COMM_ROWS", str(tmp_path / "comm"))
    # 56 allreduces of 12,500 B each (between 1 and 64 KiB), 12 allgathers of 1.42 MB each (past 1 MiB)
    m = made_up(PointConfig(preset="tiny", mode="sparse-gather", np=2), [phases(10, wait=8)] * 2, [1.0] * 2,
                COUNTERS)["metrics"]
    model, priced = m["exchange_model"], m["exchange_priced"]
    assert model["kind"] == "comm rows" and str(tmp_path / "comm") in model["source"]
    allreduce_us = 20.0 + (7e5 / 56 - 1024) * (100.0 - 20.0) / (65536 - 1024)
    assert priced["allreduce"]["ms"] == pytest.approx(56 * allreduce_us / 1e3, rel=1e-9)
    assert priced["allreduce"]["priced_by"] == "comm rows" and not priced["allreduce"]["extrapolated"]
    gather = 1.7e7 / 12
    allgather_us = 1500.0 + (gather - (1 << 20)) * (1500.0 - 150.0) / ((1 << 20) - 65536)
    assert priced["allgather"]["ms"] == pytest.approx(12 * allgather_us / 1e3, rel=1e-9)
    assert priced["allgather"]["extrapolated"]
    # the rows have no all-to-all: the fit prices it, and says so
    assert priced["alltoall"]["priced_by"] == "fit" and priced["alltoall"]["ms"] > 0
    assert m["exchange_ideal_ms"] == pytest.approx(sum(k["ms"] for k in priced.values()))
    assert "uncalibrated host" in model["source"], "the fallback is named too"
    row = summarize([made_up(PointConfig(preset="tiny", mode="sparse-gather", np=2), [phases(10, wait=8)] * 2,
                             [1.0] * 2, COUNTERS)]).iloc[0]
    assert row["exchange_model"].startswith("measured comm rows of")
    # the raw-MPI backend's points are priced by mpi4py's rows
    mpi = made_up(PointConfig(preset="tiny", mode="sparse-gather", np=2, exchange_backend="mpi"),
                  [phases(10, wait=8)] * 2, [1.0] * 2, COUNTERS)["metrics"]["exchange_model"]
    assert mpi["backend"] == "mpi4py"
    # a folder that holds no comm rows is one line before anything launches
    monkeypatch.setenv("ALURE_BENCH_COMM_ROWS", str(tmp_path / "nothing"))
    from tests.helpers import assert_one_line_error, cli_here
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--nps", "2", "--out", str(tmp_path / "s")),
                          "ALURE_BENCH_COMM_ROWS", "not found")


def test_the_sharded_rows_reverse_all_to_all_is_timed_as_the_exchanges_own_work():
    """bench.ranks.sharded.RowsAlltoall: Horovod's all-to-all forward and, in the backward, the reverse all-to-all
    with the splits received, its time added to work_ms (a stand-in for Horovod that takes 20 ms a call)."""
    import time

    from bench.ranks.sharded import RowsAlltoall

    class SlowHorovod:
        def __init__(self):
            self.calls = []

        def alltoall(self, tensor, splits, name):
            self.calls.append((name, splits.tolist()))
            time.sleep(0.02)
            return tensor * 2, torch.tensor([3, 1], dtype=torch.int32)

    hvd, counters = SlowHorovod(), ExchangeCounters()
    lent = torch.ones(4, 2, requires_grad=True)
    rows = RowsAlltoall.apply(lent, torch.tensor([1, 3], dtype=torch.int32), hvd, counters)
    assert torch.equal(rows, torch.full((4, 2), 2.0)) and counters.work_ms == 0  # the forward: the caller times it
    rows.sum().backward()
    assert hvd.calls == [("sharded.rows", [1, 3]), ("sharded.rows.grad", [3, 1])]  # back with the splits received
    assert torch.equal(lent.grad, torch.full((4, 2), 2.0))
    assert counters.work_ms >= 20
