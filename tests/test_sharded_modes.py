"""Real ranks: the sharded modes (row-wise, table-wise) train the same model as the data-parallel ones, move the
bytes the all-to-all formula says, counted from the tensors, and hold 1/P of the tables."""
import math

import pytest
import torch

from tests.helpers import launch

pytestmark = pytest.mark.mpi
STEPS = 3
MODES = ("sparse-gather", "row-wise", "table-wise")
RUNS = {2: (), 3: ("shard_rows=residue", "shard_dedup=true")}
"""One launch per P: range rows, every lookup sent (the defaults) at P=2; residue rows, distinct ids at P=3 (3 ranks
share 2 cores here: slower, as correct)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """P -> (output folder, {mode: every rank's report})."""
    out = {}
    for p, overrides in RUNS.items():
        folder = tmp_path_factory.mktemp(f"sharded{p}")
        ranks = launch(p, "train_sharded", ",".join(MODES), str(STEPS), str(folder), *overrides, timeout_s=300)
        out[p] = folder, {m: [r["modes"][m] for r in ranks] for m in MODES}
    return out


@pytest.mark.parametrize("p", sorted(RUNS))
def test_gathered_shards_equal_the_replicated_tables(runs, p):
    folder, _ = runs[p]
    reference = torch.load(folder / "sparse-gather-rank0.pt")
    for mode in ("row-wise", "table-wise"):
        states = [torch.load(folder / f"{mode}-rank{r}.pt") for r in range(p)]
        for name, expected in reference.items():
            if name.endswith(("items.weight", "codes.weight")):
                stack = torch.stack([s[name] for s in states])
                holders = (~stack[:, :, 0].isnan()).sum(0)
                assert bool((holders == 1).all()), f"{mode} {name}: every row on exactly one rank"
                got = torch.nansum(stack, 0)
            else:  # dense parameters: allreduced, the same on every rank
                got = states[p - 1][name]
            assert float((got - expected).abs().max()) <= 1e-5, (mode, name, float((got - expected).abs().max()))
    initial_moved = max(float((reference[k] - torch.load(folder / "sparse-gather-rank1.pt")[k]).abs().max())
                        for k in reference)
    assert initial_moved <= 1e-5  # the replicated ranks agree among themselves too


@pytest.mark.parametrize("p", sorted(RUNS))
def test_training_moved_the_tables(runs, p):
    """Agreement must not be the trivial kind: the item tables moved from their initial rows."""
    from alure.model import TableSpec
    folder, reports = runs[p]
    state = torch.load(folder / "row-wise-rank0.pt")
    name = "sources.post_views.items.weight"
    rows = reports["row-wise"][0]["rows"][name.removesuffix(".weight")]
    initial = TableSpec(name.removesuffix(".weight"), rows, reports["row-wise"][0]["dim"], 0).initial_rows(
        torch.arange(rows))
    held = ~state[name][:, 0].isnan()
    assert float((state[name][held] - initial[held]).abs().max()) > 1e-3


def owner(ids: torch.Tensor, rows: int, p: int, how: str, placed: int | None) -> torch.Tensor:
    if how == "table":
        return torch.full_like(ids, placed)
    return ids % p if how == "residue" else ids // math.ceil(rows / p)


@pytest.mark.parametrize("p", sorted(RUNS))
@pytest.mark.parametrize("mode", ["row-wise", "table-wise"])
def test_alltoall_bytes_match_the_lookups_counted_from_the_batch(runs, p, mode):
    """Per rank and step: ids to other ranks x 8 bytes, their rows back and their gradients out (4d bytes each);
    over all ranks, what they send is (asked of others) x (8 + 2 x 4d), about (P-1)/P of the lookups row-wise."""
    _, reports = runs[p]
    ranks = reports[mode]
    sharding = ranks[0]["sharding"]
    how = "table" if mode == "table-wise" else sharding["rows"]
    row_bytes = 4 * ranks[0]["dim"]
    for step in range(STEPS):
        total_sent, total_lookups, total_to_others = 0, 0, 0
        served = [0] * p
        for r in ranks:
            to_others = 0
            for name, ids in r["lookups"][step].items():
                ids = torch.tensor(ids, dtype=torch.long)
                placed = sharding["placement"][name] if sharding["placement"] else None
                owners = owner(ids, r["rows"][name], p, how, placed)
                to_others += int((owners != r["rank"]).sum())
                for o in range(p):
                    served[o] += int((owners == o).sum())
                total_lookups += len(ids)
            c = r["counters"][step]
            assert c["alltoall_calls"] == 3
            assert c["work_ms"] > 0  # the fetch and the reverse all-to-all are the exchange's own work
            assert c["alltoall_ids_bytes_sent"] == 8 * to_others
            assert c["alltoall_rows_bytes_received"] == c["alltoall_grad_bytes_sent"] == row_bytes * to_others
            total_sent += c["alltoall_bytes_sent"]
            total_to_others += to_others
        assert [r["counters"][step]["alltoall_lookups_served"] for r in ranks] == served
        assert total_sent == total_to_others * (8 + 2 * row_bytes)
        assert sum(r["counters"][step]["alltoall_bytes_received"] for r in ranks) == total_sent
        if mode == "row-wise":  # rows spread over the ranks: (P-1)/P of every lookup travels
            expected = (p - 1) / p * total_lookups * (8 + 2 * row_bytes)
            assert 0.85 < total_sent / expected < 1.15, (total_sent, expected)


def test_row_wise_tables_per_rank_fall_as_one_over_p(runs):
    """Table rows and Adagrad state per rank, from the tensors: the whole tables at P=1 (the replicated mode holds
    as much at every P), 1/P of them row-wise, within 15%."""
    whole = {p: max(r["counters"][-1]["table_bytes"] for r in runs[p][1]["sparse-gather"]) for p in RUNS}
    assert whole[2] == whole[3] > 0
    for p in RUNS:
        for r in runs[p][1]["row-wise"]:
            c = r["counters"][-1]
            assert c["table_state_bytes"] == c["table_bytes"]  # Adagrad: one sum per element, for its shard only
            assert abs(c["table_bytes"] * p / whole[p] - 1) < 0.15, (p, c["table_bytes"], whole[p])


def test_table_wise_places_every_table_on_one_rank(runs):
    for p, (_, reports) in runs.items():
        ranks = reports["table-wise"]
        placement = ranks[0]["sharding"]["placement"]
        assert set(placement) == set(ranks[0]["rows"]) and set(placement.values()) <= set(range(p))
        assert len(set(placement.values())) == p  # six tables: every rank holds some
        assert all(r["sharding"] == ranks[0]["sharding"] for r in ranks)
