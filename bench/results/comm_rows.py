"""The rows `alure-bench comm` and `alure-bench crossover` write (the names of docs/design.md "Results"), built from
what the ranks handed back, and the tables and ratios printed from them."""
from __future__ import annotations

import statistics

from bench.host import is_oversubscribed, physical_cores
from bench.plan.sizes import format_bytes
from bench.results.scaling import busbw_factor, slowest_rank_per_step, spread

ROW_FIELDS = ("backend", "op", "np", "size_bytes", "latency_us_median", "latency_us_min", "latency_us_max",
              "algbw_gbps", "busbw_gbps")
"""The comm row names of docs/design.md "Results": other parts rely on them."""
LAUNCH_FIELDS = ("setting", "single_copy_mechanism", "allocator", "horovod_cycle_time_ms",
                 "horovod_fusion_threshold_bytes", "horovod_cache_capacity", "horovod_autotune")
"""What a row ran with (bench.launch.environment.launch_settings, read by the ranks from their own environment); `setting`
is A, or B under --compare-env."""
EXTRA_FIELDS = ("bytes_moved", "tensors", "warmup", "iters", "rounds", "oversubscribed", "minor_faults_per_call",
                "caller_busy_fraction", *LAUNCH_FIELDS)
"""Extra columns: bytes_moved is the S of algbw (differs from size_bytes only for sparse-pair and sizes P does not
divide); tensors is how many tensors an allreduce was split into (1 unless --tensors); iters is the timed iterations
pooled over `rounds` launches of the backend, each with `warmup` untimed ones first; minor_faults_per_call is the
largest rank's page faults per timed call and caller_busy_fraction the largest rank's CPU time of the calling
thread over the timed wall time (both the mean over launches); then the launch fields."""
CROSSOVER_FIELDS = ("np", "density", "rows_touched_per_rank", "nnz_per_rank", "mode", "time_ms_median", "time_ms_p10",
                    "time_ms_p90", "bytes_sent_per_rank", "bytes_held_per_rank", "oversubscribed")
RATIO_TARGETS = {"allreduce": 0.8, "allgather": 0.7, "sparse-pair": 0.7}
"""The fraction of raw MPI's busbw Horovod should reach per op from RATIO_FROM_BYTES up (a benchmark target,
printed, never asserted)."""
RATIO_FROM_BYTES = 1 << 20


def comm_row(backend: str, op: str, np: int, size_bytes: int, bytes_moved: int, times_s: list[float], *,
             tensors: int = 1, warmup: int = 0, rounds: int = 1, oversubscribed: bool = False,
             launch: dict | None = None, setting: str = "A", minor_faults_per_call: float | None = None,
             caller_busy_fraction: float | None = None) -> dict:
    """One comm row from the per-iteration times (already the rank maximum), with what it ran with."""
    median = statistics.median(times_s)
    algbw = bytes_moved / median / 1e9
    return {"backend": backend, "op": op, "np": np, "size_bytes": size_bytes,
            "latency_us_median": round(median * 1e6, 3), "latency_us_min": round(min(times_s) * 1e6, 3),
            "latency_us_max": round(max(times_s) * 1e6, 3), "algbw_gbps": float(f"{algbw:.6g}"),
            "busbw_gbps": float(f"{algbw * busbw_factor(op, np):.6g}"), "bytes_moved": bytes_moved, "tensors": tensors,
            "warmup": warmup, "iters": len(times_s), "rounds": rounds, "oversubscribed": oversubscribed,
            "minor_faults_per_call": None if minor_faults_per_call is None else round(minor_faults_per_call, 1),
            "caller_busy_fraction": None if caller_busy_fraction is None else round(caller_busy_fraction, 3),
            "setting": setting, **{k: (launch or {}).get(k, "") for k in LAUNCH_FIELDS if k != "setting"}}


def busbw_ratios(rows: list[dict], num: str = "horovod", den: str = "mpi4py", op: str = "allreduce",
                 setting: str = "A") -> list[dict]:
    """busbw of `num` over `den` per size, for the sizes both have (same run, same np, same setting): from the
    median latencies (the figure), and from the minimum ones (what each reached at best; on a shared machine,
    noise only adds)."""
    return _ratios(rows, op, (num, setting), (den, setting))


def setting_ratios(rows: list[dict], backend: str, op: str) -> list[dict]:
    """busbw under setting B over setting A for one backend and op, per size (--compare-env)."""
    return _ratios(rows, op, (backend, "B"), (backend, "A"))


def _ratios(rows: list[dict], op: str, num: tuple[str, str], den: tuple[str, str]) -> list[dict]:
    by = {(r["backend"], r.get("setting", "A"), r["size_bytes"]): r for r in rows if r["op"] == op}
    out = []
    for (backend, setting, size), r in sorted(by.items(), key=lambda kv: kv[0][2]):
        other = by.get((*den, size))
        if (backend, setting) == num and other and other["busbw_gbps"] > 0:
            out.append({"op": op, "size_bytes": size, "numerator": num[0], "denominator": den[0],
                        **({"numerator_setting": num[1], "denominator_setting": den[1]} if num[1] != den[1] else {}),
                        "busbw_ratio": round(r["busbw_gbps"] / other["busbw_gbps"], 4),
                        "busbw_ratio_at_min_latency": round(other["latency_us_min"] / r["latency_us_min"], 4)})
    return out


def crossover_density(densities, sparse_s, dense_s) -> float | None:
    """The density where sparse-gather's time meets dense-reduce's, by linear interpolation between the two measured
    densities around the first point (from low density up) where sparse stops being faster; None when it never
    does in range (sparse faster throughout) or is never faster (dense faster throughout)."""
    points = sorted(zip(densities, sparse_s, dense_s))
    diffs = [(d, s - t) for d, s, t in points]
    if diffs and diffs[0][1] >= 0:
        return diffs[0][0] if diffs[0][1] == 0 else None
    for (d0, g0), (d1, g1) in zip(diffs, diffs[1:]):
        if g0 < 0 <= g1:
            return d0 + (0 - g0) * (d1 - d0) / (g1 - g0)
    return None


def describe_crossover(densities, sparse_s, dense_s, rows: int) -> str:
    x = crossover_density(densities, sparse_s, dense_s)
    if x is not None:
        return f"density {x:.4g} ({x * rows:.0f} rows per rank)"
    faster = "sparse-gather" if all(s < t for s, t in zip(sparse_s, dense_s)) else "dense-reduce"
    return f"none in range ({faster} faster at every density from {min(densities):g} to {max(densities):g})"


def crossover_rows(records: list[dict], np: int) -> list[dict]:
    """Rows per (density, mode) from the ranks' records: times are the slowest rank's per iteration; bytes the
    largest rank's."""
    rows = []
    for points in zip(*(r["results"] for r in records)):
        p = points[0]
        for mode in ("sparse-gather", "dense-reduce"):
            times = spread(slowest_rank_per_step([q["times_s"][mode] for q in points]))
            rows.append({"np": np, "density": p["density"], "rows_touched_per_rank": p["rows_touched_per_rank"],
                         "nnz_per_rank": p["nnz_per_rank"], "mode": mode,
                         "time_ms_median": round(times["median"] * 1e3, 4),
                         "time_ms_p10": round(times["p10"] * 1e3, 4),
                         "time_ms_p90": round(times["p90"] * 1e3, 4),
                         "bytes_sent_per_rank": max(q["bytes_sent_per_rank"][mode] for q in points),
                         "bytes_held_per_rank": max(q["bytes_held_per_rank"][mode] for q in points),
                         "oversubscribed": is_oversubscribed(np)})
    return rows


def format_comm_table(rows: list[dict], ratios: dict[int, float] | None = None, vs: str = "mpi4py") -> str:
    """One backend and op: size, latency median/min/max, algbw, busbw (and a ratio per size where given)."""
    r0 = rows[0]
    flag = f"  [OVERSUBSCRIBED: {r0['np']} ranks on {physical_cores()} cores]" if r0["oversubscribed"] else ""
    split = f", allreduce split into {r0['tensors']} tensors" if r0["tensors"] > 1 else ""
    runs = f" over {r0['rounds']} launches" if r0.get("rounds", 1) > 1 else ""
    setting = f"  [setting {r0['setting']}]" if r0.get("setting", "A") != "A" else ""
    lines = [f"{r0['backend']} {r0['op']}  np={r0['np']}  ({r0['iters']} timed iterations{runs}, "
             f"{r0['warmup']} warm-up per launch{split}){setting}{flag}",
             f"{'size':>9} {'lat med us':>11} {'min us':>10} {'max us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"
             f" {'faults/call':>11} {'busy':>5}" + (f" {'vs ' + vs:>9}" if ratios else "")]
    for r in rows:
        line = (f"{format_bytes(r['size_bytes']):>9} {r['latency_us_median']:11.1f} {r['latency_us_min']:10.1f} "
                f"{r['latency_us_max']:10.1f} {r['algbw_gbps']:11.3f} {r['busbw_gbps']:11.3f}"
                + (f" {r['minor_faults_per_call']:11.1f} {r['caller_busy_fraction']:5.2f}"
                   if r.get("minor_faults_per_call") is not None else f" {'-':>11} {'-':>5}"))
        if ratios:
            ratio = ratios.get(r["size_bytes"])
            line += f" {ratio:9.2f}" if ratio is not None else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def ratio_verdict(ratios: list[dict]) -> str:
    """The plain sentence about Horovod vs raw MPI for one op from RATIO_FROM_BYTES up (judged on the medians)."""
    op = ratios[0]["op"] if ratios else "allreduce"
    target = RATIO_TARGETS.get(op)
    big = [r for r in ratios if r["size_bytes"] >= RATIO_FROM_BYTES]
    if target is None:  # all-to-all: measured, no target set
        parts = ", ".join(f"{format_bytes(r['size_bytes'])} {r['busbw_ratio']:.2f}" for r in big or ratios)
        return f"Horovod/MPI (mpi4py) {op} busbw, same run, from median latencies: {parts} (no target set)"
    if not big:
        return (f"Horovod/MPI {op} busbw: no size >= {format_bytes(RATIO_FROM_BYTES)} with both backends "
                f"in this run")
    parts = ", ".join(f"{format_bytes(r['size_bytes'])} {r['busbw_ratio']:.2f} [{r['busbw_ratio_at_min_latency']:.2f}]"
                      for r in big)
    below = [r for r in big if r["busbw_ratio"] < target]
    verdict = (f"BELOW {target} at {', '.join(format_bytes(r['size_bytes']) for r in below)}" if below
               else f"at or above {target} at every size >= {format_bytes(RATIO_FROM_BYTES)}")
    return (f"Horovod/MPI (mpi4py) {op} busbw, same run, from median latencies [from minimum latencies]: "
            f"{parts}; {verdict}")


def format_compare_table(rows: list[dict], backend: str, op: str) -> str:
    """Setting A against setting B for one backend and op, size by size, with B/A of busbw."""
    by = {(r["setting"], r["size_bytes"]): r for r in rows if r["backend"] == backend and r["op"] == op}
    ratios = {r["size_bytes"]: r for r in setting_ratios(rows, backend, op)}
    lines = [f"{backend} {op}: busbw GB/s under A and B, interleaved launches [B/A from minimum latencies]",
             f"{'size':>9} {'A':>9} {'B':>9} {'B/A':>6} {'[min]':>7} {'A faults/call':>13} {'B faults/call':>13}"]
    for size in sorted({s for _, s in by}):
        a, b, q = by.get(("A", size)), by.get(("B", size)), ratios.get(size)
        if a and b and q:
            lines.append(f"{format_bytes(size):>9} {a['busbw_gbps']:9.3f} {b['busbw_gbps']:9.3f} "
                         f"{q['busbw_ratio']:6.2f} [{q['busbw_ratio_at_min_latency']:5.2f}] "
                         f"{a['minor_faults_per_call'] or 0:13.1f} {b['minor_faults_per_call'] or 0:13.1f}")
    return "\n".join(lines)


def format_crossover_table(rows: list[dict]) -> str:
    np = rows[0]["np"]
    flag = f"  [OVERSUBSCRIBED: {np} ranks on {physical_cores()} cores]" if rows[0]["oversubscribed"] else ""
    lines = [f"sparse-gather vs dense-reduce, Horovod, np={np}{flag}",
             f"{'density':>8} {'rows/rank':>9} {'sparse ms':>10} {'dense ms':>10} {'sparse MiB held':>15} "
             f"{'dense MiB held':>14} {'faster':>13}"]
    pairs = {}
    for r in rows:
        pairs.setdefault(r["density"], {})[r["mode"]] = r
    for density, m in sorted(pairs.items()):
        s, d = m["sparse-gather"], m["dense-reduce"]
        faster = "sparse-gather" if s["time_ms_median"] < d["time_ms_median"] else "dense-reduce"
        lines.append(f"{density:8.4g} {s['rows_touched_per_rank']:9d} {s['time_ms_median']:10.2f} "
                     f"{d['time_ms_median']:10.2f} {s['bytes_held_per_rank'] / 2**20:15.2f} "
                     f"{d['bytes_held_per_rank'] / 2**20:14.2f} {faster:>13}")
    return "\n".join(lines)
