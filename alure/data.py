"""A synthetic but structured ALURE world, and packed (padding-free) batches over it, all from a seed.

The world: users belong to planted communities, each preferring a few topics. Every source's items (the
ad_clicks source's items are the ads) carry a topic, a content vector (topic centroid plus noise: the
multimodal feature) and residual-quantised codes of that vector. Within a topic, popularity is Zipf-like and each
community ranks the topic's items its own way: a collaborative signal that similar users reveal and topics alone
do not. Late in its history and in its held-out future, each user drifts toward a "current" topic, which its
latest (realtime) events reveal and its community does not.

Batches: a global sample stream (users in a per-epoch shuffled order, one random cut point per user and source)
cut into global batches of batch_size x size samples; rank r takes its contiguous slice. So at a fixed global
batch the union over ranks is the same for any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.config import AD_SOURCE, SourceConfig, WorkloadConfig

HISTORY_DAYS = 28.0
"""Events in [0, HISTORY_DAYS) are history (model input); refreshed embeddings are computed at its end."""
FUTURE_DAYS = 7.0
"""Events in [HISTORY_DAYS, HISTORY_DAYS + FUTURE_DAYS) are held out: the ground truth of retrieval."""
DRIFT_DAYS = 7.0
"""The last DRIFT_DAYS of history (and the future) lean toward the user's current topic."""
DRIFT_RATE = 0.5
"""Probability that an event in the drift window is about the current topic."""
OFF_TOPIC_RATE = 0.15
"""Probability that any other event is about a uniformly random topic (noise)."""
LENGTH_SIGMA = 0.6
"""Spread (log scale) of history lengths around the source's mean: heavy enough that padding would waste a lot."""
CONTENT_NOISE = 0.6
"""Norm of an item's content deviation from its topic centroid."""


@dataclass(slots=True)
class Events:
    """One source's events for all users, time-sorted per user, stored as one flat array per field (CSR)."""

    offsets: np.ndarray
    """(users + 1,) user u's events are [offsets[u], offsets[u + 1])."""
    items: np.ndarray
    """(events,) item ids."""
    actions: np.ndarray
    """(events,) action types."""
    times: np.ndarray
    """(events,) timestamps in days."""

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(slots=True)
class SourceData:
    """One source's items and every user's history and held-out future in it."""

    topic: np.ndarray
    """(items,) each item's topic."""
    content: np.ndarray
    """(items, content_dim) float32 content vectors."""
    codes: np.ndarray
    """(items, rq_codebooks) residual-quantisation codes of the content vectors."""
    history: Events
    future: Events


@dataclass(slots=True)
class World:
    """Everything the workload knows, identical on every rank."""

    config: WorkloadConfig
    community: np.ndarray
    """(users,) each user's planted community."""
    current_topic: np.ndarray
    """(users,) the topic each user drifts toward."""
    sources: dict[str, SourceData]

    @property
    def ads(self) -> SourceData:
        return self.sources[AD_SOURCE]


@dataclass(slots=True)
class Items:
    """Some items of one source with their features: what the model embeds, as input tokens or as candidates."""

    ids: torch.Tensor
    """(n,) int64 rows of the source's item table."""
    content: torch.Tensor
    """(n, content_dim) float32 content vectors."""
    codes: torch.Tensor
    """(n, rq_codebooks) int64 RQ codes."""

    def select(self, index: torch.Tensor) -> Items:
        return Items(ids=self.ids[index], content=self.content[index], codes=self.codes[index])


@dataclass(slots=True)
class PackedSequences:
    """One source's sequences for a batch, packed end to end: no padding token anywhere."""

    items: Items
    """(tokens,) the engaged items."""
    actions: torch.Tensor
    """(tokens,) int64."""
    times: torch.Tensor
    """(tokens,) float32 days."""
    lengths: torch.Tensor
    """(samples,) int64: sample i owns tokens [offsets[i], offsets[i] + lengths[i])."""
    now: torch.Tensor
    """(samples,) float32 days: the moment the sample is encoded at (recency is measured from it)."""

    @property
    def offsets(self) -> torch.Tensor:
        """(samples + 1,) start of each sample's tokens, and the total at the end."""
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0))


@dataclass(slots=True)
class Batch:
    """Packed sequences per source for some users, and for training their next engagements and negatives."""

    users: torch.Tensor
    """(samples,) int64 user ids."""
    sequences: dict[str, PackedSequences]
    targets: dict[str, Items] | None = None
    """Per source (samples,): the item engaged right after the input sequence."""
    negatives: dict[str, Items] | None = None
    """Per source the candidates every sample of this rank scores besides its group's targets (`negative_ids`)."""


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of [starts[i], starts[i] + lengths[i]) for every i, concatenated."""
    first = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return first + np.arange(lengths.sum())


def shard(count: int, rank: int, size: int) -> range:
    """Rank's contiguous block of `count` things split over `size` ranks; blocks are in rank order."""
    return range(count * rank // size, count * (rank + 1) // size)


# ---- the world ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tastes:
    """What drives a user's events: its community's preferred topics, and its current topic."""

    community: np.ndarray
    current_topic: np.ndarray
    preferred: np.ndarray
    """(communities, topics_per_community) preferred topics."""
    preference_cdf: np.ndarray
    """(communities, topics_per_community) cumulative preference weights."""


@dataclass(slots=True)
class _Catalog:
    """One source's items grouped by topic, and how each community ranks them."""

    by_topic: np.ndarray
    """Item ids, topic by topic; topic t's are by_topic[topic_start[t]:topic_start[t] + topic_size[t]]."""
    topic_start: np.ndarray
    topic_size: np.ndarray
    community_shift: np.ndarray
    """(communities, topics) the position in the topic's block of each community's favourite item."""
    zipf_cdf: np.ndarray
    """Cumulative Zipf weights of ranks 1..largest topic; a prefix of it is the truncated law of a smaller topic."""


def build_world(config: WorkloadConfig) -> World:
    """The world of `config.seed`: every rank builds the same one."""
    rng = np.random.default_rng([config.seed, 0])
    # Distinct preferred topics per community, with unequal weights, so communities differ in mix as well as set.
    preferred = np.stack([rng.choice(config.topics, config.topics_per_community, replace=False)
                          for _ in range(config.communities)])
    weights = rng.dirichlet(np.full(config.topics_per_community, 2.0), config.communities)
    tastes = _Tastes(community=rng.integers(0, config.communities, config.users),
                     current_topic=rng.integers(0, config.topics, config.users),
                     preferred=preferred, preference_cdf=np.cumsum(weights, axis=1))
    # A topic looks alike in every source (posts, videos and ads about cars): one set of centroids.
    centroids = _unit(rng.standard_normal((config.topics, config.content_dim)))
    sources = {s.name: _build_source(config, s, tastes, centroids, np.random.default_rng([config.seed, 1, i]))
               for i, s in enumerate(config.sources)}
    return World(config=config, community=tastes.community, current_topic=tastes.current_topic, sources=sources)


def _build_source(config: WorkloadConfig, source: SourceConfig, tastes: _Tastes, centroids: np.ndarray,
                  rng: np.random.Generator) -> SourceData:
    topic = rng.permutation(np.arange(source.items) % config.topics)  # balanced: every topic has items
    topic_size = np.bincount(topic, minlength=config.topics)
    catalog = _Catalog(
        by_topic=np.argsort(topic, kind="stable"), topic_start=np.cumsum(topic_size) - topic_size,
        topic_size=topic_size,
        # Each community ranks a topic's items from its own starting point: its favourites are not the others'.
        community_shift=rng.integers(0, 2**31, (config.communities, config.topics)),
        zipf_cdf=np.cumsum(np.arange(1, topic_size.max() + 1, dtype=np.float64) ** -config.zipf_exponent))
    noise = rng.standard_normal((source.items, config.content_dim)) * (CONTENT_NOISE / np.sqrt(config.content_dim))
    content = (centroids[topic] + noise).astype(np.float32)
    codes = _residual_quantise(content, config.rq_codebooks, config.rq_codes, rng)
    history_lengths = np.maximum(2, np.rint(source.mean_length * rng.lognormal(
        -LENGTH_SIGMA**2 / 2, LENGTH_SIGMA, config.users))).astype(np.int64)
    future_lengths = rng.poisson(source.mean_length * FUTURE_DAYS / HISTORY_DAYS, config.users)
    history = _sample_events(history_lengths, 0.0, HISTORY_DAYS, tastes, catalog, source.actions, rng)
    future = _sample_events(future_lengths, HISTORY_DAYS, HISTORY_DAYS + FUTURE_DAYS, tastes, catalog,
                            source.actions, rng)
    return SourceData(topic=topic, content=content, codes=codes, history=history, future=future)


def _sample_events(lengths: np.ndarray, start: float, end: float, tastes: _Tastes, catalog: _Catalog, actions: int,
                   rng: np.random.Generator) -> Events:
    """`lengths[u]` events of each user u in [start, end), time-sorted per user."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    # Sorting once over all users: shifting each user's times into its own window keeps users apart.
    times = np.sort(rng.uniform(start, end, len(owner)) + owner * (end - start)) - owner * (end - start)
    community = tastes.community[owner]
    pick = (rng.random(len(owner))[:, None] > tastes.preference_cdf[community]).sum(axis=1)
    topic = tastes.preferred[community, np.minimum(pick, tastes.preferred.shape[1] - 1)]
    off_topic = rng.random(len(owner)) < OFF_TOPIC_RATE
    topic = np.where(off_topic, rng.integers(0, len(catalog.topic_size), len(owner)), topic)
    drifting = (times >= HISTORY_DAYS - DRIFT_DAYS) & (rng.random(len(owner)) < DRIFT_RATE)
    topic = np.where(drifting, tastes.current_topic[owner], topic)
    size = catalog.topic_size[topic]
    # Truncated Zipf rank within the topic: a uniform draw under the prefix of the largest topic's CDF.
    rank = np.searchsorted(catalog.zipf_cdf, rng.random(len(owner)) * catalog.zipf_cdf[size - 1], side="right")
    rank = (np.minimum(rank, size - 1) + catalog.community_shift[community, topic]) % size
    items = catalog.by_topic[catalog.topic_start[topic] + rank]
    # Engaged events (the user's own topics) take stronger actions; noise events mostly the weakest.
    strength = np.arange(1, actions + 1, dtype=np.float64)
    engaged_cdf, noise_cdf = np.cumsum(strength / strength.sum()), np.cumsum(strength[::-1] / strength.sum())
    cdf = np.where(off_topic[:, None], noise_cdf, engaged_cdf)
    action = np.minimum((rng.random(len(owner))[:, None] > cdf).sum(axis=1), actions - 1)
    return Events(offsets=np.concatenate([[0], np.cumsum(lengths)]), items=items.astype(np.int64),
                  actions=action.astype(np.int64), times=times.astype(np.float32))


def _residual_quantise(content: np.ndarray, levels: int, codes: int, rng) -> np.ndarray:
    """Codes of an RQ-VAE-like quantiser: each level encodes what the previous ones left out.

    Codebooks are sampled from the residuals rather than learned: the workload needs a few discrete, content-derived
    ids per item, coarse to fine, not a good reconstruction.
    """
    residual = torch.from_numpy(content.copy())
    out = np.empty((len(content), levels), dtype=np.int64)
    for level in range(levels):
        book = residual[torch.from_numpy(rng.integers(0, len(residual), codes))]
        for rows in torch.split(torch.arange(len(residual)), 65536):  # bounded memory for millions of items
            # argmin |r - c|^2 = argmin (|c|^2 - 2 r.c)
            nearest = ((book * book).sum(1) - 2 * residual[rows] @ book.T).argmin(1)
            out[rows.numpy(), level] = nearest.numpy()
            residual[rows] -= book[nearest]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- batches -----------------------------------------------------------------------------------------------------


def make_batch(world: World, step: int, rank: int, size: int, batch_size: int) -> Batch:
    """Rank `rank`'s `batch_size` training samples of global step `step` (global batch: batch_size x size)."""
    config = world.config
    global_batch = batch_size * size
    position = step * global_batch + np.arange(rank * batch_size, (rank + 1) * batch_size)
    users = _stream_users(config, position)
    # Drawn for the whole global batch and sliced, so each sample's cut does not depend on how ranks split it.
    cut_draws = np.random.default_rng([config.seed, 2, step]).random((global_batch, len(config.sources)))
    cut_draws = cut_draws[rank * batch_size:(rank + 1) * batch_size]
    sequences, targets, negatives = {}, {}, {}
    for i, source in enumerate(config.sources):
        events = world.sources[source.name].history
        start = events.offsets[users]
        # Cut in [1, length - 1]: at least one input event, and the event at the cut is the target.
        cut = start + 1 + (cut_draws[:, i] * (events.lengths()[users] - 1)).astype(np.int64)
        sequences[source.name] = _pack(world, source, users, cut, events.times[cut])
        targets[source.name] = _items(world.sources[source.name], events.items[cut])
        negatives[source.name] = _items(world.sources[source.name], negative_ids(config, source, i, step, rank))
    return Batch(users=torch.from_numpy(users), sequences=sequences, targets=targets, negatives=negatives)


def negatives_per_step(config: WorkloadConfig, source: SourceConfig) -> int:
    """Candidate rows each rank scores per step besides its group's targets (the length of `negative_ids`)."""
    return source.items if config.full_softmax else config.sampled_negatives


def negative_ids(config: WorkloadConfig, source: SourceConfig, index: int, step: int, rank: int) -> np.ndarray:
    """The candidate rows every sample of this rank scores besides its group's targets: the whole table under
    full_softmax; otherwise `sampled_negatives` uniform rows, the same on every rank with shared_negatives (the loss
    of a global batch is then split-invariant), else drawn by each rank for itself."""
    if config.full_softmax:
        return np.arange(negatives_per_step(config, source), dtype=np.int64)
    key = [config.seed, 3, step, index] if config.shared_negatives else [config.seed, 3, step, index, 1, rank]
    return np.random.default_rng(key).integers(0, source.items, config.sampled_negatives)


def user_batch(world: World, users: np.ndarray) -> Batch:
    """The latest history of `users`, encoded at the end of the history window (what a refresh sees)."""
    sequences = {}
    for source in world.config.sources:
        end = world.sources[source.name].history.offsets[users + 1]
        sequences[source.name] = _pack(world, source, users, end, np.full(len(users), HISTORY_DAYS, dtype=np.float32))
    return Batch(users=torch.from_numpy(np.asarray(users, dtype=np.int64)), sequences=sequences)


def _stream_users(config: WorkloadConfig, position: np.ndarray) -> np.ndarray:
    """User at each position of the sample stream: every epoch visits all users once, in its own shuffled order."""
    epoch, index = np.divmod(position, config.users)
    users = np.empty_like(position)
    for e in np.unique(epoch):
        order = np.random.default_rng([config.seed, 4, int(e)]).permutation(config.users)
        users[epoch == e] = order[index[epoch == e]]
    return users


def _pack(world: World, source: SourceConfig, users: np.ndarray, end: np.ndarray, now: np.ndarray) -> PackedSequences:
    """Events [end - max_length, end) of each user (never before its own first event), concatenated."""
    data = world.sources[source.name]
    events = data.history
    start = np.maximum(events.offsets[users], end - source.max_length)
    lengths = end - start
    index = ranges(start, lengths)
    return PackedSequences(
        items=_items(data, events.items[index]), actions=torch.from_numpy(events.actions[index]),
        times=torch.from_numpy(events.times[index]), lengths=torch.from_numpy(lengths),
        now=torch.from_numpy(np.asarray(now, dtype=np.float32)))


def _items(source: SourceData, ids: np.ndarray) -> Items:
    return Items(ids=torch.from_numpy(ids), content=torch.from_numpy(source.content[ids]),
                 codes=torch.from_numpy(source.codes[ids]))
