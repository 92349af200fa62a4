"""A sweep as Slurm job arrays: the same points and records as a local sweep, submitted and collected through
sbatch and scontrol (the command line is bench/cli/slurm.py)."""
