"""`alure-bench predict`: the cost model's predictions for thousands of ranks, from a sweep and a comm calibration.

For each rank count (powers of two up to --max-np) and each mode (every fixed mode and auto; bench.model.predictions):
the step time
and its parts, weak and strong efficiency, memory per rank and whether it fits; the rank count at which sparse-gather
runs out of memory; the crossover density; how the model reproduces the sweep's own points (in sample) and, with
--validate, how it predicts points it was not fitted to (bench.model.validation). The links come from
the comm calibration, or from --latency-us/--bandwidth-gbps (a cluster's data sheet: its network then stands for
every link of the ring, a node's shared memory being no slower).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from bench.cli.calibrate import format_calibration, link_check
from bench.cli.sweep import int_list
from bench.errors import UsageError
from bench.host import np_label
from bench.model.calibration import COMM_FILES, fit_links_by_transport, network_link, read_comm_rows
from bench.model.calibration_store import now_iso
from bench.model.predictions import (
    crossover_table,
    label_extrapolation,
    measured_vs_predicted,
    prediction_table,
    rank_counts,
    workload_density,
)
from bench.model.step import Machine, Model, cpu_factor, fit_model, read_sweep
from bench.model.uncertainty import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    DEFAULT_LINK_FACTOR,
    DEFAULT_SEED,
    bootstrap_models,
    intervals,
    link_variants,
    spread,
)
from bench.model.validation import (
    TARGET_MEDIAN_ERROR,
    format_validation,
    not_validated,
    tag_sweep,
    validate,
    validated_range,
)
from bench.results.prediction_plots import write_prediction_plots
from bench.results.records import atomic_write_json, atomic_write_text, default_out, ensure_writable, read_records

DEFAULT_RESULTS = Path("results/reference")
DEFAULT_CALIBRATION = Path("results/reference-comm")
# ---- text ----------------------------------------------------------------------------------------------------------

def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer, str)):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"


def _gbs(s_per_byte: float) -> str:
    return f"{1 / s_per_byte / 1e9:.2f}" if s_per_byte > 0 else "inf"


FIT = ("_fit_low", "_fit_high")
"""Suffixes of a figure's interval from the bootstrap over what the model was fitted on (bench.model.uncertainty)."""
LINK = ("_link_low", "_link_high")
"""Suffixes of a figure's spread over the link assumption (latency and bandwidth --link-factor better and worse)."""


def _with_band(row, column: str, suffixes: tuple[str, str], digits: int = 3) -> str:
    value, low, high = row[column], row.get(column + suffixes[0]), row.get(column + suffixes[1])
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _spread(row, column: str) -> str:
    low, high = row.get(column + LINK[0]), row.get(column + LINK[1])
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "-"
    return f"{_fmt(low, 2)}..{_fmt(high, 2)}"


def _status(row) -> str:
    statuses = {row["weak_status"], row["strong_status"]} - {"ok", "batch below one group"}
    return "OUT OF MEMORY" if statuses else "ok"


def format_table(df: pd.DataFrame) -> str:
    """The predictions, each figure with its fit interval [low, high] and its link spread low..high; a step that does
    not fit in memory shows no time or efficiency; `range`: within the validated range, or why not."""
    header = ["np", "nodes", "mode", "weak ms [fit]", "weak eff [fit]", "weak eff link", "strong ms",
              "strong eff [fit]", "strong eff link", "mem GiB", "memory", "range"]
    body = [[_fmt(r["np"]), _fmt(r["nodes"]), r["mode"], _with_band(r, "weak_step_ms", FIT),
             _with_band(r, "weak_efficiency", FIT), _spread(r, "weak_efficiency"), _fmt(r["strong_step_ms"]),
             _with_band(r, "strong_efficiency", FIT), _spread(r, "strong_efficiency"), _fmt(r["memory_gib"]),
             _status(r), "extrapolation: " + r["extrapolation"] if r.get("extrapolation") else "validated"]
            for _, r in df.iterrows()]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i < len(header) - 1 else h for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(v.rjust(w) if i < len(header) - 1 else v for i, (v, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


def uncertainty_lines(args: argparse.Namespace, ranges: dict, missed: pd.DataFrame, model: Model) -> list[str]:
    """What the intervals and the range column mean, and the validated range per mode."""
    left = model.local.oversubscribed_left_out
    lines = [f"[fit]: {100 * DEFAULT_LEVEL:.0f}% interval over {args.draws} bootstrap draws (seed {args.seed}) of the "
             f"sweep's points and the comm rows, the model refitted on each; link: the figure with the link's "
             f"latency and bandwidth each {args.link_factor:g}x better and worse (an assumption's spread, not a "
             f"confidence interval)",
             f"fits: {left} oversubscribed sweep points and {model.calibration.quality.oversubscribed_rows} "
             f"oversubscribed comm rows left out (their ranks time-share cores; the model shares a core evenly "
             f"and has no term for what lock-step ranks lose beyond that)",
             f"validated range (held-out points of the validation splits run here whose median step-time error "
             f"is within {TARGET_MEDIAN_ERROR:.0%}); a prediction outside it is an extrapolation:"]
    lines += [f"  {mode}: {r.describe()}" for mode, r in sorted(ranges.items())] or ["  none"]
    if not missed.empty:
        lines.append("not validated (median step-time error above the target): " + "; ".join(
            f"{g.split}{f' over {g.link}' if g.link else ''}{' (oversubscribed)' if g.oversubscribed else ''} "
            f"{g.mode} {g.median_abs_rel_error:.0%}" for g in missed.itertuples()))
    return lines


def format_check(check: pd.DataFrame) -> str:
    t = check.assign(np=[np_label(n, o) for n, o in zip(check["np"], check["oversubscribed"])])
    cols = ["scaling", "mode", "np", "batch_per_rank", "measured_ms", "predicted_ms", "ratio", "measured_peak_rss_mib",
            "predicted_rss_mib"]
    return t[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")


def summary_lines(model: Model, machine: Machine, table: pd.DataFrame, crossover: pd.DataFrame,
                  batch_per_rank: float, global_batch: int, check: pd.DataFrame | None) -> list[str]:
    cal, q, link = model.calibration, model.calibration.quality, model.calibration.link
    lines = [
        f"calibration ({cal.backend}, {cal.source}): a = {link.alpha_s * 1e6:.1f} us, "
        f"b = {link.beta_s_per_byte * 1e9:.3f} ns/B ({_gbs(link.beta_s_per_byte)} GB/s), "
        f"g = {link.gamma_s_per_byte * 1e9:.3f} ns/B",
        f"fit: {q.rows} allreduce/allgather rows at np {','.join(map(str, q.nps))}; R^2 {q.r2:.3f}, "
        f"median |error| {q.median_rel_error:.0%}, rms {q.rms_rel_error:.0%}, max {q.max_rel_error:.0%}"
        + (f"; held-out sparse-pair rows: median |error| {q.holdout_median_rel_error:.0%}"
           if q.holdout_median_rel_error is not None else ""),
        "CPU work around the collectives (fitted to the sweep's multi-rank points): "
        + ", ".join(f"{m} {model.local.s_per_byte[m] * 1e9:.3f} ns/B"
                    + (f" ({model.local.points[m]} points, rms {model.local.rms_rel_error[m]:.0%})"
                       if model.local.points.get(m) else " (built-in default)") for m in model.local.s_per_byte)
        + "".join(f"; {m} {v * 1e9:.3f} ns/B more per byte of the rank's own sparse gradient ({model.local.points[m]} "
                  f"points, rms {model.local.rms_rel_error[m]:.0%})" for m, v in model.local.extra_s_per_byte.items()),
        *(f"memory beyond the counted tensors (fitted to the sweep's multi-rank points): {m} {v:.2f} copies of the "
          f"tables' dense size resident" for m, v in model.local.retained_table_copies.items()),
        f"workload: {model.profile.preset}, {len(model.profile.tables)} sparse tables, "
        f"{model.profile.table_bytes() / 2**20:.0f} MiB dense, {model.profile.dense_param_bytes / 2**20:.2f} MiB other "
        f"parameters; np=1 step {model.profile.compute_ms + model.profile.optimizer_ms:.0f} ms at batch "
        f"{model.profile.reference_batch}; rows touched per rank {workload_density(model):.4f} of the item tables",
        f"machine: {machine.ranks_per_node} ranks and {machine.cores_per_node} cores per node, "
        + (f"network a = {machine.network.alpha_s * 1e6:.2f} us, {8 / machine.network.beta_s_per_byte / 1e9:.0f} Gb/s, "
           f"g = {machine.network.gamma_s_per_byte * 1e9:.3f} ns/B" if machine.network
           else "this machine's links at every scale")
        + (f", {machine.memory_per_rank_bytes / 2**30:.1f} GiB per rank" if machine.memory_per_rank_bytes else "")
        + f", CPU speed-up {machine.cpu_speedup:g}, overlap {machine.overlap:g}",
        f"weak: {batch_per_rank:g} samples per rank; strong: global batch {global_batch}",
    ]
    oom = model.oom_rank_count(machine, "sparse-gather", batch_per_rank)
    cap = machine.memory_per_rank_bytes
    lines.append(f"sparse-gather (weak) runs out of memory at np = {oom}" if oom else
                 "sparse-gather (weak) fits in memory at every rank count up to 16M" if cap else
                 "no memory per rank given: no out-of-memory rank count")
    if not crossover.empty:
        parts = [f"np {int(r.np)}: " + ("none (sparse cheaper at any density)" if pd.isna(r.crossover_density)
                                        else "none (dense cheaper at any density)" if r.crossover_density == 0
                                        else f"{r.crossover_density:.3g}") for r in crossover.itertuples()]
        lines.append("crossover density (dense-reduce cheaper above it, largest table): " + ", ".join(parts))
    if check is not None and not check.empty:
        worst = check.loc[(check["ratio"] - 1).abs().idxmax()]
        lines.append(f"the sweep's own {len(check)} points (in sample: the model was fitted to them): predicted / "
                     f"measured median {check['ratio'].median():.2f}, "
                     f"worst {worst['ratio']:.2f} ({worst['scaling']} {worst['mode']} np={worst['np']})")
    return lines


# ---- command -------------------------------------------------------------------------------------------------------

def machine_from_args(args: argparse.Namespace, model: Model, environment: dict) -> Machine:
    if (args.latency_us is None) != (args.bandwidth_gbps is None):
        raise UsageError("give both --latency-us and --bandwidth-gbps (the cluster's network), or neither")
    network = None
    if args.latency_us is not None:
        # Reducing is CPU work: a faster CPU reduces faster; moving bytes is the network's.
        network = network_link(args.latency_us, args.bandwidth_gbps,
                               model.calibration.link.gamma_s_per_byte / args.cpu_speedup)
    cores_here = model.profile.measured_cores
    rpn = args.ranks_per_node or cores_here
    cores = args.cores_per_node or (rpn if network else cores_here)
    memory = args.memory_per_rank_gib * 2**30 if args.memory_per_rank_gib else None
    if memory is None and environment.get("memory_mib"):
        memory = environment["memory_mib"] * 2**20 / rpn
    return Machine(local=model.calibration.link, network=network, ranks_per_node=rpn, cores_per_node=cores,
                   memory_per_rank_bytes=memory, cpu_speedup=args.cpu_speedup, overlap=args.overlap,
                   alltoall=model.calibration.alltoall)


STRONG_FACTOR = 32
"""Default strong-scaling global batch: this many times the weak per-rank batch (rank counts that would leave a rank
less than one group of samples are left blank)."""


def default_global_batch(model: Model, batch_per_rank: int) -> int:
    return int(batch_per_rank) * STRONG_FACTOR


def cmd_predict(args: argparse.Namespace) -> int:
    results, calibration = Path(args.results), Path(args.calibration)
    for path, flag, what in ((results, "--results", "alure-bench sweep"),
                             (calibration, "--calibration", "alure-bench comm")):
        if not path.is_dir():
            raise UsageError(f"{flag} {path} is not a folder: give a folder written by `{what}`")
    if args.draws < 0 or args.link_factor < 1:
        raise UsageError(f"--draws {args.draws} and --link-factor {args.link_factor:g}: draws must be 0 or more (0: "
                         f"no fit interval) and the link factor at least 1 (1: no link spread)")
    records, environment = read_sweep(results)
    comm_rows = read_comm_rows(calibration)
    model = fit_model(records, comm_rows, environment, args.backend, source=str(calibration))
    machine = machine_from_args(args, model, environment)
    nps = rank_counts(args.max_np, args.nps)
    batch = args.batch_per_rank or model.profile.reference_batch
    group = model.profile.group_size
    global_batch = args.global_batch or default_global_batch(model, batch)
    if batch < 1 or global_batch < group:
        raise UsageError(f"--batch-per-rank {batch} and --global-batch {global_batch} must be at least one group "
                         f"({group} samples)")
    predict_on = lambda m, on: prediction_table(m, on, nps, batch, global_batch)  # noqa: E731
    table = predict_on(model, machine)
    draws = bootstrap_models(records, comm_rows, environment, args.backend, args.draws, args.seed)
    if draws:
        table = intervals(table, [predict_on(m, machine_from_args(args, m, environment)) for m in draws], FIT)
    table = spread(table, [predict_on(model, corner) for corner in link_variants(machine, args.link_factor)], LINK)
    validation = run_validation(args, results, records, comm_rows, environment)
    ranges = validated_range(validation)
    table = label_extrapolation(table, machine, ranges)
    crossover = crossover_table(model, machine, nps)
    check = measured_vs_predicted(model, results)
    out = ensure_writable(Path(args.out) if args.out else default_out("predict"))
    per_transport = fit_links_by_transport(comm_rows, args.backend, source=str(calibration))
    text = "\n".join([format_table(table), "",
                      *uncertainty_lines(args, ranges, not_validated(validation), model), "",
                      *summary_lines(model, machine, table, crossover, batch, global_batch, check),
                      *(f"calibration per transport, {format_calibration(c)}" for c in per_transport.values()),
                      *filter(None, (link_check(c, comm_rows) for c in per_transport.values())), "",
                      "the sweep's own points on the machine that measured them (in sample):", format_check(check)])
    if args.validate:
        text += "\n\n" + format_validation(validation)
    print(text)
    atomic_write_text(out / "validation.csv", validation.points.to_csv(index=False))
    atomic_write_text(out / "validation-summary.csv", validation.summary.to_csv(index=False))
    atomic_write_text(out / "prediction.csv", table.to_csv(index=False))
    atomic_write_text(out / "measured-vs-predicted.csv", check.to_csv(index=False))
    atomic_write_text(out / "crossover.csv", crossover.to_csv(index=False))
    atomic_write_json(out / "costs.json", model.costs_for(machine).as_dict() | {"created": now_iso()})
    atomic_write_json(out / "prediction.json", {
        "arguments": {k: v for k, v in vars(args).items() if k != "func"}, "results": str(results),
        "calibration": model.calibration.as_dict(), "local_work": asdict(model.local),
        "profile": model.profile.as_dict(), "machine": asdict(machine), "batch_per_rank": batch,
        "global_batch": global_batch,
        "oom_rank_count_sparse_gather": model.oom_rank_count(machine, "sparse-gather", batch),
        "cpu_factor": {p: cpu_factor(p, machine, model.profile.measured_threads) for p in nps},
        "intervals": {"fit": {"draws": args.draws, "seed": args.seed, "level": DEFAULT_LEVEL, "suffixes": FIT},
                      "link": {"factor": args.link_factor, "suffixes": LINK}},
        "validated_range": {mode: asdict(r) for mode, r in ranges.items()},
        "table": table.to_dict(orient="records"), "crossover": crossover.to_dict(orient="records"),
        "measured_vs_predicted": check.to_dict(orient="records"),
        "calibration_per_transport": {t: c.as_dict() for t, c in per_transport.items()},
        "validation": {"summary": validation.summary.to_dict(orient="records"), "fits": validation.fits,
                       "not_run": validation.not_run, "points": validation.points.to_dict(orient="records")}})
    atomic_write_text(out / "prediction.txt", text + "\n")
    plots = write_prediction_plots(table, crossover, machine.memory_per_rank_bytes, out, check,
                                   workload_density(model))
    print(f"wrote {out}/: prediction.csv, prediction.json, prediction.txt, costs.json, crossover.csv, "
          f"measured-vs-predicted.csv, validation.csv, validation-summary.csv, {', '.join(plots)}")
    return 0


def run_validation(args: argparse.Namespace, results: Path, records: list[dict], comm_rows: list[dict],
                   environment: dict):
    """The out-of-sample validation of the sweep (and --validate-with's): what the validated range is read off."""
    records, rows = tag_sweep(records, results), list(comm_rows)
    for folder in args.validate_with or []:
        more_records, more_rows = sweeps_and_comm_under(Path(folder))
        records, rows = records + more_records, rows + more_rows
    return validate(records, rows, backend=args.backend, environment=environment)


def sweeps_and_comm_under(folder: Path) -> tuple[list[dict], list[dict]]:
    """Every sweep's records under `folder` (each folder holding a sweep.json) and every comm row under it: e.g. the
    emulated cluster's results (slurm/reference_cluster.sh), a sweep and comm runs per link rate."""
    sweeps = sorted(p.parent for p in folder.rglob("sweep.json")) if folder.is_dir() else []
    if not sweeps:
        raise UsageError(f"--validate-with {folder}: no sweep folder (one with sweep.json) under it; give a folder "
                         f"written by `alure-bench sweep` or slurm/reference_cluster.sh")
    records = [r for sweep in sweeps for r in tag_sweep(read_records(sweep), sweep)]
    has_comm = any(p.name in COMM_FILES for p in folder.rglob("comm.*"))
    return records, read_comm_rows(folder) if has_comm else []


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def register(sub) -> None:
    p = sub.add_parser("predict", help="cost-model predictions for up to thousands of ranks: step time, weak and "
                                       "strong efficiency, memory, out-of-memory rank count, crossover density",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--results", default=str(DEFAULT_RESULTS), metavar="DIR",
                   help=f"sweep folder: compute, workload and the points to check against (default {DEFAULT_RESULTS})")
    p.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), metavar="DIR",
                   help=f"alure-bench comm folder the links are fitted to (default {DEFAULT_CALIBRATION})")
    p.add_argument("--backend", default="horovod", help="comm backend to calibrate from (default horovod)")
    p.add_argument("--latency-us", type=_positive_float, help="network latency, microseconds (with --bandwidth-gbps)")
    p.add_argument("--bandwidth-gbps", type=_positive_float, help="network bandwidth, Gb/s (with --latency-us)")
    p.add_argument("--ranks-per-node", type=int, help="MPI ranks per node (default: this machine's cores)")
    p.add_argument("--cores-per-node", type=int, help="cores per node (default: ranks per node with a network, "
                                                      "this machine's cores without)")
    p.add_argument("--memory-per-rank-gib", type=_positive_float, help="memory per rank, GiB (default: the "
                                                                       "measured machine's memory / ranks per node)")
    p.add_argument("--cpu-speedup", type=_positive_float, default=1.0,
                   help="how much faster a rank computes there than here (default 1)")
    p.add_argument("--overlap", type=_positive_float, default=0.0,
                   help="share of the backward pass that hides exchange time, 0..1 (default 0: CPU-bound)")
    p.add_argument("--max-np", type=int, default=4096, help="largest rank count (default 4096)")
    p.add_argument("--nps", type=int_list, help="extra rank counts, e.g. 400,1200")
    p.add_argument("--batch-per-rank", type=int, help="weak scaling's per-rank batch (default: the sweep's np=1)")
    p.add_argument("--global-batch", type=int, help=f"strong scaling's global batch (default: {STRONG_FACTOR} x the "
                                                    f"per-rank batch)")
    p.add_argument("--validate", action="store_true",
                   help="also print the validation (fitted on part of the points, predicting the rest: np<=2 -> "
                        "np>=3, weak -> strong, one host -> several hosts) point by point; it always runs, since the "
                        "validated range is read off it (bench.model.validation)")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS,
                   help=f"bootstrap draws for the fit intervals (default {DEFAULT_DRAWS}; 0: none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"the bootstrap's seed (default {DEFAULT_SEED})")
    p.add_argument("--link-factor", type=_positive_float, default=DEFAULT_LINK_FACTOR,
                   help=f"the link spread: latency and bandwidth this many times better and worse (default "
                        f"{DEFAULT_LINK_FACTOR:g}; 1: none)")
    p.add_argument("--validate-with", action="append", metavar="DIR",
                   help="a folder of more sweeps and comm runs whose points are held out too, e.g. "
                        "results/reference-cluster (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output folder (default results/local/predict-<time>)")
    p.set_defaults(func=cmd_predict)
