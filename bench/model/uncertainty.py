"""How far a prediction can be trusted, in two separate parts: the uncertainty of what the model was fitted on (a
bootstrap over the sweep's points and the comm rows, every draw refitted) and the spread over the link it assumes
(the latency and bandwidth each a factor better and worse). docs/costmodel.md "Intervals".

The bootstrap resamples, with replacement and seeded:
    sweep records  within strata: the np=1 records of each (scaling, mode) (the compute profile and its batch), the
                   multi-rank records of each mode (what that mode's CPU work per byte is fitted to: resampled across
                   np and scaling, so a misfit between points widens the interval as repeat noise does)
    comm rows      within each (op, np, transport, link rate): the sizes of one collective's run
and refits the whole model on each draw (`fit_model`: profile, link, CPU work), then predicts from it what the point
estimate predicts. The interval is the central `level` share of the draws.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd

from bench.model.collectives import Link
from bench.model.step import Machine, Model, fit_model

DEFAULT_DRAWS = 200
"""Bootstrap draws of `alure-bench predict` (--draws)."""
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
DEFAULT_LINK_FACTOR = 2.0
"""How much better and worse than assumed the link's latency and bandwidth are taken for the link spread
(--link-factor)."""
INTERVAL_COLUMNS = ("weak_step_ms", "weak_efficiency", "strong_step_ms", "strong_efficiency", "memory_gib")
"""The predicted figures that get an interval (and a link spread)."""
ROW_KEY = ["np", "mode"]


def _strata(items: list[dict], key: Callable[[dict], tuple]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def record_stratum(record: dict) -> tuple:
    """The bootstrap stratum of a sweep record (see the module's docstring)."""
    if record["np"] == 1:
        return ("np=1", record["point"]["scaling"], record["point"]["mode"])
    return ("multi-rank", record["point"]["mode"])


def comm_stratum(row: dict) -> tuple:
    return (row["backend"], row["op"], row["np"], row.get("transport") or "", str(row.get("link_rate_gbps") or ""))


def resample(items: list[dict], key: Callable[[dict], tuple], rng: np.random.Generator) -> list[dict]:
    """`items` drawn with replacement within each stratum of `key`, each stratum keeping its size."""
    out = []
    for group in _strata(items, key).values():
        out += [group[i] for i in rng.integers(0, len(group), len(group))]
    return out


def bootstrap_models(records: list[dict], comm_rows: list[dict], environment: dict | None = None,
                     backend: str = "horovod", draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED) -> list[Model]:
    """`draws` models, each refitted on a resample of the sweep's ok records and of the comm rows."""
    rng = np.random.default_rng(seed)
    ok = [r for r in records if r["status"] == "ok"]
    models = []
    for _ in range(draws):
        models.append(fit_model(resample(ok, record_stratum, rng), resample(comm_rows, comm_stratum, rng),
                                environment, backend, source="bootstrap draw"))
    return models


def intervals(point: pd.DataFrame, tables: list[pd.DataFrame], suffixes: tuple[str, str], level: float = DEFAULT_LEVEL,
              columns=INTERVAL_COLUMNS) -> pd.DataFrame:
    """`point` with, per column, the `level` interval of the same rows over `tables` (columns <name><suffix>). A
    figure missing from a share of the draws above the interval's tails (out of memory there) has no interval."""
    tail = (1 - level) / 2
    stacked = pd.concat([t[ROW_KEY + list(columns)] for t in tables])
    grouped = stacked.groupby(ROW_KEY)
    out = point.copy()
    for column in columns:
        low = grouped[column].quantile(tail)
        high = grouped[column].quantile(1 - tail)
        missing = grouped[column].apply(lambda s: s.isna().mean())
        low[missing > tail], high[missing > tail] = np.nan, np.nan
        key = pd.MultiIndex.from_frame(out[ROW_KEY])
        out[column + suffixes[0]] = low.reindex(key).to_numpy()
        out[column + suffixes[1]] = high.reindex(key).to_numpy()
    return out


def spread(point: pd.DataFrame, tables: list[pd.DataFrame], suffixes: tuple[str, str],
           columns=INTERVAL_COLUMNS) -> pd.DataFrame:
    """`point` with, per column, the smallest and largest value of the same rows over `tables`."""
    stacked = pd.concat([t[ROW_KEY + list(columns)] for t in tables]).groupby(ROW_KEY)
    key = pd.MultiIndex.from_frame(point[ROW_KEY])
    out = point.copy()
    for column in columns:
        out[column + suffixes[0]] = stacked[column].min().reindex(key).to_numpy()
        out[column + suffixes[1]] = stacked[column].max().reindex(key).to_numpy()
    return out


def link_variants(machine: Machine, factor: float = DEFAULT_LINK_FACTOR) -> list[Machine]:
    """The machine with the link it assumes (its network, else its own) `factor` times better and worse in latency
    and in bandwidth, each combination: the corners of the link assumption."""
    if factor < 1:
        raise ValueError(f"link factor {factor} below 1")
    base = machine.link
    corners = []
    for alpha in (1 / factor, factor):
        for beta in (1 / factor, factor):
            link = Link(base.alpha_s * alpha, base.beta_s_per_byte * beta, base.gamma_s_per_byte)
            corners.append(replace(machine, network=link) if machine.network is not None
                           else replace(machine, local=link))
    return corners
