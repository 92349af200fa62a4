"""The asynchronous embedding refresh: batch inference over all users, sharded across ranks, stored compressed.

Each rank encodes a contiguous block of users and compresses the embeddings (fp16, or int8 with a per-row scale);
the block stays on its rank (`refresh_local`) unless someone needs the whole store (`gather_store`), and then
what travels and what is kept is the compressed form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alure.data import World, shard, user_batch
from alure.exchange import Exchange
from alure.model import UserEncoder


@dataclass(kw_only=True, slots=True)
class EmbeddingStore:
    """Compressed user embeddings and the ids of the users they belong to."""

    user_ids: np.ndarray
    """(users,) int64."""
    values: np.ndarray
    """(users, dim) float16, or int8 to be multiplied by `scales`."""
    scales: np.ndarray | None
    """(users,) float32 per-row scale of int8 values; None for fp16."""

    @property
    def nbytes(self) -> int:
        """Bytes held: ids, values and scales."""
        return self.user_ids.nbytes + self.values.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def dequantize(self) -> np.ndarray:
        """(users, dim) float32."""
        return dequantize(self.values, self.scales)


def dequantize(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Compressed rows (fp16, or int8 with a per-row scale) as (rows, dim) float32."""
    values = values.astype(np.float32)
    return values if scales is None else values * scales[:, None]


def compress(user_ids: np.ndarray, embeddings: np.ndarray, dtype: str) -> EmbeddingStore:
    """Store float32 embeddings as 'fp16' or as 'int8' with a per-row scale (max |x| maps to 127)."""
    if dtype == "fp16":
        return EmbeddingStore(user_ids=user_ids, values=embeddings.astype(np.float16), scales=None)
    scales = np.abs(embeddings).max(axis=1) / 127
    scales = np.where(scales > 0, scales, 1).astype(np.float32)  # an all-zero row keeps scale 1
    values = np.rint(embeddings / scales[:, None]).astype(np.int8)
    return EmbeddingStore(user_ids=user_ids, values=values, scales=scales)


@torch.no_grad()
def encode_users(model: UserEncoder, world: World, users: np.ndarray, batch_size: int) -> np.ndarray:
    """(len(users), dim) float32 embeddings of `users` from their full (latest) history."""
    parts = [model(user_batch(world, users[i:i + batch_size])).numpy() for i in range(0, len(users), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, world.config.dim), dtype=np.float32)


def refresh_local(model: UserEncoder, world: World, exchange: Exchange) -> EmbeddingStore:
    """This rank's own block of users (`shard`), encoded and compressed; nothing crosses ranks."""
    config = world.config
    mine = np.arange(config.users)[shard(config.users, exchange.rank, exchange.size)]
    return compress(mine, encode_users(model, world, mine, config.batch_size), config.refresh_dtype)


def gather_store(local: EmbeddingStore, exchange: Exchange) -> EmbeddingStore:
    """Every rank's block of the store, on every rank, in user order: the compressed form is what travels."""
    gathered = EmbeddingStore(
        user_ids=exchange.allgather_array(local.user_ids), values=exchange.allgather_array(local.values),
        scales=None if local.scales is None else exchange.allgather_array(local.scales))
    assert np.array_equal(gathered.user_ids, np.arange(len(gathered.user_ids))), "shards must come back in order"
    return gathered


def refresh(model: UserEncoder, world: World, exchange: Exchange) -> EmbeddingStore:
    """Every user's compressed embedding, on every rank; each rank encodes only its own block of users."""
    return gather_store(refresh_local(model, world, exchange), exchange)
