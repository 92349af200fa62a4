"""`alure-bench pipeline`: the whole ALURE pipeline (train -> refresh -> graph -> retrieval) and its quality.

np=1 runs in this process with no MPI at all; np>1 launches ranks that exchange through Horovod, and rank 0
prints the result as one JSON line for this process to read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace

from alure.config import PRESETS, preset
from alure.stages import DEFAULT_GRAPH_STRATEGY, GRAPH_STRATEGIES
from bench.errors import UsageError
from bench.host import threads_per_rank
from bench.launch import transport
from bench.launch.handback import collect, failures, hand_back, hand_back_failure, launched_rank
from bench.launch.hosts import add_host_flags, check_fits, launcher_from_args, shares_one_machine
from bench.launch.mpirun import LOCAL, Launcher, run_ranks
from bench.launch.rank_program import python_module_argv
from bench.plan.capacity import add_oversubscribe_flag, check_launch, rank_floor_mib, this_host
from bench.plan.config import MODES, SHARDED_MODES


def workload(preset_name: str, seed: int | None):
    try:
        config = preset(preset_name)
    except ValueError as err:  # alure names the presets it has
        raise UsageError(f"--preset: {err}") from None
    return config if seed is None else replace(config, seed=seed)


def run_local(preset_name: str, seed: int | None, graph_strategy: str) -> dict:
    import torch

    from alure.exchange import LocalExchange  # imports torch: only where it runs
    from alure.pipeline import run_pipeline  # imports torch: only where it runs
    torch.set_num_threads(threads_per_rank(1))
    return run_pipeline(workload(preset_name, seed), LocalExchange(), graph_strategy)


def run_distributed(np_: int, preset_name: str, seed: int | None, mode: str, timeout_s: float,
                    graph_strategy: str, launcher: Launcher = LOCAL) -> dict:
    with tempfile.TemporaryDirectory(prefix="alure-pipeline-") as results:
        argv = python_module_argv("bench.cli.pipeline", "--rank-entry", "--results", results, "--preset", preset_name,
                                  "--mode", mode, "--graph-strategy", graph_strategy,
                                  *(["--seed", str(seed)] if seed is not None else []))
        run = run_ranks(np_, argv, shared_memory=transport.mechanism(), timeout_s=timeout_s, launcher=launcher)
        handed = collect(results)
    if run.timed_out:
        raise UsageError(f"the pipeline on {np_} ranks ran past {timeout_s:g} s: raise --timeout")
    rank0 = next((h for h in handed if h["rank"] == 0 and h["status"] == "ok"), None)
    if run.returncode != 0 or rank0 is None:
        failed = failures(handed)
        last = [line for line in run.stderr.splitlines() if line.strip()][-1:] or ["no error output"]
        raise UsageError(f"the pipeline on {np_} ranks failed (exit {run.returncode}): "
                         f"{failed[0]['reason'] if failed else last[0]}")
    return rank0["result"]


def rank_entry(args: argparse.Namespace) -> int:
    """What each rank runs under mpirun; rank 0 hands the pipeline's result back (bench.launch.handback)."""
    rank = launched_rank()
    try:
        import torch

        from alure.pipeline import run_pipeline  # imports torch: only where it runs
        from bench.ranks.exchange import HorovodExchange  # imports torch and Horovod: rank side only
        exchange = HorovodExchange(args.mode)
        rank = exchange.rank
        torch.set_num_threads(threads_per_rank(exchange.size))
        result = run_pipeline(workload(args.preset, args.seed), exchange, args.graph_strategy)
        hand_back(args.results, rank, result if rank == 0 else None)
        exchange.shutdown()
    except BaseException as err:  # noqa: BLE001 - the launcher reports the failing rank's reason
        hand_back_failure(args.results, rank, err)
        sys.stderr.flush()
        os._exit(1)  # a rank that fails mid-collective would leave its peers waiting: end now
    return 0


def format_result(result: dict, np_: int, mode: str) -> str:
    recall_key = next(k for k in result if k.startswith("recall_at_"))
    lines = [f"ALURE pipeline, np={np_}" + (f", {mode}" if np_ > 1 else ", one process")
             + f", k-NN graph by {result['graph_strategy']}",
             f"  training loss           {result['loss_start']:.4f} -> {result['loss_end']:.4f}",
             f"  neighbour precision@10  {result['neighbor_precision_at_10']:.3f}",
             f"  {recall_key.replace('_at_', '@'):24}" + "  ".join(f"{k} {v:.3f}" for k, v in result[recall_key].items()),
             "  stage seconds           " + "  ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())]
    return "\n".join(lines)


def cmd_pipeline(args: argparse.Namespace) -> int:
    if args.rank_entry:
        return rank_entry(args)
    if args.np < 1:
        raise UsageError(f"--np must be at least 1 (got {args.np})")
    config = workload(args.preset, args.seed)  # a bad preset fails here, before any rank starts
    launcher = launcher_from_args(args)
    check_fits(launcher, [args.np])
    if not launcher.hosts or shares_one_machine(list(launcher.hosts)):  # remote hosts' memory is not ours
        check_launch(args.np, rank_floor_mib(config), this_host(), flag="--np",
                     ranks_per_core=args.oversubscribe_limit, what=f", preset {args.preset}")
    if args.np == 1 and not launcher.hosts:
        result = run_local(args.preset, args.seed, args.graph_strategy)
    else:
        result = run_distributed(args.np, args.preset, args.seed, args.mode, args.timeout,
                                 args.graph_strategy, launcher)
    print(json.dumps(result, indent=2) if args.json else format_result(result, args.np, args.mode))
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run the ALURE pipeline (train, refresh, similarity graph, ads retrieval) "
                                        "and print its quality and stage times")
    p.add_argument("--np", type=int, default=1, help="MPI processes (1: one plain process, no MPI)")
    p.add_argument("--preset", default="default", help=f"workload preset: {', '.join(PRESETS)}")
    # The later stages read the tables whole (refresh embeds every user): the data-parallel modes only.
    p.add_argument("--mode", default="dense-reduce", choices=[m for m in MODES if m not in SHARDED_MODES],
                   help="gradient exchange when np > 1")
    p.add_argument("--graph-strategy", default=DEFAULT_GRAPH_STRATEGY, choices=GRAPH_STRATEGIES,
                   help="exact k-NN across ranks: ring passes embedding blocks between neighbours (memory per rank "
                        "falls with np), replicate allgathers them all (same graph either way)")
    p.add_argument("--seed", type=int, help="seed of the world and the weights (default: the preset's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a multi-rank run is killed")
    add_oversubscribe_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (the names of docs/design.md)")
    add_host_flags(p)
    p.add_argument("--rank-entry", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)  # with --rank-entry: the folder ranks hand back in
    p.set_defaults(func=cmd_pipeline)


if __name__ == "__main__":
    from bench.cli import main
    sys.exit(main(["pipeline", *sys.argv[1:]]))
