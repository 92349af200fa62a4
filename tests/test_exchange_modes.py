"""Real ranks: sparse-gather and dense-reduce train the same model, with the collectives they claim to use."""
import json
import re
from collections import defaultdict

import pytest
import torch

from tests.conftest import launch

pytestmark = pytest.mark.mpi
STEPS = 4


def timeline_ops(path) -> dict[str, set[str]]:
    """Horovod timeline -> {tensor name: collective activities (ALLGATHER, ALLREDUCE, ...)}."""
    text = path.read_text().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e["args"]}
    ops = defaultdict(set)
    for e in events:
        if e.get("ph") == "B" and re.fullmatch(r"[A-Z_]+", e.get("name", "")):
            ops[names.get(e["pid"], "?")].add(e["name"])
    return ops


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both modes on 2 ranks from the same seed, with Horovod's timeline on."""
    out = tmp_path_factory.mktemp("modes")
    runs = {}
    for mode in ("sparse-gather", "dense-reduce"):
        timeline = out / f"{mode}-timeline.json"
        runs[mode] = {"ranks": launch(2, "train_modes", mode, str(STEPS), str(out),
                                      env={"HOROVOD_TIMELINE": str(timeline)}),
                      "timeline": timeline_ops(timeline)}
    return out, runs


def test_modes_end_with_the_same_weights_on_every_rank(trained):
    out, runs = trained
    reference = torch.load(out / "sparse-gather-rank0.pt")
    for mode in ("sparse-gather", "dense-reduce"):
        for rank in (0, 1):
            state = torch.load(out / f"{mode}-rank{rank}.pt")
            for name, tensor in reference.items():
                torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-5, msg=f"{mode} rank {rank} {name}")
    # Agreement must not be the trivial kind: training moved the tables away from where they started.
    initial = torch.load(out / "initial-rank0.pt")
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference if "items" in k)
    assert moved > 1e-3


def test_batches_repeat_item_ids_and_table_gradients_are_sparse(trained):
    _, runs = trained
    for mode, run in runs.items():
        for r in run["ranks"]:
            assert r["repeated_ids"], f"{mode}: the test batches must repeat item ids"
            assert r["sparse_grads"], f"{mode}: item-table gradients must be sparse tensors"


def test_sparse_gather_allgathers_the_tables_and_dense_reduce_allreduces_them(trained):
    _, runs = trained
    gather_ops = runs["sparse-gather"]["timeline"]
    reduce_ops = runs["dense-reduce"]["timeline"]
    table = "sources.post_views.items.weight"
    assert any(table in name and "ALLGATHER" in acts for name, acts in gather_ops.items())
    assert not any(table in name and "ALLREDUCE" in acts for name, acts in gather_ops.items())
    assert any(table in name and "ALLREDUCE" in acts for name, acts in reduce_ops.items())
    assert not any("ALLGATHER" in acts for acts in reduce_ops.values()), "dense-reduce must not allgather at all"
    # The byte counters say the same, from the tensors.
    for r in runs["sparse-gather"]["ranks"]:
        assert all(c["allgather"] > 0 for c in r["calls"])
    for r in runs["dense-reduce"]["ranks"]:
        assert all(c["allgather"] == 0 and c["allreduce"] > 0 for c in r["calls"])
