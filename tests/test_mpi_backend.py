"""The raw-MPI exchange backend: on real ranks it trains the same model as Horovod in every mode, over MPI's own
collectives with Horovod never loaded, counted by the same counters; a sweep selects it, records it and divides its
points by its own np=1. And a sweep's setting B (--compare-env): every point under both settings, recorded."""
import itertools
import json

import pytest
import torch

from bench.errors import UsageError
from bench.plan.config import MODES, SHARDED_MODES, PointConfig, SweepConfig

DATA_PARALLEL = tuple(m for m in MODES if m not in SHARDED_MODES)
"""The modes both backends carry (the sharded ones run over Horovod's all-to-all only)."""
from bench.results.compare import compare
from bench.results.summary import summarize
from tests.helpers import TINY, assert_one_line_error, cli, cli_here, launch
from tests.synthetic import point_record

STEPS = 3
BUCKETED = {"allreduce_calls", "work_ms"}
"""Counters that may differ between backends: how the dense gradients are bucketed, and work_ms (a time)."""
"""The one counter the backends count differently by design: Horovod is handed one allreduce per dense parameter
(its fusion merges them later), the raw-MPI backend starts one per bucket of them."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every mode on 2 ranks, over raw MPI first (before anything imports Horovod), then over Horovod, then over
    Horovod with its tables' gathers grouped, in one launch (one interpreter start for all)."""
    out = tmp_path_factory.mktemp("backends")
    ranks = launch(2, "train_backends", "mpi,horovod,horovod-grouped", ",".join(DATA_PARALLEL), str(STEPS), str(out))
    return out, ranks


@pytest.mark.mpi
def test_the_mpi_backend_trains_the_same_model_as_horovod_in_every_mode(trained):
    out, _ = trained
    for rank in (0, 1):
        initial = torch.load(out / f"initial-horovod-rank{rank}.pt")
        for mode, other in itertools.product(DATA_PARALLEL, ("mpi", "horovod-grouped")):
            reference = torch.load(out / f"horovod-{mode}-rank{rank}.pt")
            state = torch.load(out / f"{other}-{mode}-rank{rank}.pt")
            for name, tensor in reference.items():
                # As tests/test_exchange_modes.py: compared on what training changed, 1e-5 plus 1e-3 of the move
                # per element (Adagrad carries a nearly cancelling gradient's round-off into its update). Here the
                # same mode sums the same values on both backends, so this is looser than what they reach; a
                # missing row, a wrong average or a double-counted duplicate still moves elements by their size.
                moved = tensor - initial[name]
                off = (state[name] - tensor).abs() - (1e-5 + 1e-3 * moved.abs())
                assert float(off.max()) <= 0, \
                    f"{other} {mode} rank {rank} {name}: {float((state[name] - tensor).abs().max())}"
        # Agreement must not be the trivial kind: training moved the tables away from where they started.
        reference = torch.load(out / f"horovod-sparse-gather-rank{rank}.pt")
        assert max((reference[k] - initial[k]).abs().max().item() for k in reference if "items" in k) > 1e-3
        assert all(torch.equal(initial[k], v) for k, v in torch.load(out / f"initial-mpi-rank{rank}.pt").items())


@pytest.mark.mpi
def test_the_mpi_backend_ran_without_horovod_and_counted_what_horovod_counts(trained):
    _, ranks = trained
    for r in ranks:
        for mode in DATA_PARALLEL:
            mpi, horovod = r["runs"][f"mpi/{mode}"], r["runs"][f"horovod/{mode}"]
            assert mpi["class"] == "MpiExchange" and not mpi["horovod_loaded"], mode
            # issued as the gradients became ready: every table's and bucket's collective started within backward
            assert all(step and all(step) for step in mpi["started_in_backward"]), mode
            # auto over Horovod may shard tables (bench.ranks.sharded.AutoExchange); on the tiny preset it keeps them
            # whole, which the counters' agreement below holds
            horovod_class = "AutoExchange" if mode == "auto" else "HorovodExchange"
            assert horovod["class"] == horovod_class and horovod["horovod_loaded"], mode
            for step, (m, h) in enumerate(zip(mpi["counters"], horovod["counters"])):
                # The same tensors moved and held: every counter but the bucketed one agrees exactly.
                assert {k: v for k, v in m.items() if k not in BUCKETED} == \
                    {k: v for k, v in h.items() if k not in BUCKETED}, (mode, step)
                assert 0 < m["allreduce_calls"] < h["allreduce_calls"], (mode, step, "dense gradients bucketed")
                assert m["bytes_held"] > 0
    # Horovod with grouped gathers: the same tensors counted, one group per step wherever a table is gathered
    for r in ranks:
        for mode in DATA_PARALLEL:
            grouped, horovod = r["runs"][f"horovod-grouped/{mode}"], r["runs"][f"horovod/{mode}"]
            assert [{k: v for k, v in c.items() if k != "work_ms"} for c in grouped["counters"]] == \
                [{k: v for k, v in c.items() if k != "work_ms"} for c in horovod["counters"]], mode
            gathers = sum(c["allgather_calls"] > 0 for c in grouped["counters"])
            assert grouped["groups_started"] == gathers and horovod["groups_started"] == 0, mode
        assert r["runs"]["horovod-grouped/sparse-gather"]["groups_started"] == STEPS
    # the gathers ran on the gather modes and not on the reducing ones
    for r in ranks:
        assert all(c["allgather_calls"] > 0 for c in r["runs"]["mpi/sparse-gather"]["counters"])
        assert all(c["allgather_calls"] == 0 for c in r["runs"]["mpi/dense-reduce"]["counters"])


@pytest.mark.mpi
def test_a_sweep_over_the_mpi_backend_records_it_and_its_launch_settings(tmp_path):
    """One sweep, both features at once (each point is a launch): the mpi backend at np=2, under settings A and B."""
    out = tmp_path / "sweep"
    run = cli("sweep", "--nps", "2", "--exchange-backend", "mpi", "--modes", "coalesced-gather", "--scalings",
              "weak", "--compare-env", "HOROVOD_CYCLE_TIME=1", *TINY, "--steps", "2", "--out", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    a, b = records.pop("weak-coalesced-gather-np2-r0-mpi"), records.pop("weak-coalesced-gather-np2-r0-mpi-envB")
    assert not records
    for record in (a, b):
        assert record["status"] == "ok" and record["exchange_backend"] == "mpi"
        assert record["point"]["exchange_backend"] == "mpi" and record["horovod_controller"] is None
        assert record["metrics"]["allgather_calls"] > 0 and record["metrics"]["exchange_bytes_held"] > 0
    # what the ranks ran with, read back from their own environment
    assert a["launch_env"] == {} and a["horovod_settings"]["HOROVOD_CYCLE_TIME"] != "1"
    assert b["launch_env"] == {"HOROVOD_CYCLE_TIME": "1"} and b["horovod_settings"]["HOROVOD_CYCLE_TIME"] == "1"
    header, *rows = (out / "summary.csv").read_text().splitlines()
    columns = header.split(",")
    backend, setting = columns.index("exchange_backend"), columns.index("launch_env")
    assert sorted((r.split(",")[backend], r.split(",")[setting]) for r in rows) == \
        [("mpi", ""), ("mpi", "HOROVOD_CYCLE_TIME=1")]


def test_horovod_point_ids_are_unchanged_and_other_backends_add_a_suffix():
    point = dict(scaling="strong", mode="dense-reduce", np=4, repeat=2)
    assert PointConfig(**point).point_id == "strong-dense-reduce-np4-r2"
    assert PointConfig(**point, exchange_backend="mpi").point_id == "strong-dense-reduce-np4-r2-mpi"
    assert PointConfig(stage="graph", graph_strategy="ring", scaling="strong", np=2,
                       exchange_backend="mpi").point_id == "graph-ring-np2-r0-mpi"
    assert PointConfig(**point, exchange_backend="mpi").label() == "strong dense-reduce (mpi) np=4 r2"


def test_a_sweep_measures_every_point_once_per_backend(tmp_path):
    both = SweepConfig(exchange_backends=["horovod", "mpi"]).plan()
    assert sorted(p.point_id for p in both if p.exchange_backend == "mpi") == \
        sorted(p.point_id + "-mpi" for p in SweepConfig().plan())
    assert len({p.point_id for p in both}) == len(both) == 2 * len(SweepConfig().plan())
    path = tmp_path / "sweep.toml"
    path.write_text('[sweep]\nexchange_backends = ["mpi"]\n')
    assert {p.exchange_backend for p in SweepConfig.from_toml(path).plan()} == {"mpi"}
    with pytest.raises(UsageError, match="exchange_backends must be"):
        SweepConfig(exchange_backends=["nccl"])
    with pytest.raises(UsageError, match="unknown exchange backend"):
        PointConfig(exchange_backend="gloo")


def test_a_bad_backend_flag_is_one_line_and_exit_2(tmp_path):
    assert_one_line_error(cli_here("sweep", "--exchange-backend", "horovod,nccl", *TINY, "--out", str(tmp_path / "a")),
                          "exchange_backends", "horovod, mpi")
    assert_one_line_error(cli_here("run", "--exchange-backend", "hvd", *TINY, "--out", str(tmp_path / "b")),
                          "exchange_backends", "horovod, mpi")


def test_efficiency_divides_each_backend_by_its_own_np1():
    """Made-up records: Horovod's np=1 takes 100 ms, raw MPI's 80 ms, both np=2 points alike. Divided by a baseline
    of both backends, the two np=2 points would get the same efficiency."""
    records = [point_record(PointConfig(np=n, exchange_backend=b, preset="tiny"), ms)
               for b, times in (("horovod", (100.0, 100.0)), ("mpi", (80.0, 100.0))) for n, ms in zip((1, 2), times)]
    df = summarize(records).set_index(["exchange_backend", "np"])
    assert df.loc[("mpi", 2), "efficiency"] / df.loc[("horovod", 2), "efficiency"] == pytest.approx(0.8)
    assert df.loc[("mpi", 1), "efficiency"] == df.loc[("horovod", 1), "efficiency"] == 1.0


def test_a_compare_env_sweep_measures_every_point_under_both_settings(tmp_path):
    plan = SweepConfig(compare_env={"HOROVOD_CYCLE_TIME": "1"}).plan()
    a = [p for p in plan if not p.launch_env]
    b = [p for p in plan if p.launch_env]
    assert sorted(p.point_id for p in a) == sorted(p.point_id for p in SweepConfig().plan())  # A's ids unchanged
    assert sorted(p.point_id for p in b) == sorted(p.point_id + "-envB" for p in a)
    assert all(p.launch_env == {"HOROVOD_CYCLE_TIME": "1"} for p in b)
    path = tmp_path / "sweep.toml"
    path.write_text('[sweep]\n[sweep.compare_env]\nHOROVOD_FUSION_THRESHOLD = "67108864"\n')
    assert SweepConfig.from_toml(path).compare_env == {"HOROVOD_FUSION_THRESHOLD": "67108864"}
    path.write_text('[sweep]\n[sweep.compare_env]\nHOROVOD_CYCLE_TIME = 1\n')
    with pytest.raises(UsageError, match="strings"):
        SweepConfig.from_toml(path)
    assert_one_line_error(cli_here("sweep", "--compare-env", "HOROVOD_CYCLE_TIME", *TINY, "--out", str(tmp_path / "x")),
                          "not VAR=VALUE")


def test_compare_refuses_a_folder_that_mixes_backends():
    records = [point_record(PointConfig(np=1, exchange_backend=b, preset="tiny"), 100.0) for b in ("horovod", "mpi")]
    mixed, one = summarize(records), summarize(records[:1])
    with pytest.raises(UsageError, match="mixes exchange backends"):
        compare(mixed, one, 0.1)
    assert len(compare(one, one, 0.1)) == 1
