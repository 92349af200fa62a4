"""What to run: the sweep and point configs, the workload a point builds, whether a plan fits the machine. The
lowest package of the harness but errors and host facts (docs/design.md "Layers"); the sweep loop is bench.run."""
