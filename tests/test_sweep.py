"""Real sweeps through the CLI on real ranks: the records, the faults, resuming and interrupting."""
import signal
import subprocess
import time

import pandas as pd
import pytest

from bench.results.summary import SUMMARY_COLUMNS
from tests.helpers import CLI, TINY, rank_processes, records, wait_for

pytestmark = pytest.mark.mpi


def sweep(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "sweep", *TINY, *args], capture_output=True, text=True, timeout=timeout)


def test_exchange_bytes_grow_with_p_for_sparse_gather_and_stay_flat_for_dense_reduce(tmp_path):
    # The sweep's default modes; every mode's bytes against P: tests/test_exchange_modes.py.
    out = tmp_path / "bytes"
    modes = "sparse-gather,dense-reduce"
    run = sweep("--nps", "1,2,3", "--scalings", "weak", "--steps", "3", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    df = pd.read_csv(out / "summary.csv")
    assert list(df.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert (df["status"] == "ok").all()
    assert df.loc[df["np"] == 3, "oversubscribed"].all() and not df.loc[df["np"] < 3, "oversubscribed"].any()
    by = {(r.mode, r.np): r for r in df.itertuples()}
    # np=1: Horovod exchanges nothing at all, in any mode.
    assert {by[(m, 1)].exchange_bytes_held for m in modes.split(",")} == {0}
    # sparse-gather holds every rank's (indices, values): P x what one rank sends.
    g2, g3 = by[("sparse-gather", 2)].allgather_bytes_held, by[("sparse-gather", 3)].allgather_bytes_held
    assert 1.3 < g3 / g2 < 1.7, (g2, g3)
    # dense-reduce holds one V x d buffer per table whatever P is, and gathers nothing.
    assert by[("dense-reduce", 2)].exchange_bytes_held == by[("dense-reduce", 3)].exchange_bytes_held > 0
    assert by[("dense-reduce", 2)].allgather_calls == 0 == by[("dense-reduce", 3)].allgather_calls
    for f in ("report.md", "efficiency.png", "breakdown.png", "memory.png", "environment.json", "sweep.json"):
        assert (out / f).stat().st_size > 0
    got = records(out)
    rec = got["weak-sparse-gather-np2-r0"]
    assert len(rec["ranks"]) == 2 and all(len(r["step_time_ms"]) == 3 for r in rec["ranks"])
    assert set(rec["metrics"]["phase_ms"]) == {"data", "forward", "backward", "exchange_wait", "optimizer"}
    # the training's own memory, per phase, beside the build's
    m = rec["metrics"]
    assert m["memory_probe"] == "vmhwm-reset"
    assert set(m["phase_peak_rss_mib"]) == set(m["phase_ms"])
    assert 0 < m["train_peak_rss_mib"] <= m["peak_rss_mib"] and m["build_peak_rss_mib"] > 0
    # allreduce's ring traffic in its own field: 2(P-1)/P of what is reduced
    for p in (2, 3):
        d = got[f"weak-dense-reduce-np{p}-r0"]["metrics"]
        assert d["allreduce_ring_bytes"] == pytest.approx(2 * (p - 1) / p * d["allreduce_bytes_held"], rel=1e-6)
        assert d["densify_bytes"] > 0 and d["resparsified_bytes"] == 0


def test_a_killed_rank_is_recorded_as_failed_and_the_next_point_runs(tmp_path):
    out = tmp_path / "kill"
    # 250 steps (about 10 s of a tiny np=2 step here) outlast the kill 3 s after the ranks start; the next point runs
    # them all, so no more.
    proc = subprocess.Popen([*CLI, "sweep", *TINY, "--nps", "2", "--modes", "dense-reduce", "--steps", "250",
                             "--no-interleave",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = wait_for(lambda: len(rank_processes()) == 2 and rank_processes(), 60, "two ranks of the first point")
        time.sleep(3)  # into its training steps
        victim = next(p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    got = records(out)
    assert got["weak-dense-reduce-np2-r0"]["status"] == "failed"
    assert "signal 9" in got["weak-dense-reduce-np2-r0"]["reason"]
    assert got["strong-dense-reduce-np2-r0"]["status"] == "ok", stdout
    assert proc.returncode == 1  # a sweep with a failed point says so in its exit code


def test_a_hung_point_times_out_and_leaves_no_process_behind(tmp_path):
    out = tmp_path / "hang"
    run = sweep("--nps", "1", "--modes", "dense-reduce", "--scalings", "weak", "--steps", "100000",
                "--timeout", "6", "--out", str(out))
    assert run.returncode == 1
    rec = records(out)["weak-dense-reduce-np1-r0"]
    assert rec["status"] == "timeout" and "6 s" in rec["reason"]
    assert not rank_processes()


def test_sigterm_keeps_finished_points_and_resume_reruns_only_the_rest(tmp_path):
    out = tmp_path / "resume"
    proc = subprocess.Popen([*CLI, "sweep", *TINY, "--nps", "1,2", "--modes", "dense-reduce", "--scalings", "weak",
                             "--steps", "40", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # The rank spends its first seconds importing torch and Horovod: a signal then lands inside the point.
    wait_for(lambda: len(rank_processes()) == 1, 60, "the first point's rank")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    assert not rank_processes(), "an interrupted sweep must not leave ranks running"
    assert not records(out), "the interrupted point has no record; nothing half-written"

    first = subprocess.run([*CLI, "sweep", "--resume", str(out)], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 of 2 points already ok" in first.stdout
    done = {k: (v["started_at"], (out / "points" / f"{k}.json").stat().st_mtime_ns) for k, v in records(out).items()}
    assert len(done) == 2

    # Delete one record: resume reruns exactly that point and leaves the other file untouched.
    (out / "points" / "weak-dense-reduce-np2-r0.json").unlink()
    again = subprocess.run([*CLI, "sweep", "--resume", str(out)], capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "1 of 2 points already ok" in again.stdout
    assert (out / "points" / "weak-dense-reduce-np1-r0.json").stat().st_mtime_ns == \
        done["weak-dense-reduce-np1-r0"][1]
    assert records(out)["weak-dense-reduce-np2-r0"]["status"] == "ok"


def test_compare_set_measures_a_workload_setting_b_beside_a_and_never_pools_them(tmp_path):
    # Setting B of the workload (--compare-set): here the row-wise split by residue against the default id range.
    out = tmp_path / "rows"
    run = sweep("--nps", "1,2", "--scalings", "weak", "--modes", "row-wise", "--steps", "2", "--warmup", "1",
                "--no-corun", "--compare-set", "shard_rows=residue", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "setting B: shard_rows=residue" in run.stdout
    got = records(out)
    assert set(got) == {"weak-row-wise-np1-r0", "weak-row-wise-np2-r0",
                        "weak-row-wise-np1-r0-setB", "weak-row-wise-np2-r0-setB"}
    assert got["weak-row-wise-np2-r0"]["sharding"]["rows"] == "range"
    assert got["weak-row-wise-np2-r0-setB"]["sharding"]["rows"] == "residue"
    assert got["weak-row-wise-np2-r0-setB"]["point"]["workload_b"] == {"shard_rows": "residue"}
    df = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert sorted(set(df["workload_b"])) == ["", "shard_rows=residue"]
    # each setting's np=2 divides by its own np=1
    for setting, rows in df.groupby("workload_b"):
        t1 = float(rows.loc[rows["np"] == 1, "step_time_ms"].iloc[0])
        t2 = float(rows.loc[rows["np"] == 2, "step_time_ms"].iloc[0])
        assert float(rows.loc[rows["np"] == 2, "efficiency"].iloc[0]) == pytest.approx(t1 / t2, rel=1e-6), setting
    assert "shard_rows=residue" in (out / "report.md").read_text()
