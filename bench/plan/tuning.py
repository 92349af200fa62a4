"""Tuning Horovod's knobs on the training step: which settings to try, and the sweep that measures each one.

Every knob setting is measured as a sweep's setting B (SweepConfig.compare_env) against setting A, the launcher's
own settings (bench.launch.mpirun.HOROVOD_SETTINGS): A and B run in the same shuffled rounds, so a setting is judged
by its ratio to A within one interleaved run, never against a baseline taken at another time. One sweep per setting
keeps every ratio paired with its own A (bench.results.tuning reads them). What each knob does to the step:
docs/tuning.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.errors import UsageError
from bench.plan.comm_config import format_env_setting
from bench.plan.config import SweepConfig

GROUPED_ALLGATHER = "ALURE_BENCH_GROUPED_ALLGATHER"
"""bench.ranks.grouped_gather.VARIABLE, named here without importing that rank module (and torch) into the command
line; tests/test_tuning.py holds the two to one name."""
AUTOTUNE_LOG = "autotune-log.csv"
"""Where, in an autotune setting's sweep folder, Horovod writes the samples it tried (HOROVOD_AUTOTUNE_LOG); each
launch of setting B writes it anew, so it holds the last repeat's search."""
AUTOTUNE_WARMUP_SAMPLES = 3
"""Samples Horovod's autotuner discards before it searches (HOROVOD_AUTOTUNE_WARMUP_SAMPLES, its default)."""
AUTOTUNE_STEPS_PER_SAMPLE = 10
"""Steps Horovod scores each tried setting over (HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE, its default)."""
AUTOTUNE_SAMPLES = 20
"""Settings Horovod's Bayesian search tries before it keeps the best (HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES, its
default)."""


AUTOTUNE_STAGES = 2
"""Stages of Horovod's search the default warm-up covers: it searches cycle time and fusion threshold by Bayesian
optimisation once per setting of its on/off knobs (the response cache), logging a row as each stage ends."""


def autotune_steps(stages: int = AUTOTUNE_STAGES) -> int:
    """Untimed steps an autotune point runs before its timed ones by default: `stages` whole searches of
    (warm-up + Bayesian) samples and one more sample, so the timed steps measure what the autotuner kept rather than
    its search. The log's rows say how many stages ended (bench.results.tuning.autotune_line)."""
    return ((AUTOTUNE_WARMUP_SAMPLES + AUTOTUNE_SAMPLES) * stages + 1) * AUTOTUNE_STEPS_PER_SAMPLE


@dataclass(frozen=True, slots=True)
class KnobSetting:
    """One setting of one knob, tried as setting B against the launcher's."""

    knob: str
    """The knob's name in KNOBS (or 'custom' for a setting given whole on the command line)."""
    variables: dict = field(default_factory=dict)
    """The variables on top of the launch environment; an empty value unsets the launcher's own, leaving Horovod's
    default (bench.launch.mpirun.mpi_environment)."""
    autotune: bool = False
    """Horovod's autotuner runs: the points get autotune_steps() untimed steps and a log in their folder."""

    @property
    def label(self) -> str:
        """What the tables call it: the variables set, an unset one as VAR= (the autotuner's log and search budget
        left out: the sweep's config and the records hold them)."""
        return format_env_setting({k: v for k, v in self.variables.items() if not k.startswith("HOROVOD_AUTOTUNE_")})

    @property
    def slug(self) -> str:
        """Its sweep folder's name: the knob and its values (cycle-time-1, fusion-threshold-16777216); a custom
        setting names its variables too (custom-cycle_time-1-fusion_threshold-, an unset one ending in '-')."""
        if self.knob == "custom":
            words = [f"{k.removeprefix('HOROVOD_').lower()}-{v}" for k, v in self.variables.items()]
        else:
            words = [v for k, v in self.variables.items() if v and not k.startswith("HOROVOD_AUTOTUNE")]
        return re.sub(r"[^A-Za-z0-9.-]+", "_", "-".join([self.knob, *words]))

    def launch_env(self, folder: Path) -> dict[str, str]:
        """The sweep's compare_env; an autotune setting writes its log into `folder` (absolute: the ranks' working
        folder is not the caller's)."""
        if not self.autotune:
            return dict(self.variables)
        return {**self.variables, "HOROVOD_AUTOTUNE_LOG": str(Path(folder).resolve() / AUTOTUNE_LOG)}


def _one(knob: str, **variables: str) -> KnobSetting:
    return KnobSetting(knob, dict(variables))


KNOBS: dict[str, tuple[KnobSetting, ...]] = {
    # ms between Horovod's negotiation cycles: a longer cycle waits for more of backward's gradients to fuse them.
    "cycle-time": tuple(_one("cycle-time", HOROVOD_CYCLE_TIME=v) for v in ("0.1", "1", "5")),
    # bytes fused into one collective: 0 sends every gradient alone, larger values fuse more of them.
    "fusion-threshold": tuple(_one("fusion-threshold", HOROVOD_FUSION_THRESHOLD=str(n))
                              for n in (0, 1 << 20, 16 << 20, 64 << 20)),
    # a step's sparse tables gathered as one negotiated group (bench.ranks.grouped_gather) instead of one by one
    "grouped-allgather": (_one("grouped-allgather", **{GROUPED_ALLGATHER: "1"}),),
    # Horovod's response cache off (its default is on): every cycle negotiates every tensor afresh
    "response-cache": (_one("response-cache", HOROVOD_CACHE_CAPACITY="0"),),
    # Horovod searches cycle time, fusion threshold and the cache itself; the launcher's two fixed values are unset
    # so that it may (a value set in the environment is one Horovod's autotuner leaves alone)
    "autotune": (KnobSetting("autotune", {
        "HOROVOD_AUTOTUNE": "1", "HOROVOD_CYCLE_TIME": "", "HOROVOD_FUSION_THRESHOLD": "",
        "HOROVOD_AUTOTUNE_WARMUP_SAMPLES": str(AUTOTUNE_WARMUP_SAMPLES),
        "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE": str(AUTOTUNE_STEPS_PER_SAMPLE),
        "HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES": str(AUTOTUNE_SAMPLES)}, autotune=True),),
}
"""Every knob the tuning tries by default, with the settings it tries, each against the launcher's settings."""


def knob_settings(knobs: list[str], custom: list[dict[str, str]] = ()) -> list[KnobSetting]:
    """The settings to try: every setting of each knob named (from KNOBS), then each custom setting (a dict of
    variables, as --compare-env takes them); at least one."""
    bad = [k for k in knobs if k not in KNOBS]
    if bad:
        raise UsageError(f"unknown knob {', '.join(bad)}: choose from {', '.join(KNOBS)}")
    settings = [s for k in knobs for s in KNOBS[k]]
    settings += [KnobSetting("custom", dict(v), autotune=v.get("HOROVOD_AUTOTUNE") == "1") for v in custom]
    if not settings:
        raise UsageError("no setting to try: name knobs with --knobs or give --setting 'VAR=VALUE ...'")
    slugs = [s.slug for s in settings]
    twice = sorted({s for s in slugs if slugs.count(s) > 1})
    if twice:
        raise UsageError(f"setting {', '.join(twice)} is asked for twice: give each setting once")
    return settings


@dataclass(frozen=True, slots=True)
class SettingSweep:
    """One setting's A/B sweep and where it is written."""

    setting: KnobSetting
    config: SweepConfig
    folder: Path


def tuning_sweeps(base: SweepConfig, settings: list[KnobSetting], out: Path,
                  autotune_warmup: int | None = None) -> list[SettingSweep]:
    """Each setting's sweep: `base` (the preset, np, modes, repeats and steps of the tuning) with the setting as its
    setting B, in a folder of its own under `out`. An autotune setting's sweep warms up for the autotuner's search
    (`autotune_warmup` steps, default autotune_steps()), A as long as B so the two stay measured alike."""
    autotune_warmup = autotune_steps() if autotune_warmup is None else autotune_warmup
    if autotune_warmup < 0:
        raise UsageError(f"--autotune-warmup must not be negative (got {autotune_warmup})")
    if any(n < 2 for n in base.nps):
        raise UsageError(f"a tuning of the exchange needs np >= 2 (got {base.nps}): at np=1 nothing is exchanged")
    if base.exchange_backends != ["horovod"]:
        raise UsageError("Horovod's knobs are tuned over the horovod exchange backend only: drop the mpi backend")
    out = Path(out)
    sweeps = []
    for setting in settings:
        folder = out / setting.slug
        warmup = max(base.warmup_steps, autotune_warmup) if setting.autotune else base.warmup_steps
        config = replace(base, compare_env=setting.launch_env(folder), warmup_steps=warmup,
                         name=f"{base.name}-{setting.slug}")
        sweeps.append(SettingSweep(setting, config, folder))
    return sweeps
