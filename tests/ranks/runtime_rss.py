"""Rank script: the resident memory of a rank before it builds anything (what bench.plan.capacity.RUNTIME_MIB stands for):
the suite's imports loaded and Horovod initialised."""
import os

import horovod.torch as hvd
import mpi4py.MPI  # noqa: F401  (every rank program of the suite loads it, through Horovod or directly)
import numpy  # noqa: F401
import torch  # noqa: F401

from bench.launch.handback import hand_back
from bench.ranks.memory import rss_mib

hvd.init()
hand_back(os.environ["RANK_HANDBACK_DIR"], hvd.rank(), {"rank": hvd.rank(), "rss_mib": rss_mib()})
hvd.shutdown()
