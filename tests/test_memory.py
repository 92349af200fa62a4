"""The training's own memory: the kernel's high-water mark reset once the workload is built, read per phase."""
import pytest

from bench.ranks.memory import PeakProbe, rss_mib
from tests.helpers import launch

SPIKE_MIB = 600


@pytest.mark.mpi
def test_memory_allocated_before_the_reset_is_absent_from_the_training_peak():
    (r,) = launch(1, "memory_probe", str(SPIKE_MIB))
    assert r["memory_probe"] == "vmhwm-reset"
    assert r["build_peak_rss_mib"] > SPIKE_MIB  # the spike is in the build's peak
    assert r["train_peak_rss_mib"] < r["build_peak_rss_mib"] - 0.8 * SPIKE_MIB  # and not in the training's
    assert r["peak_rss_mib"] == r["build_peak_rss_mib"]
    phases = r["phase_peak_rss_mib"]
    assert set(phases) == {"data", "forward", "backward", "exchange_wait", "optimizer"}
    assert max(phases.values()) == r["train_peak_rss_mib"] and min(phases.values()) > 0.5 * r["baseline_rss_mib"]
    assert r["rss_growth_mib"] == pytest.approx(r["train_peak_rss_mib"] - r["baseline_rss_mib"])
    assert len(r["memory_probe_ms"]) == len(r["step_time_ms"])


def test_the_probe_sees_a_window_s_own_peak():
    probe = PeakProbe()
    assert probe.method == "vmhwm-reset"
    block = bytearray(200 * 2**20)  # zero pages: make them resident
    block[::4096] = b"x" * len(block[::4096])
    del block
    high = probe.peak_mib()
    assert high >= rss_mib() + 150
    probe.reset()
    assert probe.peak_mib() < high - 150
    probe.close()


def test_a_refused_reset_falls_back_to_sampling_and_says_so(tmp_path):
    probe = PeakProbe(clear_refs=str(tmp_path / "missing"))  # as where /proc has no clear_refs
    assert probe.method.startswith("rss-sampled: high-water mark reset refused")
    assert probe.peak_mib() == pytest.approx(rss_mib(), rel=0.05)
    probe.reset()  # a no-op, not an error
