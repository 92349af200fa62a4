"""The ALURE workload (alure/) in one process: data, model, training, refresh, graph, retrieval, pipeline."""
import dataclasses
import threading

import numpy as np
import pytest
import torch

from alure.config import SourceConfig, WorkloadConfig, default, preset, tiny
from alure.data import build_world, make_batch, shard
from alure.exchange import LocalExchange
from alure.graph import build_graph, nearest_neighbors
from alure.model import LengthGroups, SourceEncoder, UserEncoder, next_engagement_loss
from alure.pipeline import run_pipeline
from alure.refresh import compress, refresh
from alure.retrieval import evaluate
from alure.train import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as a benchmark rank runs: faster on a shared machine, and the same float sums every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return build_world(tiny())


def batch_tensors(batch):
    """Every tensor of a batch, in a fixed order."""
    out = [batch.users]
    for name in batch.sequences:
        seq = batch.sequences[name]
        out += [seq.items.ids, seq.items.content, seq.items.codes, seq.actions, seq.times, seq.lengths, seq.now]
        for group in (batch.targets, batch.negatives):
            out += [group[name].ids, group[name].content, group[name].codes]
    return out


def concat_batches(a, b):
    """Two ranks' batches as one: samples and tokens concatenated; negatives are shared by the ranks."""
    joined = dataclasses.replace(a, users=torch.cat([a.users, b.users]), sequences={}, targets={})
    for name in a.sequences:
        x, y = a.sequences[name], b.sequences[name]
        joined.sequences[name] = dataclasses.replace(
            x, items=_cat_items(x.items, y.items), actions=torch.cat([x.actions, y.actions]),
            times=torch.cat([x.times, y.times]), lengths=torch.cat([x.lengths, y.lengths]),
            now=torch.cat([x.now, y.now]))
        joined.targets[name] = _cat_items(a.targets[name], b.targets[name])
    return joined


def _cat_items(x, y):
    return dataclasses.replace(x, ids=torch.cat([x.ids, y.ids]), content=torch.cat([x.content, y.content]),
                               codes=torch.cat([x.codes, y.codes]))


def test_same_seed_gives_same_batches_and_losses(world):
    config = tiny()
    again = build_world(config)
    for a, b in zip(batch_tensors(make_batch(world, 3, 0, 1, 16)), batch_tensors(make_batch(again, 3, 0, 1, 16))):
        assert torch.equal(a, b)
    first, second = (Trainer(config, LocalExchange(), world) for _ in range(2))
    losses = [[t.train_step() for _ in range(3)] for t in (first, second)]
    assert losses[0] == losses[1]
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))


@pytest.fixture(scope="module")
def shared_world():
    """Negatives shared by the ranks, so a global batch is the same however many ranks split it."""
    return build_world(dataclasses.replace(tiny(), shared_negatives=True))


def test_ranks_split_the_same_global_batch_whatever_their_number(shared_world):
    world = shared_world
    whole = make_batch(world, 5, 0, 1, 32)
    halves = concat_batches(make_batch(world, 5, 0, 2, 16), make_batch(world, 5, 1, 2, 16))
    for a, b in zip(batch_tensors(whole), batch_tensors(halves)):
        assert torch.equal(a, b)


def test_loss_and_gradient_of_a_global_batch_do_not_depend_on_the_split(shared_world):
    world, config = shared_world, shared_world.config
    torch.manual_seed(0)
    model = UserEncoder(config)

    def gradients(batch):
        model.zero_grad(set_to_none=True)
        loss = next_engagement_loss(model, model(batch), batch, config.group_size)
        loss.backward()
        return loss.item(), [p.grad.to_dense() for p in model.parameters()]

    loss, whole = gradients(make_batch(world, 2, 0, 1, 32))
    parts = [gradients(make_batch(world, 2, rank, 2, 16)) for rank in range(2)]
    assert loss == pytest.approx(np.mean([p[0] for p in parts]), rel=1e-5)
    for i, grad in enumerate(whole):  # what averaging over 2 ranks gives
        assert torch.allclose(grad, (parts[0][1][i] + parts[1][1][i]) / 2, atol=1e-6)


def test_each_rank_draws_its_own_negatives_unless_they_are_shared(world, shared_world):
    def negatives(w, rank):
        return make_batch(w, 4, rank, 2, 16).negatives[w.config.sources[0].name].ids
    assert not torch.equal(negatives(world, 0), negatives(world, 1))
    assert torch.equal(negatives(world, 1), negatives(build_world(tiny()), 1)), "seeded by seed, step and rank"
    assert torch.equal(negatives(shared_world, 0), negatives(shared_world, 1))


def test_full_softmax_scores_every_row_of_the_tied_table():
    config = preset("paper-small")
    world = build_world(config)
    batch = make_batch(world, 0, 1, 2, config.batch_size)
    source = config.sources[0]
    assert torch.equal(batch.negatives[source.name].ids, torch.arange(source.items))
    torch.manual_seed(0)
    model = UserEncoder(config)
    next_engagement_loss(model, model(batch), batch, config.group_size).backward()
    grad = model.sources[source.name].items.weight.grad.coalesce()
    assert grad.indices().shape[1] == source.items, "every row of the table gets gradient in every step"
    with pytest.raises(ValueError, match="sampled_negatives = 0"):
        dataclasses.replace(config, sampled_negatives=8)


def test_packed_batch_has_no_padding_and_holds_each_users_latest_events(world):
    config = tiny()
    batch = make_batch(world, 0, 0, 1, 16)
    for source in config.sources:
        seq = batch.sequences[source.name]
        tokens = int(seq.lengths.sum())
        assert all(len(t) == tokens for t in (seq.items.ids, seq.items.content, seq.items.codes, seq.actions,
                                              seq.times))
        assert seq.lengths.min() >= 1 and seq.lengths.max() <= source.max_length
        assert seq.lengths.unique().numel() > 1  # jagged, as the data is
        events = world.sources[source.name].history
        for i, user in enumerate(batch.users.tolist()):
            start, length = int(seq.offsets[i]), int(seq.lengths[i])
            ids = seq.items.ids[start:start + length].numpy()
            history = events.items[events.offsets[user]:events.offsets[user + 1]]
            cut = next(c for c in range(length, len(history)) if np.array_equal(history[c - length:c], ids))
            assert history[cut] == batch.targets[source.name].ids[i]  # the target is the next event


def test_length_groups_hold_whole_samples():
    lengths = torch.tensor([3, 1, 3, 2, 1, 3])
    groups = LengthGroups.of(lengths)
    assert groups.sizes == [(1, 2), (2, 1), (3, 3)]
    assert sorted(groups.token_order.tolist()) == list(range(int(lengths.sum())))
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()
    expected = [t for s in groups.sample_order.tolist() for t in range(starts[s], starts[s] + int(lengths[s]))]
    assert groups.token_order.tolist() == expected


def test_attention_does_not_cross_sequence_boundaries(world):
    config = tiny()
    torch.manual_seed(0)
    encoder = SourceEncoder(config.sources[1], config)
    seq = make_batch(world, 0, 0, 1, 16).sequences[config.sources[1].name]
    before = encoder(seq)
    victim = int(torch.argmax(seq.lengths))  # the longest sample shares its length group with none or some others
    start, end = int(seq.offsets[victim]), int(seq.offsets[victim + 1])
    content = seq.items.content.clone()
    content[start:end] += 1.0
    after = encoder(dataclasses.replace(seq, items=dataclasses.replace(seq.items, content=content)))
    others = torch.arange(len(seq.lengths)) != victim
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[victim], after[victim])


def test_embedding_table_gradients_are_sparse(world):
    trainer = Trainer(tiny(), LocalExchange(), world)
    trainer.backward(trainer.forward(trainer.next_batch()))
    for encoder in trainer.model.sources.values():
        assert encoder.items.weight.grad.is_sparse and encoder.codes.weight.grad.is_sparse


def test_negatives_and_zipf_move_gradient_density_from_a_sliver_to_most_rows(world):
    def density(**overrides):
        config = dataclasses.replace(tiny(), **overrides)
        trainer = Trainer(config, LocalExchange())
        trainer.train_step(measure_density=True)
        return trainer.density

    sliver = density(sampled_negatives=0, zipf_exponent=3.0, batch_size=8, group_size=8)
    most = density(sampled_negatives=4000)
    assert sliver["items"] < 0.01
    assert most["items"] > 0.5
    assert min(most[f"{s.name}/codes"] for s in tiny().sources) > 0.5  # the small RQ tables: nearly dense anyway


def test_invalid_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of group_size"):
        dataclasses.replace(tiny(), batch_size=20, group_size=8)
    with pytest.raises(ValueError, match="refresh_dtype must be one of"):
        dataclasses.replace(tiny(), refresh_dtype="bf16")
    with pytest.raises(ValueError, match="knn_k must be in 10"):
        dataclasses.replace(tiny(), knn_k=5)
    with pytest.raises(ValueError, match="no 'ad_clicks' source"):
        dataclasses.replace(tiny(), sources=tiny().sources[1:])
    with pytest.raises(ValueError, match="mean_length must be >= 2"):
        SourceConfig(name="comments", items=100, mean_length=1, max_length=8)
    with pytest.raises(ValueError, match="every topic needs an item"):
        dataclasses.replace(tiny(), topics=10_000)
    with pytest.raises(ValueError, match="tiny, default, large"):
        preset("huge")
    assert isinstance(preset("default"), WorkloadConfig)


def test_large_preset_has_two_million_item_rows():
    assert preset("large").item_rows >= 2_000_000
    assert default().item_rows < preset("large").item_rows


def test_exact_knn_is_the_same_in_any_chunks_and_shards():
    embeddings = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    whole, _ = nearest_neighbors(embeddings, range(50), 10, 50)
    sharded = np.concatenate([nearest_neighbors(embeddings, shard(50, r, 3), 10, 7)[0] for r in range(3)])
    assert np.array_equal(whole, sharded)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    assert np.array_equal(np.sort(whole, axis=1), np.sort(np.argsort(-scores, axis=1)[:, :10], axis=1))


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 1e-3), ("int8", 1e-2)])
def test_refresh_compression_round_trips(dtype, tolerance):
    embeddings = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    store = compress(np.arange(20), embeddings, dtype)
    assert np.abs(store.dequantize() - embeddings).max() < tolerance
    assert store.values.nbytes <= embeddings.nbytes // 2


class ThreadRanks:
    """Fake ranks for the collectives after training: threads meeting at a barrier (real ranks: tests/ranks)."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.meet = threading.Barrier(size)

    def exchange(self, rank):
        ranks = self

        class Exchange(LocalExchange):
            def allgather_array(self, array):
                return np.concatenate(ranks.share(rank, np.asarray(array)))

            def allreduce_sum(self, array):
                return np.sum(ranks.share(rank, np.asarray(array)), axis=0)

        exchange = Exchange()
        exchange.rank, exchange.size = rank, self.size
        return exchange

    def share(self, rank, value):
        self.slots[rank] = value
        self.meet.wait()
        everyone = list(self.slots)
        self.meet.wait()  # nobody overwrites a slot before all have read
        return everyone

    def run(self, work):
        results = [None] * self.size

        def target(rank):
            results[rank] = work(self.exchange(rank))

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def test_refresh_graph_and_retrieval_sharded_over_two_ranks_match_one(world):
    config = tiny()
    model = Trainer(config, LocalExchange(), world).model

    def stages(exchange):
        store = refresh(model, world, exchange)
        graph = build_graph(store.dequantize(), config.knn_k, config.graph_chunk, exchange)
        return store, graph, evaluate(world, graph, exchange)

    one = stages(LocalExchange())
    for store, graph, recall in ThreadRanks(2).run(stages):
        assert np.array_equal(store.user_ids, one[0].user_ids)
        assert np.allclose(store.dequantize(), one[0].dequantize(), atol=1e-3)
        assert (graph.neighbors == one[1].neighbors).mean() > 0.99  # near-ties may swap at float tolerance
        assert recall == pytest.approx(one[2], abs=1e-3)


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_tiny_pipeline_runs_end_to_end_with_sane_metrics():
    result = run_pipeline(tiny(), LocalExchange())
    assert result["loss_end"] < result["loss_start"]
    assert result["neighbor_precision_at_10"] > 0.5  # random is 1 / 6
    recall = result["recall_at_50"]
    assert set(recall) == {"graph_realtime", "realtime", "popularity"}
    assert all(0 <= r <= 1 for r in recall.values())
    assert recall["graph_realtime"] > recall["popularity"]
    assert {"train", "refresh", "graph", "retrieval"} <= set(result["stage_seconds"])
    assert 0 < result["gradient_density"]["items"] < 1


@pytest.mark.slow
def test_default_pipeline_finds_communities_and_graph_beats_realtime_and_popularity():
    result = run_pipeline(default(), LocalExchange())
    assert result["neighbor_precision_at_10"] >= 0.8
    recall = result["recall_at_50"]
    assert recall["graph_realtime"] > recall["realtime"] + 0.05
    assert recall["graph_realtime"] > recall["popularity"] + 0.05
