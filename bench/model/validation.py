"""The cost model out of sample: fit it on some of a sweep's points (and comm rows), predict the points it never saw.

A split names what the model is fitted on and what it must predict:
    np<=2 -> np>=3        sweep points and comm rows at np <= 2 on one host; predicts np >= 3 on one host
    weak -> strong        the weak points (and every one-host comm row); predicts the strong points
    one host -> hosts     the one-host points and shared-memory comm rows, with each link between hosts fitted to the
                          TCP comm rows recorded at its rate; predicts the points whose ranks ran on several hosts
Per mode (and link): the median and the largest |predicted / measured - 1| over the held-out points (medians over
repeats). Each sweep's points are predicted from its own np=1 points where the split trains on them (records tagged
with `SWEEP_KEY`): like an efficiency, a prediction divides by the baseline measured in the same run, since on a
shared machine a whole recording can run faster or slower than another.
A split that has nothing to fit on or nothing to predict is reported as not run, saying why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.host import np_label
from bench.model.calibration import fit_link, row_transport
from bench.model.profile import profile_from_records
from bench.model.step import Machine, Model, auto_sharded_tables, fit_local_work, this_machine

COMPUTE_PHASES = ("data", "forward", "backward")
"""The phases the model's compute stands for (bench.model.profile: the np=1 compute)."""
SWEEP_KEY = "sweep_dir"
"""The key that tags a record with the sweep folder it came from (`tag_sweep`); untagged records are one sweep."""


def tag_sweep(records: list[dict], folder) -> list[dict]:
    """The records of the sweep in `folder`, each tagged with it, for validate()."""
    return [dict(r, **{SWEEP_KEY: str(folder)}) for r in records]


def record_transport(record: dict) -> str:
    """What a point's ranks exchanged through: its own `transport` field, else 'tcp' when its ranks ran on several
    hosts, else 'shared-memory'."""
    if record.get("transport") == "tcp" or len(set(record.get("hosts") or [])) > 1:
        return "tcp"
    return "shared-memory"


def record_link_gbps(record: dict) -> float | None:
    """The rate of the link between a point's hosts as tc configured it (recorded with the point); None on one host
    or where the record does not say."""
    if record_transport(record) != "tcp":
        return None
    return (record.get("link") or {}).get("rate_gbps")


def _one_host(record: dict) -> bool:
    return record_transport(record) != "tcp"


@dataclass(frozen=True, slots=True)
class Split:
    """What the model is fitted on and what it must predict."""

    name: str
    train: Callable[[dict], bool]
    """Sweep records the model is fitted on (np=1 compute, CPU work around the collectives)."""
    comm: Callable[[dict], bool]
    """comm rows the one-host link (a, b, g) is fitted on."""
    test: Callable[[dict], bool]
    """Sweep records it predicts."""


SPLITS = (
    Split("np<=2 -> np>=3", train=lambda r: r["np"] <= 2 and _one_host(r),
          comm=lambda row: row["np"] <= 2, test=lambda r: r["np"] >= 3 and _one_host(r)),
    Split("weak -> strong", train=lambda r: r["point"]["scaling"] == "weak" and _one_host(r),
          comm=lambda row: True, test=lambda r: r["point"]["scaling"] == "strong" and _one_host(r)),
    Split("one host -> hosts", train=_one_host, comm=lambda row: True, test=lambda r: not _one_host(r)),
)
POINT_COLUMNS = ["split", "scaling", "mode", "np", "hosts", "transport", "link_gbps", "batch_per_rank",
                 "oversubscribed", "repeats", "measured_ms", "predicted_ms", "rel_error", "measured_peak_mib",
                 "predicted_peak_mib", "peak_rel_error", "measured_compute_ms", "predicted_compute_ms",
                 "rel_error_with_measured_compute"]
SUMMARY_COLUMNS = ["split", "link", "oversubscribed", "mode", "points", "nps", "median_abs_rel_error",
                   "max_abs_rel_error", "median_abs_peak_error", "max_abs_peak_error",
                   "median_abs_rel_error_with_measured_compute", "median_compute_ratio"]
TARGET_MEDIAN_ERROR = 0.25
"""A held-out group (split, link, oversubscribed or not, mode) validates the model where the median |predicted /
measured - 1| of its step times is within this; `validated_range` counts only those groups."""


@dataclass(frozen=True, slots=True)
class Validation:
    """The held-out points of every split, their errors per mode, and the splits that could not run."""

    points: pd.DataFrame
    """POINT_COLUMNS: one row per held-out (split, scaling, mode, np, batch)."""
    summary: pd.DataFrame
    """SUMMARY_COLUMNS: per split, link between hosts ('' on one host) and mode."""
    fits: dict
    """Split -> what the model was fitted on: sweep points, comm rows and their np, the fitted link."""
    not_run: dict
    """Split -> why it did not run."""


def held_out_points(models: dict, machines: dict, records: list[dict], split: str) -> list[dict]:
    """Each held-out (sweep, scaling, mode, np, batch, link) point: the median of its repeats beside the step time
    of its sweep's model (`models`: sweep -> Model) on the machine of its link (`machines`: link rate -> Machine,
    None for one host), and its peak resident set per rank (`peak_rss_mib`, the largest rank's) beside the model's
    memory."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r.get(SWEEP_KEY, ""), r["point"]["scaling"], r["point"]["mode"], r["np"], r["batch_per_rank"],
               record_transport(r), record_link_gbps(r))
        groups.setdefault(key, []).append(r)
    rows = []
    for (sweep, scaling, mode, p, batch, transport, link), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        measured = float(np.median([r["metrics"]["step_time_ms"] for r in group]))
        try:
            predicted = models[sweep].step(machines[link], p, mode, batch,
                                           auto_sharded=auto_sharded_tables(group[0]))
        except ValueError:  # a mode the model does not price
            continue
        peak = float(np.median([r["metrics"]["peak_rss_mib"] for r in group]))
        # The slowest rank's data + forward + backward per step, as measured (the phases of `build_record`), less the
        # exchange's own work inside them (`work_ms`: the hooks' work, and the sharded tables' all-to-all fetch in the
        # forward), which the model prices as exchange: put in place of the model's compute, it tells a miss of the
        # compute (time-sharing) from one of the exchange.
        compute = float(np.median([sum(r["metrics"]["phase_ms"][ph] for ph in COMPUTE_PHASES)
                                   - r["metrics"].get("work_ms", 0.0) for r in group]))
        given_compute = predicted.step_ms - predicted.compute_ms + compute
        rows.append({"split": split, "scaling": scaling, "mode": mode, "np": p,
                     "hosts": max(len(set(r.get("hosts") or [])) for r in group) or 1, "transport": transport,
                     "link_gbps": link,
                     "batch_per_rank": batch, "oversubscribed": any(r.get("oversubscribed") for r in group),
                     "repeats": len(group), "measured_ms": measured, "predicted_ms": predicted.step_ms,
                     "rel_error": predicted.step_ms / measured - 1, "measured_peak_mib": peak,
                     "predicted_peak_mib": predicted.memory_bytes / 2**20,
                     "peak_rel_error": predicted.memory_bytes / 2**20 / peak - 1,
                     "measured_compute_ms": compute, "predicted_compute_ms": predicted.compute_ms,
                     "rel_error_with_measured_compute": given_compute / measured - 1})
    return rows


def run_split(split: Split, records: list[dict], comm_rows: list[dict], backend: str = "horovod",
              environment: dict | None = None) -> tuple[list[dict], dict]:
    """Fit on the split's training points and comm rows; predict its held-out points. Raises UsageError (saying
    why) when it cannot run."""
    ok = [r for r in records if r["status"] == "ok"]
    train = [r for r in ok if split.train(r)]
    test = [r for r in ok if split.test(r)]
    if not test:
        raise UsageError("no ok point of the sweep is held out by it")
    local_rows = [row for row in comm_rows if row["op"] == "memcpy"
                  or (row_transport(row) == "shared-memory" and split.comm(row))]
    calibration = fit_link(local_rows, backend, source=f"comm rows of {split.name}", transport="shared-memory")
    profile = profile_from_records(train, environment)
    # Each sweep's own np=1 profile where the split trains on its np=1 points; else the pooled one.
    sweeps = {r.get(SWEEP_KEY, "") for r in ok}
    profiles = {}
    for sweep in sweeps:
        own = [r for r in train if r.get(SWEEP_KEY, "") == sweep]
        if any(r["np"] == 1 for r in own):
            profiles[sweep] = profile_from_records(own, environment)
    machine = this_machine(calibration, profile, max(r["np"] for r in ok))
    # The CPU work around the collectives is fitted where the training points ran: on one host.
    local = fit_local_work(train, profile, calibration, machine,
                           profile_of=lambda r: profiles.get(r.get(SWEEP_KEY, ""), profile))
    models = {sweep: Model(profiles.get(sweep, profile), calibration, local) for sweep in sweeps}
    machines, networks = {None: machine}, {}
    for rate in sorted({record_link_gbps(r) for r in test if record_transport(r) == "tcp"}, key=str):
        rows = [row for row in comm_rows if row_transport(row) == "tcp" and row.get("link_rate_gbps") == rate]
        rate_name = "a link of unrecorded rate" if rate is None else f"{rate:g} Gb/s"
        if not any(row["backend"] == backend for row in rows):
            raise UsageError(f"no TCP comm rows at {rate_name} to fit the link between hosts on: add an `alure-bench "
                             f"comm` run across hosts at that rate to the calibration folder")
        # Every emulated host shares this machine's cores (ranks_per_node: all of them); each link between them is
        # fitted to the TCP comm rows recorded at its rate alone, and the points over it are predicted with it.
        networks[rate] = fit_link(rows, backend, source=f"TCP comm rows at {rate_name}", transport="tcp")
        machines[rate] = Machine(local=calibration.link, network=networks[rate].link,
                                 ranks_per_node=machine.ranks_per_node, cores_per_node=machine.cores_per_node)
    fit = {"sweep_points": len(train), "sweep_nps": sorted({r["np"] for r in train}),
           "comm_rows": calibration.quality.rows, "comm_nps": list(calibration.quality.nps),
           "link": {"alpha_us": calibration.link.alpha_s * 1e6, "beta_ns_per_byte": calibration.link.beta_s_per_byte
                    * 1e9, "gamma_ns_per_byte": calibration.link.gamma_s_per_byte * 1e9},
           "local_s_per_byte": dict(local.s_per_byte), "local_points": dict(local.points),
           "oversubscribed_points_left_out": local.oversubscribed_left_out,
           "oversubscribed_comm_rows_left_out": calibration.quality.oversubscribed_rows,
           "extra_s_per_byte": dict(local.extra_s_per_byte),
           "retained_table_copies": dict(local.retained_table_copies),
           "network_links": {rate: {"alpha_us": n.link.alpha_s * 1e6,
                                    "beta_ns_per_byte": n.link.beta_s_per_byte * 1e9,
                                    "gamma_ns_per_byte": n.link.gamma_s_per_byte * 1e9, "comm_rows": n.quality.rows,
                                    "comm_nps": list(n.quality.nps), "r2": n.quality.r2,
                                    "median_rel_error": n.quality.median_rel_error,
                                    "within_burst_rows": n.quality.within_burst_rows}
                             for rate, n in networks.items()}}
    return held_out_points(models, machines, test, split.name), fit


def validate(records: list[dict], comm_rows: list[dict], splits=SPLITS, backend: str = "horovod",
             environment: dict | None = None) -> Validation:
    """Every split that can run on these records and comm rows."""
    points, fits, not_run = [], {}, {}
    for split in splits:
        try:
            rows, fit = run_split(split, records, comm_rows, backend, environment)
        except UsageError as err:
            not_run[split.name] = str(err)
            continue
        points += rows
        fits[split.name] = fit
    table = pd.DataFrame(points, columns=POINT_COLUMNS)
    return Validation(points=table, summary=summarize_errors(table), fits=fits, not_run=not_run)


def summarize_errors(points: pd.DataFrame) -> pd.DataFrame:
    """Per split, link between hosts, oversubscribed or not, and mode: the median and largest errors."""
    rows = []
    link = points["link_gbps"].map(lambda g: "" if pd.isna(g) else f"{g:g} Gb/s")
    keys = [points["split"], link, points["oversubscribed"].astype(bool), points["mode"]]
    for (split, link_name, over, mode), g in points.groupby(keys, sort=False):
        err, peak_err = g["rel_error"].abs(), g["peak_rel_error"].abs()
        rows.append({"split": split, "link": link_name, "oversubscribed": bool(over), "mode": mode, "points": len(g),
                     "nps": ",".join(map(str, sorted(set(g["np"])))),
                     "median_abs_rel_error": float(err.median()), "max_abs_rel_error": float(err.max()),
                     "median_abs_peak_error": float(peak_err.median()), "max_abs_peak_error": float(peak_err.max()),
                     "median_abs_rel_error_with_measured_compute":
                         float(g["rel_error_with_measured_compute"].abs().median()),
                     "median_compute_ratio": float((g["measured_compute_ms"] / g["predicted_compute_ms"]).median())})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


@dataclass(frozen=True, slots=True)
class ValidatedRange:
    """Where a mode's predictions were checked out of sample and held: the held-out groups within the target."""

    nps: tuple[int, ...]
    """Rank counts of those held-out points."""
    hosts: int
    """The most hosts a point among them ran on (1: one host)."""
    links: tuple[str, ...]
    """'shared memory' and the rates ('1 Gb/s') of the links between hosts they ran over."""
    oversubscribed: bool
    """Whether any of them was oversubscribed."""

    def describe(self) -> str:
        nps = f"np {min(self.nps)}-{max(self.nps)}" if len(self.nps) > 1 else f"np {self.nps[0]}"
        return (f"{nps}, {'one host' if self.hosts == 1 else f'up to {self.hosts} hosts'}, "
                f"{', '.join(self.links)}{' (oversubscribed points among them)' if self.oversubscribed else ''}")


def validated_range(v: Validation, target: float = TARGET_MEDIAN_ERROR) -> dict:
    """Mode -> ValidatedRange of the held-out groups whose median step-time error is within `target` (a mode with
    none is absent): the range the predictions were validated in, read off the splits actually run."""
    held = v.summary[v.summary["median_abs_rel_error"] <= target]
    out = {}
    for mode, groups in held.groupby("mode"):
        pts = pd.concat([v.points[(v.points["split"] == g.split) & (v.points["mode"] == mode)
                                  & (v.points["oversubscribed"].astype(bool) == g.oversubscribed)
                                  & (v.points["link_gbps"].map(lambda x: "" if pd.isna(x) else f"{x:g} Gb/s")
                                     == g.link)] for g in groups.itertuples()])
        links = sorted({"shared memory" if pd.isna(x) else f"{x:g} Gb/s" for x in pts["link_gbps"]},
                       key=lambda name: (name != "shared memory", name))
        out[mode] = ValidatedRange(nps=tuple(sorted(set(int(n) for n in pts["np"]))), hosts=int(pts["hosts"].max()),
                                   links=tuple(links), oversubscribed=bool(pts["oversubscribed"].any()))
    return out


def not_validated(v: Validation, target: float = TARGET_MEDIAN_ERROR) -> pd.DataFrame:
    """The held-out groups whose median step-time error exceeds `target`: what the model failed to predict."""
    return v.summary[v.summary["median_abs_rel_error"] > target]


def format_validation(v: Validation) -> str:
    """The per-mode errors of each split, then the held-out points (np* = oversubscribed), then what did not run."""
    lines = ["out of sample (fitted on some points, predicting the others; |predicted / measured - 1|):"]
    for split, fit in v.fits.items():
        lines.append(f"  {split}: fitted on {fit['sweep_points']} sweep points at np "
                     f"{','.join(map(str, fit['sweep_nps']))} and {fit['comm_rows']} comm rows at np "
                     f"{','.join(map(str, fit['comm_nps']))}")
        for rate, n in fit["network_links"].items():
            lines.append(f"    the link between hosts {'' if rate is None else f'configured at {rate:g} Gb/s '}"
                         f"fitted to {n['comm_rows']} TCP comm rows at np {','.join(map(str, n['comm_nps']))}: a = "
                         f"{n['alpha_us']:.1f} us, b = {n['beta_ns_per_byte']:.3f} ns/B "
                         f"({8 / n['beta_ns_per_byte']:.3g} Gb/s), g = {n['gamma_ns_per_byte']:.3f} ns/B; R^2 "
                         f"{n['r2']:.3f}, median |error| {n['median_rel_error']:.0%} ({n['within_burst_rows']} rows "
                         f"within the shaper's burst left out)")
        left = fit.get("oversubscribed_points_left_out")
        if left:
            lines.append(f"    ({left} oversubscribed sweep points and {fit['oversubscribed_comm_rows_left_out']} "
                         f"oversubscribed comm rows left out of the fits)")
        for r in v.summary[v.summary["split"] == split].itertuples():
            over = (f" over {r.link}" if r.link else "") + (" (oversubscribed)" if r.oversubscribed else "")
            lines.append(f"    {r.mode:>16}{over}: {r.points} points at np {r.nps}: step time median "
                         f"{r.median_abs_rel_error:.0%}, max {r.max_abs_rel_error:.0%}; peak memory median "
                         f"{r.median_abs_peak_error:.0%}, max {r.max_abs_peak_error:.0%}; measured compute / "
                         f"model's {r.median_compute_ratio:.2f}, step error with the measured compute "
                         f"{r.median_abs_rel_error_with_measured_compute:.0%}")
    for split, why in v.not_run.items():
        lines.append(f"  {split}: not run ({why})")
    if not v.points.empty:
        t = v.points.assign(np=[np_label(n, o) for n, o in zip(v.points["np"], v.points["oversubscribed"])])
        lines += ["", t[["split", "scaling", "mode", "np", "transport", "link_gbps", "measured_ms", "predicted_ms",
                         "rel_error", "measured_peak_mib", "predicted_peak_mib", "peak_rel_error"]]
                  .to_string(index=False, float_format=lambda x: f"{x:.3g}")]
    return "\n".join(lines)
