"""The pipeline's stages sharded across ranks and measured by the harness: the exact k-NN by replicate and by ring
gives the single-process graph and quality at any P, the stages are points of a sweep, and the ring's memory per
rank falls with P where replicate's does not."""
import subprocess
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from alure.config import tiny
from alure.data import build_world
from alure.exchange import LocalExchange, ring_shift
from alure.graph import nearest_neighbors
from alure.pipeline import graph_stage, neighbor_precision_sharded, refresh_stage, retrieval_stage
from alure.refresh import compress
from alure.stages import GRAPH_STRATEGIES
from alure.train import train
from bench.errors import UsageError
from bench.plan.config import PointConfig, SweepConfig
from bench.results.summary import SUMMARY_COLUMNS
from tests.helpers import CLI


@pytest.fixture(scope="module")
def trained():
    """The tiny world and a model after a few training steps: the single-process pipeline's input to refresh
    (the sharding of the stages after training is under test, not what training learns)."""
    import torch
    config = replace(tiny(), steps=3)
    world = build_world(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return config, world, train(config, LocalExchange(), world=world).trainer.model
    finally:
        torch.set_num_threads(threads)


def single_process(config, world, model):
    """The single-process pipeline's refresh -> graph -> retrieval (replicate and ring are one thing at P=1)."""
    exchange = LocalExchange()
    graph = graph_stage(refresh_stage(model, world, exchange), config, exchange, "replicate")
    whole, recall = retrieval_stage(world, graph, exchange)
    return whole, recall, neighbor_precision_sharded(graph, world.community, exchange)


def assert_same_neighbours(neighbors, similarity, reference) -> int:
    """Exact k-NN: the same similarities, and the same neighbour sets wherever no tie straddles the k-th place.
    Returns how many neighbours a tie swapped (each may move neighbour precision by 1 / (users x 10))."""
    assert np.allclose(similarity, reference.similarity, atol=1e-6)
    same = (np.sort(neighbors, axis=1) == np.sort(reference.neighbors, axis=1)).all(axis=1)
    for u in np.flatnonzero(~same):
        # A neighbour may differ only by a tie at the k-th place: whatever one list has and the other lacks must
        # sit exactly at the k-th similarity, in both lists.
        kth = reference.similarity[u].min()
        ours = ~np.isin(neighbors[u], reference.neighbors[u])
        theirs = ~np.isin(reference.neighbors[u], neighbors[u])
        assert np.allclose(similarity[u][ours], kth, atol=1e-6) and \
            np.allclose(reference.similarity[u][theirs], kth, atol=1e-6), \
            f"user {u}: other neighbours, not a tie at the k-th place"
    assert same.mean() > 0.99
    return int(sum((~np.isin(neighbors[u], reference.neighbors[u])).sum() for u in np.flatnonzero(~same)))


def test_ring_shift_passes_a_block_to_the_next_rank():
    block = np.arange(6, dtype=np.float16).reshape(3, 2)
    assert np.array_equal(ring_shift(LocalExchange(), block), block)  # a ring of one rank


def test_running_top_k_over_blocks_is_the_exact_k_nn():
    embeddings = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    store = compress(np.arange(40), embeddings, "fp16")
    whole, _ = nearest_neighbors(store.dequantize(), range(40), 10, 7)
    config = replace(tiny(), users=40, knn_k=10, graph_chunk=7)
    for strategy in GRAPH_STRATEGIES:
        graph = graph_stage(store, config, LocalExchange(), strategy)
        assert np.array_equal(np.sort(graph.neighbors, axis=1), np.sort(whole, axis=1))


@pytest.mark.mpi
def test_sharded_stages_give_the_single_process_graph_and_quality_at_np_1_2_3(trained, tmp_path, mpi_launch):
    import torch
    config, world, model = trained
    reference, recall, precision = single_process(config, world, model)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    for np_ in (1, 2, 3):
        ranks = mpi_launch(np_, "stages", str(tmp_path / "weights.pt"), str(tmp_path), timeout_s=180)
        for strategy in GRAPH_STRATEGIES:
            saved = np.load(tmp_path / f"{strategy}-np{np_}.npz")
            swapped = assert_same_neighbours(saved["neighbors"], saved["similarity"], reference)
            for r in ranks:
                got = r[strategy]
                # a neighbour swapped by a tie at the k-th place may come from another community
                assert got["precision"] == pytest.approx(precision, abs=1e-6 + swapped / (config.users * 10))
                assert got["recall"] == pytest.approx(recall, abs=1e-6)
            # Each rank searched only its own block of users, and the strategy's own transfers carried the keys.
            assert [r[strategy]["users"] for r in ranks] == \
                [[config.users * i // np_, config.users * (i + 1) // np_] for i in range(np_)]
            if strategy == "ring":
                assert all(r["ring"]["sendrecv_calls"] == np_ - 1 and r["ring"]["allgather_calls"] == 0
                           for r in ranks)
            else:
                assert all(r["replicate"]["allgather_calls"] == 1 and r["replicate"]["sendrecv_calls"] == 0
                           for r in ranks)
            if np_ > 1:  # the ring receives P-1 blocks: about the other ranks' share of the store, as replicate
                ring = ranks[0]["ring"]["bytes_received"]
                assert ring == pytest.approx(ranks[0]["replicate"]["bytes_received"], rel=0.01)


def test_stage_points_are_planned_per_np_after_the_training_points():
    config = SweepConfig(stages=["train", "graph", "refresh"], nps=[1, 2], scalings=["weak"],
                         modes=["dense-reduce"], interleave=False, corun=False)
    assert [p.point_id for p in config.plan()] == [
        "weak-dense-reduce-np1-r0", "refresh-np1-r0", "graph-replicate-np1-r0", "graph-ring-np1-r0",
        "weak-dense-reduce-np2-r0", "refresh-np2-r0", "graph-replicate-np2-r0", "graph-ring-np2-r0"]
    # Without --stages a sweep is what it was: training points only, with the same ids.
    assert [p.point_id for p in SweepConfig(nps=[1], interleave=False).plan()] == [
        "weak-sparse-gather-np1-r0", "weak-dense-reduce-np1-r0", "strong-sparse-gather-np1-r0",
        "strong-dense-reduce-np1-r0"]
    # Interleaved (the default), every stage point is in each round, np=1 first in the first round.
    plan = SweepConfig(stages=["train", "graph"], nps=[1, 2], scalings=["weak"], modes=["dense-reduce"],
                       repeats=2, corun=False).plan()
    assert sorted(p.point_id for p in plan[:3]) == ["graph-replicate-np1-r0", "graph-ring-np1-r0",
                                                    "weak-dense-reduce-np1-r0"]
    assert [p.repeat for p in plan] == [0] * 6 + [1] * 6
    assert sorted(p.point_id for p in plan[:6]) == sorted(p.point_id.replace("-r1", "-r0") for p in plan[6:])


@pytest.mark.parametrize("fields, message", [
    ({"stage": "ranking"}, "unknown stage"),
    ({"stage": "graph"}, "graph_strategy"),
    ({"stage": "refresh", "scaling": "strong", "graph_strategy": "ring"}, "graph_strategy"),
    ({"stage": "refresh", "scaling": "weak"}, "strongly"),
])
def test_bad_stage_points_are_refused(fields, message):
    with pytest.raises(UsageError, match=message):
        PointConfig(**fields)


def test_an_unknown_stage_flag_is_one_line():
    run = subprocess.run([*CLI, "sweep", "--stages", "train,ranking"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "stages must be a non-empty list from train, refresh, graph, retrieval" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.mpi
def test_a_sweep_of_every_stage_records_and_reports_each(tmp_path):
    out = tmp_path / "stages"
    run = subprocess.run([*CLI, "sweep", "--preset", "tiny", "--stages", "train,refresh,graph,retrieval",
                          "--nps", "1,2", "--scalings", "strong", "--modes", "dense-reduce", "--steps", "2",
                          "--warmup", "1", "--stage-steps", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    df = pd.read_csv(out / "summary.csv").fillna({"graph_strategy": ""})
    assert list(df.columns[:len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert (df["status"] == "ok").all()
    rows = {(r.stage, r.graph_strategy, r.np): r for r in df.itertuples()}
    assert set(rows) == {(s, g, n) for n in (1, 2) for s, g in
                         [("train", ""), ("refresh", ""), ("graph", "replicate"), ("graph", "ring"),
                          ("retrieval", "")]}
    stages = df[df["stage"] != "train"]
    assert stages["efficiency"].notna().all() and (stages["efficiency_p10"] <= stages["efficiency_p90"]).all()
    assert (stages["step_time_ms"] > 0).all() and stages["rss_growth_mib"].notna().all()
    assert rows[("graph", "ring", 2)].sendrecv_calls == 1 and rows[("graph", "ring", 2)].allgather_calls == 0
    assert rows[("graph", "replicate", 2)].allgather_calls == 1
    assert (stages.loc[stages["np"] == 1, "exchange_bytes_sent"] == 0).all()  # one rank sends nothing
    report = (out / "report.md").read_text()
    assert "graph ring" in report and "retrieval" in report and "stages.png" in report
    assert (out / "stages.png").stat().st_size > 0
    assert "graph replicate" in run.stdout and "refresh" in run.stdout


@pytest.mark.mpi
def test_ring_peak_memory_per_rank_falls_with_p_and_replicate_does_not(tmp_path):
    """The graph stage's own peak (the high-water mark reset before it) at P = 1, 2, 3. With 12,000 users and
    blocks of 2,048 query users (fewer than any rank's users) the scores dominate: replicate holds chunk x all
    users (94 MiB of float32) at every P, ring chunk x users / P (47 and 31 MiB at P = 2 and 3; the rest of a
    rank's peak varies by a few MiB). Refresh batches of 256 keep the untimed input quick."""
    out = tmp_path / "memory"
    run = subprocess.run([*CLI, "sweep", "--preset", "tiny", "--stages", "graph", "--nps", "1,2,3",
                          "--set", "users=12000", "--set", "graph_chunk=2048", "--set", "batch_size=256",
                          "--stage-steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    df = pd.read_csv(out / "summary.csv")
    peak = {(g, n): v for g, n, v in zip(df["graph_strategy"], df["np"], df["rss_growth_mib"])}
    assert (df["memory_probe"] == "vmhwm-reset").all()  # the same probe as training points
    assert peak[("replicate", 1)] > 60
    assert peak[("ring", 3)] < peak[("ring", 2)] < 0.7 * peak[("ring", 1)]
    assert peak[("ring", 3)] < 0.55 * peak[("ring", 1)]
    assert peak[("replicate", 2)] > 0.8 * peak[("replicate", 1)]
    assert peak[("replicate", 3)] > 0.8 * peak[("replicate", 1)]
    assert peak[("ring", 3)] < 0.6 * peak[("replicate", 3)]
