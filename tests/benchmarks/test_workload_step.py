"""Benchmark: one ALURE training step of one rank (LocalExchange, no MPI), every phase as Trainer.train_step runs
them. Quick mode: the tiny preset; full mode (ALURE_BENCH_FULL=1): the default preset the sweeps use."""
import torch

from alure.config import preset
from alure.exchange import LocalExchange
from alure.train import Trainer
from tests.benchmarks.mode import pick

PRESET = pick("tiny", "default")


def test_training_step_of_one_rank(benchmark):
    torch.set_num_threads(1)  # one rank's share of a core, as a sweep at np = cores runs it
    trainer = Trainer(preset(PRESET), LocalExchange())
    benchmark.extra_info.update({"preset": PRESET, "threads": 1})
    loss = benchmark.pedantic(trainer.train_step, rounds=pick(10, 40), warmup_rounds=pick(2, 5))
    assert loss == loss  # a finite number came back (NaN != NaN)
