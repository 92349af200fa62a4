"""`alure-bench comm` and `crossover`: the figures on hand-computed values, a real 2-rank run end to end, and bad
input refused in one line."""
import csv
import json
import os
import subprocess
import sys

import pytest

from bench import cli
from bench.errors import UsageError
from bench.launch.environment import transparent_hugepages
from bench.launch.mpirun import ALLOCATORS, DEFAULT_ALLOCATOR, HOROVOD_SETTINGS, mpi_environment
from bench.launch.transport import VARIABLE
from bench.plan.comm_config import OPS, parse_env_setting, parse_size
from bench.ranks.comm_rank import alltoall_splits, geometry, split_sizes
from bench.results.comm_rows import (
    LAUNCH_FIELDS,
    ROW_FIELDS,
    busbw_ratios,
    comm_row,
    crossover_density,
    crossover_rows,
    describe_crossover,
    ratio_verdict,
    setting_ratios,
)
from bench.results.scaling import busbw_factor
from bench.run.comm import launch_order
from tests.helpers import CLI

# --- figures ------------------------------------------------------------------------------------------------------

def test_busbw_factors_follow_nccl_tests():
    assert busbw_factor("allreduce", 2) == 1.0          # 2(P-1)/P
    assert busbw_factor("allreduce", 4) == 1.5
    assert busbw_factor("allreduce", 1) == 0.0          # nobody to talk to
    assert busbw_factor("allgather", 2) == 0.5          # (P-1)/P
    assert busbw_factor("allgather", 4) == 0.75
    assert busbw_factor("sparse-pair", 8) == 0.875      # two allgathers
    assert busbw_factor("alltoall", 4) == busbw_factor("alltoall-zipf", 4) == 0.75  # (P-1)/P of a rank's bytes leave
    assert busbw_factor("memcpy", 1) == 1.0
    with pytest.raises(ValueError):
        busbw_factor("broadcast", 2)


def test_a_row_from_hand_computed_times():
    # 1 MB in a median of 2 ms: algbw 0.5 GB/s; allreduce at P=4 carries 1.5 x that over the bus.
    row = comm_row("mpi4py", "allreduce", 4, 1 << 20, 1_000_000, [0.003, 0.001, 0.002])
    assert row["latency_us_median"] == 2000.0
    assert row["latency_us_min"] == 1000.0 and row["latency_us_max"] == 3000.0
    assert row["algbw_gbps"] == pytest.approx(0.5)
    assert row["busbw_gbps"] == pytest.approx(0.75)
    assert set(ROW_FIELDS) <= set(row)


def test_the_slowest_rank_sets_each_crossover_iteration():
    def rank(times_s):
        return {"results": [{"density": 0.1, "rows_touched_per_rank": 5, "nnz_per_rank": 5, "times_s": times_s,
                             "bytes_sent_per_rank": {"sparse-gather": 1, "dense-reduce": 2},
                             "bytes_held_per_rank": {"sparse-gather": 1, "dense-reduce": 2}}]}
    rows = crossover_rows([rank({"sparse-gather": [0.001, 0.005, 0.002], "dense-reduce": [0.001] * 3}),
                           rank({"sparse-gather": [0.003, 0.001, 0.0025], "dense-reduce": [0.001] * 3})], np=2)
    sparse = next(r for r in rows if r["mode"] == "sparse-gather")
    assert sparse["time_ms_median"] == 3.0  # of the per-iteration maxima 3, 5, 2.5 ms


def test_geometry_of_each_op():
    assert geometry("allreduce", 4096, 2).bytes_moved == 4096
    ag = geometry("allgather", 4096, 2)
    assert (ag.per_rank, ag.bytes_moved) == (512, 4096)          # each rank sends half, S is what is gathered
    assert geometry("allgather", 4096, 3).bytes_moved == 4092    # 341 floats each: P does not divide S
    sp = geometry("sparse-pair", 64 << 10, 2, dim=64)
    assert sp.per_rank == 128                                    # 65536 / (4 x 64 x 2)
    assert sp.bytes_moved == 128 * 2 * (8 + 4 * 64)              # values plus the int64 indices
    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(2, 5) == [1, 1]
    a2a = geometry("alltoall", 4096, 3)
    assert (a2a.per_rank, a2a.bytes_moved) == (1024, 4096)      # S is what each rank sends, itself included
    assert alltoall_splits("alltoall", 1024, 3) == [342, 341, 341]
    skewed = alltoall_splits("alltoall-zipf", 1024, 3)         # 1 : 1/2 : 1/3 of the bytes, rank 0 the hot owner
    assert sum(skewed) == 1024 and skewed == sorted(skewed, reverse=True) and skewed[2] == 186
    assert min(alltoall_splits("alltoall-zipf", 4, 4)) >= 1      # every rank gets something, even at tiny sizes


def test_crossover_on_hand_computed_values():
    # sparse - dense: -4, -1, +5 -> meets between 0.1 and 0.2 at 0.1 + 0.1 x 1/6
    assert crossover_density([0.01, 0.1, 0.2], [1, 4, 10], [5, 5, 5]) == pytest.approx(0.1 + 0.1 / 6)
    # order of the points does not matter
    assert crossover_density([0.2, 0.01, 0.1], [10, 1, 4], [5, 5, 5]) == pytest.approx(0.1 + 0.1 / 6)
    # equal exactly at a measured density
    assert crossover_density([0.1, 0.3, 0.5], [1.0, 3.0, 7.0], [3.0, 3.0, 3.0]) == pytest.approx(0.3)
    # never crosses: sparse cheaper everywhere, or dense cheaper everywhere
    assert crossover_density([0.1, 0.5], [1, 2], [3, 3]) is None
    assert crossover_density([0.1, 0.5], [4, 9], [3, 3]) is None
    assert "none in range" in describe_crossover([0.1, 0.5], [1, 2], [3, 3], rows=1000)
    assert "sparse-gather faster" in describe_crossover([0.1, 0.5], [1, 2], [3, 3], rows=1000)
    assert "dense-reduce faster" in describe_crossover([0.1, 0.5], [4, 9], [3, 3], rows=1000)
    assert "(200 rows per rank)" in describe_crossover([0.1, 0.3], [1, 5], [3, 3], rows=1000)


def test_sizes_and_schedules():
    assert parse_size("1K") == 1024 and parse_size("64M") == 64 << 20 and parse_size("1.5MiB") == 3 << 19
    assert parse_size("4096") == 4096 and parse_size("2g") == 2 << 30
    for bad in ("1Q", "", "-1K", "2"):
        with pytest.raises(UsageError):
            parse_size(bad)
    assert launch_order(("a", "b", "c"), 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert split_sizes(31, 2) == [16, 15]  # timed iterations over launches


def test_horovod_over_mpi_ratio_per_size():
    rows = [comm_row("horovod", "allreduce", 2, 4 << 20, 4 << 20, [0.002, 0.004, 0.001]),
            comm_row("mpi4py", "allreduce", 2, 4 << 20, 4 << 20, [0.001, 0.001, 0.0009]),
            comm_row("mpi4py", "allreduce", 2, 8 << 20, 8 << 20, [0.002])]
    ratios = busbw_ratios(rows)
    assert ratios == [{"op": "allreduce", "size_bytes": 4 << 20, "numerator": "horovod", "denominator": "mpi4py",
                       "busbw_ratio": 0.5, "busbw_ratio_at_min_latency": 0.9}]
    assert ratio_verdict(ratios).endswith("allreduce busbw, same run, from median latencies [from minimum latencies]: "
                                          "4 MiB 0.50 [0.90]; BELOW 0.8 at 4 MiB")


def test_setting_b_over_a_per_size():
    a = comm_row("mpi4py", "allgather", 2, 1 << 20, 1 << 20, [0.002, 0.001], setting="A")
    b = comm_row("mpi4py", "allgather", 2, 1 << 20, 1 << 20, [0.001, 0.0005], setting="B")
    other = comm_row("horovod", "allgather", 2, 1 << 20, 1 << 20, [0.004], setting="B")
    [q] = setting_ratios([a, b, other], "mpi4py", "allgather")
    assert (q["busbw_ratio"], q["busbw_ratio_at_min_latency"]) == (2.0, 2.0)
    assert (q["numerator_setting"], q["denominator_setting"]) == ("B", "A")
    assert busbw_ratios([a, b, other], num="horovod", op="allgather", setting="B")[0]["busbw_ratio"] == 0.1875  # 0.75 ms / 4 ms


def test_env_settings_parse_or_refuse_in_one_line():
    assert parse_env_setting("A=1 B=x,C=") == {"A": "1", "B": "x", "C": ""}
    for bad in ("", "A", "1A=2", "A=1 =2"):
        with pytest.raises(UsageError):
            parse_env_setting(bad)


def test_rows_carry_what_they_ran_with():
    launch = {"single_copy_mechanism": "cma", "allocator": "glibc-reuse", "horovod_cycle_time_ms": "0.02"}
    row = comm_row("horovod", "allreduce", 2, 4, 4, [1e-5], launch=launch, setting="B")
    assert set(LAUNCH_FIELDS) <= set(row)
    assert (row["setting"], row["single_copy_mechanism"], row["allocator"]) == ("B", "cma", "glibc-reuse")
    assert row["horovod_fusion_threshold_bytes"] == ""  # not given: Horovod's own default


def test_allocator_setting_reaches_the_ranks_and_a_bad_one_is_refused():
    env = mpi_environment(2, base={}, shared_memory="none")
    assert env["ALURE_BENCH_ALLOCATOR"] == DEFAULT_ALLOCATOR
    assert all(env[k] == v for k, v in ALLOCATORS[DEFAULT_ALLOCATOR].items())
    plain = mpi_environment(2, base={"ALURE_BENCH_ALLOCATOR": "glibc"}, shared_memory="none")
    assert not any(k.startswith("MALLOC_") for k in plain)
    with pytest.raises(UsageError, match="not an allocator setting"):
        mpi_environment(2, base={"ALURE_BENCH_ALLOCATOR": "hoard"}, shared_memory="none")


HEAP_HUGE_KIB = """
import re
heap = bytearray(64 << 20)  # zero-filled: every page touched
print(re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))
"""


def heap_huge_kib(allocator: str) -> int:
    """KiB of a process's memory in transparent huge pages after it allocates 64 MiB under a launch's allocator."""
    env = mpi_environment(2, base={"PATH": os.environ["PATH"], "ALURE_BENCH_ALLOCATOR": allocator}, shared_memory="none")
    return int(subprocess.run([sys.executable, "-c", HEAP_HUGE_KIB], env=env, capture_output=True, text=True,
                              check=True).stdout)


def test_the_default_heap_gets_huge_pages_where_the_kernel_grants_them():
    mode = transparent_hugepages()["enabled"]
    if mode not in ("always", "madvise"):
        pytest.skip(f"the kernel's transparent huge page mode is {mode}: nothing to grant")
    assert heap_huge_kib(DEFAULT_ALLOCATOR) >= 32 << 10
    if mode == "madvise":  # only the allocator's request can have made them
        assert heap_huge_kib("glibc-reuse") == 0


def test_transparent_hugepage_modes_are_read_from_the_kernels_files(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    (tmp_path / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    assert transparent_hugepages(tmp_path) == {"enabled": "madvise", "defrag": "madvise"}
    assert transparent_hugepages(tmp_path / "absent") == {"enabled": None, "defrag": None}


def test_horovod_settings_reach_every_launch_unless_already_set():
    env = mpi_environment(2, base={}, shared_memory="none")
    assert all(env[k] == v for k, v in HOROVOD_SETTINGS.items()) and "HOROVOD_CYCLE_TIME" in HOROVOD_SETTINGS
    assert mpi_environment(2, base={"HOROVOD_CYCLE_TIME": "1"}, shared_memory="none")["HOROVOD_CYCLE_TIME"] == "1"  # how to A/B them


# --- a real run ---------------------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_comm_on_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "comm"
    run = subprocess.run([*CLI, "comm", "--np", "2", "--min-bytes", "1K",
                          "--max-bytes", "4K", "--warmup", "1", "--iters", "3", "--rounds", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "comm.json").read_text())
    rows = result["rows"]
    expected = {("memcpy", "memcpy", s) for s in (1024, 2048, 4096)} | {
        (b, op, s) for b in ("horovod", "mpi4py", "gloo") for op in OPS for s in (1024, 2048, 4096)}
    assert {"alltoall", "alltoall-zipf"} <= set(OPS)
    assert {(r["backend"], r["op"], r["size_bytes"]) for r in rows} == expected
    for r in rows:
        assert all(r[k] is not None for k in ROW_FIELDS), r
        assert r["np"] == (1 if r["backend"] == "memcpy" else 2)
        assert 0 < r["latency_us_min"] <= r["latency_us_median"] <= r["latency_us_max"]
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * busbw_factor(r["op"], r["np"]), rel=1e-4)
        assert r["algbw_gbps"] == pytest.approx(r["bytes_moved"] / r["latency_us_median"] / 1e3, rel=1e-4)
        assert r["iters"] == 3 and r["oversubscribed"] is False
    # The CSV says what the JSON says.
    with open(out / "comm.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:len(ROW_FIELDS)] == list(ROW_FIELDS)
    assert len(table) == len(rows)
    for c, j in zip(table, rows):
        for k in ROW_FIELDS:
            assert (c[k] == j[k]) if isinstance(j[k], str) else float(c[k]) == pytest.approx(j[k]), k
        assert c["oversubscribed"] == "false"
    # What the ranks ran with is on record.
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and env["launch_variables"]["OMPI_MCA_mpi_yield_when_idle"] == "1"
    for name, value in HOROVOD_SETTINGS.items():
        assert result["horovod_settings"][name] == value
    assert "Horovod settings:" in run.stdout and "horovod allreduce  np=2" in run.stdout
    # Every row says what it ran with, as the ranks saw it.
    launched = env["launch_variables"]
    for r in rows:
        if r["backend"] != "memcpy":
            assert r["setting"] == "A" and r["single_copy_mechanism"] == launched[VARIABLE]
            assert r["allocator"].startswith(launched["ALURE_BENCH_ALLOCATOR"])
            assert r["horovod_cycle_time_ms"] == HOROVOD_SETTINGS["HOROVOD_CYCLE_TIME"]
    assert env["shared_memory"]["single_copy_mechanism"] == launched[VARIABLE]


@pytest.mark.mpi
def test_compare_env_runs_both_settings_interleaved(tmp_path):
    out = tmp_path / "cmp"
    run = subprocess.run([*CLI, "comm", "--backends", "mpi4py", "--ops", "allgather",
                          "--min-bytes", "64K", "--max-bytes", "128K", "--warmup", "1", "--iters", "4", "--rounds", "2",
                          "--compare-env", f"{VARIABLE}=none ALURE_BENCH_ALLOCATOR=glibc", "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "comm.json").read_text())
    assert [(x["setting"], x["round"]) for x in result["launches"]] == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]
    rows = {(r["setting"], r["size_bytes"]): r for r in result["rows"] if r["backend"] == "mpi4py"}
    assert set(rows) == {(s, n) for s in "AB" for n in (64 << 10, 128 << 10)}
    assert {rows["B", n]["single_copy_mechanism"] for n in (64 << 10, 128 << 10)} == {"none"}
    assert {rows["B", n]["allocator"] for n in (64 << 10, 128 << 10)} == {"glibc"}
    assert all(rows["A", n]["allocator"].startswith(DEFAULT_ALLOCATOR) for n in (64 << 10, 128 << 10))
    assert [q["size_bytes"] for q in result["b_over_a"]] == [64 << 10, 128 << 10]
    env = json.loads((out / "environment.json").read_text())
    assert env["compare_launch_variables"][VARIABLE] == "none"
    assert "mpi4py allgather: busbw GB/s under A and B" in run.stdout


@pytest.mark.mpi
def test_crossover_on_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "x"
    run = subprocess.run([*CLI, "crossover", "--np", "2", "--rows", "2000", "--dim", "8",
                          "--densities", "0.01,0.5", "--lookups-per-row", "2", "--warmup", "1", "--iters", "2",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "crossover.json").read_text())
    assert [c["np"] for c in result["crossovers"]] == [2] and "crossover at np=2" in run.stdout
    by = {(r["density"], r["mode"]): r for r in result["rows"]}
    # Bytes read off the tensors: 20 rows touched, each twice, x (8 + 4 x 8) bytes sent, gathered from both ranks
    # uncoalesced; dense is V x d floats.
    assert by[(0.01, "sparse-gather")]["nnz_per_rank"] == 40
    assert by[(0.01, "sparse-gather")]["bytes_sent_per_rank"] == 40 * 40
    assert by[(0.01, "sparse-gather")]["bytes_held_per_rank"] == 2 * 40 * 40
    assert by[(0.5, "dense-reduce")]["bytes_held_per_rank"] == 2000 * 8 * 4
    header = (out / "crossover.csv").read_text().splitlines()[0]
    assert header.startswith("np,density,rows_touched_per_rank,nnz_per_rank,mode,time_ms_median")


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--np", "0"], "--np 0 is below 1"),
    (["--np", "two"], "not a whole number"),
    (["--backends", "horovod,nccl"], "unknown backend nccl: choose from horovod,mpi4py,gloo"),
    (["--ops", "allreduce,bcast"], "unknown op bcast"),
    (["--min-bytes", "1Q"], "not a size"),
    (["--min-bytes", "2M", "--max-bytes", "1M"], "swap them"),
    (["--iters", "0"], "at least 1"),
    (["--max-bytes", "64T"], "not a size"),
    (["--compare-env", "HOROVOD_CYCLE_TIME"], "is not VAR=VALUE"),
    (["--baseline-env", "=1"], "is not VAR=VALUE"),
])
def test_bad_comm_input_is_one_line(args, fragment, capsys):
    assert cli.main(["comm", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_bad_crossover_input_is_one_line(capsys):
    assert cli.main(["crossover", "--densities", "0.1,2"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert cli.main(["crossover", "--np", "2,x"]) == 2
    assert "comma-separated list" in capsys.readouterr().err


def test_unwritable_out_exits_2_without_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        run = subprocess.run([*CLI, "comm", "--out", str(out)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in run.stderr and "--out" in lines[0], run.stderr
