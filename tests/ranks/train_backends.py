"""Rank script: train the tiny workload a few steps in each of the given exchange modes over each of the given
exchange backends in turn, every run from the same seed; save this rank's weights per backend and mode and report
what each exchange did. A backend listed first runs first: `mpi,horovod` trains over raw MPI before anything has
imported Horovod, which the report says per run; horovod-grouped is Horovod with bench.ranks.grouped_gather's
option. Args: BACKENDS (comma-separated) MODES (comma-separated) STEPS OUT_DIR."""
import os
import sys
from pathlib import Path

import torch

from alure.config import tiny
from alure.train import Trainer
from bench.launch.handback import hand_back
from bench.plan.config import PointConfig
from bench.ranks import grouped_gather
from bench.ranks.point_program import exchange_for


def horovod_loaded() -> bool:
    return any(name == "horovod" or name.startswith("horovod.") for name in sys.modules)


def train(backend: str, mode: str, steps: int, out: Path) -> dict:
    # horovod-grouped: Horovod with its tables' gathers grouped (bench.ranks.grouped_gather), asked as a launch would
    os.environ[grouped_gather.VARIABLE] = "1" if backend == "horovod-grouped" else "0"
    exchange = exchange_for(PointConfig(mode=mode, exchange_backend=backend.removesuffix("-grouped")))
    trainer = Trainer(tiny(), exchange)
    torch.save(trainer.model.state_dict(), out / f"initial-{backend}-rank{exchange.rank}.pt")
    counters, started_in_backward = [], []
    for _ in range(steps):
        exchange.counters.reset()
        trainer.backward(trainer.forward(trainer.next_batch()))
        # the raw-MPI backend's hooks must have started every unit's collectives before synchronize is called
        started_in_backward.append([unit.started for unit in getattr(exchange, "units", [])])
        trainer.synchronize()
        trainer.step()
        c = exchange.counters
        counters.append({**c.as_dict(), "bytes_held": c.bytes_held, "bytes_sent": c.bytes_sent})
    torch.save(trainer.model.state_dict(), out / f"{backend}-{mode}-rank{exchange.rank}.pt")
    grouped = getattr(exchange, "grouped", None)
    return {"counters": counters, "started_in_backward": started_in_backward, "class": type(exchange).__name__,
            "horovod_loaded": horovod_loaded(), "groups_started": grouped.groups_started if grouped else 0,
            "exchange": exchange}


backends, modes = sys.argv[1].split(","), sys.argv[2].split(",")
steps, out = int(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
runs, rank = {}, None
for backend in backends:
    for mode in modes:
        run = train(backend, mode, steps, out)
        exchange = run.pop("exchange")
        rank = exchange.rank
        if backend == "mpi":
            exchange.shutdown()  # frees its communicators; Horovod's shutdown would end Horovod for the next mode
        runs[f"{backend}/{mode}"] = run
hand_back(os.environ["RANK_HANDBACK_DIR"], rank, {"rank": rank, "runs": runs})
if horovod_loaded():
    import horovod.torch as hvd
    hvd.shutdown()
