"""The ALURE user encoder, top to bottom: timestamp features, packed attention, one encoder per source, fusion,
and the next-engagement contrastive loss.

Sequences arrive packed (see `data.PackedSequences`): all tokens of a batch end to end, with per-sample lengths.
The encoder regroups the tokens so that samples of equal length are adjacent: each group is then a dense
(samples, length) block, and attention over it costs sum(length^2), not samples x longest^2; no token sees
another sample, with no padding and no mask. `nn.TransformerEncoder` is not used because on a packed
batch it needs a dense tokens x tokens mask, which costs what padding costs.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alure.config import SourceConfig, WorkloadConfig
from alure.data import HISTORY_DAYS, Batch, Items, PackedSequences

TEMPERATURE = 0.1
"""Softmax temperature of the contrastive loss over cosine similarities."""
INIT_STD = 0.1
"""Initial spread of embedding rows."""
INIT_BLOCK_ROWS = 4096
"""Rows of a sparse table drawn from one generator (TableSpec.initial_rows)."""
SPARSE_TABLES = ("items", "codes")
"""Each source encoder's embedding tables with sparse gradients (the ones a runtime may exchange or shard)."""


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A sparse embedding table before it is made: what a runtime that shards tables needs to make its part."""

    name: str
    """The table's module path in the model, e.g. 'sources.post_views.items'."""
    rows: int
    """Rows of the whole table."""
    dim: int
    """Width of a row."""
    seed: int
    """The workload's seed: with the name it fixes every row's initial value."""

    def initial_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The initial values of rows `ids` (any order), the same whoever asks for which rows: rows are drawn in
        blocks of INIT_BLOCK_ROWS, each from its own generator, so a rank that keeps some rows draws only the
        blocks they lie in and never holds the whole table."""
        out = torch.empty(len(ids), self.dim)
        blocks = torch.div(ids, INIT_BLOCK_ROWS, rounding_mode="floor")
        order = torch.argsort(blocks, stable=True)
        present, counts = torch.unique_consecutive(blocks[order], return_counts=True)
        for block, at in zip(present.tolist(), order.split(counts.tolist())):
            first = block * INIT_BLOCK_ROWS
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, zlib.crc32(self.name.encode()), block]).generate_state(1)[0]))
            values = torch.randn(min(INIT_BLOCK_ROWS, self.rows - first), self.dim, generator=generator)
            out[at] = values[ids[at] - first] * INIT_STD
        return out

    def build(self) -> nn.Embedding:
        """The whole table, replicated: every row at its initial value, sparse gradients."""
        # Made from its rows, so the global generator is not drawn from: a shard (made the same way) leaves it where
        # the whole table does, and the parameters made next start alike in every mode.
        if torch.empty(0).is_meta:  # a model made on the meta device, for its shapes alone (bench's cost model)
            return nn.Embedding(self.rows, self.dim, sparse=True, _weight=torch.empty(self.rows, self.dim))
        return nn.Embedding(self.rows, self.dim, sparse=True, _weight=self.initial_rows(torch.arange(self.rows)))


TableOffer = Callable[[TableSpec], "nn.Module | None"]
"""Offered each sparse table before it is made; returns the module that does its lookups (an nn.Embedding of the
rows this rank keeps), or None for the whole table (`TableSpec.build`)."""


def sparse_table(spec: TableSpec, offer: TableOffer | None) -> nn.Module:
    """The table `offer` makes of `spec`, or else the whole table."""
    made = offer(spec) if offer is not None else None
    return made if made is not None else spec.build()


class TimestampEncoder(nn.Module):
    """Feature enrichment in place of positional encoding: absolute time, recency and periodic features."""

    PERIODS_DAYS = (1.0, 7.0)  # daily and weekly rhythms

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 + 4 * len(self.PERIODS_DAYS), dim)

    def forward(self, times: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        age = (now - times).clamp_min(0)
        features = [times / HISTORY_DAYS, torch.log1p(age)]
        for period in self.PERIODS_DAYS:
            for t in (times, age):  # time of day/week of the event, and how many days/weeks ago it was
                angle = t * (2 * math.pi / period)
                features += [torch.sin(angle), torch.cos(angle)]
        return self.proj(torch.stack(features, dim=-1))


@dataclass(frozen=True, slots=True)
class LengthGroups:
    """A packed batch regrouped so that samples of equal length sit together: each group is a dense
    (samples, length) block, attended to as a batch with no padding and no mask, and no token sees another sample."""

    token_order: torch.Tensor
    """(tokens,) packed token index at each position of the regrouped order."""
    sample_order: torch.Tensor
    """(samples,) sample at each position of the regrouped order (sorted by length)."""
    sizes: list[tuple[int, int]]
    """(length, samples) of each group, in order."""

    @staticmethod
    def of(lengths: torch.Tensor) -> LengthGroups:
        sorted_lengths, sample_order = torch.sort(lengths, stable=True)
        starts = (torch.cumsum(lengths, 0) - lengths)[sample_order]
        # Token t of the regrouped order is its sample's start plus its position inside the sample.
        first = torch.repeat_interleave(starts - (torch.cumsum(sorted_lengths, 0) - sorted_lengths), sorted_lengths)
        token_order = first + torch.arange(len(first))
        group_lengths, counts = torch.unique_consecutive(sorted_lengths, return_counts=True)
        return LengthGroups(token_order, sample_order, list(zip(group_lengths.tolist(), counts.tolist())))


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention over regrouped packed tokens: one dense attention call per length group."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        # No bias: softmax ignores a key bias, so its gradient is pure round-off, and Adagrad turns round-off
        # into full-size steps (ranks and exchange modes would drift apart on noise).
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, groups: LengthGroups) -> torch.Tensor:
        dim = x.shape[1]
        outputs = []
        for block, (length, samples) in zip(self.qkv(x).split([n * l for l, n in groups.sizes]), groups.sizes):
            q, k, v = block.view(samples, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            outputs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, dim))
        return self.proj(torch.cat(outputs))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm Transformer block on packed tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PackedSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x, groups):
        x = x + self.attn(self.norm1(x), groups)
        return x + self.mlp(self.norm2(x))


class SourceEncoder(nn.Module):
    """One activity source's sequence -> one vector per sample."""

    def __init__(self, source: SourceConfig, config: WorkloadConfig, offer: TableOffer | None = None):
        super().__init__()
        dim = config.dim
        # The huge table: a step touches few rows, so its gradient is sparse. Tied: it also scores candidates.
        self.items = sparse_table(TableSpec(f"sources.{source.name}.items", source.items, dim, config.seed), offer)
        # All RQ levels in one small table (level l's code c is row l * rq_codes + c); nearly every row is hit
        # each step, so this gradient is sparse in format but dense in fact: the other kind of table.
        self.codes = sparse_table(TableSpec(f"sources.{source.name}.codes", config.rq_codebooks * config.rq_codes,
                                            dim, config.seed), offer)
        self.register_buffer("code_offset", torch.arange(config.rq_codebooks) * config.rq_codes, persistent=False)
        self.content = nn.Linear(config.content_dim, dim)
        self.actions = nn.Embedding(source.actions, dim)
        self.time = TimestampEncoder(dim)
        self.blocks = nn.ModuleList(Block(dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.actions.weight, std=INIT_STD)

    def embed_items(self, items: Items) -> torch.Tensor:
        """An item's vector from its id, RQ codes and content: for input tokens and for scored candidates alike."""
        return self.items(items.ids) + self.codes(self.code_rows(items)).sum(1) + self.content(items.content)

    def code_rows(self, items: Items) -> torch.Tensor:
        """(items, levels) rows of the codes table that `items` look up."""
        return items.codes + self.code_offset

    def input_tokens(self, seq: PackedSequences) -> torch.Tensor:
        """The packed token index of each position in the order the encoder embeds them (grouped by length)."""
        return LengthGroups.of(seq.lengths).token_order

    def forward(self, seq: PackedSequences) -> torch.Tensor:
        groups = LengthGroups.of(seq.lengths)
        token = groups.token_order  # embed the tokens directly in regrouped order (`input_tokens`)
        sample = torch.repeat_interleave(torch.arange(len(seq.lengths)), seq.lengths)[token]
        x = (self.embed_items(seq.items.select(token)) + self.actions(seq.actions[token])
             + self.time(seq.times[token], seq.now[sample]))
        for block in self.blocks:
            x = block(x, groups)
        # Masked mean pooling: each sample averages exactly its own tokens (back in the batch's sample order).
        pooled = torch.zeros(len(seq.lengths), x.shape[1]).index_add(0, sample, self.norm(x))
        return pooled / seq.lengths.clamp_min(1)[:, None]


class UserEncoder(nn.Module):
    """One encoder per activity source, fused into one L2-normalised user embedding. `offer` (e.g.
    alure.exchange.Exchange.embedding_lookup) is offered each sparse table before it is made."""

    def __init__(self, config: WorkloadConfig, offer: TableOffer | None = None):
        super().__init__()
        self.sources = nn.ModuleDict({s.name: SourceEncoder(s, config, offer) for s in config.sources})
        self.fuse = nn.Linear(len(config.sources) * config.dim, config.dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        parts = [encoder(batch.sequences[name]) for name, encoder in self.sources.items()]
        return F.normalize(self.fuse(torch.cat(parts, dim=1)), dim=1)

    def table_lookups(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """The ids each sparse table looks up in one training step on `batch` (forward, then
        `next_engagement_loss`), in the order they look them up: per source, the input tokens in the encoder's
        order, the targets, the negatives; keyed by the table's module path."""
        out = {}
        for name, encoder in self.sources.items():
            seq = batch.sequences[name]
            looked_up = [seq.items.select(encoder.input_tokens(seq)), batch.targets[name], batch.negatives[name]]
            out[f"sources.{name}.items"] = [items.ids for items in looked_up]
            out[f"sources.{name}.codes"] = [encoder.code_rows(items) for items in looked_up]
        return out


def next_engagement_loss(model: UserEncoder, users: torch.Tensor, batch: Batch, group_size: int) -> torch.Tensor:
    """Contrastive loss of each sample's user embedding against its next engaged item in every source.

    Candidates are embedded like input items (tied input/output, so targets and negatives touch the item table's
    rows): the targets of the sample's group (in-batch negatives) and the step's sampled negatives. A candidate that
    is the sample's own target item is not a negative (popular items repeat within a batch), so it is masked.
    """
    samples = len(users)
    column = torch.arange(samples) % group_size  # the sample's own target in its group's row of candidates
    losses = []
    for name, encoder in model.sources.items():
        targets, negatives = batch.targets[name].ids, batch.negatives[name].ids
        positives = F.normalize(encoder.embed_items(batch.targets[name]), dim=1)
        sampled = F.normalize(encoder.embed_items(batch.negatives[name]), dim=1)
        grouped = users.view(-1, group_size, users.shape[1])
        in_group = torch.bmm(grouped, positives.view_as(grouped).transpose(1, 2)).reshape(samples, group_size)
        logits = torch.cat([in_group, users @ sampled.T], dim=1) / TEMPERATURE
        candidates = torch.cat([targets.view(-1, group_size).repeat_interleave(group_size, 0),
                                negatives.expand(samples, -1)], dim=1)
        duplicate = candidates == targets[:, None]
        duplicate[torch.arange(samples), column] = False
        losses.append(F.cross_entropy(logits.masked_fill(duplicate, -math.inf), column))
    return torch.stack(losses).mean()
