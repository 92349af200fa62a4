"""Ads retrieval: candidates from the user graph merged with realtime activity, and recall against the future.

Rankings of all ads per user:
- realtime: the topics of the user's latest events (over all sources) say what it wants now; global popularity
  within each topic ranks that topic's ads; plus the ads it clicked itself among those events.
- graph_realtime: the ads the user's neighbourhood clicked (propagated along the weighted edges), merged with
  the same realtime topics, whose ads are now ranked mostly by the neighbourhood's clicks within the topic: realtime
  says which topics, similar users say which of their ads.
- popularity: the most clicked ads overall, the same for everyone.
Recall@K: share of a user's distinct held-out future ad clicks found in its top K. Users are sharded across ranks
and scored in blocks of graph_chunk users (memory: block x ads floats); per-rank sums are allreduced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.config import AD_SOURCE
from alure.data import Events, World, ranges, shard
from alure.exchange import Exchange
from alure.graph import RowSignal, UserGraph, propagate

GRAPH_HOPS = 2
"""Hops of propagation: the neighbours' clicks, and their neighbours' (a wider view of the community's taste)."""
GRAPH_WITHIN_TOPIC = 0.8
"""In graph_realtime, weight of the neighbourhood's clicks against global popularity when ranking a topic's ads."""
RANKINGS = ("graph_realtime", "realtime", "popularity")


@dataclass(slots=True)
class AdGrid:
    """Ads laid out topic-major on a (topics, slots) grid, so that anything per (user, topic) broadcasts over the
    topic's ads as a view: scores of a block of users are (users, topics, slots) tensors."""

    ad: np.ndarray
    """(topics * slots,) the ad in each cell; -1 for an empty cell (topics hold different numbers of ads)."""
    cell: np.ndarray
    """(ads,) each ad's cell."""
    shape: tuple[int, int]

    @staticmethod
    def of(ad_topic: np.ndarray, topics: int) -> AdGrid:
        by_topic = np.argsort(ad_topic, kind="stable")
        sizes = np.bincount(ad_topic, minlength=topics)
        slot = np.arange(len(ad_topic)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        shape = (topics, int(sizes.max()))
        cell = np.empty(len(ad_topic), dtype=np.int64)
        cell[by_topic] = ad_topic[by_topic] * shape[1] + slot
        ad = np.full(topics * shape[1], -1, dtype=np.int64)
        ad[cell] = np.arange(len(ad_topic))
        return AdGrid(ad=ad, cell=cell, shape=shape)


@dataclass(slots=True)
class Realtime:
    """What a block of users did last."""

    topic_weight: torch.Tensor
    """(users, topics) how many of the latest events were about each topic."""
    own_users: torch.Tensor
    """(clicks,) row of each ad click among the latest events ..."""
    own_cells: torch.Tensor
    """(clicks,) ... and the grid cell of the ad clicked."""

    def add_own(self, scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Add `value` (a scalar, or one per click) to each own click's score; scores are (users, cells)."""
        return scores.index_put_((self.own_users, self.own_cells), value, accumulate=True)


def latest_activity(world: World, users: np.ndarray, count: int, grid: AdGrid) -> Realtime:
    """The `count` latest history events of each user over all sources."""
    topics, ads, times = [], [], []
    for name, source in world.sources.items():
        events = source.history
        end = events.offsets[users + 1]
        index = end[:, None] - count + np.arange(count)  # this source's last `count` events; fewer if it has fewer
        valid = index >= events.offsets[users][:, None]
        index = np.where(valid, index, end[:, None] - 1)  # any event of the user's own; masked out below
        items = events.items[index]
        topics.append(source.topic[items])
        ads.append(np.where(valid & (name == AD_SOURCE), items, -1))
        times.append(np.where(valid, events.times[index], -np.inf))
    topics, ads, times = (np.concatenate(x, axis=1) for x in (topics, ads, times))
    latest = np.argsort(-times, axis=1, kind="stable")[:, :count]
    topics, ads, valid = (np.take_along_axis(x, latest, axis=1) for x in (topics, ads, np.isfinite(times)))
    topic_weight = torch.zeros(len(users), world.config.topics).index_put_(
        (torch.from_numpy(np.nonzero(valid)[0]), torch.from_numpy(topics[valid])), torch.tensor(1.0),
        accumulate=True)
    own_users, own_slot = np.nonzero(ads >= 0)
    return Realtime(topic_weight, torch.from_numpy(own_users), torch.from_numpy(grid.cell[ads[own_users, own_slot]]))


def realtime_scores(realtime: Realtime, popularity_share: torch.Tensor) -> torch.Tensor:
    """(users, cells) the realtime ranking: topic weight x popularity within the topic, plus own clicks.

    `popularity_share` is (topics, slots): each ad's share of its topic's clicks.
    """
    scores = realtime.topic_weight[:, :, None] * popularity_share
    return realtime.add_own(scores.flatten(1), torch.tensor(1.0))


def graph_realtime_scores(graph_clicks: torch.Tensor, realtime: Realtime, popularity_share: torch.Tensor,
                          realtime_weight: float) -> torch.Tensor:
    """(users, cells) (1 - w) x graph + w x realtime, each a distribution over ads, where the realtime part ranks a
    topic's ads by GRAPH_WITHIN_TOPIC x the neighbourhood's share + the rest x the global share.

    `graph_clicks` is (users, topics, slots). Every factor that depends on (user, topic) is computed on the small
    users x topics matrix and broadcast over the topic's ads.
    """
    graph_topic = graph_clicks.sum(2)
    graph_total = graph_topic.sum(1, keepdim=True).clamp_min(1e-12)
    # Normalising the realtime part: each latest event spreads 1 over its topic's ads (less where the graph has
    # no click in the topic), and each own click adds 1.
    within = GRAPH_WITHIN_TOPIC * (graph_topic > 0) + 1 - GRAPH_WITHIN_TOPIC
    own = torch.zeros(len(graph_clicks)).index_add_(0, realtime.own_users, torch.ones(len(realtime.own_users)))
    scale = realtime_weight / ((realtime.topic_weight * within).sum(1) + own).clamp_min(1e-12)[:, None]
    graph_factor = (1 - realtime_weight) / graph_total + (
        scale * GRAPH_WITHIN_TOPIC * realtime.topic_weight / graph_topic.clamp_min(1e-12))
    popularity_factor = scale * (1 - GRAPH_WITHIN_TOPIC) * realtime.topic_weight
    scores = graph_clicks.mul_(graph_factor[:, :, None]).addcmul_(popularity_factor[:, :, None], popularity_share)
    return realtime.add_own(scores.flatten(1), scale[realtime.own_users, 0])


def engagement_signal(events: Events, column: np.ndarray, width: int) -> RowSignal:
    """Each user's share of its clicks on the item of each column (`column[item]`): rows sum to 1, or are empty."""
    lengths = events.lengths()
    share = np.repeat(1.0 / np.maximum(lengths, 1), lengths)
    return RowSignal(offsets=events.offsets, columns=column[events.items], values=share, width=width)


def recall_sums(top: np.ndarray, future: Events, users: np.ndarray, ads: int) -> tuple[float, int]:
    """Sum over `users` with a future ad click of the share of their distinct future ads in their `top` row;
    and how many such users."""
    lengths = future.lengths()[users]
    rows = np.repeat(np.arange(len(users)), lengths)
    truth = np.unique(rows * ads + future.items[ranges(future.offsets[users], lengths)])
    found = np.isin(truth, np.arange(len(users))[:, None] * ads + top)
    wanted = np.bincount(truth // ads, minlength=len(users))
    hits = np.bincount(truth // ads, weights=found, minlength=len(users))
    return float((hits[wanted > 0] / wanted[wanted > 0]).sum()), int((wanted > 0).sum())


def evaluate(world: World, graph: UserGraph, exchange: Exchange) -> dict[str, float]:
    """Recall@top_k of each ranking over all users (each rank scores its block); the same on every rank."""
    config = world.config
    ads = world.ads
    grid = AdGrid.of(ads.topic, config.topics)
    clicks = engagement_signal(ads.history, grid.cell, grid.ad.size)
    clicks_per_ad = np.bincount(ads.history.items, minlength=config.ads)
    popularity = torch.zeros(grid.ad.shape).index_put_((torch.from_numpy(grid.cell),),
                                                       torch.from_numpy(clicks_per_ad).float()).view(grid.shape)
    popularity_share = popularity / popularity.sum(1, keepdim=True).clamp_min(1)
    empty = torch.from_numpy(grid.ad < 0)
    popular = grid.ad[popularity.flatten().masked_fill(empty, -torch.inf).topk(config.top_k).indices.numpy()]
    sums = np.zeros(len(RANKINGS) + 1)  # recall sum per ranking, then the users with a future click
    mine = np.arange(config.users)[shard(config.users, exchange.rank, exchange.size)]
    for start in range(0, len(mine), config.graph_chunk):
        users = mine[start:start + config.graph_chunk]
        realtime = latest_activity(world, users, config.realtime_events, grid)
        graph_clicks = propagate(graph, clicks, users, GRAPH_HOPS).view(len(users), *grid.shape)
        rankings = (graph_realtime_scores(graph_clicks, realtime, popularity_share, config.realtime_weight),
                    realtime_scores(realtime, popularity_share))
        tops = [grid.ad[scores.masked_fill_(empty, -torch.inf).topk(config.top_k).indices.numpy()]
                for scores in rankings] + [np.broadcast_to(popular, (len(users), config.top_k))]
        for i, top in enumerate(tops):
            recall, counted = recall_sums(top, ads.future, users, config.ads)
            sums[i] += recall
        sums[-1] += counted
    sums = exchange.allreduce_sum(sums)
    return {name: float(sums[i] / max(sums[-1], 1)) for i, name in enumerate(RANKINGS)}
