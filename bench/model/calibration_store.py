"""Calibrations kept per host: where `alure-bench calibrate` files what it fitted on a machine, and where the `auto`
exchange mode finds the one that matches the host it runs on.

A calibration is keyed by what decides the cost of a collective there: the CPU model, the cores, the MPI library
(its version string) and the transport the ranks exchange through (shared memory on one host, TCP between hosts).
One JSON file per key in the calibration folder (ALURE_BENCH_CALIBRATIONS, else <user cache>/alure-bench/calibrations).
Where none matches, `auto` decides with the built-in DEFAULT_COSTS and says so in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from bench.errors import UsageError
from bench.launch.environment import cpu_model, mpi_library
from bench.model.table_costs import DEFAULT_COSTS, ExchangeCosts
from bench.results.records import atomic_write_json, ensure_writable

CALIBRATIONS_ENV = "ALURE_BENCH_CALIBRATIONS"
"""Names the calibration folder (default: `default_folder()`)."""
FILE_KIND = "alure-bench calibration"
FILE_VERSION = 1
TRANSPORTS = ("shared-memory", "tcp")


def default_folder() -> Path:
    """ALURE_BENCH_CALIBRATIONS, else $XDG_CACHE_HOME (or ~/.cache)/alure-bench/calibrations."""
    named = os.environ.get(CALIBRATIONS_ENV)
    if named:
        return Path(named)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "alure-bench" / "calibrations"


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What a calibration is valid for."""

    cpu_model: str
    """/proc/cpuinfo's model name (bench.launch.environment.cpu_model)."""
    cores: int
    """Cores this process may run on."""
    mpi_library: str
    """The MPI library's version string as mpi4py reports it (first line)."""
    transport: str
    """'shared-memory' (ranks on one host) or 'tcp' (ranks on several hosts)."""

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}: one of {', '.join(TRANSPORTS)}")

    def key(self) -> str:
        """A file name: readable words of the identity and a hash of all of it."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        cpu = re.sub(r"[^a-z0-9]+", "-", self.cpu_model.lower()).strip("-")[:32] or "cpu"
        return f"{cpu}-{self.cores}c-{self.transport}-{digest}"

    def describe(self) -> str:
        return f"{self.cpu_model}, {self.cores} cores, {self.mpi_library}, {self.transport}"


def this_host(transport: str) -> HostIdentity:
    """The identity of the host this process runs on, for ranks exchanging through `transport`."""
    mpi = mpi_library()
    return HostIdentity(cpu_model=cpu_model(), cores=len(os.sched_getaffinity(0)),
                        mpi_library=mpi.get("library") or f"unknown ({mpi.get('error', 'no mpi4py')})",
                        transport=transport)


def now_iso() -> str:
    """This moment, local time with its offset, to the second: when a calibration or costs file was made."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def calibration_path(folder: Path, identity: HostIdentity) -> Path:
    return Path(folder) / f"{identity.key()}.json"


def save_calibration(folder: Path, identity: HostIdentity, calibration, costs, comm_dir: Path | str,
                     arguments: dict) -> Path:
    """Write the calibration of `identity` (replacing an older one of the same host and transport)."""
    path = calibration_path(ensure_writable(Path(folder)), identity)
    atomic_write_json(path, {"kind": FILE_KIND, "version": FILE_VERSION,
                             "created": now_iso(),
                             "host": asdict(identity), "arguments": arguments, "comm": str(comm_dir),
                             "calibration": calibration.as_dict(), "costs": costs.as_dict()})
    return path


def read_calibration(path: Path) -> dict:
    """A calibration file, checked; bad files are bad input (one line naming the mend)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg}): rerun `alure-bench calibrate` or delete it") \
            from None
    if not isinstance(data, dict) or data.get("kind") != FILE_KIND or "costs" not in data:
        raise UsageError(f"{path} is not a calibration of `alure-bench calibrate`: delete it or rerun the command")
    if data.get("version") != FILE_VERSION:
        raise UsageError(f"{path} is a calibration of version {data.get('version')}, this alure-bench reads version "
                         f"{FILE_VERSION}: rerun `alure-bench calibrate`")
    return data


def find_costs(folder: Path, identity: HostIdentity):
    """(ExchangeCosts, path) of the calibration of exactly `identity` in `folder`; None where there is none."""
    path = calibration_path(folder, identity)
    if not path.is_file():
        return None
    data = read_calibration(path)
    if data["host"] != asdict(identity):  # a hash collision, or a file renamed by hand
        return None
    try:
        costs = ExchangeCosts.from_dict(data["costs"])
    except (KeyError, TypeError) as err:
        raise UsageError(f"{path} has no complete costs ({err}): rerun `alure-bench calibrate`") from None
    return replace(costs, source=f"{path} ({costs.source})"), path


def builtin_note() -> str:
    link = DEFAULT_COSTS.link
    return (f"the built-in DEFAULT_COSTS of bench/model/table_costs.py ({DEFAULT_COSTS.source}; a = "
            f"{link.alpha_s * 1e6:.0f} us, b = {link.beta_s_per_byte * 1e9:.2f} ns/B)")


def costs_for_this_host(transport: str = "shared-memory", warn: bool = False):
    """The costs `auto` decides with on this host: its calibration for `transport`, else DEFAULT_COSTS; with `warn`,
    the fall-back is said in one line on stderr, naming what was looked for and what is used instead."""
    return costs_and_origin_for_this_host(transport, warn)[0]


def costs_and_origin_for_this_host(transport: str = "shared-memory", warn: bool = False) -> tuple:
    """(costs, origin) of `costs_for_this_host`: origin (`costs_origin`) names the calibration file and its date, or
    the built-in costs."""
    folder = default_folder()
    identity = this_host(transport if transport in TRANSPORTS else "shared-memory")
    found = find_costs(folder, identity)
    if found:
        return found[0], costs_origin(CALIBRATED, found[0], found[1], read_calibration(found[1]).get("created"))
    if warn:
        print(f"alure-bench: warning: no calibration of this host ({identity.describe()}) in {folder}: auto decides "
              f"with {builtin_note()}; run `alure-bench calibrate` here to measure this host", file=sys.stderr,
              flush=True)
    return DEFAULT_COSTS, costs_origin(BUILT_IN, DEFAULT_COSTS)


COSTS_ENV = "ALURE_BENCH_COSTS"
CALIBRATED, COSTS_FILE, BUILT_IN = "calibration", "costs-file", "built-in"
"""What `auto` decided with (`costs_origin`'s kind): this host's calibration, a costs.json named by
ALURE_BENCH_COSTS, or DEFAULT_COSTS."""


def costs_origin(kind: str, costs: ExchangeCosts, path: Path | str | None = None, created: str | None = None) -> dict:
    """What a record says of the costs its `auto` ranks decided with: kind, file and its date (None for the
    built-in costs), and the costs' own source line."""
    return {"kind": kind, "path": None if path is None else str(path), "created": created, "source": costs.source}


def load_costs(path: str | Path | None = None, transport: str = "shared-memory", warn: bool = False) -> ExchangeCosts:
    """The costs `auto` decides with: `path`, else the file named by ALURE_BENCH_COSTS, else the calibration of
    this host and `transport` (DEFAULT_COSTS, with a one-line warning if `warn`, without)."""
    return load_costs_and_origin(path, transport, warn)[0]


def load_costs_and_origin(path: str | Path | None = None, transport: str = "shared-memory",
                          warn: bool = False) -> tuple:
    """(costs, origin) of `load_costs`: origin (`costs_origin`) is what an auto record names."""
    path = path or os.environ.get(COSTS_ENV)
    if not path:
        return costs_and_origin_for_this_host(transport, warn)
    try:
        data = json.loads(Path(path).read_text())
        costs = ExchangeCosts.from_dict(data)
    except FileNotFoundError:
        raise UsageError(f"{COSTS_ENV}={path}: no such file; write one with `alure-bench predict --out DIR` "
                         f"(DIR/costs.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{path} is not a costs.json of alure-bench predict ({err}): rewrite it") from None
    created = data.get("created") or datetime.fromtimestamp(Path(path).stat().st_mtime).astimezone().isoformat(
        timespec="seconds")
    return costs, costs_origin(COSTS_FILE, costs, path, created)


SWEEP_COSTS_FILE = "costs.json"
"""What a sweep folder keeps of the costs its auto points decide with (`keep_costs`)."""


def keep_costs(sweep_dir: Path) -> dict:
    """Write into `sweep_dir` the costs `auto` will decide with on this host (ranks on it: shared memory), with
    their origin, in the form ALURE_BENCH_COSTS reads back; return the origin. Each auto record names its own."""
    costs, origin = load_costs_and_origin(transport="shared-memory")
    atomic_write_json(Path(sweep_dir) / SWEEP_COSTS_FILE, costs.as_dict() | {"origin": origin})
    return origin
