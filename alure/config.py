"""What an ALURE workload is: one dataclass, validated at construction, and three named presets.

The harness, the CLI and the tests all build a `WorkloadConfig`, so this file is the one place that says what a
valid workload is. Presets are plain functions; change one field of a preset with `dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass

AD_SOURCE = "ad_clicks"
"""The source whose items are the ads: its history feeds the graph signal, its future is what retrieval must find."""

REFRESH_DTYPES = ("fp16", "int8")
SHARD_ROWS = ("range", "residue")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True, slots=True)
class SourceConfig:
    """One activity source (ad clicks, post views, ...): its own item table and its own sequence encoder."""

    name: str
    """Source name; it keys the batch, the model's encoder and the density report."""
    items: int
    """Rows of this source's item-id embedding table (the huge, sparse table)."""
    mean_length: float
    """Mean number of history events per user; lengths vary around it, so batches are jagged."""
    max_length: int
    """The encoder sees at most this many latest events of a sequence; older ones are dropped (never padded)."""
    actions: int = 3
    """Action types (e.g. view, like, share); engaged users take the stronger actions more often."""

    def __post_init__(self):
        _require(bool(self.name), "source name is empty; give each source a name such as 'post_views'")
        _require(self.items >= 1, f"source {self.name}: items must be >= 1 (got {self.items}); set a table size")
        _require(self.mean_length >= 2, f"source {self.name}: mean_length must be >= 2 (got {self.mean_length}); "
                 "training needs an input event and a next event")
        _require(self.max_length >= 1, f"source {self.name}: max_length must be >= 1 (got {self.max_length})")
        _require(self.actions >= 1, f"source {self.name}: actions must be >= 1 (got {self.actions})")


@dataclass(kw_only=True, slots=True)
class WorkloadConfig:
    """The synthetic world, the model, its training and the refresh -> graph -> retrieval stages."""

    seed: int = 0
    """Seeds the world, the batches, the sampled negatives and the initial weights."""
    users: int
    """Users in the world; refresh, graph and retrieval cover all of them."""
    communities: int
    """Planted user communities; a user's nearest neighbours should come from its own."""
    topics: int
    """Topics that items and ads carry."""
    topics_per_community: int = 3
    """Topics each community prefers."""
    sources: tuple[SourceConfig, ...]
    """Activity sources, one encoder each; one must be named 'ad_clicks' (its items are the ads)."""
    zipf_exponent: float = 1.3
    """Exponent of item popularity within a topic: higher means fewer distinct rows touched per step."""
    content_dim: int = 32
    """Width of an item's dense content vector (the multimodal feature)."""
    rq_codebooks: int = 3
    """Residual-quantisation levels: discrete codes per item, each looked up in a small, nearly dense table."""
    rq_codes: int = 64
    """Codes per RQ level."""
    dim: int = 64
    """Model width: item, code and user embeddings all have this size (the item table is tied to the output)."""
    heads: int = 4
    """Attention heads per Transformer block."""
    layers: int = 1
    """Transformer blocks per source encoder."""
    batch_size: int = 128
    """Samples per rank per step: weak scaling keeps it, strong scaling divides a global batch by it."""
    group_size: int = 32
    """Samples sharing in-batch negatives; a batch is whole groups, so the loss of a global batch is the same
    however many ranks split it."""
    sampled_negatives: int = 1024
    """Extra negative rows per source per rank and step, uniform over the item table: the main gradient-density
    knob."""
    shared_negatives: bool = False
    """True: every rank draws the same sampled negatives in a step (seeded by seed and step alone), so the loss of a
    global batch is the same however many ranks split it. False (the default): each rank draws its own (seeded by
    seed, step and rank), as a data-parallel recommender samples; the loss of a global batch is then the mean over
    ranks of each rank's loss against its own negatives, the same for every exchange mode at a given rank count."""
    full_softmax: bool = False
    """Score every row of each item table as a candidate (a tied output projection over the whole vocabulary, as in
    a language model's softmax): every row gets gradient every step. Needs sampled_negatives = 0."""
    learning_rate: float = 0.03
    """Adagrad learning rate."""
    steps: int = 300
    """Training steps run by `train` and the pipeline."""
    knn_k: int = 20
    """Neighbours per user in the similarity graph (at least 10, for neighbor_precision_at_10)."""
    graph_chunk: int = 1024
    """Users per block of the exact k-NN and of retrieval scoring: memory is block x users (k-NN) and block x ads
    (retrieval) floats."""
    refresh_dtype: str = "fp16"
    """Storage of refreshed embeddings: 'fp16', or 'int8' with a per-row scale."""
    top_k: int = 50
    """Ads retrieved per user; recall is reported at this K."""
    realtime_events: int = 10
    """Latest events per user (over all sources) that form its realtime activity."""
    realtime_weight: float = 0.7
    """Share of the realtime score in the merged graph + realtime ranking."""
    shard_rows: str = "range"
    """How a runtime that shards tables row-wise splits a table of V rows over P ranks (the model itself never reads
    it): 'range' (row i on rank i // ceil(V/P), as TorchRec does; the default: the world spreads popular items over
    the id space, so ranges split the lookups as evenly as residues do or more, see docs/sharding.md) or 'residue'
    (row i on rank i % P, which spreads rows that are hot together when hot ids are adjacent)."""
    shard_dedup: bool = False
    """A sharding runtime sends each distinct id once per owner and step (True), or every lookup (False)."""

    def __post_init__(self):
        _require(self.users >= 2, f"users must be >= 2 (got {self.users}); a graph needs neighbours")
        _require(1 <= self.communities <= self.users,
                 f"communities must be in 1..users (got {self.communities} for {self.users} users)")
        _require(1 <= self.topics_per_community <= self.topics,
                 f"topics_per_community must be in 1..topics (got {self.topics_per_community} of {self.topics})")
        names = [s.name for s in self.sources]
        _require(len(set(names)) == len(names), f"source names repeat ({names}); give each source its own name")
        _require(AD_SOURCE in names, f"no '{AD_SOURCE}' source among {names}; add one, its items are the ads")
        for s in self.sources:
            _require(s.items >= self.topics, f"source {s.name} has {s.items} items for {self.topics} topics; "
                     "every topic needs an item: raise items or lower topics")
        _require(self.zipf_exponent >= 0,
                 f"zipf_exponent must be >= 0 (got {self.zipf_exponent}); 0 is uniform popularity")
        _require(self.content_dim >= 1, f"content_dim must be >= 1 (got {self.content_dim})")
        _require(self.rq_codebooks >= 1 and self.rq_codes >= 1,
                 f"rq_codebooks and rq_codes must be >= 1 (got {self.rq_codebooks} x {self.rq_codes})")
        _require(self.dim >= 1 and self.heads >= 1 and self.dim % self.heads == 0,
                 f"dim must be a positive multiple of heads (got dim={self.dim}, heads={self.heads})")
        _require(self.layers >= 0, f"layers must be >= 0 (got {self.layers})")
        _require(self.group_size >= 1 and self.batch_size >= self.group_size
                 and self.batch_size % self.group_size == 0,
                 f"batch_size must be a positive multiple of group_size (got {self.batch_size} and "
                 f"{self.group_size}); change either so groups never straddle ranks")
        _require(self.sampled_negatives >= 0, f"sampled_negatives must be >= 0 (got {self.sampled_negatives})")
        _require(not (self.full_softmax and self.sampled_negatives),
                 f"full_softmax scores every item already: set sampled_negatives = 0 (got {self.sampled_negatives})")
        _require(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate})")
        _require(self.steps >= 1, f"steps must be >= 1 (got {self.steps})")
        _require(10 <= self.knn_k < self.users,
                 f"knn_k must be in 10..users-1 (got {self.knn_k}); neighbor_precision_at_10 needs 10 neighbours")
        _require(self.graph_chunk >= 1, f"graph_chunk must be >= 1 (got {self.graph_chunk})")
        _require(self.refresh_dtype in REFRESH_DTYPES,
                 f"refresh_dtype must be one of {REFRESH_DTYPES} (got {self.refresh_dtype!r})")
        _require(1 <= self.top_k <= self.ads, f"top_k must be in 1..ads (got {self.top_k} of {self.ads} ads)")
        _require(self.realtime_events >= 1, f"realtime_events must be >= 1 (got {self.realtime_events})")
        _require(self.shard_rows in SHARD_ROWS,
                 f"shard_rows must be one of {SHARD_ROWS} (got {self.shard_rows!r})")
        _require(0 <= self.realtime_weight <= 1, f"realtime_weight must be in [0, 1] (got {self.realtime_weight})")

    @property
    def ads(self) -> int:
        """Ads in the inventory: the rows of the ad_clicks source's item table."""
        return next(s.items for s in self.sources if s.name == AD_SOURCE)

    @property
    def item_rows(self) -> int:
        """Rows of all item-id tables together."""
        return sum(s.items for s in self.sources)


def tiny() -> WorkloadConfig:
    """For tests: the whole pipeline in seconds, a training step in milliseconds."""
    return WorkloadConfig(
        users=600, communities=6, topics=24, content_dim=8, rq_codebooks=2, rq_codes=16,
        sources=(
            SourceConfig(name=AD_SOURCE, items=4800, mean_length=8, max_length=16),
            SourceConfig(name="post_views", items=3000, mean_length=12, max_length=16),
            SourceConfig(name="video_watches", items=1500, mean_length=8, max_length=16),
        ),
        dim=16, heads=2, layers=1, batch_size=32, group_size=8, sampled_negatives=64,
        steps=150, knn_k=10, graph_chunk=256,
    )


def default() -> WorkloadConfig:
    """For benchmarks: one step of one rank takes tens to a few hundred ms on one core."""
    return WorkloadConfig(
        users=10_000, communities=40, topics=100,
        sources=(
            SourceConfig(name=AD_SOURCE, items=20_000, mean_length=12, max_length=48),
            SourceConfig(name="post_views", items=200_000, mean_length=40, max_length=48),
            SourceConfig(name="video_watches", items=100_000, mean_length=24, max_length=48),
        ),
    )


def large() -> WorkloadConfig:
    """Item tables of 2,000,000 rows, so that sparse and dense gradient exchange differ visibly in memory."""
    return WorkloadConfig(
        users=50_000, communities=64, topics=200,
        sources=(
            SourceConfig(name=AD_SOURCE, items=200_000, mean_length=12, max_length=48),
            SourceConfig(name="post_views", items=1_200_000, mean_length=40, max_length=48),
            SourceConfig(name="video_watches", items=600_000, mean_length=24, max_length=48),
        ),
    )


def paper() -> WorkloadConfig:
    """The regime where Cavdar et al. found densifying wins: one tied 32,768 x 512 item table scored in full every
    step (like the NMT model's tied embedding and softmax in OpenSeq2Seq PR 249), so every row gets gradient each
    step; the rest of ALURE shrunk so that a step of one rank stays near a second on one core."""
    return WorkloadConfig(
        users=4000, communities=32, topics=64, content_dim=16, rq_codebooks=1, rq_codes=64,
        sources=(SourceConfig(name=AD_SOURCE, items=32_768, mean_length=16, max_length=32),),
        dim=512, heads=8, layers=1, batch_size=32, group_size=8, sampled_negatives=0, full_softmax=True,
    )


def paper_small() -> WorkloadConfig:
    """The paper regime at a size tests can afford: a tied 8,192 x 256 table scored in full every step."""
    return WorkloadConfig(
        users=600, communities=6, topics=24, content_dim=8, rq_codebooks=1, rq_codes=16,
        sources=(SourceConfig(name=AD_SOURCE, items=8192, mean_length=8, max_length=16),),
        dim=256, heads=4, layers=1, batch_size=16, group_size=8, sampled_negatives=0, full_softmax=True,
        steps=20, knn_k=10, graph_chunk=256,
    )


def sharded() -> WorkloadConfig:
    """Where sharding must win: 1,200,000 item rows of width 32 (about 150 MiB of rows and as much Adagrad state)
    outweigh everything else a rank holds, so replicated they must fit whole on every rank, while a row-wise shard is
    1/P of them; the rest is small enough that a step takes well under a second."""
    return WorkloadConfig(
        users=2000, communities=20, topics=50, content_dim=8, rq_codebooks=2, rq_codes=32,
        sources=(
            SourceConfig(name=AD_SOURCE, items=200_000, mean_length=12, max_length=32),
            SourceConfig(name="post_views", items=600_000, mean_length=24, max_length=32),
            SourceConfig(name="video_watches", items=400_000, mean_length=16, max_length=32),
        ),
        dim=32, heads=2, layers=1, batch_size=32, group_size=8, sampled_negatives=256, steps=20, knn_k=10,
        graph_chunk=256,
    )


PRESETS = {"tiny": tiny, "default": default, "large": large, "paper": paper, "paper-small": paper_small, "sharded": sharded}


def preset(name: str) -> WorkloadConfig:
    """The preset called `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
