"""The arithmetic of horovod issue #554 and OpenSeq2Seq PR 249 (tests/test_costmodel.py checks it)."""
from __future__ import annotations

from collections.abc import Sequence

from bench.model.table_costs import INDEX_BYTES, VALUE_BYTES


def gathered_bytes(rows_per_rank: Sequence[float] | float, p: int | None, dim: int, value_bytes: int = VALUE_BYTES,
                   index_bytes: int = INDEX_BYTES) -> float:
    """What every rank holds after an uncoalesced sparse allgather: all ranks' rows, values and indices. Give one
    count per rank, or one count and p (the same on every rank)."""
    total = float(sum(rows_per_rank)) if isinstance(rows_per_rank, Sequence) else float(rows_per_rank) * p
    return total * (value_bytes * dim + index_bytes)


def tied_embedding_rows(vocab: int, source_tokens: int, target_tokens: int) -> int:
    """Rows of one rank's gradient of a Transformer's tied embedding as TensorFlow accumulates it (IndexedSlices):
    the output projection's dense gradient as all V rows, plus one row per source and per target token."""
    return vocab + source_tokens + target_tokens
