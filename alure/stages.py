"""The names of the pipeline's stages and of the k-NN graph's strategies, in a module with no heavy imports, so
that a harness can validate its configs without loading torch."""

STAGES = ("train", "refresh", "graph", "retrieval")
"""The pipeline's stages, in order."""
GRAPH_STRATEGIES = ("replicate", "ring")
"""How the ranks share the embeddings for the exact k-NN (alure.graph): allgather them all, or pass blocks around
the ring."""
DEFAULT_GRAPH_STRATEGY = "ring"
"""The pipeline's choice: memory per rank falls with the ranks, and the graph is the same as replicate's."""
