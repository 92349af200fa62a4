"""The cost model out of sample (bench.model.validation): fitted on some points, it predicts the others.

On a synthetic sweep made from a known model (with noise) the held-out points come back within a few percent, and a
sweep whose np >= 3 points carry a cost the model lacks is caught. On the committed reference it is run and its
errors printed; the 25% target on the median step-time error of every split and mode (np<=2 -> np>=3 an expected
failure there, below), and 15% on every point's peak memory, are checked there too.
"""
import functools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.model.calibration import fit_link, read_comm_rows
from bench.model.validation import (
    SPLITS,
    TARGET_MEDIAN_ERROR,
    format_validation,
    not_validated,
    record_transport,
    tag_sweep,
    validate,
    validated_range,
)
from bench.plan.config import SweepConfig
from bench.results.records import atomic_write_json, read_records, write_record
from tests.synthetic import LINK, model_sweep, synthetic_rows

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
REFERENCE_COMM = ROOT / "results" / "reference-comm"
REFERENCE_CLUSTER = ROOT / "results" / "reference-cluster"  # slurm/reference_cluster.sh: a sweep and comm per rate
ENVIRONMENT = {"cores": 2, "memory_mib": 8192, "cpu_model": "test"}
TRUE_LOCAL = {"sparse-gather": 1e-9, "dense-reduce": 2e-9}


def synthetic_sweep(extra_per_rank: float = 0.0, noise: float = 0.02, seed: int = 0,
                    np1_ms: float = 40.0) -> list[dict]:
    """Records of a tiny-preset sweep (np 1-4, weak and strong, both modes, 2 repeats) whose step times a known Model
    gives, times (1 + noise x normal); np >= 3 points also take `extra_per_rank` x (np - 2) more: a cost the model
    does not have. The weak np=1 step is `np1_ms`."""
    config = SweepConfig(name="synthetic", preset="tiny", nps=[1, 2, 3, 4], steps=5, global_batch=96, repeats=2,
                         corun=False)
    return model_sweep(config, TRUE_LOCAL, ENVIRONMENT, np1_ms=np1_ms, noise=noise, seed=seed,
                       extra_per_rank=extra_per_rank)


def comm_rows() -> list[dict]:
    return synthetic_rows(LINK, nps=(2, 3, 4), noise=0.02, seed=1, sizes=range(10, 27))


def test_held_out_points_of_a_known_model_come_back_within_a_few_percent():
    v = validate(synthetic_sweep(), comm_rows(), environment=ENVIRONMENT)
    assert set(v.fits) == {"np<=2 -> np>=3", "weak -> strong"}
    assert "one host -> hosts" in v.not_run  # every synthetic rank ran on one host
    np_split = v.points[v.points["split"] == "np<=2 -> np>=3"]
    assert set(np_split["np"]) == {3, 4} and set(np_split["mode"]) == {"sparse-gather", "dense-reduce"}
    assert v.fits["np<=2 -> np>=3"]["sweep_nps"] == [1, 2] and v.fits["np<=2 -> np>=3"]["comm_nps"] == [2]
    strong = v.points[v.points["split"] == "weak -> strong"]
    assert set(strong["scaling"]) == {"strong"} and set(strong["np"]) == {1, 2, 3, 4}
    for row in v.summary.itertuples():
        assert row.median_abs_rel_error < 0.05 and row.max_abs_rel_error < 0.10, format_validation(v)
    # Without noise the fit at np <= 2 finds the truth's CPU work around the collectives (with 2% noise sparse-gather's
    # is not identifiable on the tiny preset: it is under 1% of a step).
    exact = validate(synthetic_sweep(noise=0.0), comm_rows(), environment=ENVIRONMENT)
    for mode, value in TRUE_LOCAL.items():
        assert exact.fits["np<=2 -> np>=3"]["local_s_per_byte"][mode] == pytest.approx(value, rel=0.01)


def test_each_sweep_is_predicted_from_its_own_np1_points():
    # The same workload recorded twice, the second recording's compute 30% faster (a shared machine on another
    # day): tagged with their sweeps, each sweep's strong points are predicted from its own weak np=1 points.
    slow, fast = synthetic_sweep(noise=0.0), synthetic_sweep(noise=0.0, np1_ms=28.0)
    split = [s for s in SPLITS if s.name == "weak -> strong"]
    own = validate(tag_sweep(slow, "slow") + tag_sweep(fast, "fast"), comm_rows(), splits=split,
                   environment=ENVIRONMENT)
    assert (own.points.groupby("mode").size() == 8).all()  # each sweep's 4 strong points, apart
    # (from one profile of both sweeps' np=1 steps pooled, the strong points of both came out far off)
    assert (own.summary["max_abs_rel_error"] < 0.05).all(), format_validation(own)


def test_a_cost_the_model_lacks_shows_in_the_held_out_points():
    # 40% more per rank beyond 2 at np >= 3: fitted on np <= 2 the model cannot know it; fitted on weak (all np) it
    # absorbs part of it into the CPU work, so strong still misses.
    v = validate(synthetic_sweep(extra_per_rank=0.4), comm_rows(), environment=ENVIRONMENT)
    by = v.summary.set_index(["split", "mode"])
    for mode in ("sparse-gather", "dense-reduce"):
        assert by.loc[("np<=2 -> np>=3", mode), "median_abs_rel_error"] > 0.25, format_validation(v)


def test_points_on_several_hosts_are_predicted_over_the_tcp_link():
    # The same sweep with its np >= 2 points on two hosts over a link 4x slower than shared memory: with that link
    # fitted to TCP comm rows, the one-host fit predicts them; the records say their transport.
    tcp = replace(LINK, beta_s_per_byte=4 * LINK.beta_s_per_byte, alpha_s=3 * LINK.alpha_s)
    records = synthetic_sweep(noise=0.0)
    moved = [dict(r, transport="tcp") for r in records if r["np"] >= 2 and r["point"]["scaling"] == "weak"]
    rows = comm_rows() + synthetic_rows(tcp, nps=(2, 4), sizes=range(10, 27), transport="tcp")
    v = validate(records + moved, rows, splits=[s for s in SPLITS if s.name == "one host -> hosts"],
                 environment=ENVIRONMENT)
    assert {record_transport(r) for r in moved} == {"tcp"}
    points = v.points
    assert len(points) == 6 and set(points["transport"]) == {"tcp"}
    # generated over the one-host link, predicted over a slower one: every point predicted slower than measured
    assert (points["rel_error"] > 0).all(), format_validation(v)
    assert not v.not_run


def test_points_over_two_link_rates_are_each_predicted_over_their_own_link():
    # Weak points over a slow link, strong points over a link 4x faster: each link is fitted to the TCP comm rows
    # recorded at its rate (as `comm` writes link_rate_gbps), and each point is predicted over its own. The sweep is
    # generated over the one-host link: both sets are predicted slower than measured, the slow link's far more.
    links = {1.0: replace(LINK, beta_s_per_byte=16 * LINK.beta_s_per_byte),
             4.0: replace(LINK, beta_s_per_byte=4 * LINK.beta_s_per_byte)}
    records = synthetic_sweep(noise=0.0)
    moved = [dict(r, transport="tcp", link={"rate_gbps": 1.0 if r["point"]["scaling"] == "weak" else 4.0})
             for r in records if r["np"] >= 2]
    rows = comm_rows()
    for rate, link in links.items():
        rows += [row | {"link_rate_gbps": rate} for row in synthetic_rows(link, nps=(2, 4), sizes=range(10, 27),
                                                                         transport="tcp")]
    v = validate(records + moved, rows, splits=[s for s in SPLITS if s.name == "one host -> hosts"],
                 environment=ENVIRONMENT)
    fitted = v.fits["one host -> hosts"]["network_links"]
    assert set(fitted) == set(links)
    for rate, link in links.items():
        assert fitted[rate]["beta_ns_per_byte"] == pytest.approx(link.beta_s_per_byte * 1e9, rel=0.05)
    by_link = v.summary.set_index(["link", "oversubscribed", "mode"])["median_abs_rel_error"]
    assert {link for link, _, _ in by_link.index} == {"1 Gb/s", "4 Gb/s"}
    for over, mode in {(o, m) for _, o, m in by_link.index}:
        assert by_link[("1 Gb/s", over, mode)] > by_link[("4 Gb/s", over, mode)], format_validation(v)
    assert (v.points["rel_error"] > 0).all(), format_validation(v)


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_predict_validate_prints_and_writes_the_out_of_sample_errors(tmp_path):
    sweep = tmp_path / "sweep"
    config = SweepConfig(name="synthetic", preset="tiny", nps=[1, 2, 3, 4], steps=5, global_batch=96, repeats=2,
                         corun=False)
    atomic_write_json(sweep / "sweep.json", config.as_dict())
    atomic_write_json(sweep / "environment.json", ENVIRONMENT)
    for r in synthetic_sweep():
        write_record(sweep, r)
    atomic_write_json(tmp_path / "comm" / "comm.json", {"kind": "comm", "rows": comm_rows()})
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench.cli", "predict", "--results", str(sweep), "--calibration",
                          str(tmp_path / "comm"), "--validate", "--max-np", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("calibration per transport, shared-memory: a = ", "out of sample", "np<=2 -> np>=3: fitted on",
                 "one host -> hosts: not run"):
        assert line in run.stdout, run.stdout
    summary = json.loads((out / "prediction.json").read_text())["validation"]["summary"]
    assert {(s["split"], s["mode"]) for s in summary} >= {("np<=2 -> np>=3", "dense-reduce"),
                                                           ("weak -> strong", "sparse-gather")}
    assert (out / "validation.csv").stat().st_size > 0 and (out / "validation-summary.csv").stat().st_size > 0


@functools.cache
def reference_validation():
    """The committed one-host reference and the emulated cluster's sweep, with their comm runs (run once)."""
    environment = json.loads((REFERENCE / "environment.json").read_text())
    records = tag_sweep(read_records(REFERENCE), REFERENCE) + [
        r for sweep in sorted(REFERENCE_CLUSTER.rglob("sweep.json")) for r in tag_sweep(read_records(sweep.parent),
                                                                                      sweep.parent)]
    v = validate(records, read_comm_rows(REFERENCE_COMM) + read_comm_rows(REFERENCE_CLUSTER), environment=environment)
    print(format_validation(v))
    return v


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_out_of_sample_runs_on_the_committed_reference():
    v = reference_validation()
    np_split = v.summary[v.summary["split"] == "np<=2 -> np>=3"]
    assert set(np_split["mode"]) >= {"sparse-gather", "dense-reduce"}
    assert (np_split["nps"] == "3,4").all() and np_split["median_abs_rel_error"].notna().all()


# The fits leave oversubscribed points out (bench.model.step.fit_local_work, bench.model.calibration.fit_link), so
# nothing fitted says how much more than an even share of a core lock-step ranks lose beyond the cores: the model
# shares a core out evenly (bench.model.step.cpu_factor: 1.5x the np=1 compute at np 3 on 2 cores, 2x at np 4). On
# this 2-core recording every np >= 3 point is oversubscribed, and so is the cluster's 4 hosts. The groups that miss
# are all among those: coalesced-gather's and dense-reduce's on one host, and on the cluster's 4 hosts also
# row-wise's and sparse-as-dense's; their compute took longer than the model's even share, or the densified tables'
# allreduce longer than the model's price
# (test_the_misses_are_oversubscribed_and_what_the_measured_compute_leaves_is_the_densified_exchange).
# docs/costmodel.md "Fit quality".
TIME_SHARING = pytest.mark.xfail(strict=True, reason="oversubscribed points (2 cores): compute and the densified "
                                 "allreduce slower than an even share of a core")
REFERENCE_GROUPS = [("np<=2 -> np>=3", True, TIME_SHARING), ("weak -> strong", False, ()),
                    ("weak -> strong", True, TIME_SHARING), ("one host -> hosts", False, ()),
                    ("one host -> hosts", True, TIME_SHARING)]


@pytest.mark.parametrize("split, oversubscribed", [pytest.param(s, o, marks=m, id=f"{s}-{'over' if o else 'fits'}")
                                                   for s, o, m in REFERENCE_GROUPS])
def test_out_of_sample_median_error_within_25_percent_on_the_reference(split, oversubscribed):
    v = reference_validation()
    assert split in v.fits, v.not_run  # every split runs: the cluster's points are predicted too
    assert v.fits[split]["oversubscribed_points_left_out"] > 0  # the fits leave them out, and say so
    groups = v.summary[(v.summary["split"] == split) & (v.summary["oversubscribed"] == oversubscribed)]
    assert len(groups) and (groups["median_abs_rel_error"] <= TARGET_MEDIAN_ERROR).all(), format_validation(v)


def test_the_misses_are_oversubscribed_and_what_the_measured_compute_leaves_is_the_densified_exchange():
    """The measured causes of every miss. Every held-out group that misses is oversubscribed (more ranks than the
    machine's 2 cores). Put the measured compute (the slowest rank's data, forward and backward, less the exchange's
    own work in them) in place of the model's, an attribution, not a validation, since it reads the held-out points'
    phases: a miss that then comes within 25% is one of the compute, which ran slower than the model's even share
    of a core; a miss that does not is the exchange, and only in the modes that move the dense tables (dense-reduce,
    sparse-as-dense), whose large allreduce slows more than an even share when ranks time-share 2 cores. In the
    np<=2 -> np>=3 split the replicated gather and reduce modes come within 25% with their measured compute."""
    v = reference_validation()
    missed = not_validated(v)
    assert len(missed), "no miss left: drop the TIME_SHARING marks above"
    assert missed["oversubscribed"].all(), format_validation(v)
    compute = missed["median_abs_rel_error_with_measured_compute"] <= TARGET_MEDIAN_ERROR
    assert (missed[compute]["median_compute_ratio"] > 1).all(), format_validation(v)
    assert set(missed[~compute]["mode"]) <= {"dense-reduce", "sparse-as-dense"}, format_validation(v)
    np_split = v.summary[v.summary["split"] == "np<=2 -> np>=3"]
    assert np_split["oversubscribed"].all()  # 2 cores: every np >= 3 point time-shares them
    replicated = np_split[np_split["mode"].isin(["sparse-gather", "coalesced-gather", "dense-reduce"])]
    assert len(replicated) == 3
    assert (replicated["median_abs_rel_error_with_measured_compute"] <= TARGET_MEDIAN_ERROR).all(), \
        format_validation(v)


def test_the_validated_range_is_read_off_the_splits_that_held():
    v = reference_validation()
    ranges = validated_range(v)
    held = v.summary[v.summary["median_abs_rel_error"] <= TARGET_MEDIAN_ERROR]
    assert set(ranges) == set(held["mode"])
    for mode, r in ranges.items():
        mine = v.points[v.points["mode"] == mode]
        assert set(r.nps) <= set(mine["np"]) and r.hosts <= mine["hosts"].max()
        assert "shared memory" in r.links  # weak -> strong held on one host for every mode


# Row-wise's training adds more to its build peak than the model's shard, Adagrad state and all-to-all buffers
# (at strong np=2 its records' train_peak_rss_mib lies further above build_peak_rss_mib than sparse-gather's), so the
# model under-predicts its peak there; the figures and the command that prints them: docs/costmodel.md "Fit
# quality". Which allocation it is (Horovod's all-to-all buffers, the owners' sparse gradients) is not measured yet.
ROW_WISE_TRAINING_MEMORY = pytest.mark.xfail(strict=True, reason="row-wise training holds more than the model's "
                                             "shard + state + buffers (measured: train peak over build peak)")
REFERENCE_MODES = ("sparse-gather", "coalesced-gather", "dense-reduce", "sparse-as-dense", "auto", "row-wise",
                   "table-wise")


@pytest.mark.parametrize("mode", [pytest.param(m, marks=ROW_WISE_TRAINING_MEMORY if m == "row-wise" else ())
                                  for m in REFERENCE_MODES])
def test_out_of_sample_peak_memory_within_15_percent_of_every_point_on_the_reference(mode):
    """Every held-out point of the mode in every split (np 1-4 on one host, the cluster's hosts): the predicted peak
    resident set per rank within 15% of the measured one."""
    v = reference_validation()
    groups = v.summary[v.summary["mode"] == mode]
    assert len(groups) and (groups["max_abs_peak_error"] <= 0.15).all(), format_validation(v)


def test_the_link_fitted_between_emulated_hosts_is_the_link_tc_shaped():
    """At P = 2 a ring's bytes cross the one link between the two hosts: fitted to the TCP comm rows (those beyond
    the shaper's burst), 8 / b lands within 15% of the rate tc was configured with, read back from tc by comm."""
    rows = [r for r in read_comm_rows(REFERENCE_CLUSTER) if r.get("transport") == "tcp" and r["np"] == 2]
    rates = sorted({r["link_rate_gbps"] for r in rows})
    assert rates, "no comm run across 2 emulated hosts in results/reference-cluster"
    for rate in rates:  # each link rate the cluster was recorded at, fitted on its own
        fitted = fit_link([r for r in rows if r["link_rate_gbps"] == rate], "horovod", transport="tcp")
        assert fitted.quality.within_burst_rows > 0  # small messages pass at line speed and are left out
        gbps = 8 / fitted.link.beta_s_per_byte / 1e9
        print(f"{rate:g} Gb/s link, np=2: fitted {gbps:.3f} Gb/s from {fitted.quality.rows} rows "
              f"({fitted.quality.within_burst_rows} within the burst left out), R^2 {fitted.quality.r2:.3f}")
        assert gbps == pytest.approx(rate, rel=0.15), (rate, fitted)
