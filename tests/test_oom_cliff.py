"""The out-of-memory cliff: a cap derived from measured training growth, and real ranks that hit it."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from bench.errors import UsageError
from bench.run.demo import check, derive_cap
from bench.run.sweep import classify_failure

CLI = [sys.executable, "-m", "bench.cli"]


def growth_frame(growth: dict) -> pd.DataFrame:
    return pd.DataFrame([{"scaling": "weak", "mode": m, "np": n, "status": "ok", "data_growth_mib": g}
                         for (m, n), g in growth.items()])


def test_the_cap_lies_midway_and_predicts_each_point():
    df = growth_frame({("dense-reduce", 1): 300, ("dense-reduce", 2): 320, ("dense-reduce", 3): 330,
                       ("sparse-gather", 1): 300, ("sparse-gather", 2): 420, ("sparse-gather", 3): 600})
    d = derive_cap(df)
    assert d.dense_max_mib == 330 and d.margin_mib == 33
    # np=2 clears 330 by 90 MiB < 2 x 33? No: 420 - 330 = 90 >= 66, so the cliff is at np=2.
    assert d.cliff_np == 2 and d.allowance_mib == pytest.approx(375)
    assert d.predicted == {"dense-reduce 1": "ok", "dense-reduce 2": "ok", "dense-reduce 3": "ok",
                           "sparse-gather 1": "ok", "sparse-gather 2": "oom", "sparse-gather 3": "oom"}


def test_no_cliff_is_said_not_faked():
    df = growth_frame({("dense-reduce", 1): 300, ("dense-reduce", 2): 320,
                       ("sparse-gather", 1): 300, ("sparse-gather", 2): 340})
    with pytest.raises(UsageError, match="no cliff"):
        derive_cap(df)
    with pytest.raises(UsageError, match="lacks ok weak points"):
        derive_cap(growth_frame({("dense-reduce", 1): 300}))


def test_the_check_flags_a_point_that_did_not_fall_as_predicted():
    d = derive_cap(growth_frame({("dense-reduce", 2): 100, ("sparse-gather", 2): 400}))
    capped = pd.DataFrame([{"scaling": "weak", "mode": "dense-reduce", "np": 2, "status": "ok"},
                           {"scaling": "weak", "mode": "sparse-gather", "np": 2, "status": "ok"}])
    table = check(d, capped)
    assert table.set_index("mode").loc["sparse-gather", "agrees"] == False  # noqa: E712
    assert table.set_index("mode").loc["dense-reduce", "agrees"] == True  # noqa: E712


MPIRUN_SIGNALLED = ("mpirun noticed that process rank 1 with PID 4242 on node vm exited on signal {} ({}).\n"
                    "--------------------------------------------------------------------------\n")


def test_a_crash_under_the_memory_cap_counts_as_out_of_memory_and_says_it_was_inferred():
    """Horovod's and MPI's native threads die of a refused allocation (SIGSEGV, seen in a capped sparse-gather
    point) instead of raising: under the cap that is the cap's doing; without it, a crash stays a failure."""
    segv = MPIRUN_SIGNALLED.format(11, "Segmentation fault")
    status, reason = classify_failure(False, 139, segv, 300, capped=True)
    assert status == "oom" and "inferred" in reason and "signal 11 (Segmentation fault)" in reason
    assert classify_failure(False, 139, segv, 300, capped=False) == (
        "failed", "a rank exited on signal 11 (Segmentation fault)")
    # A kill from outside is no allocation of the rank's own, cap or not.
    assert classify_failure(False, 137, MPIRUN_SIGNALLED.format(9, "Killed"), 300, capped=True)[0] == "failed"
    # What a rank handed back, and a traceback's own words, come first.
    handed = [{"rank": 0, "status": "failed", "reason": "ValueError: bad"}]
    assert classify_failure(False, 1, segv, 300, handed, capped=True) == ("failed", "ValueError: bad")
    assert classify_failure(False, 1, "RuntimeError: out of memory\n" + segv, 300)[0] == "oom"


@pytest.mark.mpi
def test_sparse_gather_falls_off_the_derived_cliff_and_dense_reduce_does_not(tmp_path):
    """The small demonstration, end to end on real ranks: uncapped, derived cap, capped. 120,000 sampled negatives
    per source and rank, 8 samples per rank, make the exchange weigh (measured on the 2-core machine: data-segment
    growth 314 MiB for dense-reduce, 445 for sparse-gather at np=2, so the cap lies 65 MiB from each, twice the
    margin); np=2 alone keeps it to four launches."""
    config = tmp_path / "oom-small.toml"
    config.write_text(SMALL_DEMO)
    out = tmp_path / "demo"
    run = subprocess.run([*CLI, "oom-demo", "--config", str(config), "--out", str(out)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cliff = {(r["mode"], r["np"]): r for r in json.loads((out / "cliff.json").read_text())}
    assert cliff[("sparse-gather", 2)]["capped"] == "oom" and cliff[("sparse-gather", 2)]["predicted"] == "oom"
    assert cliff[("dense-reduce", 2)]["capped"] == "ok" and cliff[("dense-reduce", 2)]["predicted"] == "ok"
    records = [json.loads(p.read_text()) for p in (out / "capped" / "points").glob("*.json")]
    oom = [r for r in records if r["status"] == "oom"]
    assert oom and all("memory" in r["reason"].lower() or "alloc" in r["reason"].lower() for r in oom)


SMALL_DEMO = """
[sweep]
name = "oom-small"
preset = "tiny"
nps = [2]
scalings = ["weak"]
modes = ["sparse-gather", "dense-reduce"]
steps = 1
warmup_steps = 1
timeout_s = 180.0
batch_per_rank = 8

[sweep.workload]
sampled_negatives = 120000
"""
