"""What to run: the sweep and point configs, the workload a point builds, whether a plan fits the machine, and the
sweep loop that walks the plan one launch per point (data flow: cli -> plan -> launch -> ranks -> results)."""
