"""The cost model: its formulas by hand, its least-squares calibration per transport, the #554 arithmetic, memory and
crossover. Its predictions against measured points, out of sample, are in tests/test_validation.py."""
import math

import numpy as np
import pytest

from bench.errors import UsageError
from bench.model.calibration import Calibration, FitQuality, calibrate, fit_link, fit_links_by_transport, read_comm_rows
from bench.model.calibration_store import load_costs
from bench.model.collectives import Link, allgather_s, allreduce_s, nnls
from bench.model.paper import gathered_bytes, tied_embedding_rows
from bench.model.profile import Profile, Table
from bench.model.step import LocalFit, Machine, Model, cpu_factor
from bench.model.table_costs import (
    DEFAULT_COSTS,
    ELEMENT_BYTES,
    INDEX_BYTES,
    VALUE_BYTES,
    ExchangeCosts,
    choose_dense,
    choose_mode,
    dense_table_s,
    sparse_table_s,
    table_memory_bytes,
)
from bench.results.records import atomic_write_json, write_csv_atomic
from tests.synthetic import LINK, SHM, synthetic_rows


def test_ring_formulas_by_hand():
    # 2(P-1)a + 2((P-1)/P) n b + ((P-1)/P) n g with P=4, n=1e6 bytes
    assert allreduce_s(1e6, 4, LINK) == pytest.approx(2 * 3 * 20e-6 + 2 * 0.75 * 1e6 * 1e-9 + 0.75 * 1e6 * 0.25e-9)
    # (P-1)a + ((P-1)/P) n b, n the total gathered
    assert allgather_s(1e6, 4, LINK) == pytest.approx(3 * 20e-6 + 0.75 * 1e6 * 1e-9)
    assert allreduce_s(1e9, 1, LINK) == 0 == allgather_s(1e9, 1, LINK)  # one rank exchanges nothing
    # At large P the bandwidth terms saturate (2nb + ng for allreduce) while the latency term keeps growing.
    assert allreduce_s(1e6, 4096, LINK) == pytest.approx(2 * 4095 * 20e-6 + 2 * 4095 / 4096 * 1e-3 + 4095 / 4096
                                                         * 0.25e-3)


def test_nnls_keeps_unknowns_non_negative():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nnls(a, np.array([1.0, 2.0, 3.0])) == pytest.approx([1.0, 2.0])
    x = nnls(a, np.array([-1.0, 2.0, 1.0]))  # the unconstrained solution has a negative first unknown
    assert x[0] == 0 and x[1] > 0


def test_least_squares_recovers_known_alpha_beta_gamma():
    cal = fit_link(synthetic_rows(LINK))
    assert cal.link.alpha_s == pytest.approx(LINK.alpha_s, rel=1e-6)
    assert cal.link.beta_s_per_byte == pytest.approx(LINK.beta_s_per_byte, rel=1e-6)
    assert cal.link.gamma_s_per_byte == pytest.approx(LINK.gamma_s_per_byte, rel=1e-6)
    q = cal.quality
    assert q.rows == 2 * 2 * 9 and q.nps == (2, 4)
    assert q.r2 == pytest.approx(1.0) and q.max_rel_error < 1e-6
    assert q.holdout_rows == 18 and q.holdout_median_rel_error < 1e-6  # sparse-pair: predicted, not fitted
    assert cal.copy_s_per_byte == pytest.approx(1e-10)


def test_least_squares_with_noise_and_a_single_process_count():
    # One np is enough: allgather separates b, allreduce then gives g, the intercepts give a.
    cal = fit_link(synthetic_rows(LINK, nps=(2,), noise=0.05, seed=3))
    assert cal.link.alpha_s == pytest.approx(LINK.alpha_s, rel=0.15)
    assert cal.link.beta_s_per_byte == pytest.approx(LINK.beta_s_per_byte, rel=0.15)
    assert cal.link.gamma_s_per_byte == pytest.approx(LINK.gamma_s_per_byte, rel=0.5)
    assert 0.01 < cal.quality.rms_rel_error < 0.1


TCP = Link(alpha_s=60e-6, beta_s_per_byte=0.8e-9, gamma_s_per_byte=0.35e-9)


@pytest.mark.parametrize("seed", range(5))
def test_fit_per_transport_recovers_known_alpha_beta_gamma_within_5_percent(seed):
    # comm rows at np 2, 3 and 4, every size comm measures by default (1 KiB .. 64 MiB), 1% multiplicative noise, two
    # transports mixed in one set of rows: each transport's a, b, g come back within 5%. (g is told apart from b only
    # by allreduce against allgather: with 2% noise a seed in twenty misses 5% on g.)
    rows = (synthetic_rows(SHM, nps=(2, 3, 4), noise=0.01, seed=seed, sizes=range(10, 27))
            + synthetic_rows(TCP, nps=(2, 3, 4), noise=0.01, seed=seed + 100, sizes=range(10, 27), transport="tcp"))
    fits = fit_links_by_transport(rows)
    assert set(fits) == {"shared-memory", "tcp"}
    for transport, truth in (("shared-memory", SHM), ("tcp", TCP)):
        cal = fits[transport]
        assert cal.transport == transport
        for got, want in zip((cal.link.alpha_s, cal.link.beta_s_per_byte, cal.link.gamma_s_per_byte),
                             (truth.alpha_s, truth.beta_s_per_byte, truth.gamma_s_per_byte)):
            assert got == pytest.approx(want, rel=0.05), (transport, cal.link, truth)
        q = cal.quality
        assert q.rows == 2 * 3 * 17 and q.nps == (2, 3, 4)
        assert q.r2 > 0.99 and q.median_rel_error < 0.02 and q.max_rel_error < 0.05
    # One link fitted to both transports' rows cannot fit either: what the per-transport fit is for.
    mixed = fit_link(rows)
    assert mixed.transport == "any" and mixed.quality.median_rel_error > 5 * fits["tcp"].quality.median_rel_error


def test_transport_of_a_comm_run_reaches_its_rows(tmp_path):
    # alure-bench comm writes the run's network (hosts, transport, link) beside its rows; rows without a transport of their
    # own take the run's, rows without either ran on one host.
    atomic_write_json(tmp_path / "cluster" / "comm.json",
                      {"kind": "comm", "network": {"transport": "tcp"}, "rows": synthetic_rows(TCP, nps=(2,))})
    atomic_write_json(tmp_path / "local" / "comm.json", {"kind": "comm", "rows": synthetic_rows(SHM, nps=(2,))})
    fits = fit_links_by_transport(read_comm_rows(tmp_path))
    assert fits["tcp"].link.beta_s_per_byte == pytest.approx(TCP.beta_s_per_byte, rel=1e-6)
    assert fits["shared-memory"].link.beta_s_per_byte == pytest.approx(SHM.beta_s_per_byte, rel=1e-6)
    assert calibrate(tmp_path).transport == "shared-memory"  # the link within a host, where there is one
    assert calibrate(tmp_path / "cluster").transport == "tcp"


def test_fitted_bandwidth_is_set_beside_the_link_rate_tc_configured(tmp_path):
    from bench.cli.calibrate import link_check
    one_gbit = Link(alpha_s=80e-6, beta_s_per_byte=8e-9, gamma_s_per_byte=0.3e-9)  # 1 Gbit/s: 8 ns per byte
    network = {"transport": "tcp", "link": {"interface": "veth0", "qdisc": "tbf", "rate_gbps": 1.0}}
    atomic_write_json(tmp_path / "comm.json", {"kind": "comm", "network": network,
                                               "rows": synthetic_rows(one_gbit, nps=(2,), noise=0.01)})
    rows = read_comm_rows(tmp_path)
    cal = fit_links_by_transport(rows)["tcp"]
    line = link_check(cal, rows)
    assert line.startswith("tcp: fitted bandwidth") and "against the link's 1 Gb/s as configured (tc)" in line
    assert float(line.split(": ")[-1].split()[0]) == pytest.approx(1.0, abs=0.05)
    assert link_check(fit_links_by_transport(synthetic_rows(SHM))["shared-memory"], rows) is None


def test_calibration_reads_what_alure_bench_comm_writes(tmp_path):
    from bench.results.comm_rows import EXTRA_FIELDS, ROW_FIELDS
    rows = synthetic_rows(LINK, nps=(2,))
    (tmp_path / "np2").mkdir()
    atomic_write_json(tmp_path / "np2" / "comm.json", {"kind": "comm", "rows": rows})
    write_csv_atomic(tmp_path / "np4" / "comm.csv", synthetic_rows(LINK, nps=(4,)), ROW_FIELDS + EXTRA_FIELDS)
    got = read_comm_rows(tmp_path)
    assert {r["np"] for r in got} == {1, 2, 4}
    cal = calibrate(tmp_path)
    assert cal.link.beta_s_per_byte == pytest.approx(LINK.beta_s_per_byte, rel=1e-4)
    with pytest.raises(UsageError, match="choose --backend"):
        calibrate(tmp_path, backend="gloo")
    with pytest.raises(UsageError, match="alure-bench comm"):
        read_comm_rows(tmp_path / "missing")


def test_gathered_size_of_horovod_issue_554():
    # The issue's numbers: the allgather's output was 2233033 rows of a 512-wide float32 gradient,
    # "2233033*512*4 bytes =~4.25GB". The thread gives the gathered row count, not its split over ranks: every
    # split of it (e.g. 43 ranks of 51931 rows, ragged or not) gives the same size.
    values = gathered_bytes(2233033, 1, 512, index_bytes=0)
    assert values == 2233033 * 512 * 4 == 4_573_251_584
    assert values / 2**30 == pytest.approx(4.25, abs=0.01)  # GiB
    assert gathered_bytes([51931] * 43, None, 512, index_bytes=0) == values
    # torch's COO indices (int64 per row) come on top: what sparse-gather holds here.
    assert gathered_bytes(2233033, 1, 512) == values + 8 * 2233033
    # The growth is P-fold: the same rows per rank on twice the ranks hold twice as much.
    assert gathered_bytes(51931, 86, 512) == 2 * gathered_bytes(51931, 43, 512)
    # The dense alternative is one V x d table whatever P: for the Transformer's 33708-token vocabulary, 69 MB.
    assert VALUE_BYTES * 33708 * 512 == 69_033_984


def test_tied_embedding_rows_of_openseq2seq_pr_249():
    # NVIDIA/OpenSeq2Seq PR 249: (num_gpus * (vocab + src tokens + tgt tokens), hidden) =
    # (2 * (32768 + 128 * 56 + 128 * 56), 512) = (94208, 512).
    rows = tied_embedding_rows(32768, 128 * 56, 128 * 56)
    assert 2 * rows == 94208
    assert gathered_bytes(rows, 2, 512, index_bytes=0) == 94208 * 512 * 4


def tiny_model(link=LINK, optimizer_ms=10.0, rows=100_000, dim=64, lookups=2000.0) -> Model:
    """A Model from numbers, no sweep: one table, a 100 ms np=1 step."""
    table = Table(name="t.weight", rows=rows, dim=dim, lookups_per_sample=lookups / 128, lookups_per_step=0.0,
                  distinct_at_reference=lookups)
    profile = Profile(preset="test", tables=(table,), dense_param_bytes=1 << 20, group_size=8, reference_batch=128,
                      compute_ms=90.0, backward_ms=50.0, optimizer_ms=optimizer_ms, base_rss_mib=500.0,
                      measured_cores=2, measured_threads=2)
    quality = FitQuality(rows=0, nps=(), r2=1.0, rms_rel_error=0, max_rel_error=0, median_rel_error=0,
                         holdout_rows=0, holdout_median_rel_error=None)
    cal = Calibration(link=link, copy_s_per_byte=None, backend="horovod", quality=quality, source="test")
    local = LocalFit(s_per_byte={"sparse-gather": 1e-9, "dense-reduce": 0.5e-9, "sparse-as-dense": 2e-9}, points={},
                     rms_rel_error={})
    return Model(profile, cal, local)


def machine(**kw) -> Machine:
    return Machine(**{"local": LINK, "ranks_per_node": 1 << 20, "cores_per_node": 1 << 20, **kw})


def test_np1_step_is_the_measured_np1_step_in_every_mode():
    model = tiny_model()
    for mode in ("sparse-gather", "dense-reduce", "auto"):
        s = model.step(machine(), 1, mode, 128)
        assert s.step_ms == pytest.approx(100.0) and s.network_ms == 0 and s.exchange_bytes_held == 0


def test_step_parts_by_hand_at_four_ranks():
    model = tiny_model()
    costs = model.costs(machine())
    gathered = 4 * 2000 * (INDEX_BYTES + VALUE_BYTES * 64)
    assert costs.optimizer_s_per_byte == pytest.approx(10e-3 / (2000 * (8 + 256)))
    s = model.step(machine(), 4, "sparse-gather", 128)
    network = allgather_s(gathered, 4, LINK) + 3 * LINK.alpha_s + allreduce_s(1 << 20, 4, LINK)
    cpu = (1e-9 + costs.optimizer_s_per_byte) * gathered
    assert s.network_ms == pytest.approx(network * 1e3)
    assert s.step_ms == pytest.approx(90 + (network + cpu) * 1e3)
    assert s.exchange_bytes_held == gathered + (1 << 20)
    table = 4 * 100_000 * 64
    union = 100_000 * (1 - (1 - 0.02) ** 4)
    # dense-reduce: the allreduce and the dense update of the whole table; nothing element-wise
    d = model.step(machine(), 4, "dense-reduce", 128)
    expected = allreduce_s(table, 4, LINK) + 0.5e-9 * table
    assert d.step_ms == pytest.approx(90 + (expected + allreduce_s(1 << 20, 4, LINK)) * 1e3)
    assert d.exchange_bytes_held == table + (1 << 20)
    # sparse-as-dense: to_dense, allreduce, to_sparse and the optimizer over the element-wise union
    c = model.step(machine(), 4, "sparse-as-dense", 128)
    expected = allreduce_s(table, 4, LINK) + 2e-9 * table + costs.optimizer_s_per_byte * union * 64 * ELEMENT_BYTES
    assert c.step_ms == pytest.approx(90 + (expected + allreduce_s(1 << 20, 4, LINK)) * 1e3)
    assert c.exchange_bytes_held == pytest.approx(table + union * 64 * ELEMENT_BYTES + (1 << 20))
    # coalesced-gather: rows are distinct here, so it gathers what sparse-gather does, after one coalescing pass
    g = model.step(machine(), 4, "coalesced-gather", 128)
    assert g.network_ms == pytest.approx(s.network_ms)
    assert g.step_ms == pytest.approx(s.step_ms + 1e-9 * gathered / 4 * 1e3)
    assert g.exchange_bytes_held == pytest.approx(gathered * 5 / 4 + (1 << 20))  # + this rank's coalesced copy
    # overlap hides network time behind the backward pass, never more than the network time
    o = model.step(machine(overlap=1.0), 4, "sparse-gather", 128)
    assert o.hidden_ms == pytest.approx(min(50.0, s.network_ms))
    assert o.step_ms == pytest.approx(s.step_ms - o.hidden_ms)


def test_memory_grows_p_fold_for_sparse_gather_and_stays_flat_for_dense_reduce():
    model = tiny_model()
    m = machine(memory_per_rank_bytes=2 * 2**30)
    sparse = [model.step(m, p, "sparse-gather", 128).exchange_bytes_held - (1 << 20) for p in (2, 4, 8)]
    assert sparse[1] == pytest.approx(2 * sparse[0]) and sparse[2] == pytest.approx(4 * sparse[0])
    dense = {model.step(m, p, "dense-reduce", 128).memory_bytes for p in (2, 64, 4096)}
    assert len(dense) == 1
    # sparse-as-dense re-sparsifies the union of the rows any rank touched: it grows with P until the table is full
    control = [model.step(m, p, "sparse-as-dense", 128).memory_bytes for p in (2, 4, 8)]
    assert control[0] < control[1] < control[2]
    # The out-of-memory rank count: the first P with 500 MiB + 2 x (P x 2000 x 264 B + 1 MiB) > 2 GiB.
    per_p = 2 * 2000 * 264
    first = math.floor((2 * 2**30 - 500 * 2**20 - 2 * (1 << 20)) / per_p) + 1
    assert model.oom_rank_count(m, "sparse-gather", 128) == first
    assert model.oom_rank_count(m, "dense-reduce", 128) is None


def test_crossover_density_is_where_the_modes_cost_the_same_and_falls_with_p():
    model = tiny_model(optimizer_ms=0.0)
    m = machine()
    costs = model.costs(m)
    seen = []
    for p in (4, 16, 64):
        x = model.crossover_density(m, p)
        assert x is not None and 0 < x < 1
        rows = x * 100_000
        union = 100_000 * (1 - (1 - x) ** p)
        sparse = sparse_table_s(costs, p, 64, p * rows)
        dense = dense_table_s(costs, p, 100_000, 64, union)
        assert sparse == pytest.approx(dense, rel=1e-6)
        # the auto rule agrees with the crossover on either side of it
        assert not choose_dense(costs, p, 100_000, 64, p * rows * 0.5, p * rows * 0.5)
        assert choose_dense(costs, p, 100_000, 64, p * rows * 2, p * rows * 2)
        seen.append(x)
    assert seen[0] > seen[1] > seen[2]  # more ranks gather more: sparse stops paying at lower density
    assert model.crossover_density(m, 1) is None


def test_cpu_factor_time_shares_cores_beyond_their_number():
    m = Machine(local=LINK, ranks_per_node=4, cores_per_node=2)
    assert [cpu_factor(p, m, 2) for p in (1, 2, 3, 4, 8)] == [1.0, 1.0, 1.5, 2.0, 2.0]
    assert cpu_factor(2, Machine(local=LINK, ranks_per_node=4, cores_per_node=2, cpu_speedup=4.0), 2) == 0.25
    with pytest.raises(UsageError):
        Machine(local=LINK, overlap=1.5)


def test_auto_reads_its_costs_from_the_file_predict_writes(tmp_path, monkeypatch):
    costs = tiny_model().costs(machine())
    path = tmp_path / "costs.json"
    atomic_write_json(path, costs.as_dict())
    monkeypatch.setenv("ALURE_BENCH_COSTS", str(path))
    assert load_costs() == ExchangeCosts.from_dict(costs.as_dict())
    monkeypatch.delenv("ALURE_BENCH_COSTS")
    monkeypatch.setenv("ALURE_BENCH_CALIBRATIONS", str(tmp_path / "no-calibrations"))
    assert load_costs() is DEFAULT_COSTS  # no calibration of this host (tests/test_calibration_store.py)
    with pytest.raises(UsageError, match="predict --out"):
        load_costs(tmp_path / "nope.json")


def test_auto_takes_the_cheapest_mode_that_fits_the_budget():
    costs = tiny_model(optimizer_ms=0.0).costs(machine())
    p, rows, dim = 4, 100_000, 64
    # heavy duplication: coalescing shrinks the gather 8-fold, and then gathering beats the dense table
    mode, added = choose_mode(costs, p, rows, dim, p * 8000.0, p * 1000.0)
    assert mode == "coalesced-gather"
    assert added == table_memory_bytes(mode, p, rows, dim, p * 8000.0, p * 1000.0, p * 1000.0)
    # no duplicates and nearly the table's size gathered: sparse-gather is quicker than the dense allreduce, but
    # holds twice the dense buffer
    rows_total = distinct_total = p * 24_000.0
    mode, added = choose_mode(costs, p, rows, dim, rows_total, distinct_total)
    dense = table_memory_bytes("dense-reduce", p, rows, dim, rows_total, distinct_total, distinct_total)
    assert mode == "sparse-gather" and dense < added
    # a budget between the two: never the mode that does not fit
    assert choose_mode(costs, p, rows, dim, rows_total, distinct_total, budget_bytes=(dense + added) / 2) == \
        ("dense-reduce", dense)
    # the buffer already made costs nothing more; with nothing fitting, the mode that needs least
    assert choose_mode(costs, p, rows, dim, rows_total, distinct_total, budget_bytes=0,
                       paid=("dense-reduce",)) == ("dense-reduce", 0.0)
    assert choose_mode(costs, p, rows, dim, rows_total, distinct_total, budget_bytes=1)[0] == "dense-reduce"
    assert choose_mode(costs, 1, rows, dim, rows_total, distinct_total) == ("sparse-gather", 0.0)
