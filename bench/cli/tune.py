"""`alure-bench tune`: Horovod's knobs tried on the training step, each setting as an interleaved A/B sweep against the
launcher's settings (bench.plan.tuning), then the table of bench.results.tuning (tune.csv, tune.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.sweep import add_shared_flags, check_launchable, str_list, sweep_config_from_args
from bench.errors import MachineFault, UsageError
from bench.launch.hosts import add_host_flags, launcher_from_args, save_layout
from bench.launch.interrupts import INTERRUPTED_EXIT_CODE, signals_ignored
from bench.plan.comm_config import parse_env_setting
from bench.plan.config import DEFAULT_SWEEP_MODES
from bench.plan.tuning import (
    AUTOTUNE_LOG,
    AUTOTUNE_STAGES,
    KNOBS,
    SettingSweep,
    autotune_steps,
    knob_settings,
    tuning_sweeps,
)
from bench.results.folder_lock import exclusive_writer
from bench.results.records import default_out, ensure_writable
from bench.results.report import write_report
from bench.results.tuning import (
    PREFER_ALPHA,
    autotune_choice,
    rounds_to_tell_apart,
    setting_rows,
    tuning_table,
    write_tuning,
)
from bench.run.sweep import load_sweep_config, run_sweep, start_sweep


def cmd_tune(args: argparse.Namespace) -> int:
    if args.tabulate:
        return _tabulate_again(args.out)
    settings = knob_settings(args.knobs, [parse_env_setting(s, "--setting") for s in args.settings])
    needed = rounds_to_tell_apart(len(settings))
    repeats = needed if args.repeats is None else args.repeats
    if repeats < needed:
        print(f"tune: note: {repeats} rounds can tell none of {len(settings)} settings apart (the paired test's "
              f"smallest p is 2^-{repeats}, Holm needs {PREFER_ALPHA:g}/{len(settings)}): give --repeats {needed} "
              f"or more, or fewer settings")
    base = sweep_config_from_args(args, nps=[args.np], modes=args.modes, scalings=[args.scaling],
                                  repeats=repeats, corun=False, exchange_backends=["horovod"], name="tune")
    launcher = launcher_from_args(args)
    out = Path(args.out) if args.out else default_out("tune")
    sweeps = tuning_sweeps(base, settings, out, args.autotune_warmup)
    for sweep in sweeps:
        check_launchable(sweep.config, launcher, "--np", args.oversubscribe_limit)
    context = _context(base)
    print(f"tune {out}: {len(sweeps)} settings x {len(base.modes)} modes, A/B interleaved; {context}")
    if (out / "tune.csv").exists() or any((s.folder / "points").is_dir() for s in sweeps):
        raise UsageError(f"{out} already holds a tuning: choose a new --out")
    ensure_writable(out)
    done = []
    with exclusive_writer(out):
        try:
            for i, sweep in enumerate(sweeps, 1):
                print(f"setting {i}/{len(sweeps)}: {sweep.setting.label} ({sweep.folder.name}/)", flush=True)
                start_sweep(sweep.config, sweep.folder)
                save_layout(sweep.folder, launcher)
                run_sweep(sweep.config, sweep.folder, launcher=launcher)
                write_report(sweep.folder)
                done.append(sweep)
        except KeyboardInterrupt:
            with signals_ignored():  # what finished is tabulated whole
                _tabulate(out, done, context + f" Interrupted after {len(done)} of {len(sweeps)} settings.")
            print(f"interrupted: the {len(done)} finished settings are tabulated in {out}/tune.md")
            return INTERRUPTED_EXIT_CODE
        except MachineFault as fault:
            raise fault.then(f"the finished settings are in {out}; run the others again with --out elsewhere")
        table = _tabulate(out, done, context)
    print((out / "tune.md").read_text())
    print(f"results: {out} (tune.csv, tune.md, one A/B sweep folder per setting)")
    return 0 if table["reached_ranks"].all() else 1


def _context(base) -> str:
    """tune.md's sentence on what was run, from the tuning's shared sweep config."""
    return (f"Preset {base.preset}, {base.scalings[0]} scaling, np={base.nps[0]}, modes {', '.join(base.modes)}, "
            f"{base.repeats} repeats of {base.steps} timed steps after {base.warmup_steps} warm-up steps "
            f"(an autotune setting's sweep warms up for its whole search).")


def _tabulate_again(out: str | None) -> int:
    """tune.csv and tune.md of a finished tuning rebuilt from its setting folders' records, e.g. after a change of
    the table's rule; nothing is measured. Each folder's setting is read from its sweep.json (compare_env)."""
    if not out:
        raise UsageError("--tabulate needs --out DIR: the folder of the tuning to tabulate again")
    out = Path(out)
    by_slug = {s.slug: s for s in knob_settings(list(KNOBS))}
    sweeps = []
    for sweep_json in sorted(out.glob("*/sweep.json")):
        config = load_sweep_config(sweep_json.parent)
        if not config.compare_env:
            continue
        setting = by_slug.get(sweep_json.parent.name) or knob_settings(
            [], [{k: v for k, v in config.compare_env.items() if k != "HOROVOD_AUTOTUNE_LOG"}])[0]
        sweeps.append(SettingSweep(setting, config, sweep_json.parent))
    if not sweeps:
        raise UsageError(f"{out} holds no tuning (no setting folder with a sweep.json naming its setting B): give "
                         f"the --out of an `alure-bench tune` run")
    order = list(by_slug)  # the catalogue's order, as a run tabulates them; custom settings after, by name
    sweeps.sort(key=lambda sw: (order.index(sw.folder.name) if sw.folder.name in order else len(order),
                                sw.folder.name))
    ensure_writable(out)
    plain = next((s.config for s in sweeps if not s.setting.autotune), sweeps[0].config)
    table = _tabulate(out, sweeps, _context(plain) + " Tabulated again from the records (`alure-bench tune "
                                                      "--tabulate`).")
    print((out / "tune.md").read_text())
    print(f"results: {out} (tune.csv, tune.md rebuilt from {len(sweeps)} setting folders)")
    return 0 if table["reached_ranks"].all() else 1


def _tabulate(out: Path, done: list, context: str):
    rows = [row for sweep in done for row in setting_rows(sweep.setting.knob, sweep.setting.label,
                                                          sweep.config.compare_env, sweep.folder)]
    table = tuning_table(rows)
    autotune = {s.folder.name: autotune_choice(s.folder / AUTOTUNE_LOG) for s in done if s.setting.autotune}
    write_tuning(out, table, autotune, context)
    return table


def register(sub) -> None:
    tune = sub.add_parser("tune", help="try Horovod's knobs on the training step: each setting as an interleaved A/B "
                                       "against the launcher's settings; write tune.csv and tune.md")
    tune.add_argument("--knobs", type=str_list, default=list(KNOBS),
                      help=f"knobs whose settings to try, from {','.join(KNOBS)} (default all; "
                           f"--knobs '' with --setting tries only those)")
    tune.add_argument("--setting", dest="settings", action="append", default=[], metavar="'VAR=VALUE ...'",
                      help="a setting of your own to try as B (repeatable), e.g. --setting 'HOROVOD_CYCLE_TIME=2'; "
                           "an empty value unsets the launcher's own")
    tune.add_argument("--np", type=int, default=2, help="ranks of every point (default 2)")
    tune.add_argument("--modes", type=str_list, default=list(DEFAULT_SWEEP_MODES),
                      help=f"exchange modes to tune for (default {','.join(DEFAULT_SWEEP_MODES)})")
    tune.add_argument("--scaling", default="weak", help="weak or strong (default weak)")
    tune.add_argument("--repeats", type=int, default=None,
                      help="rounds of A and B per setting (default: the fewest with which a setting can be told "
                           "apart from A among those tried: 6 for one setting, 9 for the whole catalogue of 10)")
    tune.add_argument("--autotune-warmup", type=int, metavar="N",
                      help=f"untimed steps of the autotune setting's points, where Horovod searches (default "
                           f"{autotune_steps()}: {AUTOTUNE_STAGES} stages of its search; its log says how many ended)")
    tune.add_argument("--out", metavar="DIR", help="output folder (default results/local/tune-<time>)")
    tune.add_argument("--tabulate", action="store_true",
                      help="measure nothing: rebuild tune.csv and tune.md of the finished tuning in --out DIR from "
                           "its records (after a change of the table's rule)")
    add_shared_flags(tune)
    add_host_flags(tune)
    tune.set_defaults(func=cmd_tune, config=None)
