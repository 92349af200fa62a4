"""alure-bench noise: the machine's share of a sweep's spread, from its records. Synthetic records check each
figure against what was put in; the committed folders check that docs/figures.md says what the command prints."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.results.noise import by_predecessor, by_slot, noise_text, round_correlations, window_cv, windows
from bench.results.records import read_records
from tests.helpers import assert_one_line_error, cli_here

REPO = Path(__file__).resolve().parents[1]


def record(np_: int, mode: str, repeat: int, ms: float, minute: int, steps: list[float] | None = None,
           corun: bool = False) -> dict:
    return {"status": "ok", "np": np_, "started_at": f"2026-01-01T10:{minute:02d}:00+00:00",
            "point": {"scaling": "weak", "mode": mode, "repeat": repeat, "stage": "train", "corun": corun},
            "metrics": {"step_time_ms": ms}, "ranks": [{"step_time_ms": steps or [ms] * 20}]}


def test_the_spells_slots_predecessors_and_round_pairing_are_what_the_records_hold():
    # Round r: np=1 then np=2 of each mode; round 1 is a slow spell for both (np=2 tracks np=1 exactly).
    recs, minute = [], 0
    for r, slow in enumerate((1.0, 1.5, 1.0)):
        for mode in ("a", "b"):
            recs.append(record(1, mode, r, 100 * slow + (mode == "b"), minute))
            recs.append(record(2, mode, r, 200 * slow + 2 * (mode == "b"), minute + 1))
            minute += 2
        minute += 10
    recs.append(record(2, "a", 9, 1.0, minute, corun=True))  # co-runs are not points of the sweep's spread
    slots = dict(by_slot(recs, 10))
    assert slots["10:10"].median_ms > 1.4 and slots["10:00"].median_ms < 1.0  # round 1 ran in the 10:10 slot
    assert set(by_predecessor(recs)) == {"np 2"}  # every np=1 point after round 0's first came after an np=2 one
    r = round_correlations(recs)[("weak", 2)]
    assert r["a"] == pytest.approx(1.0) and r["b"] == pytest.approx(1.0)
    text = noise_text(recs)
    assert "weak: 6 repeats of 2 modes, median 101.0 ms, 100.0-151.0 ms" in text


def test_window_spread_is_that_of_the_window_medians():
    steps = [10.0] * 10 + [20.0] * 10
    assert window_cv(steps, 10) == pytest.approx(1 / 3)  # medians 10 and 20: std 5, mean 15
    assert window_cv(steps, 20) is None  # one window has no spread
    assert windows([record(1, "a", 0, 15.0, 0, steps)]) == {5: (1, pytest.approx(1 / 3)), 10: (1, pytest.approx(1 / 3))}


@pytest.mark.parametrize("args, fragment", [(["noise", "no/such/folder"], "has no points/ folder"),
                                            *[(["noise", "results/reference", "--slot-minutes", m],
                                               "does not divide an hour") for m in ("7", "0", "-60", "120")]])
def test_bad_input_is_one_line(args, fragment):
    assert_one_line_error(cli_here(*args), fragment)


def test_a_folder_without_np1_points_is_bad_input(tmp_path):
    (tmp_path / "points").mkdir()
    assert_one_line_error(cli_here("noise", str(tmp_path)), "no ok np=1 training point")


# What docs/figures.md "What the intervals are made of" quotes, per committed folder: each must be in the command's
# output on that folder and in the doc, so neither can drift from the files.
QUOTED = {
    "results/reference": ["weak: 56 repeats of 7 modes, median 75.0 ms,\n  63.9-101.2 ms, CV 13.1%",
                          "13:10: 14 repeats, median 0.89", "14:10: 27 repeats, median 1.11",
                          "after np 1: 49 repeats, median 1.00", "after np 2: 39 repeats, median\n  1.00",
                          "weak np 2: r -0.26 to 0.45 over 7 modes", "w = 10: CV 3.7% (112 repeats)"],
    "results/machine-noise/back-to-back": ["weak: 8 repeats of 1 modes, median\n63.1 ms, 61.9-63.8 ms, CV 1.0%"],
    "results/machine-noise/one-long-run": ["w = 200: CV 3.6% (1 repeats)", "w = 20: CV 4.4% (1 repeats)"],
}


@pytest.mark.parametrize("folder", sorted(QUOTED))
def test_the_doc_says_what_noise_prints_on_the_committed_folders(folder):
    printed = " ".join(noise_text(read_records(REPO / folder)).split())
    doc = " ".join((REPO / "docs/figures.md").read_text().split())
    for quote in QUOTED[folder]:
        flat = " ".join(quote.split())
        assert flat in printed, f"alure-bench noise {folder} no longer prints {flat!r}"
        assert flat in doc, f"docs/figures.md should say {flat!r} (alure-bench noise {folder})"
