"""Benchmark: the paper's dense path (dense-reduce) against Horovod-PyTorch's sparse_as_dense (sparse-as-dense) and
sparse-gather, at np=2, with where the time goes.

One launch of real ranks (through bench/launch/mpirun.py) trains the same workload once per mode side by side, one Trainer
per mode, step by step in turn, so the machine's noise falls on every mode alike; ratios come from this one run. Per
mode: the median step time of the slowest rank with p10/p90, each phase's median (of the rank that set the pace in
each step), and the ratio to sparse-as-dense. Quick mode: the tiny preset; full mode (ALURE_BENCH_FULL=1): the
default preset the sweeps use. No speed target is asserted: these are figures to read, on a quiet machine.

This file is also the rank program: `python tests/benchmarks/test_dense_modes.py SPEC_JSON` under mpirun.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.benchmarks.mode import FULL, pick

NP = 2
PRESET = pick("tiny", "default")
STEPS, WARMUP = pick((6, 2), (30, 3))
MODES = ("dense-reduce", "sparse-as-dense", "sparse-gather")


@pytest.mark.mpi
def test_dense_reduce_against_sparse_as_dense(benchmark):
    result = benchmark.pedantic(launch, rounds=1, iterations=1)
    benchmark.extra_info.update({"np": NP, "preset": PRESET, "steps": STEPS, "full": FULL, **result})
    print("\n" + describe(result))
    assert set(result["ms"]) == set(MODES) and all(v > 0 for v in result["ms"].values())


def describe(result: dict) -> str:
    phases = list(next(iter(result["phase_ms"].values())))
    lines = [f"np={NP} preset {PRESET}, {STEPS} steps per mode, interleaved; slowest rank per step (ms)",
             f"{'mode':16} {'step':>8} {'p10':>8} {'p90':>8} {'/s-a-d':>7} " + " ".join(f"{p:>13}" for p in phases)]
    for m in MODES:
        lines.append(f"{m:16} {result['ms'][m]:8.1f} {result['p10'][m]:8.1f} {result['p90'][m]:8.1f} "
                     f"{result['ms'][m] / result['ms']['sparse-as-dense']:7.3f} "
                     + " ".join(f"{result['phase_ms'][m][p]:13.1f}" for p in phases))
    return "\n".join(lines)


def launch() -> dict:
    from bench.launch import transport
    from bench.launch.mpirun import run_ranks
    spec = {"preset": PRESET, "steps": STEPS, "warmup": WARMUP}
    run = run_ranks(NP, shared_memory=transport.mechanism(), argv=[sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], timeout_s=3600,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0 and not run.timed_out, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stdout[-3000:]
    return json.loads(lines[-1])


def rank_main(spec: dict) -> None:
    """Every rank: the modes side by side; rank 0 prints the result as one JSON line."""
    import numpy as np
    import torch

    from alure.config import preset
    from alure.data import build_world
    from alure.train import Trainer
    from bench.host import threads_per_rank
    from bench.ranks.exchange import HorovodExchange
    from bench.ranks.worker import instrumented_step
    from bench.results.scaling import PHASES

    exchanges = {m: HorovodExchange(m) for m in MODES}
    first = exchanges[MODES[0]]
    torch.set_num_threads(threads_per_rank(first.size))
    config = preset(spec["preset"])
    world = build_world(config)
    trainers = {m: Trainer(config, exchanges[m], world) for m in MODES}
    phases = {m: [] for m in MODES}
    for i in range(spec["warmup"] + spec["steps"]):
        for mode in MODES:  # in turn, step by step: noise falls on every mode alike
            ms = instrumented_step(trainers[mode], exchanges[mode]).ms
            if i >= spec["warmup"]:
                phases[mode].append([ms[p] for p in PHASES])
    every = {m: np.array(first.allgather_object(phases[m])).reshape(first.size, spec["steps"], len(PHASES))
             for m in MODES}  # [rank, step, phase]
    out = {"ms": {}, "p10": {}, "p90": {}, "phase_ms": {}, "threads": torch.get_num_threads()}
    for m, a in every.items():
        step = a.sum(axis=2)  # [rank, step]
        pace = step.argmax(axis=0)  # the rank that set the pace in each step
        slowest = step.max(axis=0)
        out["ms"][m] = float(np.median(slowest))
        out["p10"][m], out["p90"][m] = (float(np.percentile(slowest, q)) for q in (10, 90))
        out["phase_ms"][m] = {p: float(np.median(a[pace, np.arange(spec["steps"]), k])) for k, p in enumerate(PHASES)}
    if first.rank == 0:
        print(json.dumps(out), flush=True)
    first.shutdown()


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
