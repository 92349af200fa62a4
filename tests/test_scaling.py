"""The figures of DESIGN.md, against values worked out by hand."""
import numpy as np
import pytest

from bench.scaling import busbw_factor, efficiency, rank_skew, slowest_rank_per_step, spread, \
    throughput_samples_per_s
from bench.summary import SUMMARY_COLUMNS, summarize


def test_weak_efficiency_is_t1_over_tp():
    assert efficiency("weak", 100.0, 125.0, 4) == pytest.approx(0.8)


def test_strong_efficiency_divides_by_p():
    # 100 ms alone, 40 ms on 4 ranks: ideal would be 25 ms, so 25/40.
    assert efficiency("strong", 100.0, 40.0, 4) == pytest.approx(0.625)


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="weak or strong"):
        efficiency("sideways", 1, 1, 1)


def test_the_slowest_rank_sets_each_steps_time():
    step_ms = np.array([[10, 30, 20], [12, 25, 22]])
    assert slowest_rank_per_step(step_ms).tolist() == [12, 30, 22]
    # skews per step: 2/12, 5/30, 2/22 -> median 2/12
    assert rank_skew(step_ms) == pytest.approx(2 / 12)


def test_spread_is_median_with_p10_p90():
    s = spread(range(1, 12))  # 1..11
    assert (s["median"], s["p10"], s["p90"]) == (6, 2, 10)


def test_throughput_counts_the_global_batch():
    assert throughput_samples_per_s(256, 128.0) == pytest.approx(2000.0)


def test_busbw_factors_follow_nccl_tests():
    assert busbw_factor("allreduce", 4) == pytest.approx(1.5)
    assert busbw_factor("allgather", 4) == pytest.approx(0.75)
    assert busbw_factor("allreduce", 1) == 0


def _record(scaling, mode, np_, step_ms, status="ok"):
    metrics = None if status != "ok" else {"step_time_ms": step_ms, "step_time_ms_p10": step_ms,
                                            "step_time_ms_p90": step_ms, "throughput_samples_per_s": 1.0,
                                            "peak_rss_mib": 1.0, "exchange_bytes_held": 0, "phase_ms": {}}
    return {"point": {"scaling": scaling, "mode": mode, "np": np_, "repeat": 0, "preset": "tiny"},
            "status": status, "reason": None if status == "ok" else "boom", "oversubscribed": np_ > 2,
            "metrics": metrics}


def test_summary_has_the_design_columns_and_efficiency_per_mode_and_scaling():
    df = summarize([_record("weak", "dense-reduce", 1, 100.0), _record("weak", "dense-reduce", 2, 125.0),
                    _record("strong", "dense-reduce", 1, 100.0), _record("strong", "dense-reduce", 4, 40.0),
                    _record("weak", "sparse-gather", 1, 50.0), _record("weak", "sparse-gather", 2, 0, "oom")])
    assert list(df.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    eff = {(r.scaling, r.mode, r.np): r.efficiency for r in df.itertuples()}
    assert eff[("weak", "dense-reduce", 2)] == pytest.approx(0.8)
    assert eff[("strong", "dense-reduce", 4)] == pytest.approx(0.625)
    assert eff[("weak", "sparse-gather", 1)] == pytest.approx(1.0)
    assert np.isnan(eff[("weak", "sparse-gather", 2)])
    assert df.loc[df["np"] == 4, "oversubscribed"].item()
