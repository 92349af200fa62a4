"""`alure-bench slurm render | submit | status | collect | task`: the same sweep config as a local sweep, run as
Slurm job arrays (bench/slurm/), collected into the same summary, report and plots (bench/results/report.py)."""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from bench.cli.sweep import SHARED_FLAGS, add_plan_flags, sweep_config_from_args
from bench.errors import UsageError
from bench.plan.capacity import check_sweep, positive_int, slurm_partition
from bench.results.records import default_out, point_path, read_record
from bench.results.report import efficiency_table, write_report
from bench.run.sweep import check_room, start_sweep
from bench.slurm.arrays import LAUNCHERS, SlurmOptions, array_spec, plan_arrays, render_arrays
from bench.slurm.jobs import (
    active_points,
    latest_tasks,
    next_round,
    outstanding,
    read_jobs,
    require_sweep,
    run_task,
    submit_scripts,
    why_outstanding,
    write_jobs,
    write_scripts,
)
from bench.slurm.scheduler import query_states

# flag -> SlurmOptions field
OPTION_FLAGS = {"partition": "partition", "account": "account", "time": "time_limit", "nodes": "nodes",
                "ranks_per_node": "ranks_per_node", "array_limit": "array_limit", "launcher": "launcher",
                "template": "template"}
PLAN_FLAGS = ("config", "nps", "modes", "scalings", "repeats", "name", "out")
WAIT_POLL_S = 1.0


def options_from_args(args: argparse.Namespace, base: SlurmOptions) -> SlurmOptions:
    """`base` (the defaults, or what the sweep was submitted with) changed by the flags given."""
    changes = {field: getattr(args, flag) for flag, field in OPTION_FLAGS.items() if getattr(args, flag) is not None}
    if changes.get("template"):
        changes["template"] = str(Path(changes["template"]).resolve())
    return replace(base, **changes)


def _require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found on PATH: submit from a Slurm login node (or `module load slurm`); "
                         "`alure-bench slurm render` writes the scripts without Slurm")


def _new_sweep(args: argparse.Namespace):
    """Config, options and the rendered scripts of a new sweep; the folder is started only once all of them are
    valid, so a bad option leaves no half-made sweep behind."""
    config = sweep_config_from_args(args)
    options = options_from_args(args, SlurmOptions())
    check_partition(config, options)
    sweep_dir = (Path(args.out) if args.out else default_out(config.name)).resolve()
    submitted = [e["job_id"] for e in read_jobs(sweep_dir)["arrays"]]
    if submitted:
        raise UsageError(f"{sweep_dir} already has submitted arrays (jobs {', '.join(submitted)}): continue it with "
                         f"`alure-bench slurm submit --resume {sweep_dir}`, or choose a new --out")
    rendered = render_arrays(config, options, sweep_dir, plan_arrays(config))
    start_sweep(config, sweep_dir)
    write_jobs(sweep_dir, {"options": options.as_dict(), "arrays": []})
    return config, options, sweep_dir, rendered


def check_partition(config, options: SlurmOptions) -> None:
    """Refuse arrays the partition cannot hold (where sinfo can say), before anything is written or submitted."""
    hosts = slurm_partition(options.partition)
    if hosts is not None:
        check_sweep(config, flag="--nps", hosts=hosts, layout=options.layout)


def _print_arrays(scripts, jobs_by_np=None) -> None:
    for array, script in scripts:
        job = f"job {jobs_by_np[array.np]} " if jobs_by_np else ""
        print(f"  np={array.np}: {job}array {array_spec(array.indices)} "
              f"({len(array.indices)} point(s)), {script}")


def cmd_render(args: argparse.Namespace) -> int:
    config, options, sweep_dir, rendered = _new_sweep(args)
    scripts = write_scripts(sweep_dir, rendered, round_no=1)
    print(f"sweep {sweep_dir}: {len(config.plan())} points as {len(scripts)} job array(s), one per np:")
    _print_arrays(scripts)
    print(f"submit them with: alure-bench slurm submit --resume {sweep_dir}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(args)
    _require_sbatch()
    config, options, sweep_dir, rendered = _new_sweep(args)
    scripts = write_scripts(sweep_dir, rendered, round_no=1)
    jobs = read_jobs(sweep_dir)
    submitted = submit_scripts(sweep_dir, jobs, options, scripts, round_no=1)
    print(f"sweep {sweep_dir}: {len(config.plan())} points submitted as {len(submitted)} job array(s):")
    _print_arrays(scripts, {e["np"]: e["job_id"] for e in submitted})
    _print_next_steps(sweep_dir)
    return 0


def _resume(args: argparse.Namespace) -> int:
    given = [f"--{f.replace('_', '-')}" for f in (*PLAN_FLAGS, *SHARED_FLAGS) if getattr(args, f, None) is not None]
    given += [flag for flag, dest in (("--set", "overrides"), ("--compare-set", "compare_set"))
              if getattr(args, dest, None)]
    if given:
        raise UsageError(f"--resume reruns the sweep's own config: leave out {', '.join(given)} "
                         f"(Slurm options such as --partition may change)")
    sweep_dir = Path(args.resume).resolve()
    config = require_sweep(sweep_dir)
    jobs = read_jobs(sweep_dir)
    options = options_from_args(args, SlurmOptions.from_dict(jobs["options"]))
    _require_sbatch()
    check_partition(config, options)
    states = query_states(e["job_id"] for e in jobs["arrays"])
    todo = outstanding(config, sweep_dir)
    active = active_points(jobs, states)
    chosen = {p.point_id for p, _ in todo if p.point_id not in active}
    plan = config.plan()
    print(f"resuming {sweep_dir}: {len(plan) - len(todo)} of {len(plan)} points ok, "
          f"{len([p for p, _ in todo if p.point_id in active])} still queued or running, {len(chosen)} to submit")
    if not chosen:
        print("nothing to submit")
        return 0
    check_room(config, sweep_dir, [p for p, _ in todo if p.point_id in chosen])
    round_no = next_round(jobs)
    rendered = render_arrays(config, options, sweep_dir, plan_arrays(config, only=chosen))
    scripts = write_scripts(sweep_dir, rendered, round_no)
    submitted = submit_scripts(sweep_dir, jobs, options, scripts, round_no)
    _print_arrays(scripts, {e["np"]: e["job_id"] for e in submitted})
    _print_next_steps(sweep_dir)
    return 0


def _print_next_steps(sweep_dir: Path) -> None:
    print(f"follow with: alure-bench slurm status {sweep_dir}   (--wait SECONDS to block until done)\n"
          f"then:        alure-bench slurm collect {sweep_dir}")


def _known_states(jobs: dict) -> tuple[dict, str]:
    """Slurm's task states, or none with a note when Slurm cannot be asked (the folder alone still tells a lot)."""
    if not jobs["arrays"]:
        return {}, ""
    try:
        return query_states(e["job_id"] for e in jobs["arrays"]), ""
    except UsageError as err:
        return {}, f"(Slurm states unknown: {err})"


def cmd_status(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.dir).resolve()
    config = require_sweep(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if args.wait is not None:
        if not jobs["arrays"]:
            raise UsageError(f"{sweep_dir} has no submitted arrays to wait for: submit it first")
        deadline = time.monotonic() + args.wait
        while active_points(jobs, query_states(e["job_id"] for e in jobs["arrays"])):
            if time.monotonic() > deadline:
                print(f"still queued or running after {args.wait:g} s:")
                break
            time.sleep(WAIT_POLL_S)
    states, note = _known_states(jobs)
    latest = latest_tasks(jobs)
    plan = config.plan()
    print(f"sweep {sweep_dir}: {len(plan)} points; arrays: " +
          (", ".join(f"{e['job_id']} (np={e['np']}, tasks {e['array']}, round {e['round']})" for e in jobs["arrays"])
           or "none submitted"))
    if note:
        print(note)
    counts: dict[str, int] = {}
    print(f"  {'point':32} {'task':12} {'slurm':12} record")
    for point in plan:
        task = latest.get(point.point_id)
        path = point_path(sweep_dir, point.point_id)
        status = read_record(path)["status"] if path.exists() else "missing"
        counts[status] = counts.get(status, 0) + 1
        print(f"  {point.point_id:32} {f'{task[0]}_{task[1]}' if task else '-':12} "
              f"{states.get(task, '-') if task else '-':12} {status}")
    active = active_points(jobs, states)
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {len(active)} task(s) queued or running")
    return 1 if args.wait is not None and active else 0


def cmd_collect(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.dir).resolve()
    config = require_sweep(sweep_dir)
    jobs = read_jobs(sweep_dir)
    plan = config.plan()
    if any((sweep_dir / "points").glob("*.json")):
        print(efficiency_table(write_report(sweep_dir)))
    else:
        print("no point has a record yet")
    todo = outstanding(config, sweep_dir)
    if not todo:
        print(f"complete: all {len(plan)} points ok; results: {sweep_dir} (summary.csv, report.md, efficiency.png, "
              f"breakdown.png, memory.png)")
        return 0
    states, note = _known_states(jobs)
    print(f"{len(todo)} of {len(plan)} points missing or failed{' ' + note if note else ''}:")
    for point, record in todo:
        print(f"  {point.label()}: {why_outstanding(sweep_dir, point, record, jobs, states)}")
    print(f"resubmit exactly those with: alure-bench slurm submit --resume {sweep_dir}")
    return 1


def cmd_task(args: argparse.Namespace) -> int:
    index = args.index
    if index is None:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            raise UsageError("not inside a Slurm array task (no SLURM_ARRAY_TASK_ID): give --index")
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return run_task(Path(args.sweep).resolve(), args.np, index, args.launcher)


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm options (kept in <sweep>/slurm/jobs.json; --resume reuses them unless given)")
    g.add_argument("--partition", help="partition of every array (default: the cluster's or the template's)")
    g.add_argument("--account", help="account to charge (default: yours, or the template's)")
    g.add_argument("--time", help="time limit of every task, e.g. 30 or 1:00:00 (default: point timeout + 5 min per "
                                 "launch attempt, see --retries)")
    g.add_argument("--nodes", type=positive_int, help="nodes per array (at most np); default: as --ranks-per-node "
                                                       "needs, or Slurm's choice")
    g.add_argument("--ranks-per-node", type=positive_int, metavar="N", help="MPI ranks per node")
    g.add_argument("--array-limit", type=positive_int, metavar="N",
                   help="run at most N tasks of each array at once (sbatch --array=...%%N)")
    g.add_argument("--launcher", choices=LAUNCHERS, help="how a task starts its ranks inside the allocation "
                                                               "(default mpirun; srun uses --mpi=pmix)")
    g.add_argument("--template", metavar="FILE", help="sbatch template (default slurm/array.sbatch): copy it to "
                                                      "add modules, venv and #SBATCH defaults")


def register(sub) -> None:
    group = sub.add_parser("slurm", help="run a sweep as Slurm job arrays (one per np): render, submit, status, "
                                         "collect")
    cmds = group.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", required=True)

    render = cmds.add_parser("render", help="start the sweep folder and write one sbatch script per np, without "
                                            "submitting")
    add_plan_flags(render, out_help="results folder, on a file system the compute nodes share (default results/local/<name>-<time>)")
    _add_option_flags(render)
    render.set_defaults(func=cmd_render)

    submit = cmds.add_parser("submit", help="start the sweep folder and submit one job array per np; with --resume "
                                            "DIR, submit only its missing or failed points")
    add_plan_flags(submit, out_help="results folder, on a file system the compute nodes share (default results/local/<name>-<time>)")
    submit.add_argument("--resume", metavar="DIR", help="resubmit the points of DIR without an ok record (not those "
                                                        "still queued or running)")
    _add_option_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = cmds.add_parser("status", help="the sweep's arrays, each point's Slurm task, its state and its record")
    status.add_argument("dir", help="the sweep's results folder")
    status.add_argument("--wait", type=float, metavar="SECONDS", help="first wait (at most SECONDS) until none of "
                                                                      "its tasks is queued or running")
    status.set_defaults(func=cmd_status)

    collect = cmds.add_parser("collect", help="build summary.csv, report.md and plots as a local sweep does; list "
                                              "the missing or failed points (exit 1 if any)")
    collect.add_argument("dir", help="the sweep's results folder")
    collect.set_defaults(func=cmd_collect)

    task = cmds.add_parser("task", help="(run by the sbatch script) measure the point of this array task")
    task.add_argument("--sweep", required=True, metavar="DIR", help="the sweep's results folder")
    task.add_argument("--np", type=positive_int, required=True, help="the array's process count")
    task.add_argument("--index", type=int, help="the point's index among the np points (default "
                                                "$SLURM_ARRAY_TASK_ID)")
    task.add_argument("--launcher", choices=LAUNCHERS, default="mpirun")
    task.set_defaults(func=cmd_task)
