"""What a sparse embedding gradient costs before any byte is exchanged: densifying it (dense-reduce's to_dense) and
coalescing it (merging duplicate rows, which Horovod's sparse-gather does not do before sending, horovod #3328).

The gradient is what nn.Embedding(sparse=True) hands back: one (index, row) entry per lookup, uncoalesced. Here
every touched row is looked up LOOKUPS_PER_ROW times, so nnz = LOOKUPS_PER_ROW x density x V.
Each benchmark times real calls on a fresh-each-time result (the input stays uncoalesced, so every round does the work).
"""
import pytest
import torch

from tests.benchmarks.mode import pick

V, D = 100_000, 64
LOOKUPS_PER_ROW = 2
DENSITIES = pick((0.01, 0.1), (0.001, 0.01, 0.05, 0.1, 0.5))
ROUNDS = pick(5, 30)


def embedding_gradient(density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(V, generator=gen)[:max(1, round(density * V))]
    ids = rows.repeat(LOOKUPS_PER_ROW)[torch.randperm(len(rows) * LOOKUPS_PER_ROW, generator=gen)]
    values = torch.randn(len(ids), D, generator=gen)
    return torch.sparse_coo_tensor(ids.reshape(1, -1), values, (V, D), check_invariants=False)


def describe(benchmark, grad, density):
    benchmark.extra_info.update(rows=V, dim=D, density=density, nnz=grad._nnz(), lookups_per_row=LOOKUPS_PER_ROW,
                                sparse_bytes=grad._indices().nbytes + grad._values().nbytes, dense_bytes=4 * V * D,
                                torch_threads=torch.get_num_threads())


@pytest.mark.parametrize("density", DENSITIES)
def test_to_dense(benchmark, density):
    grad = embedding_gradient(density)
    describe(benchmark, grad, density)
    dense = benchmark.pedantic(grad.to_dense, rounds=ROUNDS, warmup_rounds=1)
    assert dense.shape == (V, D)


@pytest.mark.parametrize("density", DENSITIES)
def test_coalesce(benchmark, density):
    grad = embedding_gradient(density)
    describe(benchmark, grad, density)
    merged = benchmark.pedantic(grad.coalesce, rounds=ROUNDS, warmup_rounds=1)
    assert not grad.is_coalesced() and merged._nnz() == grad._nnz() // LOOKUPS_PER_ROW
