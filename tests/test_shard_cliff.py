"""Where sharding must win: a per-rank budget derived from measured peaks, and real ranks that hit it replicated
and fit under it row-wise."""
import json
import subprocess

import pytest

from bench.errors import UsageError
from bench.run.demo import derive_budget
from tests.helpers import CLI


def test_the_budget_lies_midway_and_predicts_each_point():
    d = derive_budget({("sparse-gather", 1): 1000, ("sparse-gather", 2): 1040, ("dense-reduce", 2): 1200,
                       ("row-wise", 1): 1000, ("row-wise", 2): 780, ("row-wise", 3): 700})
    assert d.sharded_max_mib == 780 and d.replicated_min_mib == 1000 and d.margin_mib == 78
    assert d.budget_mib == pytest.approx(890)
    assert d.predicted == {"sparse-gather 1": "oom", "sparse-gather 2": "oom", "dense-reduce 2": "oom",
                           "row-wise 1": "oom", "row-wise 2": "ok", "row-wise 3": "ok"}


def test_no_gap_is_said_not_faked():
    with pytest.raises(UsageError, match="no gap"):
        derive_budget({("sparse-gather", 2): 820, ("row-wise", 2): 780})
    with pytest.raises(UsageError, match="lacks ok weak points"):
        derive_budget({("sparse-gather", 2): 820})


@pytest.mark.mpi
def test_replicated_tables_oom_under_the_derived_budget_and_a_row_wise_shard_fits(tmp_path):
    """End to end at np=2 on the sharded preset: four launches (two modes, uncapped then capped)."""
    config = tmp_path / "shard-small.toml"
    config.write_text(SMALL_DEMO)
    out = tmp_path / "demo"
    run = subprocess.run([*CLI, "shard-demo", "--config", str(config), "--out", str(out)], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    outcome = {(r["mode"], r["np"]): r for r in json.loads((out / "outcome.json").read_text())}
    assert outcome[("sparse-gather", 2)]["capped"] == "oom" == outcome[("sparse-gather", 2)]["predicted"]
    assert outcome[("row-wise", 2)]["capped"] == "ok" == outcome[("row-wise", 2)]["predicted"]
    capped = {p.stem: json.loads(p.read_text()) for p in (out / "capped" / "points").glob("*.json")}
    row_wise = capped["weak-row-wise-np2-r0"]
    assert row_wise["metrics"]["peak_data_mib"] < json.loads((out / "budget.json").read_text())["budget_mib"]
    # the shard is half the tables, read off the tensors: rows and Adagrad state alike
    uncapped = json.loads((out / "uncapped" / "points" / "weak-sparse-gather-np2-r0.json").read_text())
    whole = uncapped["metrics"]["table_bytes"]
    assert abs(row_wise["metrics"]["table_bytes"] * 2 / whole - 1) < 0.15
    assert row_wise["metrics"]["table_state_bytes"] == row_wise["metrics"]["table_bytes"]


SMALL_DEMO = """
[sweep]
name = "shard-small"
preset = "sharded"
nps = [2]
scalings = ["weak"]
modes = ["sparse-gather", "row-wise"]
steps = 1
warmup_steps = 1
timeout_s = 300.0
"""
