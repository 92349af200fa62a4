"""Asking Slurm: sbatch to submit a script, scontrol for the state of every task of the sweep's arrays (and the
parsers of their answers)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.errors import UsageError
from bench.slurm.arrays import expand_task_ids

ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})
"""Job states of a task that may still write its point's record."""


def parse_sbatch_output(stdout: str) -> str:
    """The job id from `sbatch --parsable` ('1234' or '1234;cluster')."""
    job_id = stdout.strip().splitlines()[-1].split(";")[0].strip() if stdout.strip() else ""
    if not job_id.isdigit():
        raise UsageError(f"sbatch printed no job id (got {stdout.strip()[:200]!r})")
    return job_id


def parse_scontrol_jobs(text: str) -> list[dict[str, str]]:
    """`scontrol -o show job` output: one dict of its KEY=VALUE fields per job record."""
    records = []
    for line in text.splitlines():
        record = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if record:
            records.append(record)
    return records


def task_states(records: list[dict[str, str]]) -> dict[tuple[str, int], str]:
    """(array job id, task index) -> job state; a pending record that stands for many tasks gives each its state."""
    states = {}
    for r in records:
        ids = r.get("ArrayTaskId")
        if not ids or ids == "N/A":
            continue
        for index in expand_task_ids(ids):
            states[(r.get("ArrayJobId") or r["JobId"], index)] = r.get("JobState", "UNKNOWN")
    return states


def _slurm(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]} not found on PATH: run this on a Slurm login node (or `module load slurm`)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{argv[0]} did not answer within {timeout:g} s: is slurmctld up? (scontrol ping)") \
            from None


def sbatch(script: Path) -> str:
    """Submit a script; its job id. A refusal (unknown partition, impossible request) is a UsageError."""
    run = _slurm(["sbatch", "--parsable", str(script)])
    if run.returncode != 0:
        said = [line.removeprefix("sbatch: error: ") for line in run.stderr.splitlines() if line.strip()]
        raise UsageError(f"sbatch refused {script.name}: {'; '.join(said[-2:]) or f'exit code {run.returncode}'}")
    return parse_sbatch_output(run.stdout)


def query_states(job_ids) -> dict[tuple[str, int], str]:
    """What Slurm still knows of these array jobs' tasks. A job it has forgotten (finished more than MinJobAge
    ago) is left out: the records in the sweep folder are the truth, Slurm's states only explain gaps."""
    states: dict[tuple[str, int], str] = {}
    for job_id in sorted(set(job_ids), key=int):
        run = _slurm(["scontrol", "-o", "show", "job", job_id])
        if run.returncode == 0:
            states.update(task_states(parse_scontrol_jobs(run.stdout)))
    return states
