"""Tests against the real local single-node Slurm cluster from slurm/local_cluster.sh.

Start it first with `bash slurm/local_cluster.sh start`; without it these tests skip.
We poll `scontrol show job` ourselves every 0.2 s because `sbatch --wait` polls slowly
(2 s growing to 10 s), which would make this file several times slower.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

POLL_S = 0.2
JOB_TIMEOUT_S = 12.0  # per job; a healthy run takes ~1 s, so the file stays well under 60 s
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}
def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def _sbatch(args: list[str], env: dict[str, str] | None = None) -> str:
    out = _run(["sbatch", "--parsable", "--partition=debug", *args], env=env)
    assert out.returncode == 0, f"sbatch failed: {out.stderr.strip()}"
    return out.stdout.strip().split(";")[0]


def _job_records(job_id: str) -> list[dict[str, str]]:
    """One dict per job record; an array job yields one record per (split-off) task."""
    out = _run(["scontrol", "-o", "show", "job", job_id])
    assert out.returncode == 0, f"scontrol show job {job_id} failed: {out.stderr.strip()}"
    records = []
    for line in out.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if fields:
            records.append(fields)
    return records


def _wait_for_job(job_id: str, n_records: int = 1, timeout: float = JOB_TIMEOUT_S) -> list[dict[str, str]]:
    """Poll until the job (all n_records array tasks) reaches a terminal state; cancel it on timeout."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = _job_records(job_id)
        if len(records) >= n_records and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(POLL_S)
    _run(["scancel", job_id])
    states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: {states}")


def _root_mpi_env() -> dict[str, str]:
    # Open MPI refuses to run as root without these.
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def test_job_array_tasks_write_their_ids(slurm_cluster: str, tmp_path: Path) -> None:
    job_id = _sbatch([
        "--array=0-1", "--ntasks=1", f"--chdir={tmp_path}", f"--output={tmp_path}/%A_%a.out",
        "--wrap", 'echo "$SLURM_ARRAY_TASK_ID" > "task_${SLURM_ARRAY_TASK_ID}.txt"',
    ])
    records = _wait_for_job(job_id, n_records=2)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    for r in records:
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), r
    for task in (0, 1):
        assert (tmp_path / f"task_{task}.txt").read_text().strip() == str(task)


def _run_mpirun_job(tmp_path: Path, ranks: int) -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    out_file = tmp_path / "mpi.out"
    # sbatch exports the submitting environment by default, so the root variables reach mpirun.
    job_id = _sbatch(
        [f"--ntasks={ranks}", f"--chdir={tmp_path}", f"--output={out_file}",
         "--wrap", f"mpirun -np {ranks} hostname"],
        env=_root_mpi_env(),
    )
    (record,) = _wait_for_job(job_id)
    output = out_file.read_text() if out_file.exists() else "<no output file>"
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == ranks, output


def test_mpirun_inside_two_task_allocation(slurm_cluster: str, tmp_path: Path) -> None:
    _run_mpirun_job(tmp_path, ranks=2)


def test_four_ranks_run_oversubscribed(slurm_cluster: str, tmp_path: Path) -> None:
    # The node declares CPUs=4 (SlurmdParameters=config_overrides) even on a 2-core machine,
    # so the 4-rank scaling points can run.
    _run_mpirun_job(tmp_path, ranks=4)


def test_impossible_request_fails_at_submit(slurm_cluster: str) -> None:
    # EnforcePartLimits=ALL rejects it at submit instead of leaving it pending forever.
    out = _run(["sbatch", "--parsable", "--partition=debug", "--ntasks=64", "--wrap", "true"])
    if out.returncode == 0:  # do not leave a forever-pending job behind
        _run(["scancel", out.stdout.strip().split(";")[0]])
    assert out.returncode != 0, f"sbatch accepted an impossible request: job {out.stdout.strip()}"
    assert out.stderr.strip(), "sbatch failed without saying why"
