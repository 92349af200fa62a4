"""`alure-bench calibrate`: measure this host's collectives and file the fit where the `auto` mode will find it.

Runs `alure-bench comm` (one backend, allreduce, allgather and sparse-pair) at each of --nps ranks on this host (or
over --hosts: TCP between the emulated cluster's hosts, which share this machine's identity), fits
a, b and g per transport with their fit quality (bench.model.calibration.fit_links_by_transport), and writes one calibration
per transport into the calibration folder (--out, else ALURE_BENCH_CALIBRATIONS, else <user cache>/alure-bench/
calibrations), keyed by this host's CPU model, cores, MPI library and the transport (bench.model.calibration_store). The
comm results stay beside it (comm/<time>/np<P>/) so the fit can be redone. With --results SWEEP the CPU costs around
the collectives are fitted from that sweep too; without, they stay the built-in ones and the file says so.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bench.cli.comm import host_layout, results_dir, run_comm
from bench.errors import UsageError
from bench.host import physical_cores
from bench.launch.hosts import add_host_flags
from bench.model.calibration import fit_links_by_transport, read_comm_rows
from bench.model.calibration_store import default_folder, save_calibration, this_host
from bench.model.step import build_model
from bench.model.table_costs import DEFAULT_COSTS
from bench.plan.capacity import positive_int
from bench.plan.comm_config import BACKENDS, CommConfig, parse_numbers, parse_size
from bench.results.records import ensure_writable

OPS = ("allreduce", "allgather", "sparse-pair", "alltoall")
"""What the fit needs: allreduce and allgather are fitted, sparse-pair is held out and predicted; alltoall gives the
all-to-all its own a and b (bench.model.calibration.fit_alltoall), which auto prices sharding with."""


def format_calibration(cal) -> str:
    """One calibration and its fit quality, in one line."""
    link, q = cal.link, cal.quality
    gbs = f"{1 / link.beta_s_per_byte / 1e9:.2f} GB/s" if link.beta_s_per_byte > 0 else "inf GB/s"
    held = (f"; held-out sparse-pair rows: median |error| {q.holdout_median_rel_error:.0%}"
            if q.holdout_median_rel_error is not None else "")
    return (f"{cal.transport}: a = {link.alpha_s * 1e6:.1f} us, b = {link.beta_s_per_byte * 1e9:.3f} ns/B ({gbs}), "
            f"g = {link.gamma_s_per_byte * 1e9:.3f} ns/B; {q.rows} {cal.backend} allreduce/allgather rows at np "
            f"{','.join(map(str, q.nps))}: R^2 {q.r2:.3f}, median |error| {q.median_rel_error:.0%}, max "
            f"{q.max_rel_error:.0%}{held}"
            + (f"; {q.within_burst_rows} rows within the link shaper's burst left out" if q.within_burst_rows else "")
            + (f"; all-to-all a = {cal.alltoall.alpha_s * 1e6:.1f} us, b = {cal.alltoall.beta_s_per_byte * 1e9:.3f} "
               f"ns/B from {cal.alltoall_rows} alltoall rows" if cal.alltoall else ""))


def link_check(cal, rows: list[dict]) -> str | None:
    """The fitted bandwidth beside the link's rate as configured (tc, recorded by comm across shaped hosts): at P = 2
    a ring moves its bytes over that one link, so 1/b should land near it. None without a configured rate."""
    rates = sorted({r["link_rate_gbps"] for r in rows
                    if r.get("link_rate_gbps") and r.get("transport") == cal.transport})
    if not rates or cal.link.beta_s_per_byte <= 0:
        return None
    fitted = 8 / cal.link.beta_s_per_byte / 1e9
    several = "" if len(rates) == 1 else " (rows of several rates fitted together)"
    return (f"{cal.transport}: fitted bandwidth {fitted:.3g} Gb/s against the link's "
            f"{', '.join(f'{r:g}' for r in rates)} Gb/s as configured (tc): {fitted / rates[0]:.2f} of it{several}")


def comm_configs(args: argparse.Namespace) -> list:
    """One CommConfig per rank count, all checked before anything is measured."""
    nps = parse_numbers(args.nps, int, "--nps")
    if any(p < 2 for p in nps):
        raise UsageError(f"--nps {args.nps}: a link needs at least 2 ranks; give counts of 2 or more, e.g. 2,3,4")
    layout = host_layout(args, nps)
    return [CommConfig(np=p, backends=(args.backend,), ops=OPS, min_bytes=parse_size(args.min_bytes, "--min-bytes"),
                       max_bytes=parse_size(args.max_bytes, "--max-bytes"), warmup=args.warmup, iters=args.iters,
                       rounds=args.rounds, **layout) for p in sorted(set(nps))]


def cpu_costs(results: Path | None, comm_dir: Path, backend: str):
    """The per-byte CPU costs `auto` decides with besides the link: from the sweep in `results`, else built in."""
    if results is None:
        return replace(DEFAULT_COSTS, source=f"CPU work per byte built in ({DEFAULT_COSTS.source})")
    costs = build_model(results, comm_dir, backend).costs()
    return replace(costs, source=f"CPU work per byte fitted to the sweep {results}")


def cmd_calibrate(args: argparse.Namespace) -> int:

    configs = comm_configs(args)
    results = Path(args.results) if args.results else None
    if results is not None and not (results / "points").is_dir():
        raise UsageError(f"--results {results} is not a sweep folder (no points/): give a folder written by "
                         f"`alure-bench sweep`, or leave --results out")
    folder = ensure_writable(Path(args.out) if args.out else default_folder())
    comm_root = folder / "comm" / f"{datetime.now():%Y%m%d-%H%M%S}"
    failed = []
    for cfg in configs:
        print(f"calibrate: comm on {cfg.np} ranks ({cfg.backends[0]}) ...", file=sys.stderr, flush=True)
        if run_comm(cfg, results_dir(str(comm_root / f"np{cfg.np}"), "comm")) != 0:
            failed.append(cfg.np)
    if len(failed) == len(configs):
        raise UsageError(f"comm failed at every rank count ({', '.join(map(str, failed))}): see its messages above; "
                         f"`alure-bench comm --np 2 --backends {args.backend}` shows the same failure alone")
    rows = read_comm_rows(comm_root)
    fits = fit_links_by_transport(rows, args.backend, source=str(comm_root))
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    cpu = cpu_costs(results, comm_root, args.backend)
    print()
    for transport, cal in fits.items():
        identity = this_host(transport)
        costs = replace(cpu, link=cal.link, alltoall_link=cal.alltoall, source=f"link fitted by `alure-bench calibrate` on "
                                                     f"{identity.describe()} from {comm_root}; {cpu.source}")
        path = save_calibration(folder, identity, cal, costs, comm_root, arguments)
        print(f"calibration {format_calibration(cal)}")
        check = link_check(cal, rows)
        if check:
            print(check)
        print(f"wrote {path}: `auto` on this host over {transport} decides with it")
    if any(c.np > _cores() for c in configs):
        print(f"note: rank counts above this host's {_cores()} cores time-share them (oversubscribed, flagged in "
              f"the comm rows): their latencies include waiting for a core")
    if failed:
        print(f"comm failed at np {', '.join(map(str, failed))}: the fit uses the other rank counts")
        return 1
    return 0


def _cores() -> int:
    return physical_cores()


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this host's collectives (comm at --nps ranks), fit a, b, g per "
                                         "transport and file them for the auto mode",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--nps", default="2", help="comma list of rank counts to run comm at (default 2; e.g. 2,3,4)")
    p.add_argument("--backend", default="horovod", choices=BACKENDS,
                   help="the backend to fit (default horovod: what the exchange modes run on)")
    p.add_argument("--min-bytes", default="1K", help="smallest size (default 1K)")
    p.add_argument("--max-bytes", default="64M", help="largest size (default 64M)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed iterations per point (default 5)")
    p.add_argument("--iters", type=positive_int, default=30, help="timed iterations per point (default 30)")
    p.add_argument("--rounds", type=positive_int, default=2, help="launches per rank count, iterations pooled (default 2)")
    p.add_argument("--results", metavar="SWEEP", help="a sweep folder to fit the CPU costs around the collectives "
                                                      "from (default: the built-in ones)")
    p.add_argument("--out", metavar="DIR", help="calibration folder (default $ALURE_BENCH_CALIBRATIONS, else "
                                                "~/.cache/alure-bench/calibrations)")
    add_host_flags(p)
    p.set_defaults(func=cmd_calibrate)
