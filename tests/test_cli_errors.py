"""Bad input: one line that says what is wrong and how to mend it, a non-zero exit, no traceback."""
import json
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, cli, cli_here

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_flag():
    # through a process of its own, as a user runs it; the others run the command in this process (quicker)
    assert_one_line_error(cli("sweep", "--npz", "1,2"), "unrecognized arguments")


def test_impossible_rank_count():
    assert_one_line_error(cli_here("sweep", "--nps", "0,1"), "positive whole numbers")
    assert_one_line_error(cli_here("sweep", "--nps", "1,two"), "comma-separated list")


def test_uneven_strong_split():
    assert_one_line_error(cli_here("sweep", "--nps", "1,3", "--global-batch", "64"), "divisible")


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep\nnps = 1")
    assert_one_line_error(cli_here("sweep", "--config", str(bad)), "not valid TOML", str(bad))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[sweep]\nmodes = ["sparse-gather", "bogus"]\n')
    assert_one_line_error(cli_here("sweep", "--config", str(wrong)), "modes must be")


def test_unknown_preset_and_workload_field():
    assert_one_line_error(cli_here("sweep", "--preset", "huge"), "huge")
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--set", "no_such_field=3"), "no_such_field")
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--compare-set", "no_such_field=3"), "no_such_field")
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--modes", "row-wise", "--compare-set",
                                   "shard_rows=diagonal"), "shard_rows must be one of")


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--out", str(blocker / "sub")), "not writable", "--out")


def test_resume_of_a_folder_that_is_no_sweep(tmp_path):
    assert_one_line_error(cli_here("sweep", "--resume", str(tmp_path)), "--resume takes a folder")


def test_a_sweep_folder_is_not_overwritten(tmp_path):
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "x.json").write_text("{}")
    assert_one_line_error(cli_here("sweep", "--preset", "tiny", "--out", str(tmp_path)), "--resume")


def test_results_from_an_older_version(tmp_path):
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "weak-dense-reduce-np1-r0.json").write_text(json.dumps({"schema_version": 0}))
    assert_one_line_error(cli_here("report", str(tmp_path)), "schema version 0", "reads 1")


def test_report_of_a_missing_folder(tmp_path):
    assert_one_line_error(cli_here("report", str(tmp_path / "nope")), "not a folder")


# --- a bug of the suite is not bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("boom"), FileNotFoundError("boom")])
def test_an_unexpected_exception_is_shown_as_a_bug_with_its_traceback(monkeypatch, capsys, error):
    from bench import cli
    from bench.cli import environment

    def broken():
        raise error
    monkeypatch.setattr(environment, "capture_environment", broken)
    assert cli.main(["env"]) == cli.BUG_EXIT_CODE
    err = capsys.readouterr().err
    assert "Traceback" in err and f"{type(error).__name__}: boom" in err, err
    last = err.strip().splitlines()[-1]
    assert "bug of alure-bench" in last and cli.BUG_REPORT in last, last
    assert "Reporting a bug" in (ROOT / "README.md").read_text()  # the pointer leads somewhere in the repository


def test_a_usage_error_raised_inside_a_command_stays_one_line(monkeypatch, capsys):
    from bench import cli
    from bench.cli import environment
    from bench.errors import UsageError

    def refused():
        raise UsageError("what is wrong: how to mend it")
    monkeypatch.setattr(environment, "capture_environment", refused)
    assert cli.main(["env"]) == 2
    assert capsys.readouterr().err == "alure-bench env: error: what is wrong: how to mend it\n"


def test_slurm_resume_names_every_plan_flag_it_was_given(tmp_path):
    # checked before the folder is read: the words name what to leave out, --compare-set included
    assert_one_line_error(cli_here("slurm", "submit", "--resume", str(tmp_path), "--compare-set", "shard_rows=residue"),
                          "leave out --compare-set")
    assert_one_line_error(cli_here("slurm", "submit", "--resume", str(tmp_path), "--nps", "2", "--set", "a=1"),
                          "leave out --nps, --set")
