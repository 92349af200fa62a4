"""The suite's figures, against values worked out by hand."""
import numpy as np
import pytest

from bench.results.scaling import bootstrap_step_time, busbw_factor, efficiency, interval, rank_skew, slowest_rank_per_step, \
    spread, throughput_samples_per_s
from bench.results.summary import SUMMARY_COLUMNS, summarize


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
    return {"point": {"scaling": scaling, "mode": mode, "np": np_, "repeat": 0, "preset": "tiny",
                      "threads_per_rank": 1},
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


def _stepped(scaling, mode, np_, steps, repeat=0, threads=1):
    """An ok record with its per-step (slowest rank) times, as the worker writes it."""
    record = _record(scaling, mode, np_, float(np.median(steps)))
    record["point"]["repeat"] = repeat
    record["threads_per_rank"] = threads
    record["step_time_ms_slowest_rank"] = list(steps)
    return record


def test_bootstrap_interval_holds_the_median_and_widens_with_noise():
    rng = np.random.default_rng(1)
    quiet = [100 + rng.normal(0, 1, 20) for _ in range(5)]
    noisy = [100 + rng.normal(0, 10, 20) for _ in range(5)]
    q_low, q_high = interval(bootstrap_step_time(quiet, np.random.default_rng(0)))
    n_low, n_high = interval(bootstrap_step_time(noisy, np.random.default_rng(0)))
    assert q_low < np.median([np.median(r) for r in quiet]) < q_high
    assert n_high - n_low > 3 * (q_high - q_low)


def test_bootstrap_counts_the_noise_between_repeats():
    # Every repeat is steady within itself, but the repeats disagree: the interval must span them.
    repeats = [np.full(20, t) + np.arange(20) * 1e-3 for t in (90.0, 100.0, 110.0)]
    low, high = interval(bootstrap_step_time(repeats, np.random.default_rng(0)))
    assert low <= 91 and high >= 109


def test_summary_gives_each_point_its_interval_and_efficiency_its_interval():
    rng = np.random.default_rng(2)
    records = [_stepped("weak", "dense-reduce", n, base * (1 + rng.normal(0, 0.05, 20)), r)
               for n, base in ((1, 100.0), (2, 125.0)) for r in range(3)]
    df = summarize(records)
    two = df[df["np"] == 2].iloc[0]
    assert two["repeats_ok"] == 3
    assert two["step_time_ms_ci_low"] < two["point_step_time_ms"] < two["step_time_ms_ci_high"]
    assert two["efficiency_ci_low"] < two["point_efficiency"] < two["efficiency_ci_high"]
    assert two["efficiency_ci_low"] < 0.8 < two["efficiency_ci_high"]
    one = df[df["np"] == 1].iloc[0]
    assert one["efficiency_ci_low"] == one["efficiency_ci_high"] == 1, "the baseline is 1 by definition"
    again = summarize(records)
    assert again["efficiency_ci_low"].equals(df["efficiency_ci_low"]), "the report is reproducible"


def test_efficiency_divides_only_by_the_baseline_of_the_same_threads():
    df = summarize([_stepped("weak", "sparse-gather", 1, [100.0] * 5, threads=2),
                    _stepped("weak", "sparse-gather", 2, [100.0] * 5, threads=1)])
    two = df[df["np"] == 2].iloc[0]
    assert np.isnan(two["efficiency"]) and np.isnan(two["efficiency_ci_low"]), "no baseline ran with 1 thread"
    df = summarize([_stepped("weak", "sparse-gather", 1, [100.0] * 5, threads=1),
                    _stepped("weak", "sparse-gather", 2, [100.0] * 5, threads=1)])
    assert df.loc[df["np"] == 2, "efficiency"].item() == pytest.approx(1.0)
