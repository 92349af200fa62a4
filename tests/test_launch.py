import pytest

from bench.errors import UsageError
from bench.host import is_oversubscribed, threads_per_rank
from bench.launch.mpirun import BIND_VARIABLE, mpi_environment, mpirun_command


def test_oversubscription_is_flagged_beyond_the_cores():
    assert not is_oversubscribed(2, cores=2)
    assert is_oversubscribed(3, cores=2)


def test_threads_share_out_the_cores():
    assert threads_per_rank(1, cores=2) == 2
    assert threads_per_rank(2, cores=2) == 1
    assert threads_per_rank(4, cores=2) == 1


def test_mpirun_gets_the_flags_this_machine_needs():
    env = mpi_environment(64, base={}, shared_memory="none")
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "1"
    assert "--oversubscribe" in mpirun_command(64, ["true"])


def _bind_flags(cmd: list[str]) -> list[str]:
    return cmd[3:cmd.index("true")]


def test_ranks_are_pinned_to_cores_only_when_asked_and_where_they_fit(monkeypatch):
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    assert _bind_flags(mpirun_command(1, ["true"])) == ["--bind-to", "none"], "unbound unless asked"
    monkeypatch.setenv(BIND_VARIABLE, "core")
    assert _bind_flags(mpirun_command(1, ["true"])) == ["--map-by", "core", "--bind-to", "core"]
    assert mpi_environment(1, base={}, shared_memory="none")["OMPI_MCA_hwloc_base_binding_policy"] == "core"
    assert "--bind-to" in (flags := _bind_flags(mpirun_command(64, ["true"]))) and "core" not in flags, \
        "more ranks than cores stay unbound"
    assert _bind_flags(mpirun_command(1, ["true"], single_host=False)) == ["--bind-to", "none"]
    monkeypatch.setenv(BIND_VARIABLE, "socket")
    with pytest.raises(UsageError, match="none, core"):
        mpirun_command(1, ["true"])


def test_an_impossible_rank_count_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        mpirun_command(0, ["true"])


@pytest.mark.mpi
def test_horovod_collectives_on_two_real_ranks(mpi_launch):
    records = mpi_launch(2, "collectives")
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["size"] == 2
        assert r["allreduce"] == [3.0] * 4
        assert r["allgather_rows"] == 3
