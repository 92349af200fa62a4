"""Real ranks: every exchange mode trains the same model, with the collectives it claims to use and the bytes it
claims to move."""
import json
import re
from collections import defaultdict

import pytest
import torch

from bench.plan.config import REPLICATED_MODES
from tests.helpers import launch

pytestmark = pytest.mark.mpi
MODES = (*REPLICATED_MODES, "auto")
"""The data-parallel modes (the sharded ones: tests/test_sharded_modes.py)."""
FIXED_MODES = REPLICATED_MODES
STEPS = 4
TABLE = "sources.post_views.items.weight"


def trained_modes(np: int, modes, out, env=None) -> list[dict]:
    """tests/ranks/train_modes.py on `np` ranks: each rank's record (per mode), in rank order."""
    return launch(np, "train_modes", ",".join(modes), str(STEPS), str(out), env=env)


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
    ranks = trained_modes(2, MODES, out, env={"HOROVOD_TIMELINE": "DYNAMIC"})
    runs = {mode: {"ranks": [r["modes"][mode] for r in ranks], "timeline": timeline_ops(out / f"{mode}-timeline.json")}
            for mode in MODES}
    return out, runs


def test_modes_end_with_the_same_weights_on_every_rank(trained):
    out, runs = trained
    reference = torch.load(out / "sparse-gather-rank0.pt")
    initial = torch.load(out / "initial-rank0.pt")
    for mode in MODES:
        for rank in (0, 1):
            state = torch.load(out / f"{mode}-rank{rank}.pt")
            for name, tensor in reference.items():
                # Compared on what training changed. Modes sum a row's gradient in other orders (coalesce, scatter-add
                # then allreduce), and Adagrad divides by the root of the summed squares, so an element whose gradient
                # nearly cancels carries its round-off into its update: one element of the tiny world's tables moved
                # 1.2e-5 apart out of a 0.029 move. 1e-5 plus 1e-3 of the move still fails any real difference
                # (a missing row, a wrong average, a double-counted duplicate move elements by their whole size), per element.
                moved = tensor - initial[name]
                off = (state[name] - tensor).abs() - (1e-5 + 1e-3 * moved.abs())
                assert float(off.max()) <= 0, f"{mode} rank {rank} {name}: {float((state[name] - tensor).abs().max())}"
    # Agreement must not be the trivial kind: training moved the tables away from where they started.
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


@pytest.fixture(scope="module")
def held_by_p(trained, tmp_path_factory):
    """Bytes each fixed mode holds per step at P = 1, 2, 3 (np=2 from `trained`; np=3 is oversubscribed here)."""
    out = tmp_path_factory.mktemp("held")
    held = {2: {m: trained[1][m]["ranks"] for m in FIXED_MODES}}
    for p in (1, 3):
        ranks = trained_modes(p, FIXED_MODES, out)
        held[p] = {m: [r["modes"][m] for r in ranks] for m in FIXED_MODES}
    return {(p, key): {m: max(max(c[key] for c in r["counters"]) for r in ranks) for m, ranks in modes.items()}
            for p, modes in held.items() for key in ("bytes_held", "allgather_bytes_held")}


def test_bytes_held_grow_with_p_for_the_gathers_and_stay_flat_for_dense_reduce(held_by_p):
    held = {p: held_by_p[(p, "bytes_held")] for p in (1, 2, 3)}
    gathered = {p: held_by_p[(p, "allgather_bytes_held")] for p in (2, 3)}
    assert {held[1][m] for m in FIXED_MODES} == {0}  # np=1: Horovod exchanges nothing, in any mode
    for mode in ("sparse-gather", "coalesced-gather"):  # every rank's rows: P x what one rank sends
        assert 1.3 < gathered[3][mode] / gathered[2][mode] < 1.7, (mode, gathered)
        assert held[2][mode] < held[3][mode]
    for p in (2, 3):  # rows repeat: coalescing holds less
        assert held[p]["coalesced-gather"] < held[p]["sparse-gather"]
    assert held[2]["dense-reduce"] == held[3]["dense-reduce"] > 0
    # the control holds the dense copy and the re-sparsified union of the rows any rank touched, which grows with P
    assert held[2]["dense-reduce"] < held[2]["sparse-as-dense"] < held[3]["sparse-as-dense"]
