"""`alure-bench sweep | run | report`: flags and TOML files into a SweepConfig, then bench.run.sweep and
bench.results.report."""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import replace
from pathlib import Path

from alure.config import PRESETS
from bench.errors import MachineFault, UsageError
from bench.launch.hosts import (
    add_host_flags,
    check_fits,
    launcher_from_args,
    load_layout,
    save_layout,
    shares_one_machine,
)
from bench.launch.interrupts import INTERRUPTED_EXIT_CODE, signals_ignored
from bench.launch.mpirun import LOCAL, Launcher
from bench.model.calibration import read_comm_rows
from bench.model.row_price import COMM_ROWS_ENV, rows_named
from bench.plan.capacity import add_oversubscribe_flag, check_sweep
from bench.plan.comm_config import format_env_setting, parse_env_setting
from bench.plan.config import MODES, SweepConfig
from bench.plan.workload import workload_config
from bench.results.folder_lock import exclusive_writer
from bench.results.records import default_out, ensure_writable
from bench.results.report import efficiency_table, write_report
from bench.run.sweep import load_sweep_config, run_sweep, start_sweep


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 1,2,4")


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. sampled_negatives=4096")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# flag -> SweepConfig field; one table so `sweep` and `run` accept the same words.
SHARED_FLAGS = {"preset": "preset", "steps": "steps", "warmup": "warmup_steps", "timeout": "timeout_s",
                "mem_limit": "mem_limit_mib", "threads": "threads_per_rank", "seed": "seed",
                "batch_per_rank": "batch_per_rank", "global_batch": "global_batch",
                "train_mem_limit": "train_mem_limit_mib", "retries": "retries"}


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"workload preset: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, help="timed steps per point (default 20)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per point (default 3)")
    p.add_argument("--timeout", type=float, help="seconds before a point is killed and recorded as timeout")
    p.add_argument("--mem-limit", type=int, metavar="MIB",
                   help="per-rank memory cap in MiB, enforced by the kernel (RLIMIT_DATA); past it: status oom")
    p.add_argument("--train-mem-limit", type=int, metavar="MIB",
                   help="per-rank cap in MiB on what training adds once the workload is built (RLIMIT_DATA above "
                        "the built data segment); past it: status oom")
    p.add_argument("--threads", type=int, help="torch threads per rank, the same at every np (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-per-rank", type=int, help="per-rank batch of weak points (default: the preset's)")
    p.add_argument("--global-batch", type=int, help="global batch of strong points (default: the preset's)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="launch a point again (after a pause) when its launch failed before any rank began to "
                        "measure, up to N times (default 0); a crash, oom or timeout is never retried")
    add_oversubscribe_flag(p)
    p.add_argument("--no-corun", dest="corun", action="store_false", default=None,
                   help="leave out the co-run baseline points of a sweep (P independent np=1 trainings at each "
                        "np > 1, the machine's own share of the efficiency: docs/efficiency.md); run adds none")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a workload config field, e.g. --set sampled_negatives=4096 (repeatable)")


def add_plan_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    """The flags that make a plan of points (read by sweep_config_from_args): `sweep` and `slurm` take the same."""
    p.add_argument("--config", metavar="FILE", help="TOML sweep file (a [sweep] table of SweepConfig fields)")
    p.add_argument("--nps", type=int_list, help="process counts, e.g. 1,2,4 (default 1,2)")
    p.add_argument("--modes", type=str_list, help="from sparse-gather,coalesced-gather,dense-reduce,sparse-as-dense,"
                   "auto (default sparse-gather,dense-reduce)")
    p.add_argument("--scalings", type=str_list, help="weak,strong (default both)")
    p.add_argument("--repeats", type=int, help="repetitions of every point (default 1)")
    p.add_argument("--repeats-by-np", type=repeats_by_np, metavar="NP:R[,NP:R]",
                   help="repetitions at the rank counts named, in place of --repeats, e.g. 3:3,4:3")
    p.add_argument("--no-interleave", dest="interleave", action="store_false", default=None,
                   help="run each point's repeats back to back, np ascending (default: rounds of every point in a "
                        "seeded shuffled order)")
    p.add_argument("--stages", type=str_list, help="pipeline stages to measure: train,refresh,graph,retrieval "
                                                   "(default train; the others scale strongly over the preset's "
                                                   "users)")
    p.add_argument("--graph-strategies", type=str_list, help="k-NN strategies of the graph stage: replicate,ring "
                                                             "(default both)")
    p.add_argument("--stage-steps", type=int, help="timed repetitions of a stage other than train (default 3)")
    p.add_argument("--compare-env", metavar="'VAR=VALUE ...'",
                   help="setting B: variables on top of the suite's launch environment (setting A); every point is "
                        "measured under both, interleaved, e.g. --compare-env 'HOROVOD_CYCLE_TIME=1'")
    p.add_argument("--compare-set", dest="compare_set", type=_override, action="append", default=None,
                   metavar="KEY=VALUE", help="setting B: a workload field overridden on top of --set (repeatable); "
                   "every point is measured under both, interleaved, e.g. --compare-set shard_rows=residue")
    p.add_argument("--exchange-backend", "--exchange-backends", dest="exchange_backends", type=str_list,
                   help="what carries the exchange: horovod, mpi (raw MPI, no Horovod in the ranks) or horovod,mpi "
                        "for both side by side (default horovod)")
    p.add_argument("--name", help="sweep name, the results folder's prefix")
    p.add_argument("--out", metavar="DIR", help=out_help)
    add_shared_flags(p)


def repeats_by_np(text: str) -> dict[int, int]:
    """--repeats-by-np NP:R[,NP:R]."""
    try:
        pairs = [item.split(":") for item in text.split(",")]
        return {int(n): int(r) for n, r in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give rank counts and their repeats, e.g. 3:3,4:3") from None


def sweep_config_from_args(args: argparse.Namespace, **fixed) -> SweepConfig:
    config = SweepConfig.from_toml(args.config) if getattr(args, "config", None) else SweepConfig()
    changes = {field: getattr(args, flag) for flag, field in SHARED_FLAGS.items() if getattr(args, flag) is not None}
    for flag in ("nps", "modes", "scalings", "repeats", "name", "interleave", "stages", "graph_strategies",
                 "stage_steps", "corun", "exchange_backends", "repeats_by_np"):
        if getattr(args, flag, None) is not None:
            changes[flag] = getattr(args, flag)
    if getattr(args, "compare_env", None) is not None:
        changes["compare_env"] = parse_env_setting(args.compare_env)
    if args.overrides:
        changes["workload"] = {**config.workload, **dict(args.overrides)}
    if getattr(args, "compare_set", None):
        changes["compare_set"] = {**config.compare_set, **dict(args.compare_set)}
    config = replace(config, **(changes | fixed))
    _check_workload(config)
    return config


def setting_b_text(config: SweepConfig) -> str:
    """Setting B as a person reads it: its launch variables and its workload overrides."""
    return " ".join(filter(None, [format_env_setting(config.compare_env) if config.compare_env else "",
                                  *(f"{k}={v}" for k, v in config.compare_set.items())]))


def _check_workload(config: SweepConfig) -> None:
    """Build every point's workload config here, so a bad preset, override or batch split fails before anything
    launches (not as a failed point minutes into the sweep)."""
    for point in config.plan():
        try:
            workload_config(point)
        except TypeError as err:
            raise UsageError(f"unknown workload setting in --set/--compare-set/workload ({err}): see "
                             f"alure/config.py for the fields") from None
        except ValueError as err:
            raise UsageError(f"{point.point_id}: {err}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.resume:
        sweep_dir = Path(args.resume)
        config = load_sweep_config(sweep_dir)
        if args.retries is not None:  # how often to relaunch changes no measurement: the one flag --resume takes
            config = replace(config, retries=args.retries)
        launcher = load_layout(sweep_dir)
    else:
        config = sweep_config_from_args(args)
        launcher = launcher_from_args(args)
        sweep_dir = Path(args.out) if args.out else default_out(config.name)
    check_launchable(config, launcher, "--nps", args.oversubscribe_limit)
    print(f"sweep {sweep_dir}: {len(config.plan())} points, preset {config.preset}, np {config.nps}, "
          f"modes {', '.join(config.modes)}, {', '.join(config.scalings)} scaling"
          + (f"; exchange over {', '.join(config.exchange_backends)}" if config.exchange_backends != ["horovod"]
             else "")
          + (f"; each also under setting B: {setting_b_text(config)}" if config.compare_env or config.compare_set
             else "")
          + (f"; stages {', '.join(config.stages)}" if config.stages != ["train"] else ""))
    df = run_locked(config, sweep_dir, resume=bool(args.resume), launcher=launcher)
    if df is None:
        return INTERRUPTED_EXIT_CODE
    print(efficiency_table(df))
    print(f"results: {sweep_dir} (summary.csv, report.md, efficiency.png, breakdown.png, memory.png)")
    return 0 if (df["status"] == "ok").all() else 1


def cmd_run(args: argparse.Namespace) -> int:
    """One point: a one-point sweep, so its record and report are those of any sweep."""
    config = sweep_config_from_args(args, nps=sorted({1, args.np}) if args.with_baseline else [args.np],
                                    modes=[args.mode], scalings=[args.scaling], name="run", corun=False,
                                    exchange_backends=[args.exchange_backend])
    launcher = launcher_from_args(args)
    check_launchable(config, launcher, "--np", args.oversubscribe_limit)
    sweep_dir = Path(args.out) if args.out else default_out("run")
    df = run_locked(config, sweep_dir, resume=False, launcher=launcher)
    if df is None:
        return INTERRUPTED_EXIT_CODE
    print(efficiency_table(df))
    print(f"record: {sweep_dir}/points/")
    return 0 if (df["status"] == "ok").all() else 1


def check_launchable(config: SweepConfig, launcher: Launcher, flag: str, ranks_per_core: int) -> None:
    """Refuse, in one line and before anything starts, what cannot run: more ranks than the hosts' slots, or (where
    every rank runs on this machine, emulated hosts included) more than its memory and cores can take. The memory
    of real remote hosts is not this machine's to judge."""
    if rows_named():  # every record's exchange is priced from them: a bad folder fails here, not in every point
        try:
            read_comm_rows(rows_named())
        except UsageError as err:
            raise UsageError(f"{COMM_ROWS_ENV}: {err}") from None
    check_fits(launcher, config.nps)
    if not launcher.hosts or shares_one_machine(list(launcher.hosts)):
        check_sweep(config, flag=flag, ranks_per_core=ranks_per_core)


def run_locked(config: SweepConfig, sweep_dir: Path, *, resume: bool, launcher: Launcher = LOCAL):
    """Run the sweep as the folder's only writer; its summary table, or None if it was interrupted (the finished
    points kept and reported)."""
    ensure_writable(sweep_dir)
    with exclusive_writer(sweep_dir):
        if not resume:
            start_sweep(config, sweep_dir)
            save_layout(sweep_dir, launcher)
        try:
            try:
                run_sweep(config, sweep_dir, resume=resume, launcher=launcher)
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP (bench.launch.interrupts)
                with signals_ignored():  # the report of what finished is written whole
                    if any((sweep_dir / "points").glob("*.json")):
                        write_report(sweep_dir)
                print(f"interrupted: finished points are kept in {sweep_dir}; continue with "
                      f"`{resume_command(sweep_dir)}`")
                return None
            return write_report(sweep_dir)
        except MachineFault as fault:  # the folder is started: every point recorded so far is kept
            raise fault.then(f"continue with `{resume_command(sweep_dir)}`")


def resume_command(sweep_dir: Path) -> str:
    return f"alure-bench sweep --resume {shlex.quote(str(sweep_dir))}"


def cmd_report(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"{sweep_dir} is not a folder: give a sweep's results folder")
    df = write_report(sweep_dir)
    print(efficiency_table(df))
    print(f"rebuilt {sweep_dir}/summary.csv, report.md and plots")
    return 0


def register(sub) -> None:
    sweep = sub.add_parser("sweep", help="run a plan of points (scaling x mode x np x repeats) locally; write the "
                                         "results folder and print the efficiency table")
    add_plan_flags(sweep, out_help="results folder (default results/local/<name>-<time>)")
    add_host_flags(sweep)
    sweep.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR: rerun only points without an "
                                                       "ok record")
    sweep.set_defaults(func=cmd_sweep)

    run = sub.add_parser("run", help="measure one point (np, mode, scaling) and print its figures")
    run.add_argument("--np", type=int, default=1)
    run.add_argument("--mode", default="sparse-gather",
                     help=", ".join(MODES))
    run.add_argument("--scaling", default="weak", help="weak or strong")
    run.add_argument("--with-baseline", action="store_true", help="also measure np=1, for the efficiency")
    run.add_argument("--exchange-backend", default="horovod",
                     help="what carries the exchange: horovod or mpi (raw MPI, no Horovod in the ranks)")
    run.add_argument("--out", metavar="DIR", help="results folder (default results/local/run-<time>)")
    add_shared_flags(run)
    add_host_flags(run)
    run.set_defaults(func=cmd_run, config=None)

    report = sub.add_parser("report", help="rebuild summary.csv, report.md and plots from a results folder")
    report.add_argument("dir", help="the sweep's results folder")
    report.set_defaults(func=cmd_report)
