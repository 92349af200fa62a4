"""scripts/record_references.sh, without recording anything: its plan and commands (--dry-run), the parts --only
picks, and its refusals (a dirty tree, an unknown part). Each test runs a copy of the script in a git repository of
its own, so the state of this checkout does not decide the outcome."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path("scripts/record_references.sh")
PARTS = ["calibrate", "comm", "reference", "cluster", "paper", "shard", "derived"]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A committed, clean repository holding the script."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / SCRIPT, tmp_path / SCRIPT)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "script")
    return tmp_path


def run(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(checkout / SCRIPT), *args], cwd=checkout, capture_output=True, text=True,
                          timeout=60)


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_the_plan_and_every_command_in_order_and_runs_none(checkout):
    result = run(checkout, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert plan == PARTS + ["total"]
    total = next(line for line in result.stdout.splitlines() if line.startswith("  total"))
    minutes = [int(line.split()[1]) for line in result.stdout.splitlines()
               if line.startswith("  ") and not line.startswith("  total")]
    assert int(total.split()[1]) == sum(minutes)

    cmds = commands(result.stdout)
    first = {key: next(i for i, c in enumerate(cmds) if key in c) for key in
             ["calibrate --nps 2", "comm --np 2", "configs/reference.toml", "reference_cluster.sh",
              "configs/paper.toml", "configs/shard-demo.toml", "mv ", " report results/reference",
              "predict --validate"]}
    assert list(first.values()) == sorted(first.values()), first  # calibrated first, derived files last
    assert any("--out results/reference/predict" in c for c in cmds)
    assert sum("--nps 1200" in c for c in cmds) == 3 and any("--results results/paper" in c for c in cmds)
    # every sweep is checked (clean tree, calibrated auto) before anything is moved into results/
    checks = [i for i, c in enumerate(cmds) if c.startswith("check ")]
    assert len(checks) == 6 and max(checks) < first["mv "]
    assert "nothing recorded" in result.stdout
    assert not (checkout / "results").exists()


def test_only_runs_the_parts_named(checkout):
    result = run(checkout, "--dry-run", "--only", "derived,reference")
    assert result.returncode == 0, result.stderr
    plan = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert plan == ["reference", "derived", "total"]
    cmds = commands(result.stdout)
    assert not any("calibrate" in c or "comm --np" in c or "paper.toml" in c for c in cmds)
    assert [c for c in cmds if c.startswith("mv ")] == [c for c in cmds if c.startswith("mv ")
                                                        and c.endswith(" results/reference")]


@pytest.mark.parametrize("args, says", [
    (["--only", "cluster,bogus"], "--only bogus: no such part"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--max-load", "high"], "--max-load needs a number"),
])
def test_bad_arguments_say_so_in_one_line(checkout, args, says):
    result = run(checkout, "--dry-run", *args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr


def test_a_dirty_tree_is_refused_before_anything_runs(checkout):
    (checkout / SCRIPT).write_text((checkout / SCRIPT).read_text() + "\n# edited\n")
    for args in ([], ["--dry-run"]):
        result = run(checkout, *args)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "uncommitted changes" in result.stderr and "commit or stash" in result.stderr
        assert "plan" not in result.stdout and not commands(result.stdout)


def test_calibrate_over_hosts_checks_the_layout_before_measuring(tmp_path):
    """The cluster reference calibrates across emulated hosts (`calibrate --hosts`): a layout the rank counts do not
    fit, or ranks per host without hosts, is one line before any comm runs."""
    from tests.helpers import assert_one_line_error, cli_here
    out = str(tmp_path / "calibrations")
    assert_one_line_error(cli_here("calibrate", "--hosts", "node1,node2", "--nps", "2,4", "--out", out),
                          "np 4 does not fit on 2 host(s)")
    assert_one_line_error(cli_here("calibrate", "--ranks-per-host", "2", "--out", out), "give --hosts too")
    assert not (tmp_path / "calibrations").exists()


def test_a_busy_machine_is_refused_unless_told_and_a_dry_run_only_warns(checkout):
    """Another alure-bench process (here a stand-in named like one) makes the machine busy."""
    stand_in = subprocess.Popen(["bash", "-c", "exec -a /opt/x/.venv/bin/alure-bench sleep 60"])
    try:
        result = run(checkout)
        assert result.returncode == 2 and "the machine is not idle" in result.stderr, result.stderr
        assert "other alure-bench processes run" in result.stderr and "--busy-ok" in result.stderr
        assert not commands(result.stdout)
        dry = run(checkout, "--dry-run")
        assert dry.returncode == 0 and "warning: the machine is not idle" in dry.stderr
        # --busy-ok goes on, to the next check: this copy has no venv
        assert "make setup" in run(checkout, "--busy-ok").stderr
    finally:
        stand_in.kill()
        stand_in.wait()
