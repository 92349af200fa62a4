"""Rank script: a spike of memory allocated and freed before the worker's training window opens, then one tiny
point measured as the sweep measures it. Args: SPIKE_MIB."""
import os
import sys

import torch

from bench.launch.handback import hand_back
from bench.plan.config import PointConfig
from bench.ranks.exchange import HorovodExchange
from bench.ranks.worker import measure

spike_mib = int(sys.argv[1])
exchange = HorovodExchange("sparse-gather")
spike = torch.ones(spike_mib * 2**20 // 4)  # written, so resident: the kernel's high-water mark rises by it
del spike  # torch frees a block this large back to the kernel at once
record = measure(PointConfig(preset="tiny", np=exchange.size, steps=3, warmup_steps=1), exchange)
hand_back(os.environ["RANK_HANDBACK_DIR"], exchange.rank, {"rank": exchange.rank, **{k: record[k] for k in (
    "baseline_rss_mib", "build_peak_rss_mib", "warmup_peak_rss_mib", "train_peak_rss_mib", "phase_peak_rss_mib",
    "peak_rss_mib", "rss_growth_mib", "memory_probe", "memory_probe_ms", "step_time_ms")}})
exchange.shutdown()
