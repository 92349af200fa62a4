"""Every bad sweep setting is refused at construction with a message that says how to mend it."""
import pytest

from bench.errors import UsageError
from bench.plan.config import PointConfig, SweepConfig


def test_the_default_plan_covers_scaling_mode_and_np():
    plan = SweepConfig().plan()
    assert len(plan) == 10
    assert {(p.scaling, p.mode, p.np) for p in plan if not p.corun} == {
        (s, m, n) for s in ("weak", "strong") for m in ("sparse-gather", "dense-reduce") for n in (1, 2)}
    # and a co-run baseline per scaling kind at np=2 (docs/efficiency.md)
    assert sorted(p.point_id for p in plan if p.corun) == ["corun-strong-np2-r0", "corun-weak-np2-r0"]
    assert [p.np for p in plan] == sorted(p.np for p in plan), "np=1 first: a partial sweep keeps its baselines"


@pytest.mark.parametrize("data, message", [
    ({"nps": [0, 1]}, "positive whole numbers"),
    ({"modes": ["sparse"]}, "modes must be"),
    ({"scalings": []}, "scalings must be"),
    ({"steps": "ten"}, "should be a int"),
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"stepz": 3}, "unknown sweep setting"),
    ({"global_batch": 10, "nps": [1, 3]}, "divisible"),
])
def test_bad_sweep_settings_say_what_is_wrong(data, message):
    with pytest.raises(UsageError, match=message):
        SweepConfig.from_dict(data)


def test_a_malformed_toml_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "sweep.toml"
    bad.write_text("[sweep]\nnps = [1, 2\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        SweepConfig.from_toml(bad)
    with pytest.raises(UsageError, match="not found"):
        SweepConfig.from_toml(tmp_path / "missing.toml")


def test_a_toml_sweep_builds_the_same_config(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[sweep]\npreset = "tiny"\nnps = [1, 2, 4]\nmodes = ["dense-reduce"]\nsteps = 5\n'
                    '[sweep.workload]\nsampled_negatives = 512\n')
    config = SweepConfig.from_toml(path)
    assert config == SweepConfig(preset="tiny", nps=[1, 2, 4], modes=["dense-reduce"], steps=5,
                                 workload={"sampled_negatives": 512})


def test_point_ids_are_stable_file_names():
    assert PointConfig(scaling="strong", mode="dense-reduce", np=4, repeat=2).point_id == \
        "strong-dense-reduce-np4-r2"


def test_repeats_interleave_in_seeded_rounds_with_the_baselines_first():
    config = SweepConfig(nps=[1, 2, 3], repeats=3)
    plan = config.plan()
    points = {(p.scaling, p.mode, p.np, p.corun) for p in plan}
    per_round = len(points)
    for r in range(3):
        round_ = plan[r * per_round:(r + 1) * per_round]
        assert {p.repeat for p in round_} == {r} and {(p.scaling, p.mode, p.np, p.corun) for p in round_} == points
    assert [p.np for p in plan[:4]] == [1] * 4, "round 0 measures every np=1 baseline first"
    orders = [[(p.scaling, p.mode, p.np, p.corun) for p in plan[r * per_round:(r + 1) * per_round]] for r in range(3)]
    assert orders[1] != orders[2], "each round has its own shuffled order"
    assert plan == SweepConfig(nps=[1, 2, 3], repeats=3).plan(), "the order is seeded"
    assert plan != SweepConfig(nps=[1, 2, 3], repeats=3, seed=1).plan()


def test_no_interleave_runs_each_points_repeats_back_to_back():
    plan = SweepConfig(nps=[1, 2], repeats=2, interleave=False).plan()
    assert [(p.np, p.repeat) for p in plan[:2]] == [(1, 0), (1, 1)]
    assert [p.np for p in plan] == sorted(p.np for p in plan)


@pytest.mark.parametrize("interleave", [True, False])
def test_repeats_by_np_gives_the_named_rank_counts_their_own_repeats(interleave, tmp_path):
    config = SweepConfig(nps=[1, 2, 3, 4], repeats=4, repeats_by_np={3: 2, 4: 1}, interleave=interleave)
    plan = config.plan()
    repeats = {n: sorted({p.repeat for p in plan if p.np == n}) for n in (1, 2, 3, 4)}
    assert repeats == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3], 3: [0, 1], 4: [0]}
    per_point = {}
    for p in plan:
        per_point.setdefault((p.scaling, p.mode, p.np, p.corun), []).append(p.repeat)
    assert all(sorted(r) == list(range(config.repeats_at(k[2]))) for k, r in per_point.items())
    toml = tmp_path / "s.toml"
    toml.write_text("[sweep]\nnps = [1, 3]\nrepeats = 3\nrepeats_by_np = {3 = 1}\n")
    assert SweepConfig.from_toml(toml).repeats_at(3) == 1 and SweepConfig.from_toml(toml).repeats_at(1) == 3


@pytest.mark.parametrize("bad", [{3: 0}, {"three": 2}, [3, 1]])
def test_repeats_by_np_that_is_not_a_count_per_np_is_one_line(bad):
    with pytest.raises(UsageError, match="repeats_by_np"):
        SweepConfig(nps=[1, 3], repeats_by_np=bad)


def test_every_point_runs_the_same_threads():
    assert {p.threads_per_rank for p in SweepConfig(nps=[1, 2, 4]).plan()} == {1}
    assert {p.threads_per_rank for p in SweepConfig(nps=[1, 2], threads_per_rank=2).plan()} == {2}
    with pytest.raises(UsageError, match="threads_per_rank must be at least 1"):
        SweepConfig(threads_per_rank=0)


def test_sweep_flags_set_interleave_and_threads():
    import argparse

    from bench.cli.sweep import add_plan_flags, sweep_config_from_args
    parser = argparse.ArgumentParser()
    add_plan_flags(parser, out_help="")
    default = sweep_config_from_args(parser.parse_args(["--preset", "tiny"]))
    assert default.interleave and default.threads_per_rank == 1
    config = sweep_config_from_args(parser.parse_args(["--preset", "tiny", "--no-interleave", "--threads", "2"]))
    assert not config.interleave and config.threads_per_rank == 2
