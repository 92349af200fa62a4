"""Rank script: Horovod allreduce and allgather, each checked on this rank against what it must be."""
import os

import horovod.torch as hvd
import torch

from bench.launch.handback import hand_back

hvd.init()
rank, size = hvd.rank(), hvd.size()

summed = hvd.allreduce(torch.full((4,), float(rank + 1)), op=hvd.Sum)
expected_sum = float(size * (size + 1) // 2)
assert torch.equal(summed, torch.full((4,), expected_sum)), summed

# Ranks contribute different row counts: allgather must concatenate in rank order.
gathered = hvd.allgather(torch.full((rank + 1, 2), float(rank)))
expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(size)])
assert torch.equal(gathered, expected), gathered

hand_back(os.environ["RANK_HANDBACK_DIR"], rank,
          {"rank": rank, "size": size, "allreduce": summed.tolist(), "allgather_rows": gathered.shape[0]})
