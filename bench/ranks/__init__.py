"""What runs under mpirun on every rank: the training worker, the pipeline-stage worker, the collective
micro-benchmark rank, the Horovod gradient exchange and the memory probe. Above launch and model, below the
executors of bench.run (docs/design.md "Layers")."""
