"""Rank script standing in for a point's rank program (bench.ranks.point_program), to end a launch one chosen way
that a real point would take seconds to reach. Started as `launch_outcomes.py OUTCOME --point JSON --results DIR`
(the point program's own arguments after the outcome):

- `crash-measuring`: marks the rank measuring, as a point's rank does once its launch is up, then dies by SIGKILL
  (a crash mid-training);
- `fail-before-measuring`: raises before marking anything (a launch whose transport or start-up failed);
- `hang-before-measuring`: sleeps without marking (a launch stuck starting: only the point's timeout ends it);
- `hand-back`: hands back as a point's rank does at its end, a failure with its reason if it cannot (the test
  removes the results folder first).
"""
import argparse
import os
import signal
import sys
import time

from bench.launch.handback import hand_back, hand_back_failure, launched_rank, mark_measuring

parser = argparse.ArgumentParser()
parser.add_argument("outcome")
parser.add_argument("--point")
parser.add_argument("--results", required=True)
args = parser.parse_args()
rank = launched_rank()

if args.outcome == "crash-measuring":
    mark_measuring(args.results, rank)
    os.kill(os.getpid(), signal.SIGKILL)
elif args.outcome == "fail-before-measuring":
    raise RuntimeError("the transport did not come up")
elif args.outcome == "hang-before-measuring":
    time.sleep(3600)
elif args.outcome == "hand-back":
    try:
        hand_back(args.results, rank, None)
    except BaseException as err:  # noqa: BLE001 - as bench.ranks.point_program: every failure handed back
        hand_back_failure(args.results, rank, err)
        os._exit(1)
else:
    sys.exit(f"unknown outcome {args.outcome!r}")
