"""Calibrations per host: `alure-bench calibrate` files them, `auto` finds the one of its host or says what it falls
back to; bad calibration files and bad flags are one line."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest

from bench.errors import UsageError
from bench.model.calibration import fit_link
from bench.model.calibration_store import (
    CALIBRATIONS_ENV,
    HostIdentity,
    calibration_path,
    costs_for_this_host,
    default_folder,
    find_costs,
    keep_costs,
    load_costs,
    load_costs_and_origin,
    save_calibration,
    this_host,
)
from bench.model.collectives import Link
from bench.model.table_costs import DEFAULT_COSTS
from bench.results.report import auto_costs_note
from tests.helpers import assert_one_line_error
from tests.synthetic import SHM, synthetic_rows

CLI = [sys.executable, "-m", "bench.cli"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty calibration folder, named by ALURE_BENCH_CALIBRATIONS (what a user's cache would be)."""
    path = tmp_path / "calibrations"
    monkeypatch.setenv(CALIBRATIONS_ENV, str(path))
    monkeypatch.delenv("ALURE_BENCH_COSTS", raising=False)
    return path


def calibrated_costs(link: Link = SHM):
    return replace(DEFAULT_COSTS, link=link, source="test")


def test_identity_keys_differ_by_every_field_and_name_the_host():
    base = HostIdentity(cpu_model="AMD EPYC 7B13", cores=2, mpi_library="Open MPI v4.1.4", transport="shared-memory")
    keys = {base.key(), replace(base, cores=4).key(), replace(base, transport="tcp").key(),
            replace(base, mpi_library="MPICH 4.0").key(), replace(base, cpu_model="Intel Xeon").key()}
    assert len(keys) == 5
    assert base.key().startswith("amd-epyc-7b13-2c-shared-memory-") and base.key() == HostIdentity(**asdict(base)).key()
    with pytest.raises(ValueError, match="transport"):
        replace(base, transport="infiniband")
    here = this_host("tcp")
    assert here.transport == "tcp" and here.cores >= 1 and here.cpu_model and "MPI" in here.mpi_library


def test_auto_uses_the_calibration_of_its_host_and_transport(folder, capsys):
    cal = fit_link(synthetic_rows(SHM, nps=(2, 3)), transport="shared-memory")
    path = save_calibration(folder, this_host("shared-memory"), cal, calibrated_costs(), "comm-dir", {"nps": "2,3"})
    assert path == calibration_path(folder, this_host("shared-memory")) and default_folder() == folder
    costs = load_costs(transport="shared-memory", warn=True)
    assert costs.link == SHM and str(path) in costs.source
    assert capsys.readouterr().err == ""  # found: nothing to warn about
    # another transport of the same host has no calibration: the built-in costs, and one line saying so
    assert load_costs(transport="tcp", warn=True) is DEFAULT_COSTS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning: no calibration of this host" in err[0] and "tcp" in err[0]
    assert "DEFAULT_COSTS" in err[0] and DEFAULT_COSTS.source in err[0] and "alure-bench calibrate" in err[0]
    # only rank 0 warns
    assert costs_for_this_host("tcp", warn=False) is DEFAULT_COSTS and capsys.readouterr().err == ""
    # a calibration of another host (here: other cores) does not match
    other = replace(this_host("tcp"), cores=this_host("tcp").cores + 64)
    save_calibration(folder, other, cal, calibrated_costs(), "comm-dir", {})
    assert find_costs(folder, this_host("tcp")) is None


def test_auto_records_and_the_sweep_folder_name_the_costs_auto_decided_with(folder, tmp_path, monkeypatch):
    # no calibration: the built-in costs, said as such; the sweep folder keeps them, and report.md says "uncalibrated"
    costs, origin = load_costs_and_origin()
    assert costs is DEFAULT_COSTS and origin["kind"] == "built-in" and origin["path"] is None
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    assert keep_costs(sweep) == origin
    kept = json.loads((sweep / "costs.json").read_text())
    assert kept["origin"] == origin and load_costs(sweep / "costs.json") == DEFAULT_COSTS  # readable back
    record = {"point": {"mode": "auto"}, "status": "ok", "auto_costs": origin}
    assert "auto ran uncalibrated** in 1 of 1" in auto_costs_note([record, {"point": {"mode": "dense-reduce"},
                                                                            "status": "ok"}])
    assert "do not say" in auto_costs_note([{"point": {"mode": "auto"}, "status": "ok"}])
    assert auto_costs_note([{"point": {"mode": "dense-reduce"}, "status": "ok"}]) is None
    # this host calibrated: the file and its date
    cal = fit_link(synthetic_rows(SHM, nps=(2,)), transport="shared-memory")
    path = save_calibration(folder, this_host("shared-memory"), cal, calibrated_costs(), "comm-dir", {})
    costs, origin = load_costs_and_origin()
    assert origin == {"kind": "calibration", "path": str(path), "created": json.loads(path.read_text())["created"],
                      "source": costs.source} and origin["created"]
    note = auto_costs_note([dict(record, auto_costs=origin)])
    assert "uncalibrated" not in note and str(path) in note and origin["created"] in note
    # a costs.json named by ALURE_BENCH_COSTS: that file and the date predict wrote into it
    file = tmp_path / "costs.json"
    file.write_text(json.dumps(calibrated_costs().as_dict() | {"created": "2026-01-02T03:04:05+00:00"}))
    monkeypatch.setenv("ALURE_BENCH_COSTS", str(file))
    assert load_costs_and_origin()[1] | {"source": ""} == {"kind": "costs-file", "path": str(file),
                                                            "created": "2026-01-02T03:04:05+00:00", "source": ""}


def test_bad_calibration_files_are_one_line_errors(folder):
    path = calibration_path(folder, this_host("shared-memory"))
    folder.mkdir()
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON.*alure-bench calibrate"):
        load_costs()
    path.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(UsageError, match="not a calibration"):
        load_costs()
    save_calibration(folder, this_host("shared-memory"), fit_link(synthetic_rows(SHM)), calibrated_costs(), "c", {})
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"version": 0}))
    with pytest.raises(UsageError, match="version 0.*rerun `alure-bench calibrate`"):
        load_costs()


@pytest.mark.mpi  # launches real ranks
def test_calibrate_measures_this_host_and_auto_finds_it(tmp_path, monkeypatch):
    # Real ranks, tiny sizes: comm at np 2 and 3 (3 is oversubscribed on 2 cores, flagged, and left out of the fit),
    # fitted and filed.
    out = tmp_path / "cal"
    run = subprocess.run([*CLI, "calibrate", "--nps", "2,3", "--max-bytes", "32K", "--iters", "3", "--warmup", "1",
                          "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    oversubscribed = os.cpu_count() < 3
    fitted = "np 2: R^2" if oversubscribed else "np 2,3: R^2"
    assert "calibration shared-memory: a = " in run.stdout and fitted in run.stdout, run.stdout
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == [f"{this_host('shared-memory').key()}.json"]
    data = json.loads(files[0].read_text())
    assert data["host"] == asdict(this_host("shared-memory"))
    quality = data["calibration"]["quality"]
    assert quality["nps"] == ([2] if oversubscribed else [2, 3]) and data["calibration"]["transport"] == "shared-memory"
    assert (quality["oversubscribed_rows"] > 0) == oversubscribed
    assert "CPU work per byte built in" in data["costs"]["source"]
    assert len(list((out / "comm").glob("*/np*/comm.json"))) == 2  # the measurements stay beside the fit
    monkeypatch.setenv(CALIBRATIONS_ENV, str(out))
    monkeypatch.delenv("ALURE_BENCH_COSTS", raising=False)
    costs = load_costs()
    assert costs.link == Link(**data["calibration"]["link"]) and costs.link != DEFAULT_COSTS.link
    assert costs.alltoall_link == Link(**data["calibration"]["alltoall"])  # auto prices sharding on it


def test_calibrate_bad_input_is_one_line(tmp_path, capsys):
    from bench.cli import main

    def calibrate(*args):  # in-process: a traceback would fail the test; the exit code and stderr are checked
        code = main(["calibrate", *args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    assert_one_line_error(calibrate("--nps", "1,2", "--out", str(tmp_path)), "at least 2 ranks")
    assert_one_line_error(calibrate("--nps", "two", "--out", str(tmp_path)), "--nps")
    assert_one_line_error(calibrate("--max-bytes", "lots", "--out", str(tmp_path)), "--max-bytes")
    (tmp_path / "file").write_text("")
    assert_one_line_error(calibrate("--out", str(tmp_path / "file" / "sub")), "not writable")
    assert_one_line_error(calibrate("--results", str(tmp_path / "none"), "--out", str(tmp_path)), "alure-bench sweep")
    assert not list(tmp_path.glob("comm"))  # nothing measured before the input was checked
