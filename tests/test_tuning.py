"""`alure-bench tune`: Horovod's knob settings, each an interleaved A/B sweep against the launcher's settings; the table
has every setting and mode with paired intervals, names a preferred setting only when Holm's step-down over the
mode's settings finds it faster, and says whether each setting reached the ranks; `--tabulate` rebuilds it from the
records. On real ranks: two settings, the table complete and each setting in its records' horovod_settings."""
import json

import numpy as np
import pandas as pd
import pytest

from bench.launch.mpirun import HOROVOD_SETTINGS, mpi_environment
from bench.plan.config import PointConfig, SweepConfig
from bench.plan.tuning import (
    AUTOTUNE_LOG,
    GROUPED_ALLGATHER,
    KNOBS,
    autotune_steps,
    knob_settings,
    tuning_sweeps,
)
from bench.results.records import write_record
from bench.results.tuning import (
    NOT_TOLD_APART,
    PREFER_ALPHA,
    TUNE_COLUMNS,
    autotune_choice,
    autotune_line,
    holm_faster,
    preferred,
    rounds_to_tell_apart,
    setting_rows,
    tuning_table,
)
from tests.helpers import TINY, assert_one_line_error, cli, cli_here
from tests.synthetic import point_record


def test_every_knob_setting_is_a_valid_launch_setting_and_names_the_grouped_gather_as_the_ranks_read_it():
    from bench.ranks.grouped_gather import VARIABLE
    assert GROUPED_ALLGATHER == VARIABLE
    for knob, settings in KNOBS.items():
        assert settings, knob
        for setting in settings:
            PointConfig(launch_env=setting.variables)  # raises on a malformed variable
    slugs = [s.slug for s in knob_settings(list(KNOBS))]
    assert len(set(slugs)) == len(slugs)


def test_an_empty_value_unsets_the_launchers_knob_so_autotune_may_tune_it():
    assert "HOROVOD_CYCLE_TIME" not in mpi_environment(2, base={"HOROVOD_CYCLE_TIME": ""}, shared_memory="none")
    assert mpi_environment(2, base={}, shared_memory="none")["HOROVOD_CYCLE_TIME"] == HOROVOD_SETTINGS["HOROVOD_CYCLE_TIME"]


def test_each_setting_gets_its_own_ab_sweep_and_autotune_warms_up_for_its_search(tmp_path):
    base = SweepConfig(preset="tiny", nps=[2], modes=["sparse-gather"], scalings=["weak"], corun=False, repeats=2)
    sweeps = tuning_sweeps(base, knob_settings(["cycle-time", "autotune"]), tmp_path)
    assert [s.folder.name for s in sweeps] == ["cycle-time-0.1", "cycle-time-1", "cycle-time-5", "autotune"]
    for sweep in sweeps:
        plan = sweep.config.plan()
        assert sorted(p.launch_env == {} for p in plan) == [False, False, True, True], "A and B in every round"
        assert {p.warmup_steps for p in plan} == {autotune_steps() if sweep.setting.autotune else base.warmup_steps}
    autotune = sweeps[-1].config.compare_env
    assert autotune["HOROVOD_AUTOTUNE"] == "1" and autotune["HOROVOD_CYCLE_TIME"] == ""
    assert autotune["HOROVOD_AUTOTUNE_LOG"] == str((tmp_path / "autotune" / AUTOTUNE_LOG).resolve())
    assert {p.warmup_steps for p in tuning_sweeps(base, knob_settings(["autotune"]), tmp_path, 50)[0].config.plan()} \
        == {50}


def test_bad_tuning_input_is_one_line(tmp_path):
    assert_one_line_error(cli_here("tune", "--knobs", "cycle,fusion", "--out", str(tmp_path / "a")), "unknown knob",
                          "cycle-time")
    assert_one_line_error(cli_here("tune", "--np", "1", "--out", str(tmp_path / "b")), "np >= 2")
    assert_one_line_error(cli_here("tune", "--knobs", "", "--out", str(tmp_path / "c")), "no setting to try")
    assert_one_line_error(cli_here("tune", "--knobs", "", "--setting", "CYCLE", "--out", str(tmp_path / "d")),
                          "--setting 'CYCLE' is not VAR=VALUE")
    assert_one_line_error(cli_here("tune", "--knobs", "", "--setting", "A=1", "--setting", "A=1", "--out",
                                   str(tmp_path / "e")), "asked for twice")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "tune.csv").write_text("knob\n")
    assert_one_line_error(cli_here("tune", "--knobs", "response-cache", *TINY, "--out", str(tmp_path / "f")),
                          "already holds a tuning")
    assert_one_line_error(cli_here("tune", "--tabulate"), "--tabulate needs --out DIR")
    assert_one_line_error(cli_here("tune", "--tabulate", "--out", str(tmp_path / "f")), "holds no tuning")


def test_tabulate_rebuilds_the_table_from_the_setting_folders_records(tmp_path):
    from bench.results.records import atomic_write_text
    from bench.run.sweep import SWEEP_FILE
    base = SweepConfig(preset="tiny", nps=[2], modes=["sparse-gather"], scalings=["weak"], corun=False, repeats=8)
    for sweep, b_over_a in zip(tuning_sweeps(base, knob_settings(["cycle-time"]), tmp_path), (0.8, 1.0, 1.0)):
        _ab_folder(sweep.folder, sweep.config.compare_env, b_over_a)
        atomic_write_text(sweep.folder / SWEEP_FILE, json.dumps(sweep.config.as_dict()))
    done = cli_here("tune", "--tabulate", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "tune.csv")
    assert sorted(table["setting"]) == ["HOROVOD_CYCLE_TIME=0.1", "HOROVOD_CYCLE_TIME=1", "HOROVOD_CYCLE_TIME=5"]
    assert set(table["knob"]) == {"cycle-time"} and table["reached_ranks"].all()
    text = (tmp_path / "tune.md").read_text()
    assert "8 repeats" in text and "Tabulated again" in text and "- sparse-gather: HOROVOD_CYCLE_TIME=0.1" in text


def test_the_default_rounds_are_the_fewest_that_can_tell_a_setting_apart():
    for settings in (1, 2, 10, 40):
        n = rounds_to_tell_apart(settings)
        assert 2.0 ** -n <= PREFER_ALPHA / settings < 2.0 ** -(n - 1)


def _ab_folder(folder, variables: dict, b_over_a: float, rounds: int = 8) -> None:
    """A setting's sweep folder of made-up records: A and B in every round, B `b_over_a` times A's step, the round's
    drift shared by both; each record's horovod_settings as its ranks would have read them."""
    for r in range(rounds):
        drift = 1 + 0.1 * r
        for env, factor in (({}, 1.0), (variables, b_over_a)):
            point = PointConfig(preset="tiny", mode="sparse-gather", np=2, repeat=r, launch_env=dict(env))
            record = point_record(point, 50.0 * drift * factor)
            record["horovod_settings"] = {**HOROVOD_SETTINGS, **env}
            write_record(folder, record)


def test_the_table_pairs_b_with_a_by_round_and_prefers_only_a_setting_told_apart(tmp_path):
    faster, same = {"HOROVOD_CYCLE_TIME": "1"}, {"HOROVOD_CACHE_CAPACITY": "0"}
    _ab_folder(tmp_path / "fast", faster, 0.8)
    _ab_folder(tmp_path / "same", same, 1.0)
    rows = setting_rows("cycle-time", "HOROVOD_CYCLE_TIME=1", faster, tmp_path / "fast") + \
        setting_rows("response-cache", "HOROVOD_CACHE_CAPACITY=0", same, tmp_path / "same")
    table = tuning_table(rows)
    assert list(table.columns) == TUNE_COLUMNS and len(table) == 2
    assert table.drop(columns=["a_exchange_efficiency", "a_exchange_efficiency_ci_low",
                               "a_exchange_efficiency_ci_high", "b_exchange_efficiency",
                               "b_exchange_efficiency_ci_low", "b_exchange_efficiency_ci_high"]).notna().all().all()
    fast, flat = table.iloc[0], table.iloc[1]
    # the drift of the rounds is shared: paired, the ratio's interval is tight around 0.8 although A spans 50-85 ms
    assert fast["step_ratio"] == pytest.approx(0.8, rel=0.02) and fast["step_ratio_ci_high"] < 0.85
    assert fast["a_step_time_ms_ci_high"] / fast["a_step_time_ms_ci_low"] > 1.1
    assert flat["step_ratio_ci_low"] <= 1 <= flat["step_ratio_ci_high"]
    # eight rounds all faster: the sign-flip p is 2^-8, no less; a tie is not faster
    assert fast["step_ratio_p_not_faster"] == pytest.approx(2 ** -8) and flat["step_ratio_p_not_faster"] == 1
    assert fast["reached_ranks"] and flat["reached_ranks"] and fast["repeats_ok_b"] == "8/8"
    assert preferred(table) == {"sparse-gather": "HOROVOD_CYCLE_TIME=1"}
    assert preferred(table.iloc[1:]) == {"sparse-gather": NOT_TOLD_APART}
    one_round = table.assign(repeats_ok_a="1/1")
    assert preferred(one_round) == {"sparse-gather": NOT_TOLD_APART}, "one round's interval is its steps' noise"
    # a setting the ranks never saw is neither reached nor preferred
    lost = tuning_table(setting_rows("cycle-time", "HOROVOD_CYCLE_TIME=2", {"HOROVOD_CYCLE_TIME": "2"},
                                     tmp_path / "fast"))
    assert not lost["reached_ranks"].iloc[0]


def test_holm_holds_the_smallest_p_to_alpha_over_m_and_stops_at_the_first_that_fails():
    alpha = PREFER_ALPHA
    # alone, p = 0.02 passes; among ten settings it is held to 0.0025 and fails
    assert holm_faster(pd.Series([0.02]), alpha).tolist() == [True]
    assert not holm_faster(pd.Series([0.02] + [0.5] * 9), alpha).any()
    # step-down: 0.001 <= 0.025/3 passes, 0.011 <= 0.025/2 passes, 0.03 > 0.025 fails
    assert holm_faster(pd.Series([0.03, 0.001, 0.011]), alpha).tolist() == [False, True, True]
    # a NaN p counts in the family and is never faster; the one after a failure is not tested
    assert holm_faster(pd.Series([float("nan"), 0.012]), alpha).tolist() == [False, True]
    # the last is held to alpha itself once the others passed; a failure stops the rest, smaller than alpha or not
    assert holm_faster(pd.Series([0.02, 0.011, 0.001]), alpha).tolist() == [True, True, True]
    assert holm_faster(pd.Series([0.02, 0.013, 0.001]), alpha).tolist() == [False, False, True]


def test_the_sign_flip_p_is_exact_and_cannot_say_more_than_its_rounds():
    from bench.results.scaling import paired_sign_flip_p
    rng = np.random.default_rng(0)
    a = {r: [100.0] for r in range(5)}
    assert paired_sign_flip_p(a, {r: [90.0] for r in range(5)}, rng) == 2 ** -5, "5 rounds all faster: 1/32"
    assert paired_sign_flip_p(a, {r: [110.0] for r in range(5)}, rng) == 1.0
    # one round of five slower by as much as the others are faster: the sign assignments whose mean is at or below
    # the observed one are those with at most one round positive, 1 + 5 of 32
    mixed = {0: [110.0], 1: [100 / 1.1], 2: [100 / 1.1], 3: [100 / 1.1], 4: [100 / 1.1]}
    assert paired_sign_flip_p(a, mixed, rng) == pytest.approx(6 / 32)
    assert np.isnan(paired_sign_flip_p(a, {7: [90.0]}, rng)), "no common round"


def test_a_setting_faster_alone_is_not_preferred_among_many_that_are_not(tmp_path):
    """The table of a real run, its p values set: one setting at p = 0.02 (the 95% interval of its ratio below 1), ten
    that change nothing. Alone it is preferred; in the family of eleven Holm holds it to 0.025 / 11."""
    _ab_folder(tmp_path / "fast", {"HOROVOD_CYCLE_TIME": "1"}, 0.9)
    one = tuning_table(setting_rows("cycle-time", "HOROVOD_CYCLE_TIME=1", {"HOROVOD_CYCLE_TIME": "1"},
                                    tmp_path / "fast"))
    table = pd.concat([one.assign(step_ratio_p_not_faster=0.02)] +
                      [one.assign(setting=f"HOROVOD_CYCLE_TIME={i}", step_ratio=1.0, step_ratio_p_not_faster=0.6)
                       for i in range(2, 12)], ignore_index=True)
    assert preferred(table.iloc[:1]) == {"sparse-gather": "HOROVOD_CYCLE_TIME=1"}
    assert preferred(table) == {"sparse-gather": NOT_TOLD_APART}
    # a setting that did not reach the ranks is not in the family: with the other ten left out it is preferred again
    assert preferred(table.assign(reached_ranks=[True] + [False] * 10)) == {"sparse-gather": "HOROVOD_CYCLE_TIME=1"}


def test_autotune_log_says_how_far_the_search_got_and_its_best_setting(tmp_path):
    log = tmp_path / "log.csv"
    assert autotune_choice(log) is None
    log.write_text("cache_enabled,cycle_time_ms,fusion,score\n 0,5,4,3.1\n 1,2.5,16,12\n 1,1,64,7\n")
    choice = autotune_choice(log)
    assert choice["samples"] == 3 and choice["last"]["cycle_time_ms"] == "1"
    assert choice["best"] == {"cache_enabled": "1", "cycle_time_ms": "2.5", "fusion": "16", "score": "12"}
    assert "3 rows logged" in autotune_line("autotune", choice) and "cycle_time_ms=2.5" in \
        autotune_line("autotune", choice)
    assert "no row in its log" in autotune_line("autotune", None)


@pytest.mark.mpi
def test_tune_two_settings_on_real_ranks_tables_both_and_each_reached_the_ranks(tmp_path):
    """Two settings (a knob of the catalogue and one of the command line, which unsets a launcher value), one mode,
    one round: four launches."""
    out = tmp_path / "tune"
    run = cli("tune", "--knobs", "grouped-allgather", "--setting", "HOROVOD_CYCLE_TIME=1 HOROVOD_FUSION_THRESHOLD=",
              "--modes", "sparse-gather", "--repeats", "1", *TINY, "--steps", "2", "--out", str(out), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "tune.csv")
    assert list(table.columns) == TUNE_COLUMNS
    assert sorted(table["folder"]) == ["custom-cycle_time-1-fusion_threshold-", "grouped-allgather-1"]
    assert (table["mode"] == "sparse-gather").all() and table["reached_ranks"].all()
    for column in ("a_step_time_ms", "b_step_time_ms", "step_ratio", "step_ratio_ci_low", "step_ratio_ci_high",
                   "a_exchange_wait_ms", "b_exchange_wait_ms", "wait_ratio", "b_exchange_efficiency"):
        assert table[column].notna().all(), column
    assert "The step prefers" in (out / "tune.md").read_text()
    records = {p.parent.parent.name + "/" + p.stem: json.loads(p.read_text()) for p in out.glob("*/points/*.json")}
    grouped = records["grouped-allgather-1/weak-sparse-gather-np2-r0-envB"]["horovod_settings"]
    assert grouped[GROUPED_ALLGATHER] == "1"
    assert GROUPED_ALLGATHER not in records["grouped-allgather-1/weak-sparse-gather-np2-r0"]["horovod_settings"]
    custom = records["custom-cycle_time-1-fusion_threshold-/weak-sparse-gather-np2-r0-envB"]["horovod_settings"]
    assert custom["HOROVOD_CYCLE_TIME"] == "1" and "HOROVOD_FUSION_THRESHOLD" not in custom
    a = records["custom-cycle_time-1-fusion_threshold-/weak-sparse-gather-np2-r0"]["horovod_settings"]
    assert a["HOROVOD_CYCLE_TIME"] == HOROVOD_SETTINGS["HOROVOD_CYCLE_TIME"]
    assert a["HOROVOD_FUSION_THRESHOLD"] == HOROVOD_SETTINGS["HOROVOD_FUSION_THRESHOLD"]
