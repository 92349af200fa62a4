"""Horovod against raw MPI in one sweep (`--exchange-backends horovod,mpi`, docs/exchange-backends.md): per point,
Horovod's step time and exchange time over the MPI backend's, paired by round (bench.results.scaling.paired_ratio:
both backends of a round ran in the same shuffle, so what slowed the machine in a round slowed both).

The exchange time is the pace-setting rank's exchange wait plus the exchange's own work in the other phases
(`work_ms`, per step), not the wait alone: the MPI backend starts its collectives inside the gradient hooks, so much of
its exchange is work, where Horovod's is wait."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.host import np_label
from bench.results.scaling import pace_phase_steps, paired_ratio

BACKENDS_TEXT = ("Horovod against raw MPI, per point: the median over repeats of Horovod's step time (slowest rank) "
                 "and exchange time (the pace-setting rank's exchange wait + the exchange's own work, work_ms) over "
                 "the MPI backend's, [95% interval paired by round]. Below 1, Horovod is faster.")
COLUMNS = ["scaling", "mode", "np", "oversubscribed", "repeats", "step_ratio", "step_ratio_ci_low",
           "step_ratio_ci_high", "exchange_ratio", "exchange_ratio_ci_low", "exchange_ratio_ci_high"]


def _exchange_steps(record: dict) -> list[float]:
    pace = pace_phase_steps(record["ranks"], extra=("work_ms",))
    return list(pace["exchange_wait"] + pace["work_ms"])


def backend_table(records: list[dict], seed: int = 0) -> pd.DataFrame:
    """One row per (scaling, mode, np > 1) measured ok over both backends; empty where none was."""
    rng = np.random.default_rng(seed)
    ok = [r for r in records if r["status"] == "ok" and r["np"] > 1 and not r["point"].get("corun")
          and r["point"].get("stage", "train") == "train" and not r["point"].get("launch_env")
          and not r["point"].get("workload_b")]
    rows = []
    for key in sorted({(r["point"]["scaling"], r["point"]["mode"], r["np"]) for r in ok}):
        of = {b: [r for r in ok if (r["point"]["scaling"], r["point"]["mode"], r["np"]) == key
                  and r["point"].get("exchange_backend", "horovod") == b] for b in ("horovod", "mpi")}
        if not of["horovod"] or not of["mpi"]:
            continue
        row = {"scaling": key[0], "mode": key[1], "np": key[2],
               "oversubscribed": any(r["oversubscribed"] for r in of["horovod"] + of["mpi"]),
               "repeats": f"{len(of['horovod'])}/{len(of['mpi'])}"}
        for name, series in (("step_ratio", lambda r: r["step_time_ms_slowest_rank"]), ("exchange_ratio", _exchange_steps)):
            mpi = {r["point"]["repeat"]: series(r) for r in of["mpi"]}
            horovod = {r["point"]["repeat"]: series(r) for r in of["horovod"]}
            row |= dict(zip([name, f"{name}_ci_low", f"{name}_ci_high"], paired_ratio(mpi, horovod, rng)))
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def format_backends(table: pd.DataFrame) -> str:
    def cell(row, name):
        return f"{row[name]:.2f} [{row[f'{name}_ci_low']:.2f}, {row[f'{name}_ci_high']:.2f}]"
    shown = pd.DataFrame({"scaling": table["scaling"], "mode": table["mode"],
                          "np": [np_label(n, o) for n, o in zip(table["np"], table["oversubscribed"])],
                          "repeats horovod/mpi": table["repeats"],
                          "step horovod/mpi": [cell(r, "step_ratio") for _, r in table.iterrows()],
                          "exchange horovod/mpi": [cell(r, "exchange_ratio") for _, r in table.iterrows()]})
    return shown.to_string(index=False)
