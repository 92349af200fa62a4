"""Launches that can't run wild, tried with real processes: impossible rank counts refused before anything starts;
no process of a launch left 10 s after the command is killed at launch, mid-point, outright (SIGKILL), by a timeout,
or after mpirun dies mid-spawn; one writer per results folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from bench.errors import UsageError
from bench.launch import lifetime
from bench.plan.capacity import (
    DEFAULT_RANKS_PER_CORE,
    RUNTIME_MIB,
    Hosts,
    check_launch,
    parse_sinfo,
    rank_floor_mib,
    this_host,
)
from bench.results.folder_lock import LOCK_FILE, exclusive_writer
from tests.helpers import (
    CLI,
    TINY,
    assert_one_line_error,
    cli,
    describe,
    mpirun_of,
    own_session,
    rank_processes,
    records,
    session_processes,
    wait_for,
)

FOREVER = ["--steps", "100000"]
"""A point that never ends by itself: only the fault under test ends it."""
AFTER_S = 10.0
"""How long after a command ends none of its processes may remain."""


# --- helpers ------------------------------------------------------------------------------------------------------

def start(session: str, *args: str) -> subprocess.Popen:
    """The command as a terminal's foreground job starts it. Ctrl-C's SIGINT is set back to its default: a shell
    starts background jobs (`make test &`, nohup) with SIGINT ignored, Python keeps an inherited ignore, and the
    command then rightly does not act on it (two pre-check runs started that way failed the Ctrl-C test)."""
    env = {**os.environ, lifetime.SESSION_VAR: session}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_nothing_left(session: str, since: float) -> None:
    """No process started within `session` (command, mpirun or rank) is alive AFTER_S after `since`. Polled: once
    none is left, none can appear (every process of the session descends from one carrying its tag)."""
    deadline = since + AFTER_S
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{len(left)} process(es) outlived the command by {AFTER_S:g} s:\n{describe(left)}"


def wait_until_training(session: str, np: int) -> list[psutil.Process]:
    """The np ranks of the point, once they are past their imports (a rank that has loaded torch is well over
    100 MiB)."""
    def ready():
        now = rank_processes(session)
        try:
            return len(now) == np and all(p.memory_info().rss > 150 * 2**20 for p in now) and now
        except psutil.Error:
            return False
    found = wait_for(ready, 90, f"{np} ranks training")
    time.sleep(2)
    return found


def assert_interrupted(proc: subprocess.Popen, stdout: str, stderr: str) -> None:
    assert proc.returncode == 130, (proc.returncode, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.strip()]
    assert len(said) <= 1, stderr
    assert stdout.splitlines()[-1].startswith("interrupted: finished points are kept in"), stdout


# --- refused before anything starts -------------------------------------------------------------------------------

def refused(capsys, *args: str) -> str:
    """Run the CLI in this process (the checks need no process of their own); its one-line error."""
    from bench.cli import main
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_np_far_beyond_memory_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    session = own_session("huge")
    out = tmp_path / "huge"
    run = cli("run", *TINY, "--np", "100000", "--out", str(out), env={lifetime.SESSION_VAR: session})
    assert_one_line_error(run, "--np 100000 cannot run on this host", "of memory", "ranks fit", "lower --np")
    assert not out.exists(), "a refused run must not start a results folder"
    # The same check guards every command that launches ranks.
    monkeypatch.setenv(lifetime.SESSION_VAR, session)
    for args in (["sweep", *TINY, "--nps", "1,100000", "--scalings", "weak", "--out", str(out)],
                 ["pipeline", "--preset", "tiny", "--np", "100000"], ["comm", "--np", "100000", "--max-bytes", "1K"],
                 ["crossover", "--np", "2,100000", "--rows", "1", "--dim", "1", "--densities", "0.001"]):
        line = refused(capsys, *args)
        assert "100000 cannot run on this host" in line and "ranks fit" in line, line
    assert not lifetime.tagged_processes(lifetime.SESSION_VAR, session) and not out.exists()


def test_oversubscription_is_bounded_unless_the_limit_is_raised(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    np = cores * 2 + 1
    line = refused(capsys, "run", *TINY, "--np", str(np), "--oversubscribe-limit", "2")
    assert "ranks per core where the limit is 2" in line and f"at most {cores * 2} ranks fit" in line, line
    # Raised, the limit lets the same count through, to the next check (the results folder, here unwritable, so
    # that nothing runs).
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = refused(capsys, "run", *TINY, "--np", str(np), "--oversubscribe-limit", str(np), "--out",
                   str(blocker / "sub"))
    assert "not writable" in line, line


def test_a_slurm_partition_that_cannot_hold_the_arrays_is_refused(tmp_path, capsys, monkeypatch):
    """A stand-in sinfo (the real one needs the cluster) reports one 4-CPU node with 4 GiB in the default
    partition."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\necho 'node1|debug*|4|4096'\necho 'node2|other|64|512000'\n")
    (fake / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out = tmp_path / "render"
    render = ["slurm", "render", *TINY, "--scalings", "weak", "--out", str(out)]
    line = refused(capsys, *render, "--nps", "1,8")
    assert "--nps 8 cannot run on Slurm partition debug: it needs 8 ranks on a node of 4 CPUs" in line, line
    assert "at most 4 ranks fit" in line, line
    assert "2 nodes where Slurm partition debug has 1" in refused(capsys, *render, "--nps", "2", "--nodes", "2")
    assert "of memory per host (4 ranks x" in refused(capsys, *render, "--nps", "4", "--preset", "large")
    assert not out.exists()
    from bench.cli import main
    assert main([*render, "--nps", "1,4"]) == 0
    assert main([*render[:-1], str(tmp_path / "big"), "--nps", "64", "--partition", "other"]) == 0


def test_the_check_names_what_is_needed_and_what_fits():
    host = Hosts(where="this host", nodes=1, cpus_per_node=2, memory_per_node_mib=4096, oversubscribe=True)
    check_launch(16, 200, host, flag="--np")  # 8 per core, 3.2 GiB: fits
    with pytest.raises(UsageError, match=r"--np 17 cannot run on this host: it needs 8.5 ranks per core where "
                                         r"the limit is 8 .*at most 16 ranks fit: lower --np"):
        check_launch(17, 200, host, flag="--np")
    with pytest.raises(UsageError, match=r"at least 4.7 GiB of memory per host \(12 ranks x 400 MiB\) where it "
                                         r"has 4 GiB; at most 10 ranks fit"):
        check_launch(12, 400, host, flag="--np")
    check_launch(64, 10, host, flag="--np", ranks_per_core=32)
    with pytest.raises(UsageError, match="not one rank fits"):
        check_launch(1, 5000, host, flag="--np")


def test_sinfo_is_read_for_the_named_or_the_default_partition():
    text = "n1|debug*|4|1\nn2|debug*|4|1\nn1|big|4|1\nn3|big|64|256000\n"
    debug = parse_sinfo(text)
    assert (debug.where, debug.nodes, debug.cpus_per_node, debug.memory_per_node_mib) == \
        ("Slurm partition debug", 2, 4, None)  # RealMemory 1: not configured
    big = parse_sinfo(text, "big")
    assert (big.nodes, big.cpus_per_node, big.memory_per_node_mib, big.oversubscribe) == (2, 64, 256000, False)
    assert parse_sinfo(text, "nope") is None and parse_sinfo("") is None


def test_inside_a_slurm_allocation_the_host_is_what_the_job_was_given(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1000")
    host = this_host()
    assert (host.where, host.cpus_per_node, host.memory_per_node_mib) == ("this node of Slurm job 7", 1, 1000)
    with pytest.raises(UsageError, match="--np 5 cannot run on this node of Slurm job 7: .*1000 MiB"):
        check_launch(5, 300, host, flag="--np")
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "600")
    assert this_host().memory_per_node_mib == 600


def test_the_memory_floor_counts_the_tables_and_respects_a_cap():
    from alure.config import preset
    tiny, default = rank_floor_mib(preset("tiny")), rank_floor_mib(preset("default"))
    assert RUNTIME_MIB < tiny < default
    # Two float32 copies (weights, Adagrad state) of the default preset's 320,000 x 64 item-table rows at least.
    assert default - RUNTIME_MIB > 2 * 4 * 320_000 * 64 / 2**20
    assert rank_floor_mib(preset("default"), mem_limit_mib=100) == 100
    assert DEFAULT_RANKS_PER_CORE == 8


# --- no process outlives its launch -------------------------------------------------------------------------------

@pytest.mark.mpi
def test_sigterm_at_launch_leaves_no_process(tmp_path):
    session = own_session("at-launch")
    proc = start(session, "run", *TINY, *FOREVER, "--np", "2", "--out", str(tmp_path / "r"))
    wait_for(lambda: mpirun_of(session), 60, "mpirun")
    proc.send_signal(signal.SIGTERM)
    killed = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert_interrupted(proc, stdout, stderr)
    assert not records(tmp_path / "r"), "the interrupted point has no record"
    assert_nothing_left(session, killed)


@pytest.mark.mpi
def test_ctrl_c_mid_point_keeps_finished_records_and_leaves_no_process(tmp_path):
    session = own_session("mid-point")
    out = tmp_path / "r"
    # np=1 runs first and ends at its timeout (a finished record); the interrupt comes while np=2 trains. The
    # timeout leaves np=2's ranks time to start and load torch before it ends their point too (15 s did not, once,
    # on the 2-core machine with other work on it).
    proc = start(session, "run", *TINY, *FOREVER, "--timeout", "30", "--np", "2", "--with-baseline",
                 "--out", str(out))
    wait_until_training(session, 2)
    proc.send_signal(signal.SIGINT)
    killed = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert_interrupted(proc, stdout, stderr)
    got = records(out)
    assert list(got) == ["weak-sparse-gather-np1-r0"] and got["weak-sparse-gather-np1-r0"]["status"] == "timeout"
    assert (out / "summary.csv").exists(), "the finished point is reported"
    assert_nothing_left(session, killed)


@pytest.mark.mpi
def test_sigkill_of_the_command_takes_mpirun_and_the_ranks_down(tmp_path):
    session = own_session("sigkill")
    proc = start(session, "run", *TINY, *FOREVER, "--np", "2", "--out", str(tmp_path / "r"))
    wait_until_training(session, 2)
    proc.kill()
    killed = time.monotonic()
    proc.communicate(timeout=30)
    assert_nothing_left(session, killed)


@pytest.mark.mpi
def test_mpirun_dying_mid_spawn_takes_its_ranks_down(tmp_path):
    session = own_session("mpirun-dies")
    out = tmp_path / "r"
    proc = start(session, "run", *TINY, *FOREVER, "--np", "3", "--out", str(out))
    # Kill mpirun as soon as its first rank exists, while the others are still being started.
    mpirun = wait_for(lambda: rank_processes(session) and mpirun_of(session), 60, "mpirun with a first rank")[0]
    mpirun.kill()
    killed = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr[-2000:]
    assert records(out)["weak-sparse-gather-np3-r0"]["status"] == "failed"
    assert_nothing_left(session, killed)


@pytest.mark.mpi
def test_a_point_past_its_timeout_leaves_no_process(tmp_path):
    session = own_session("timeout")
    out = tmp_path / "r"
    run = cli("run", *TINY, *FOREVER, "--np", "2", "--timeout", "8", "--out", str(out),
              env={lifetime.SESSION_VAR: session})
    ended = time.monotonic()
    assert run.returncode == 1, run.stderr[-2000:]
    assert records(out)["weak-sparse-gather-np2-r0"]["status"] == "timeout"
    assert_nothing_left(session, ended)


# --- one writer per results folder --------------------------------------------------------------------------------

@pytest.mark.mpi
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys):
    session = own_session("writers")
    out = tmp_path / "sweep"
    first = start(session, "sweep", *TINY, *FOREVER, "--nps", "1", "--modes", "dense-reduce", "--scalings", "weak",
                  "--out", str(out))
    wait_for(lambda: rank_processes(session), 60, "the first sweep's rank")
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == first.pid

    # Second writers (in this process: the lock is per open file, so that is a writer like any other).
    for args in (["sweep", "--resume", str(out)], ["sweep", *TINY, "--out", str(out)],
                 ["run", *TINY, "--out", str(out)]):
        line = refused(capsys, *args)
        assert f"{out} is being written by pid {first.pid}" in line and "sweep" in line, line
        assert "choose another --out" in line, line
    assert first.poll() is None, "the first writer runs on undisturbed"

    first.kill()  # its lock file stays behind, naming a dead process
    killed = time.monotonic()
    first.communicate(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    # The first sweep recorded no point: a new one may start in its folder, taking the stale lock over.
    again = cli("sweep", *TINY, "--nps", "1", "--modes", "dense-reduce", "--scalings", "weak", "--steps", "2",
                "--out", str(out), env={lifetime.SESSION_VAR: session}, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert records(out)["weak-dense-reduce-np1-r0"]["status"] == "ok"
    assert not (out / LOCK_FILE).exists(), "a writer that ends removes its lock"
    assert_nothing_left(session, killed)


@pytest.mark.mpi
def test_slurm_array_tasks_are_not_blocked_by_the_folder_lock(tmp_path):
    out = tmp_path / "array"
    rendered = cli("slurm", "render", *TINY, "--nps", "1", "--modes", "dense-reduce", "--scalings", "weak",
                   "--steps", "2", "--out", str(out))
    assert rendered.returncode == 0, rendered.stderr
    with exclusive_writer(out):  # as if a local sweep held the folder
        task = cli("slurm", "task", "--sweep", str(out), "--np", "1", "--index", "0")
    assert task.returncode == 0, task.stderr[-2000:]
    assert records(out)["weak-dense-reduce-np1-r0"]["status"] == "ok"


@pytest.mark.mpi
def test_the_runtime_floor_is_below_what_a_bare_rank_holds(mpi_launch):
    """The memory floor must never refuse what would run: a rank that has only loaded the suite's runtime holds at
    least RUNTIME_MIB."""
    records = mpi_launch(1, "runtime_rss")
    assert records[0]["rss_mib"] >= RUNTIME_MIB, records
