"""Faults of the machine around the results, not of the suite: a full disk (a real small tmpfs, filled), a quota, a
read-only or failing file system (remounted read-only, or the errno injected), the results folder removed under a
running sweep. Each ends in one line naming the file and what to do, exit 2, no traceback, every record already
written intact, no temporary file and no process left. And `--retries`: a launch that failed before any rank began
to measure is launched again, every attempt in the record; a point that failed once measuring never is."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.errors import MachineFault
from bench.launch import lifetime, transport
from bench.plan.config import PointConfig, SweepConfig
from bench.results import records as records_module
from bench.results.folder_lock import LOCK_FILE, exclusive_writer
from bench.results.records import atomic_write_json, read_record, read_records, room_for_point
from bench.run import sweep as sweep_module
from tests.helpers import (
    CLI,
    RANK_SCRIPTS,
    cli_here,
    launched,
    own_session,
    rank_processes,
    records,
    session_processes,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
QUICK = ["--preset", "tiny", "--warmup", "0", "--steps", "1"]
"""The shortest real point: the tiny preset, one timed step."""
ONE_POINT = [*QUICK, "--nps", "1", "--modes", "sparse-gather", "--scalings", "weak"]
OUTCOMES = RANK_SCRIPTS / "launch_outcomes.py"
AFTER_S = 10.0
"""How long after a command ends none of its processes may remain."""


# --- helpers ------------------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs (`size`, mount `options`) under tmp_path, unmounted at teardown; skips where this
    process may not mount (not root, or no CAP_SYS_ADMIN)."""
    mounts = []

    def mount(size: str = "1m", name: str = "fs", options: str = "") -> Path:
        where = tmp_path / name
        where.mkdir()
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(filter(None, (f"size={size}", options))),
                              "tmpfs", str(where)], capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or f'exit {run.returncode}'}): the real "
                        f"full-disk tests need root")
        mounts.append(where)
        return where
    yield mount
    for where in reversed(mounts):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill the file system of `fs` to the last byte, then give back `leave` bytes."""
    filler = fs / "filler"
    written = 0
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    if leave:
        os.truncate(filler, written - leave)
    return filler


def remount(fs: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(fs)], check=True, capture_output=True)


def one_fault_line(run: subprocess.CompletedProcess, *fragments: str) -> str:
    """A machine fault as the CLI reports it: exit 2, one line on stderr, neither a traceback nor the bug line;
    every fragment in it. Returns the line."""
    assert run.returncode == 2, (run.returncode, run.stdout[-2000:], run.stderr[-3000:])
    assert "Traceback" not in run.stderr and "bug of alure-bench" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_temporary_files(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".write-test.")]
    assert not left, left


def nothing_launched_left(session: str | None = None) -> None:
    """No process of the launches (or, with `session`, none at all of that session) outlives the command."""
    def left():
        return session_processes(session) if session else launched()
    deadline = time.monotonic() + AFTER_S
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), [p.cmdline() for p in left()]


def copy_reference_sweep(to: Path, points: int = 4) -> dict[str, bytes]:
    """A few committed records of results/reference and its sweep.json, copied to `to`; their bytes by name."""
    if not (REFERENCE / "points").is_dir():
        pytest.skip("no committed results/reference to copy")
    (to / "points").mkdir(parents=True)
    shutil.copy(REFERENCE / "sweep.json", to / "sweep.json")
    for path in sorted((REFERENCE / "points").glob("*.json"))[:points]:
        shutil.copy(path, to / "points" / path.name)
    return {p.name: p.read_bytes() for p in (to / "points").iterdir()}


def launch_instead(monkeypatch, *choices):
    """The sweep's next launches run `choices` in turn (an outcome of tests/ranks/launch_outcomes.py, a missing
    program, or None: the point's own rank program), each through the real mpirun launch; later ones the point's
    own. Returns the list of argvs launched."""
    real = sweep_module.run_ranks
    queue, argvs = list(choices), []

    def run_ranks(np, argv, **kwargs):
        choice = queue.pop(0) if queue else None
        if choice == "missing-program":  # a real launch failure: mpirun's rank cannot start its program
            argv = ["/nonexistent/alure-bench-rank-program"]
        elif choice is not None:
            argv = [sys.executable, str(OUTCOMES), choice, *argv[argv.index("--point"):]]
        argvs.append(argv)
        return real(np, argv, **kwargs)
    monkeypatch.setattr(sweep_module, "run_ranks", run_ranks)
    monkeypatch.setattr(sweep_module, "RETRY_PAUSE_S", 0.1)
    return argvs


def sweep_folder(tmp_path: Path, **settings) -> Path:
    """A started sweep folder (its sweep.json) for calling run_point and run_task directly."""
    folder = tmp_path / "sweep"
    config = SweepConfig(preset="tiny", nps=[1], modes=["sparse-gather"], scalings=["weak"], steps=1,
                         warmup_steps=0, **settings)
    atomic_write_json(folder / sweep_module.SWEEP_FILE, config.as_dict())
    return folder


# --- where the suite writes ---------------------------------------------------------------------------------------

def test_a_rewrite_on_a_full_disk_keeps_the_old_file_whole_and_leaves_no_temporary_file(tmpfs):
    fs = tmpfs("256k")
    path = fs / "points" / "a.json"
    atomic_write_json(path, {"version": 1})
    fill(fs)
    with pytest.raises(MachineFault) as caught:
        atomic_write_json(path, {"version": 2})
    said = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert said.startswith(f"cannot write {path}: no space left") and f"df -h {path.parent}" in said, said
    assert json.loads(path.read_text()) == {"version": 1}
    no_temporary_files(fs)


def test_a_figure_saved_on_a_full_disk_keeps_the_old_image_and_leaves_no_temporary_file(tmpfs):
    from bench.results.plots import plt, save_figure  # the plots module picks the file-only backend first
    fs = tmpfs("512k")
    path = fs / "efficiency.png"
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 0.5])
    save_figure(fig, path)
    before = path.read_bytes()
    fill(fs)
    fig, ax = plt.subplots(figsize=(16, 12))
    ax.imshow(np.random.default_rng(0).random((800, 800)))  # noise, which PNG cannot compress: it cannot fit
    with pytest.raises(MachineFault) as caught:
        save_figure(fig, path)
    assert caught.value.errno == errno.ENOSPC and str(path) in str(caught.value), caught.value
    assert path.read_bytes() == before
    assert not plt.get_fignums(), "the figure was not closed"
    no_temporary_files(fs)


@pytest.mark.parametrize("code, problem", [(errno.EDQUOT, "quota"), (errno.EIO, "I/O error"),
                                           (errno.EROFS, "read-only"), (errno.ESTALE, "stale")])
def test_each_fault_of_the_machine_is_named_with_what_to_do(tmp_path, monkeypatch, code, problem):
    path = tmp_path / "points" / "a.json"
    atomic_write_json(path, {"version": 1})

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(MachineFault) as caught:
        atomic_write_json(path, {"version": 2})
    assert caught.value.errno == code and str(path) in str(caught.value) and problem in str(caught.value)
    assert json.loads(path.read_text()) == {"version": 1}
    no_temporary_files(tmp_path)


def test_an_error_that_is_not_the_machines_stays_what_it_was(tmp_path, monkeypatch):
    def refused(fd):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "fsync", refused)
    with pytest.raises(PermissionError):
        atomic_write_json(tmp_path / "a.json", {})
    no_temporary_files(tmp_path)


def test_a_machine_error_no_writer_named_is_still_one_line_and_the_command_again(monkeypatch):
    from bench.cli import environment

    def failing():
        raise OSError(errno.EIO, "Input/output error", "/results/x.json")
    monkeypatch.setattr(environment, "capture_environment", failing)
    one_fault_line(cli_here("env"), "cannot write /results/x.json", "I/O error", "then run `alure-bench env` again")


def test_the_folder_lock_on_a_full_then_read_only_file_system(tmpfs):
    fs = tmpfs("256k")
    (fs / "s").mkdir()
    fill(fs)
    with pytest.raises(MachineFault) as caught:
        with exclusive_writer(fs / "s"):
            pass
    assert LOCK_FILE in str(caught.value) and "no space" in str(caught.value)
    assert not (fs / "s" / LOCK_FILE).exists()
    (fs / "filler").unlink()
    remount(fs, "ro")  # as the kernel does to a file system after an error
    for write in (lambda: exclusive_writer(fs / "s").__enter__(), lambda: atomic_write_json(fs / "s" / "a.json", {})):
        with pytest.raises(MachineFault) as caught:
            write()
        assert caught.value.errno == errno.EROFS and "read-only" in str(caught.value)


def test_a_lock_that_cannot_be_removed_does_not_hide_the_fault_that_ended_its_writer(tmp_path, monkeypatch):
    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(MachineFault) as caught:
        with exclusive_writer(tmp_path):
            monkeypatch.setattr(Path, "unlink", read_only)
            raise MachineFault(tmp_path / "points" / "a.json", errno.EROFS)
    assert caught.value.path == tmp_path / "points" / "a.json"


# --- the commands -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["report"], ["slurm", "collect"]])
def test_report_and_collect_on_a_full_disk(tmpfs, command):
    fs = tmpfs("1m")
    folder = fs / "s"
    before = copy_reference_sweep(folder)
    fill(fs)
    one_fault_line(cli_here(*command, str(folder)), f"cannot write {folder.resolve()}/summary.csv", "no space",
                   f"then run `alure-bench {' '.join(command)} {folder}` again")
    assert {p.name: p.read_bytes() for p in (folder / "points").iterdir()} == before
    assert len(read_records(folder)) == len(before)
    no_temporary_files(folder)


@pytest.mark.parametrize("command", [["comm", "--np", "1", "--out"], ["calibrate", "--nps", "2", "--out"]])
def test_comm_and_calibrate_refuse_a_read_only_folder_before_measuring(tmpfs, command):
    fs = tmpfs("64k", options="ro")
    one_fault_line(cli_here(*command, str(fs / "out")), f"cannot write {fs / 'out'}", "read-only",
                   f"then run `alure-bench {' '.join(command)} {fs / 'out'}` again")
    nothing_launched_left()


def test_a_writer_that_names_no_file_is_reported_with_the_commands_folder(tmp_path, monkeypatch):
    # pandas' to_csv and matplotlib's savefig (predict, the plots) raise ENOSPC without a file name
    from bench.cli import sweep as sweep_cli

    def full(sweep_dir):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sweep_cli, "write_report", full)
    one_fault_line(cli_here("report", str(tmp_path)), f"cannot write {tmp_path}: no space", f"df -h {tmp_path}",
                   f"then run `alure-bench report {tmp_path}` again")


def test_a_sweep_refuses_a_folder_without_room_for_one_point(tmpfs):
    fs = tmpfs("1m")
    fill(fs, leave=32 * 1024)
    out = fs / "s"
    run = cli_here("sweep", *QUICK, "--nps", "1,2", "--modes", "sparse-gather", "--scalings", "weak",
                   "--out", str(out))
    need = max(sweep_module.room_needed(p) for p in SweepConfig(
        preset="tiny", nps=[1, 2], modes=["sparse-gather"], scalings=["weak"], steps=1, warmup_steps=0).plan())
    line = one_fault_line(run, f"cannot write {out}", "KiB free", f"needs about {need // 1024} KiB",
                          "for its record and log", "then run `alure-bench sweep")
    assert int(re.search(r"\((\d+) KiB free", line).group(1)) < need // 1024
    assert not list(out.glob("points/*.json")) and not (out / "sweep.json").exists()
    nothing_launched_left()


def test_the_room_a_point_needs_covers_what_the_committed_records_and_logs_take():
    if not (REFERENCE / "points").is_dir():
        pytest.skip("no committed results/reference")
    for path in sorted((REFERENCE / "points").glob("*.json")):
        record = read_record(path)
        log = REFERENCE / "logs" / f"{path.stem}.log"
        taken = path.stat().st_size + (log.stat().st_size if log.exists() else 0)
        assert room_for_point(record["np"], record["point"]["steps"]) >= taken, path.name
        # the record's own term, not only the log's allowance, holds the record (docs/faults.md)
        assert records_module.RECORD_BASE_BYTES + record["np"] * (
            records_module.RECORD_RANK_BYTES + record["point"]["steps"] * records_module.RECORD_RANK_STEP_BYTES
        ) >= path.stat().st_size, path.name


@pytest.mark.mpi  # launches real ranks
def test_a_sweep_whose_disk_fills_mid_run_stops_in_one_line_and_its_resume_retries_a_failed_launch(tmpfs,
                                                                                                   monkeypatch):
    fs = tmpfs("4m")
    out = fs / "s"
    session = own_session("disk-fills")
    proc = subprocess.Popen([*CLI, "sweep", *ONE_POINT, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, lifetime.SESSION_VAR: session})
    try:
        wait_for(lambda: rank_processes(session) or proc.poll() is not None, 60, "the point's rank")
        filler = fill(fs)  # the sweep is started, its rank still importing: the disk fills under the point
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    line = one_fault_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), str(out),
                          "no space left", f"df -h {out}", f"then continue with `alure-bench sweep --resume {out}`")
    nothing_launched_left(session)
    assert json.loads((out / "sweep.json").read_text())["preset"] == "tiny" and not records(out)
    no_temporary_files(out)

    # What the line says to do, done: space freed, then its command; with a retry, as the first launch of the
    # resumed point fails for real (its program is missing) before anything was measured.
    filler.unlink()
    argvs = launch_instead(monkeypatch, "missing-program")
    resume = re.search(r"continue with `alure-bench (.*)`$", line).group(1).split()
    run = cli_here(*resume, "--retries", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(argvs) == 2 and "bench.ranks.worker" in argvs[1]
    record = records(out)["weak-sparse-gather-np1-r0"]
    assert record["status"] == "ok"
    first, second = record["attempts"]
    assert (first["attempt"], first["status"], second["attempt"], second["status"]) == (1, "failed", 2, "ok")
    assert "FileNotFoundError" in first["reason"] and second["reason"] is None
    assert all(a["started_at"] and a["wall_seconds"] > 0 for a in record["attempts"])
    assert "attempt 2 of 3" in run.stdout and "2 attempts" in run.stdout and "elapsed" in run.stdout, run.stdout
    log = (out / "logs" / "weak-sparse-gather-np1-r0.log").read_text()
    assert "=== attempt 1" in log and "=== attempt 2" in log and "FileNotFoundError" in log
    taken = (out / "points" / "weak-sparse-gather-np1-r0.json").stat().st_size + len(log)
    assert taken <= room_for_point(1, 1, attempts=3)
    nothing_launched_left()


@pytest.mark.mpi  # launches real ranks
def test_a_results_folder_removed_under_a_running_sweep(tmp_path, monkeypatch):
    out = tmp_path / "s"
    real = sweep_module.run_ranks

    def removed_meanwhile(np, argv, **kwargs):
        shutil.rmtree(out)  # while the point runs: its ranks then hand back into a folder that is gone
        return real(np, [sys.executable, str(OUTCOMES), "hand-back", *argv[argv.index("--point"):]], **kwargs)
    monkeypatch.setattr(sweep_module, "run_ranks", removed_meanwhile)
    one_fault_line(cli_here("sweep", *ONE_POINT, "--out", str(out)), f"results folder {out} is gone", "put it back",
                   f"then continue with `alure-bench sweep --resume {out}`")
    assert not out.exists()  # nothing made it again behind the user's back
    nothing_launched_left()


def test_a_rank_that_cannot_hand_back_for_a_full_disk_stops_the_sweep_without_a_record(tmp_path, monkeypatch):
    from bench.launch.handback import MACHINE_FAULT_MARK, machine_fault_in
    assert machine_fault_in(f"noise\n{MACHINE_FAULT_MARK}{{\"path\": \"/x/h/rank1.json\"\nrank 1: {MACHINE_FAULT_MARK}"
                            f'{{"path": "/x/h/rank1.json", "errno": {errno.ENOSPC}}}\n').errno == errno.ENOSPC
    assert machine_fault_in("exit code 1: Errno 28\n") is None


# --- retries ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outcome, retries, status, attempts", [
    ("crash-measuring", 3, "failed", 1),       # measured something: a result, never retried
    ("hang-before-measuring", 2, "timeout", 1),  # a timeout is a result too
])  # a launch failing every time, retried until the retries run out: the Slurm task's test below
@pytest.mark.mpi  # launches real ranks
def test_only_a_launch_that_failed_before_any_rank_measured_is_retried(tmp_path, monkeypatch, outcome, retries,
                                                                         status, attempts):
    folder = sweep_folder(tmp_path)
    argvs = launch_instead(monkeypatch, *[outcome] * (retries + 1))
    # The hang ends by its timeout; the others must never meet theirs, on a loaded machine too.
    point = PointConfig(preset="tiny", np=1, steps=1, warmup_steps=0, timeout_s=1 if "hang" in outcome else 120)
    record, _ = sweep_module.run_point(point, folder, shared_memory=transport.mechanism(), retries=retries,
                                       out=io.StringIO())
    assert (record["status"], len(record["attempts"]), len(argvs)) == (status, attempts, attempts), record
    assert read_record(folder / "points" / f"{point.point_id}.json") == record
    if outcome == "crash-measuring":
        assert "signal 9" in record["reason"]
    nothing_launched_left()


@pytest.mark.mpi  # launches real ranks
def test_a_slurm_task_retries_as_a_local_sweep_does_and_stops_on_a_machine_fault(tmp_path, monkeypatch):
    from bench.slurm.jobs import run_task, task_note
    folder = sweep_folder(tmp_path, retries=1)
    launch_instead(monkeypatch, "fail-before-measuring", "fail-before-measuring")
    said = io.StringIO()
    assert run_task(folder, 1, 0, "mpirun", out=said) == 1
    record = records(folder)["weak-sparse-gather-np1-r0"]
    assert [a["status"] for a in record["attempts"]] == ["failed", "failed"] and "2 attempts" in said.getvalue()
    assert all("RuntimeError: the transport did not come up" in a["reason"] for a in record["attempts"])
    assert task_note(folder, "weak-sparse-gather-np1-r0")["outcome"] == "failed"

    def disk_full(point, sweep_dir, launcher, **kwargs):
        raise MachineFault(sweep_dir / "handback" / point.point_id / "rank0.json", errno.ENOSPC)
    monkeypatch.setattr(sweep_module, "launch_point", disk_full)
    one_fault_line(cli_here("slurm", "task", "--sweep", str(folder), "--np", "1", "--index", "0"), "no space",
                   f"then `alure-bench slurm submit --resume {folder}` measures the point again")
    assert task_note(folder, "weak-sparse-gather-np1-r0")["outcome"].startswith("stopped by a fault of the machine")
    nothing_launched_left()


def test_retries_is_a_sweep_field_and_a_flag(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text("[sweep]\npreset = \"tiny\"\nretries = 2\n")
    assert SweepConfig.from_toml(toml).retries == 2
    run = cli_here("sweep", *ONE_POINT, "--retries", "-1", "--out", str(tmp_path / "s"))
    assert run.returncode == 2 and "retries must not be negative" in run.stderr
    from bench.slurm.arrays import TIME_MARGIN_S, SlurmOptions, format_time_limit
    assert SlurmOptions().time_for(SweepConfig(timeout_s=60, retries=2)) == format_time_limit(60 + 3 * TIME_MARGIN_S)


# --- progress -----------------------------------------------------------------------------------------------------

def test_progress_shows_the_elapsed_time_and_an_eta_from_the_points_measured():
    progress = sweep_module.Progress()
    points = [PointConfig(preset="tiny", np=n) for n in (1, 2, 4)]
    assert progress.eta_s(points) is None
    progress.measured(points[0], 10.0)
    progress.measured(points[1], 30.0)
    # np 1 and 2 as measured; np 4, which has not run yet, as the measured points' mean
    assert progress.eta_s(points) == pytest.approx(10 + 30 + 20)
    record = {"status": "ok", "metrics": {"step_time_ms": 12.5}, "attempts": [{}]}
    line = sweep_module.progress_line(2, 3, points[1], record, 30.0, elapsed_s=75, eta_s=progress.eta_s(points[2:]))
    assert line.endswith("ok 12.5 ms/step (30 s); elapsed 1:15, ETA 0:20"), line
    last = sweep_module.progress_line(3, 3, points[2], record, 30.0, elapsed_s=3723, eta_s=0)
    assert last.endswith("elapsed 1:02:03"), last
