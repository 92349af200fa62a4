"""Benchmark: what the worker's memory probe costs against one training step. Per timed step the worker resets the
kernel's high-water mark before and reads it after each of the five phases (bench.ranks.memory.PeakProbe); this times
those ten calls, interleaved with training steps of one rank (LocalExchange, no MPI) so noise falls on both alike.
Quick mode: the tiny preset; full mode (ALURE_BENCH_FULL=1): the default preset the sweeps use, where the target is
under 1% of a step (asserted in full mode only: a speed target is no pass/fail test on a noisy machine)."""
import time

import numpy as np
import pytest
import torch

from alure.config import preset
from alure.exchange import LocalExchange
from alure.train import Trainer
from bench.ranks.memory import PeakProbe
from bench.results.scaling import PHASES
from tests.benchmarks.mode import FULL, pick

PRESET = pick("tiny", "default")
TARGET = 0.01


def probe_step(probe: PeakProbe) -> None:
    for _ in PHASES:
        probe.reset()
        probe.peak_mib()


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_memory_probe_costs_under_one_percent_of_a_step(benchmark):
    torch.set_num_threads(1)
    trainer = Trainer(preset(PRESET), LocalExchange())
    probe = PeakProbe()
    for _ in range(pick(2, 3)):
        trainer.train_step()
    steps, probes = [], []
    for _ in range(pick(10, 30)):  # interleaved: a step, then the probe's calls of one step
        t = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        probe_step(probe)
        probes.append(time.perf_counter() - t)
    benchmark.pedantic(probe_step, args=(probe,), rounds=pick(50, 500))
    probe.close()
    ratio = float(np.median(probes) / np.median(steps))
    benchmark.extra_info.update({"preset": PRESET, "method": probe.method, "step_ms": float(np.median(steps)) * 1e3,
                                 "probe_ms_per_step": float(np.median(probes)) * 1e3, "probe_share": ratio})
    print(f"\n{PRESET}: step {np.median(steps) * 1e3:.1f} ms, probe {np.median(probes) * 1e3:.3f} ms per step "
          f"({ratio:.3%}), {probe.method}")
    assert probe.method == "vmhwm-reset" and ratio > 0
    if FULL:
        assert ratio < TARGET, f"memory probe {ratio:.2%} of a step (target {TARGET:.0%})"
