"""Real ranks: `auto` shards a table row-wise once, at its first step, when no replicated mode fits the memory budget
(then it trains the same model as row-wise) or when row-wise is predicted cheaper; its record says which and why,
and the decision is the cost model's (bench.model.shard_costs.choose_sharding) on the inputs it recorded."""
import pytest
import torch

from bench.model.shard_costs import choose_sharding
from bench.model.table_costs import ExchangeCosts
from tests.helpers import launch

pytestmark = pytest.mark.mpi
P, STEPS = 2, 3
PRESSED = "auto@1"
"""auto under a budget of one byte, which no table fits replicated (nor sharded): it must shard every table whose
shard needs less."""


def recomputed(rank: dict) -> dict:
    """Each table's decision as choose_sharding makes it from what the record says auto decided with."""
    costs = ExchangeCosts.from_dict(rank["costs"])
    out = {}
    for name, c in rank["sharding"]["auto"].items():
        out[name] = choose_sharding(costs, P, name, rank["table_rows"][name], rank["dim"], c["rows_total"],
                                    c["distinct_total"], c["cpu"], c["budget_bytes"]).sharded
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: row-wise, auto under the budget above, auto with this host's memory."""
    folder = tmp_path_factory.mktemp("auto")
    return folder, launch(P, "train_sharded", f"row-wise,{PRESSED},auto", str(STEPS), str(folder), timeout_s=300)


def test_under_a_budget_no_replicated_table_fits_auto_shards_and_trains_as_row_wise(runs):
    folder, ranks = runs
    auto = ranks[0]["modes"][PRESSED]["sharding"]
    assert auto["mode"] == "auto" and auto["tables"], auto
    assert all(c["reason"] == "memory" for c in auto["auto"].values()), auto["auto"]
    for name, c in auto["auto"].items():  # the least memory wins when nothing fits
        assert c["sharded"] == (c["row_wise_bytes"] < c["replicated_bytes"]) == (name in auto["tables"])
    assert {r["modes"][PRESSED]["sharding"]["tables"] == auto["tables"] for r in ranks} == {True}  # ranks alike
    rows = [torch.load(folder / f"row-wise-rank{r}.pt") for r in range(P)]
    autos = [torch.load(folder / f"{PRESSED}-rank{r}.pt") for r in range(P)]
    for name, expected in rows[P - 1].items():
        if name.removesuffix(".weight") in ranks[0]["modes"]["row-wise"]["sharding"]["tables"]:
            expected = torch.nansum(torch.stack([s[name] for s in rows]), 0)
        if name.removesuffix(".weight") in auto["tables"]:
            got = torch.nansum(torch.stack([s[name] for s in autos]), 0)
        else:
            got = autos[P - 1][name]
        assert float((got - expected).abs().max()) <= 1e-5, name


def test_auto_decides_as_choose_sharding_computes(runs):
    """Under the budget above and without one (this host's free memory, the costs auto loads): each table's
    decision is choose_sharding's on the recorded inputs, not a hand-picked answer."""
    _, ranks = runs
    for run in (PRESSED, "auto"):
        for r in ranks:
            report = r["modes"][run]
            decided = {name: c["sharded"] for name, c in report["sharding"]["auto"].items()}
            assert decided and decided == recomputed(report)
            assert sorted(n for n, s in decided.items() if s) == sorted(report["sharding"]["tables"])
    assert all(c["reason"] != "memory" for c in ranks[0]["modes"]["auto"]["sharding"]["auto"].values())


def test_the_models_alltoall_bytes_are_the_counted_ones(runs):
    """The cost model's bytes per rank and step (bench.model.shard_costs.sharded_step: (P-1)/P x lookups x
    (8 + 2 x 4d) row-wise) against what the row-wise ranks counted off their tensors, from the same lookups."""
    from bench.model.shard_costs import ShardTable, sharded_step
    ranks = [r["modes"]["row-wise"] for r in runs[1]]
    for step in range(STEPS):
        lookups = {name: sum(len(r["lookups"][step][name]) for r in ranks) / P for name in ranks[0]["rows"]}
        tables = [ShardTable(name, ranks[0]["rows"][name], ranks[0]["dim"], n) for name, n in lookups.items()]
        model = sharded_step("row-wise", P, tables).mean_sent_bytes
        counted = sum(r["counters"][step]["alltoall_bytes_sent"] for r in ranks) / P
        assert 0.85 < counted / model < 1.15, (step, counted, model)
