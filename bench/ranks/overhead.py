"""What the harness's instrumentation costs: the same trainer alternates blocks of instrumented steps (phase
clocks, byte counters, as the sweep worker runs them) with blocks of the bare `Trainer.train_step` loop, on the
same ranks in the same run, so drift and noise fall on both alike. Run on every rank:

    mpirun -np 2 python -m bench.ranks.overhead --results DIR --preset default --blocks 10 --steps-per-block 5

Rank 0 hands the block means and their ratio back into DIR (bench.launch.handback).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from alure.config import preset
from bench.host import threads_per_rank
from bench.launch.handback import hand_back
from bench.ranks.worker import instrumented_step


def block_means(trainer, exchange, blocks: int, steps: int) -> tuple[list[float], list[float]]:
    """Per block, the mean step time in ms (slowest rank) of the instrumented and of the bare loop."""
    harness, bare = [], []
    for b in range(blocks):
        # Alternate which goes first, so neither always follows the other's cache state.
        for kind in (("harness", "bare") if b % 2 == 0 else ("bare", "harness")):
            exchange.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                if kind == "harness":
                    instrumented_step(trainer, exchange)
                else:
                    trainer.train_step()
            mean_ms = (time.perf_counter() - start) * 1000 / steps
            slowest = float(exchange.allgather_array(np.array([mean_ms])).max())
            (harness if kind == "harness" else bare).append(slowest)
    return harness, bare


def main(argv: list[str] | None = None) -> int:
    import torch

    from alure.train import Trainer  # imports torch: rank side only
    from bench.ranks.exchange import HorovodExchange  # imports torch and Horovod: rank side only

    parser = argparse.ArgumentParser(prog="python -m bench.ranks.overhead")
    parser.add_argument("--results", required=True, help="the folder to hand the result back into")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--mode", default="dense-reduce")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--steps-per-block", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    exchange = HorovodExchange(args.mode)
    torch.set_num_threads(threads_per_rank(exchange.size))
    trainer = Trainer(preset(args.preset), exchange)
    for _ in range(args.warmup):
        trainer.train_step()
    harness, bare = block_means(trainer, exchange, args.blocks, args.steps_per_block)
    if exchange.rank == 0:
        ratios = np.array(harness) / np.array(bare)
        hand_back(args.results, 0, {"np": exchange.size, "preset": args.preset, "mode": args.mode,
                                    "harness_ms": harness, "bare_ms": bare,
                                    "overhead_ratio_median": float(np.median(ratios)),
                                    "overhead_ratio_p10": float(np.percentile(ratios, 10)),
                                    "overhead_ratio_p90": float(np.percentile(ratios, 90))})
    exchange.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
