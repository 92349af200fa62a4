"""report.md's "Horovod against raw MPI" (bench.results.backends): Horovod's step and exchange time over the MPI
backend's per point, paired by round, on made-up records whose ratio is known."""

import pytest

from bench.plan.config import SweepConfig
from bench.results.backends import backend_table, format_backends
from tests.synthetic import point_record


def records(horovod_ms: float, mpi_ms: float) -> list[dict]:
    config = SweepConfig(name="b", preset="tiny", nps=[1, 2], modes=["sparse-gather"], scalings=["weak"], repeats=3,
                         exchange_backends=["horovod", "mpi"], corun=False)
    out = []
    for point in config.plan():
        slow = 1.0 + 0.1 * point.repeat  # a round that ran slow ran slow for both backends
        step = (horovod_ms if point.exchange_backend == "horovod" else mpi_ms) * slow
        out.append(point_record(point, step))
    return out

def test_horovod_over_mpi_is_the_ratio_of_their_medians_and_its_paired_interval_is_tight():
    table = backend_table(records(80.0, 100.0))
    assert len(table) == 1  # np=2 only: at np=1 nothing is exchanged
    row = table.iloc[0]
    assert (row["mode"], row["np"], row["repeats"]) == ("sparse-gather", 2, "3/3")
    assert row["step_ratio"] == pytest.approx(0.8, rel=1e-6)
    # the rounds' shared slowdown cancels: paired, the interval is the ratio itself
    assert row["step_ratio_ci_low"] == pytest.approx(0.8, rel=1e-6) == row["step_ratio_ci_high"]
    assert row["exchange_ratio"] == pytest.approx(0.8, rel=1e-6)  # point_record's exchange scales with the step
    assert "0.80 [0.80, 0.80]" in format_backends(table)

def test_a_sweep_of_one_backend_has_no_such_table():
    only_horovod = [r for r in records(80.0, 100.0) if r["point"]["exchange_backend"] == "horovod"]
    assert backend_table(only_horovod).empty
    failed = [replace_status(r) if r["point"]["exchange_backend"] == "mpi" else r for r in records(80.0, 100.0)]
    assert backend_table(failed).empty

def replace_status(record: dict) -> dict:
    return {**record, "status": "failed"}
