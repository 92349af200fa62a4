"""The suite's figures, against values worked out by hand."""
import numpy as np
import pytest

from bench.results.ranking import mode_ranking
from bench.results.scaling import (
    bootstrap_step_time,
    busbw_factor,
    efficiency,
    interval,
    overlapping,
    pace_phase_means,
    paired_efficiency,
    rank_skew,
    slowest_rank_per_step,
    spread,
    throughput_samples_per_s,
)
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


def test_the_bootstrap_resamples_whole_repeats_not_their_steps():
    # Steps that scatter widely within each run, but every run has the same median: runs of this point do not
    # disagree, and steps resampled one by one would invent a spread between them.
    repeats = [[80.0, 100.0, 120.0] * 7 for _ in range(4)]
    assert interval(bootstrap_step_time(repeats, np.random.default_rng(0))) == (100.0, 100.0)
    # Two steady runs at 100 and 110: a draw's median over two resampled runs is 100, 105 or 110, nothing else.
    draws = bootstrap_step_time([[100.0] * 9, [110.0] * 9], np.random.default_rng(0))
    assert set(np.unique(draws)) == {100.0, 105.0, 110.0}


def test_one_repeat_gets_an_interval_of_its_own_steps_noise():
    # 27 steps: blocks of 3. A run slow in its first part and fast after: every block lies within a part or
    # across the one boundary, so a draw's median stays between the parts' times.
    steps = [120.0] * 13 + [100.0] * 14
    draws = bootstrap_step_time([steps], np.random.default_rng(0))
    low, high = interval(draws)
    assert 100.0 <= low < 110.0 < high <= 120.0
    assert draws.min() >= 100.0 and draws.max() <= 120.0


def test_efficiency_is_paired_by_round_so_a_slow_round_cancels():
    # Round r slowed np=1 and np=2 alike (by 0.9 ... 1.2): each round's efficiency is 100/125 = 0.8 exactly.
    slow = {r: k for r, k in enumerate((0.9, 1.0, 1.1, 1.2))}
    baseline = {r: [100.0 * k] * 5 for r, k in slow.items()}
    point = {r: [125.0 * k] * 5 for r, k in slow.items()}
    paired = interval(paired_efficiency("weak", baseline, point, 2, np.random.default_rng(0)))
    assert paired == pytest.approx((0.8, 0.8))
    # Bootstrapped apart, the same runs give a wide interval.
    apart = interval(efficiency("weak", bootstrap_step_time(list(baseline.values()), np.random.default_rng(0)),
                                bootstrap_step_time(list(point.values()), np.random.default_rng(1)), 2))
    assert apart[1] - apart[0] > 0.2


def test_pairing_leaves_out_rounds_one_side_lacks():
    baseline = {0: [100.0] * 5, 1: [100.0] * 5, 2: [50.0] * 5}  # round 2 of np=2 failed
    point = {0: [125.0] * 5, 1: [125.0] * 5}
    assert interval(paired_efficiency("weak", baseline, point, 2, np.random.default_rng(0))) == \
        pytest.approx((0.8, 0.8))


def test_summary_efficiency_intervals_pair_the_rounds():
    slow = (0.9, 1.0, 1.1, 1.2)
    records = [_stepped("weak", "dense-reduce", n, [t * k] * 5, r) for r, k in enumerate(slow)
               for n, t in ((1, 100.0), (2, 125.0))]
    two = summarize(records).query("np == 2").iloc[0]
    assert (two["efficiency_ci_low"], two["efficiency_ci_high"]) == pytest.approx((0.8, 0.8))
    assert two["step_time_ms_ci_low"] < 125.0 < two["step_time_ms_ci_high"], "the step time keeps the rounds' noise"


def test_phase_means_of_the_pace_setting_rank_add_up_to_the_mean_step():
    # Rank 1 sets step 0's pace, rank 0 step 1's.
    ranks = [{"step_time_ms": [10.0, 30.0], "phase_ms": {"data": [1, 2], "forward": [4, 10], "backward": [4, 14],
                                                          "exchange_wait": [0, 2], "optimizer": [1, 2]}},
             {"step_time_ms": [20.0, 12.0], "phase_ms": {"data": [2, 1], "forward": [6, 4], "backward": [8, 4],
                                                          "exchange_wait": [2, 2], "optimizer": [2, 1]}}]
    means = pace_phase_means(ranks)
    assert means == {"data": 2.0, "forward": 8.0, "backward": 11.0, "exchange_wait": 2.0, "optimizer": 2.0}
    assert sum(means.values()) == pytest.approx(np.mean([20.0, 30.0]))


def test_overlapping_intervals_are_the_pairs_not_told_apart():
    pairs = overlapping({"a": (0.70, 0.80), "b": (0.78, 0.90), "c": (0.95, 1.0), "d": (0.90, 0.92),
                         "e": (float("nan"), float("nan"))})
    assert pairs == [("a", "b"), ("b", "d")]


def test_the_report_says_which_modes_it_does_not_tell_apart():
    # Weak np=2: dense-reduce clearly slower; sparse-gather and auto 1% apart under 5% round-to-round noise, which
    # lands on each mode's rounds in another order.
    noise = {"sparse-gather": (0.95, 1.0, 1.05, 0.97, 1.03), "auto": (1.03, 0.95, 0.97, 1.05, 1.0),
             "dense-reduce": (1.0, 1.05, 0.95, 1.03, 0.97)}
    times = {"sparse-gather": 120.0, "auto": 121.0, "dense-reduce": 200.0}
    records = [_stepped("weak", mode, n, [(100.0 if n == 1 else times[mode]) * k ** (n - 1)] * 5, r)
               for mode in times for r, k in enumerate(noise[mode]) for n in (1, 2)]
    lines = mode_ranking(summarize(records))
    step = next(line for line in lines if "step time" in line)
    assert step.startswith("weak np=2 step time: sparse-gather < auto < dense-reduce")
    assert step.endswith("not distinguished: sparse-gather ~ auto")
    assert any(line.startswith("weak np=2 efficiency: sparse-gather > auto > dense-reduce") for line in lines)


def test_the_report_says_whether_a_points_settings_a_and_b_are_told_apart():
    # row-wise under setting A and B (a workload override): B 30% slower at np=2, told apart; np=1 the same.
    noise = (0.98, 1.0, 1.02, 0.99, 1.01)
    records = []
    for r, k in enumerate(noise):
        for setting, slower in (({}, 1.0), ({"shard_rows": "residue"}, 1.3)):
            for n in (1, 2):
                record = _stepped("weak", "row-wise", n, [100.0 * k * (slower if n == 2 else 1.0)] * 5, r)
                record["point"]["workload_b"] = setting
                records.append(record)
    lines = mode_ranking(summarize(records))
    assert "weak row-wise np=2 step time: A < B (shard_rows=residue); told apart" in lines
    assert "weak row-wise np=2 efficiency: A > B (shard_rows=residue); told apart" in lines
    # one mode per setting: no line ranks row-wise against itself
    assert not any("[B:" in line for line in lines)
