"""Real ranks: every exchange mode trains the same model, with the collectives it claims to use and the bytes it
claims to move."""
import json
import re
from collections import defaultdict

import pytest
import torch

from bench.config import MODES
from tests.conftest import launch

pytestmark = pytest.mark.mpi
STEPS = 4
TABLE = "sources.post_views.items.weight"


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
    """Every mode on 2 ranks from the same seed, with Horovod's timeline on."""
    out = tmp_path_factory.mktemp("modes")
    # one launch: the modes in turn, each with a timeline of its own
    ranks = launch(2, "train_modes", ",".join(MODES), str(STEPS), str(out), env={"HOROVOD_TIMELINE": "DYNAMIC"})
    runs = {mode: {"ranks": [r["modes"][mode] for r in ranks], "timeline": timeline_ops(out / f"{mode}-timeline.json")}
            for mode in MODES}
    return out, runs


def test_modes_end_with_the_same_weights_on_every_rank(trained):
    out, runs = trained
    reference = torch.load(out / "sparse-gather-rank0.pt")
    for mode in MODES:
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
    for mode in ("sparse-gather", "coalesced-gather"):
        ops = runs[mode]["timeline"]
        assert any(TABLE in name and "ALLGATHER" in acts for name, acts in ops.items()), mode
        assert not any(TABLE in name and "ALLREDUCE" in acts for name, acts in ops.items()), mode
        for r in runs[mode]["ranks"]:  # the byte counters say the same, from the tensors
            assert all(c["allgather_calls"] > 0 and c["allgather_bytes_held"] > 0 for c in r["counters"])
    for mode in ("dense-reduce", "sparse-as-dense"):
        ops = runs[mode]["timeline"]
        assert any(TABLE in name and "ALLREDUCE" in acts for name, acts in ops.items()), mode
        assert not any("ALLGATHER" in acts for acts in ops.values()), f"{mode} must not allgather at all"
        for r in runs[mode]["ranks"]:
            assert all(c["allgather_calls"] == 0 and c["allreduce_calls"] > 0 for c in r["counters"])


def test_dense_reduce_hands_the_optimizer_no_sparse_tensor_and_makes_no_sparse_copy(trained):
    _, runs = trained
    for r in runs["dense-reduce"]["ranks"]:
        assert not r["sparse_to_optimizer"]
        for c in r["counters"]:
            assert c["resparsified_bytes"] == 0 == c["coalesced_bytes"]
            assert c["densify_bytes"] > 0 and c["bytes_held"] == c["allreduce_bytes_held"]
            # the ring moves 2(P-1)/P of what is reduced: at P=2 exactly as much
            assert c["allreduce_ring_bytes"] == c["allreduce_bytes_sent"]
    # the control re-sparsifies: sparse gradients reach its optimizer, and it holds the re-sparsified copy
    for r in runs["sparse-as-dense"]["ranks"]:
        assert r["sparse_to_optimizer"]
        assert all(c["resparsified_bytes"] > 0 and c["bytes_held"] > c["allreduce_bytes_held"]
                   for c in r["counters"])


def test_coalesced_gather_gathers_each_ranks_distinct_rows(trained):
    _, runs = trained
    ranks = runs["coalesced-gather"]["ranks"]
    for step in range(STEPS):
        distinct = [r["distinct_rows"][step] for r in ranks]
        for r in ranks:
            c = r["counters"][step]
            assert c["allgather_rows_sent"] == r["distinct_rows"][step]
            assert c["allgather_rows_held"] == sum(distinct)
            assert c["coalesced_bytes"] == c["allgather_bytes_sent"] > 0
    # sparse-gather sends every lookup, repeats and all: more rows than the distinct ones
    for r in runs["sparse-gather"]["ranks"]:
        assert all(c["allgather_rows_sent"] > d for c, d in zip(r["counters"], r["distinct_rows"]))
        assert all(c["allgather_rows_held"] == sum(o["counters"][i]["allgather_rows_sent"]
                                                   for o in runs["sparse-gather"]["ranks"])
                   for i, c in enumerate(r["counters"]))


def test_auto_chooses_alike_on_every_rank_among_its_three_modes(trained):
    _, runs = trained
    ranks = runs["auto"]["ranks"]
    assert ranks[0]["table_modes"] == ranks[1]["table_modes"]
    chosen = {m for step in ranks[0]["table_modes"] for m in step}
    assert chosen and chosen <= {"sparse-gather", "coalesced-gather", "dense-reduce"}
