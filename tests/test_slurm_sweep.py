"""Sweeps as Slurm job arrays: the arrays, the scripts and Slurm's answers (unit), bad input (one line), and real
sweeps on the local single-node cluster of slurm/local_cluster.sh: records exactly like a local run's, a failed and
a cancelled task listed by `collect`, and `submit --resume` filling exactly those.

The cluster tests skip without the cluster (`bash slurm/local_cluster.sh start`), or fail under `make test`
(ALURE_REQUIRE_SLURM=1), through the slurm_cluster fixture of tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from bench.errors import UsageError
from bench.plan.config import PointConfig, SweepConfig
from bench.slurm.arrays import (
    TIME_MARGIN_S,
    SlurmOptions,
    array_spec,
    expand_task_ids,
    format_time_limit,
    plan_arrays,
    point_for_task,
)
from bench.slurm.jobs import active_points, read_jobs
from bench.slurm.scheduler import parse_sbatch_output, parse_scontrol_jobs, task_states
from tests.helpers import CLI, assert_one_line_error, cli, cli_here

TINY = ["--preset", "tiny", "--warmup", "1", "--steps", "3", "--modes", "dense-reduce", "--scalings", "weak",
        "--no-corun"]
WAIT_S = 300  # a whole tiny sweep takes 30-60 s here; a loaded machine is slower


# --- arrays, scripts and Slurm's answers ---------------------------------------------------------------------

def test_one_array_per_np_and_a_task_index_means_the_same_point_everywhere():
    config = SweepConfig(preset="tiny", nps=[1, 2, 4], modes=["dense-reduce"], repeats=2, corun=False)
    arrays = plan_arrays(config)
    assert [(a.np, a.indices) for a in arrays] == [(1, (0, 1, 2, 3)), (2, (0, 1, 2, 3)), (4, (0, 1, 2, 3))]
    for a in arrays:
        assert [point_for_task(config, a.np, i).point_id for i in a.indices] == list(a.point_ids)
        assert {point_for_task(config, a.np, i).np for i in a.indices} == {a.np}
    # A config rebuilt from sweep.json (as inside a task) maps every index to the same point.
    again = SweepConfig.from_dict(json.loads(json.dumps(config.as_dict())))
    assert point_for_task(again, 2, 3) == point_for_task(config, 2, 3)
    # Resubmitting some points keeps their indices, per np.
    only = {"strong-dense-reduce-np2-r1", "weak-dense-reduce-np4-r0"}
    assert [(a.np, a.indices, a.point_ids) for a in plan_arrays(config, only)] == [
        (2, (3,), ("strong-dense-reduce-np2-r1",)), (4, (0,), ("weak-dense-reduce-np4-r0",))]
    with pytest.raises(UsageError, match="out of range"):
        point_for_task(config, 2, 4)
    with pytest.raises(UsageError, match="no np=3 points"):
        point_for_task(config, 3, 0)


def test_array_specs_compress_runs_and_expand_back():
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3], limit=2) == "3%2"
    for spec, ids in [("3", [3]), ("0-3%2", [0, 1, 2, 3]), ("1,5-7", [1, 5, 6, 7]), ("[0-6:3]", [0, 3, 6])]:
        assert expand_task_ids(spec) == ids


def test_slurm_answers_are_read_per_task():
    assert parse_sbatch_output("1234\n") == "1234" == parse_sbatch_output("1234;cluster\n")
    with pytest.raises(UsageError, match="no job id"):
        parse_sbatch_output("Submitted batch job\n")
    text = ("JobId=41 ArrayJobId=40 ArrayTaskId=1 JobName=x JobState=RUNNING Reason=None\n"
            "JobId=40 ArrayJobId=40 ArrayTaskId=2-3%1 JobName=x JobState=PENDING Reason=JobArrayTaskLimit\n"
            "JobId=39 ArrayJobId=39 ArrayTaskId=0 JobName=y JobState=CANCELLED Reason=None\n"
            "JobId=50 JobName=plain JobState=RUNNING\n")
    assert task_states(parse_scontrol_jobs(text)) == {
        ("40", 1): "RUNNING", ("40", 2): "PENDING", ("40", 3): "PENDING", ("39", 0): "CANCELLED"}
    jobs = {"arrays": [{"job_id": "39", "indices": [0], "point_ids": ["a"]},
                       {"job_id": "40", "indices": [1, 2], "point_ids": ["b", "c"]}]}
    assert active_points(jobs, task_states(parse_scontrol_jobs(text))) == \
        {"b": "RUNNING", "c": "PENDING"}


def test_layout_and_time_limit_follow_the_options():
    assert SlurmOptions().layout(4) == (0, 0)
    assert SlurmOptions(ranks_per_node=2).layout(5) == (3, 2)
    assert SlurmOptions(ranks_per_node=4).layout(1) == (1, 1)
    assert SlurmOptions(nodes=2).layout(1) == (1, 0)
    with pytest.raises(UsageError, match="does not fit"):
        SlurmOptions(nodes=1, ranks_per_node=2).layout(4)
    assert format_time_limit(300 + TIME_MARGIN_S) == "0-00:10:00"
    assert format_time_limit(2 * 86400 + 61) == "2-00:02:00"
    for bad, message in [({"time_limit": "1h"}, "not a Slurm time"), ({"launcher": "aprun"}, "unknown launcher"),
                         ({"partition": "a b"}, "not a Slurm partition"), ({"array_limit": -1}, "at least 1")]:
        with pytest.raises(UsageError, match=message):
            SlurmOptions(**bad)


def test_the_rendered_script_asks_what_the_options_say(tmp_path):
    out = tmp_path / "render"
    run = cli("slurm", "render", *TINY, "--nps", "1,2", "--repeats", "3", "--out", str(out), "--partition", "p1",
              "--account", "acct", "--time", "45", "--ranks-per-node", "1", "--array-limit", "2", "--launcher", "srun")
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "sweep.json").read_text())["nps"] == [1, 2]
    assert (out / "environment.json").exists() and not list((out / "points").iterdir())
    script = (out / "slurm" / "submit1-np2.sbatch").read_text()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert directives == ["#SBATCH --job-name=alure-sweep-np2", "#SBATCH --array=0-2%2", "#SBATCH --ntasks=2",
                          "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=p1",
                          "#SBATCH --account=acct", "#SBATCH --time=45",
                          f"#SBATCH --output={out}/slurm/np2-%A_%a.out", f"#SBATCH --chdir={Path.cwd()}"]
    assert f"exec alure-bench slurm task --sweep {out} --np 2 --launcher srun" in script
    assert f'source "{sys.prefix}/bin/activate"' in script and not re.search(r"\{\{\w+\}\}", script)
    assert subprocess.run(["bash", "-n", str(out / "slurm" / "submit1-np1.sbatch")]).returncode == 0
    assert json.loads((out / "slurm" / "jobs.json").read_text())["options"]["launcher"] == "srun"


# --- bad input: one line, no traceback -----------------------------------------------------------------------

def test_submit_without_sbatch_on_path_is_one_line_and_starts_nothing(tmp_path):
    out = tmp_path / "nosbatch"
    run = cli("slurm", "submit", *TINY, "--out", str(out), env={"PATH": str(tmp_path)})
    assert_one_line_error(run, "sbatch not found", "slurm render")
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--array-limit", "0"], "at least 1"), (["--array-limit", "x"], "at least 1"),
    (["--time", "soon"], "not a Slurm time"), (["--nps", "1,4", "--nodes", "1", "--ranks-per-node", "2"],
                                               "does not fit"),
    (["--launcher", "aprun"], "invalid choice"),
])
def test_bad_slurm_options_are_one_line(tmp_path, flags, fragment):
    out = tmp_path / "bad"
    assert_one_line_error(cli_here("slurm", "render", *TINY, "--out", str(out), *flags), fragment)
    assert not out.exists(), "a refused option must leave no half-made sweep folder"


def test_a_folder_that_is_no_sweep_is_one_line(tmp_path):
    for args in (["status", str(tmp_path)], ["collect", str(tmp_path)], ["submit", "--resume", str(tmp_path)],
                 ["task", "--sweep", str(tmp_path), "--np", "1", "--index", "0"]):
        assert_one_line_error(cli_here("slurm", *args), "not a sweep folder")


def test_a_template_without_the_task_command_is_refused(tmp_path):
    template = tmp_path / "mine.sbatch"
    template.write_text("#!/bin/bash\n{{sbatch_options}}\nsrun hostname\n")
    assert_one_line_error(cli_here("slurm", "render", *TINY, "--out", str(tmp_path / "t"), "--template", str(template)),
                          "lacks {{task_command}}")
    template.write_text("#!/bin/bash\n{{sbatch_options}}\n{{modules}}\n{{task_command}}\n")
    assert_one_line_error(cli_here("slurm", "render", *TINY, "--out", str(tmp_path / "t"), "--template", str(template)),
                          "unknown mark(s) {{modules}}")


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_a_task_outside_slurm_needs_an_index(tmp_path):
    out = tmp_path / "rendered"
    assert cli("slurm", "render", *TINY, "--out", str(out)).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    run = subprocess.run([*CLI, "slurm", "task", "--sweep", str(out), "--np", "1"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert_one_line_error(run, "SLURM_ARRAY_TASK_ID", "--index")
    assert_one_line_error(cli_here("slurm", "task", "--sweep", str(out), "--np", "2", "--index", "1"), "out of range")


# --- real sweeps on the local cluster ------------------------------------------------------------------------

@pytest.fixture
def sweeps(slurm_cluster):
    """Folders of sweeps submitted by a test; whatever the test did, none of their jobs outlives it."""
    made: list[Path] = []
    yield made
    for folder in made:
        ids = [e["job_id"] for e in read_jobs(folder)["arrays"]]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def submit(sweeps: list, out: Path, *flags: str) -> list[dict]:
    sweeps.append(out)
    run = cli("slurm", "submit", *TINY, "--partition", "debug", "--out", str(out), *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    return read_jobs(out)["arrays"]


def wait_until_done(out: Path) -> None:
    run = cli("slurm", "status", str(out), "--wait", str(WAIT_S), timeout=WAIT_S + 60)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def shape(value):
    """The keys (recursively) and kinds of a JSON value, not its numbers."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value and isinstance(value[0], (dict, list)) else "list"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number"


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))}


def sweep_ranks(out: Path) -> dict[str, list[psutil.Process]]:
    """Live rank processes of this sweep, by point id."""
    found: dict[str, list[psutil.Process]] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        # mpirun's and srun's command lines name bench.ranks.worker too: ranks are the python processes. A rank
        # names the folder it hands back into, inside the sweep's (bench.run.sweep: <out>/handback/<point>).
        inside = any(arg == str(out) or arg.startswith(f"{out}/") for arg in cmd)
        if "bench.ranks.worker" in cmd and Path(cmd[0]).name.startswith("python") and inside:
            point = PointConfig.from_dict(json.loads(cmd[cmd.index("--point") + 1]))
            found.setdefault(point.point_id, []).append(p)
    return found


@pytest.mark.slurm
@pytest.mark.mpi
def test_a_slurm_sweep_writes_exactly_the_records_of_a_local_sweep(sweeps, tmp_path):
    arrays = submit(sweeps, tmp_path / "slurm", "--nps", "1,2")
    assert [(a["np"], a["array"]) for a in arrays] == [(1, "0"), (2, "0")]
    local = subprocess.run([*CLI, "sweep", *TINY, "--nps", "1,2", "--out", str(tmp_path / "local")],
                           capture_output=True, text=True, timeout=WAIT_S)
    assert local.returncode == 0, local.stderr[-2000:]
    wait_until_done(tmp_path / "slurm")
    collect = cli("slurm", "collect", str(tmp_path / "slurm"))
    assert collect.returncode == 0 and "complete: all 2 points ok" in collect.stdout, collect.stdout + collect.stderr

    on_slurm, here = records(tmp_path / "slurm"), records(tmp_path / "local")
    assert sorted(on_slurm) == sorted(here) == ["weak-dense-reduce-np1-r0", "weak-dense-reduce-np2-r0"]
    for point_id, record in on_slurm.items():
        assert record["status"] == "ok", record["reason"]
        assert shape(record) == shape(here[point_id]), point_id
        assert record["point"] == here[point_id]["point"] and len(record["ranks"]) == record["np"]
    for name in ("sweep.json", "environment.json"):
        assert shape(json.loads((tmp_path / "slurm" / name).read_text())) == \
            shape(json.loads((tmp_path / "local" / name).read_text())), name
    summary, local_summary = (pd.read_csv(tmp_path / d / "summary.csv") for d in ("slurm", "local"))
    assert list(summary.columns) == list(local_summary.columns)
    assert dict(summary.dtypes) == dict(local_summary.dtypes)
    assert summary[["scaling", "mode", "np", "repeat", "status"]].equals(
        local_summary[["scaling", "mode", "np", "repeat", "status"]])
    # The same files as a local sweep, plus the slurm/ folder (scripts, jobs, task notes, Slurm's output).
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir()) == \
        sorted([p.name for p in (tmp_path / "local").iterdir()] + ["slurm"])
    assert sorted(p.name for p in (tmp_path / "slurm" / "logs").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "logs").iterdir())
    note = json.loads((tmp_path / "slurm" / "slurm" / "tasks" / "weak-dense-reduce-np2-r0.json").read_text())
    assert note["outcome"] == "ok" and note["task"] == f"{arrays[1]['job_id']}_0"
    assert note["variables"]["SLURM_NTASKS"] == "2"


@pytest.mark.slurm
@pytest.mark.mpi
def test_a_failed_and_a_cancelled_task_are_collected_and_resume_fills_exactly_them(sweeps, tmp_path):
    out = tmp_path / "faults"
    # Two repeats: arrays of two tasks per np; %1 runs them one after the other, so task 1 starts after task 0.
    arrays = submit(sweeps, out, "--nps", "1,2", "--repeats", "2", "--array-limit", "1")
    assert [(a["np"], a["array"]) for a in arrays] == [(1, "0-1%1"), (2, "0-1%1")]
    job = {a["np"]: a["job_id"] for a in arrays}
    killed, cancelled = "weak-dense-reduce-np1-r1", "weak-dense-reduce-np2-r1"

    # Task 1 of np=1: a rank dies (SIGKILL) -> a failed record. Task 1 of np=2: scancel while its ranks run ->
    # Slurm's SIGTERM stops the task before it writes anything -> the point is missing.
    done: set[str] = set()
    deadline = time.monotonic() + WAIT_S
    while done != {killed, cancelled}:
        assert time.monotonic() < deadline, f"ranks of {killed} / {cancelled} never showed (did: {done})"
        ranks = sweep_ranks(out)
        if killed not in done and ranks.get(killed):
            ranks[killed][0].send_signal(signal.SIGKILL)
            done.add(killed)
        if cancelled not in done and len(ranks.get(cancelled, [])) == 2:
            subprocess.run(["scancel", f"{job[2]}_1"], check=True, timeout=30)
            done.add(cancelled)
        time.sleep(0.1)
    wait_until_done(out)
    assert not sweep_ranks(out), "a cancelled task must not leave ranks behind"

    got = records(out)
    assert got[killed]["status"] == "failed" and "signal 9" in got[killed]["reason"]
    assert cancelled not in got
    assert {got[p]["status"] for p in ("weak-dense-reduce-np1-r0", "weak-dense-reduce-np2-r0")} == {"ok"}
    kept = {p: (out / "points" / f"{p}.json").stat().st_mtime_ns
            for p in ("weak-dense-reduce-np1-r0", "weak-dense-reduce-np2-r0")}

    collect = cli("slurm", "collect", str(out))
    assert collect.returncode == 1 and "Traceback" not in collect.stderr, collect.stderr
    assert "2 of 4 points missing or failed" in collect.stdout
    assert "weak dense-reduce np=1 r1: failed: a rank exited on signal 9" in collect.stdout
    assert f"weak dense-reduce np=2 r1: missing: task {job[2]}_1 was stopped (signal 15)" in collect.stdout
    assert len(pd.read_csv(out / "summary.csv")) == 3  # the failed point is in the summary, as locally

    # Resume with the other launcher (srun --mpi=pmix): only task 1 of each array again.
    resume = cli("slurm", "submit", "--resume", str(out), "--launcher", "srun")
    assert resume.returncode == 0, resume.stderr
    assert "2 of 4 points ok, 0 still queued or running, 2 to submit" in resume.stdout
    again = [a for a in read_jobs(out)["arrays"] if a["round"] == 2]
    assert [(a["np"], a["indices"], a["point_ids"]) for a in again] == [(1, [1], [killed]), (2, [1], [cancelled])]
    assert read_jobs(out)["options"]["array_limit"] == 1  # the stored options carry over
    wait_until_done(out)

    collect = cli("slurm", "collect", str(out))
    assert collect.returncode == 0 and "complete: all 4 points ok" in collect.stdout, collect.stdout
    assert {r["status"] for r in records(out).values()} == {"ok"} and len(records(out)) == 4
    assert {p: (out / "points" / f"{p}.json").stat().st_mtime_ns for p in kept} == kept, "ok points were rerun"
    assert "launching with srun" in (out / "slurm" / f"np2-{again[1]['job_id']}_1.out").read_text()
    nothing = cli("slurm", "submit", "--resume", str(out))
    assert nothing.returncode == 0 and "nothing to submit" in nothing.stdout
    # A new submit into a folder with submitted arrays would lose track of them: refused.
    assert_one_line_error(cli_here("slurm", "submit", *TINY, "--out", str(out)), "already has submitted arrays",
                          "--resume")


@pytest.mark.slurm
def test_a_partition_that_slurm_rejects_is_one_line(sweeps, tmp_path):
    out = tmp_path / "nopart"
    sweeps.append(out)
    run = cli("slurm", "submit", *TINY, "--out", str(out), "--partition", "no_such_partition")
    assert_one_line_error(run, "sbatch refused", "invalid partition")
    assert read_jobs(out)["arrays"] == []
