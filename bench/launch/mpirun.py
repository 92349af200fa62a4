"""The one place that knows how local MPI ranks are started on this kind of machine.

Everything that launches ranks (sweeps, the pipeline, comm benchmarks, tests) goes through `mpirun_command` and
`mpi_environment`, so nobody sets Open MPI's flags by hand. Both only build: the one value that needs a probe, the
shared-memory copy mechanism, is resolved once per command (bench.launch.transport.mechanism) and handed in.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from bench.errors import UsageError
from bench.host import is_oversubscribed
from bench.launch import lifetime
from bench.launch.gloo_rendezvous import wrap

SHARED_MEMORY_VARIABLE = "OMPI_MCA_btl_vader_single_copy_mechanism"
"""The Open MPI variable the shared-memory copy mechanism is given to the ranks through (bench.launch.transport
chooses it; a value already set in the launch's environment wins)."""

HOROVOD_SETTINGS: dict[str, str] = {
    # ms. Horovod's default cycle adds its own wait to every small op and holds mid-sized allreduces well below raw
    # MPI; a short cycle removes most of it, and 0 spins a core per rank when idle (docs/collectives.md "Every knob,
    # measured on a quiet machine").
    "HOROVOD_CYCLE_TIME": "0.02",
    # bytes. The 128 MiB default fuses a large gradient with small ones: two extra copies and one huge message;
    # 4 MiB keeps small tensors fused and sends large ones as they are (same section).
    "HOROVOD_FUSION_THRESHOLD": str(4 << 20),
}
"""Horovod's knobs for every launch (setdefault: a variable already set wins, which is how to A/B them; set empty, it
is unset). Chosen from interleaved `alure-bench comm` runs (docs/collectives.md); every comm result records what was
used. `alure-bench tune` measures other values on the training step against these (docs/tuning.md)."""

ALLOCATOR_VARIABLE = "ALURE_BENCH_ALLOCATOR"
"""Names the ranks' allocator setting (one of ALLOCATORS); default DEFAULT_ALLOCATOR."""
GLIBC_REUSE = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
"""glibc's malloc told to keep freed memory for reuse: the base of two allocator settings (why: below)."""
ALLOCATORS: dict[str, dict[str, str]] = {
    # glibc as it comes: allocations from 32 MiB up (less, until the dynamic threshold has grown) are mmap'ed and
    # unmapped on free, so a tensor allocated per call (Horovod's allgather output, a sparse gradient) faults in
    # every page again on every step: 16,384 faults for 64 MiB.
    "glibc": {},
    # glibc keeping freed memory for reuse: no mmap, one arena (Horovod allocates outputs on its background
    # thread, whose arenas cannot hold a chunk above 64 MiB), and up to 256 MiB of free memory kept at the top of
    # the heap instead of being returned at once. A 64 MiB output per call then costs no fault.
    "glibc-reuse": GLIBC_REUSE,
    # The same, with the heap asking the kernel for transparent huge pages (madvise; a kernel whose THP mode is
    # `never` ignores it, and environment.json records the mode). Shared-memory copies and the step's large
    # tensors then touch one page table entry per 2 MiB instead of per 4 KiB, which speeds up the large collectives
    # (docs/collectives.md "Huge pages in the launch").
    "glibc-reuse-thp": {**GLIBC_REUSE, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
DEFAULT_ALLOCATOR = "glibc-reuse-thp"
"""What launches use unless ALURE_BENCH_ALLOCATOR says otherwise: the mode comparison must not be an allocator
comparison (docs/collectives.md)."""


BIND_VARIABLE = "ALURE_BENCH_BIND"
"""How mpirun places local ranks on cores: one of BINDINGS; default DEFAULT_BINDING."""
BINDINGS = ("none", "core")
"""none: the kernel moves ranks between cores as it likes. core: each rank pinned to a core of its own (Open MPI's
--map-by core --bind-to core), where the ranks fit this host's cores; a launch with more ranks than cores, or across
hosts, stays unbound (Open MPI refuses to bind more ranks than cores, and time-shared ranks gain nothing from a pin)."""
DEFAULT_BINDING = "none"
"""What launches use unless ALURE_BENCH_BIND says otherwise (the references so far ran unbound)."""


def mpi_environment(np: int, base: dict[str, str] | None = None, *, shared_memory: str,
                    single_host: bool = True) -> dict[str, str]:
    """The environment mpirun needs here, on top of `base` (default: this process's); `shared_memory` is the copy
    mechanism of this command (bench.launch.transport.mechanism), used unless `base` sets one.

    `single_host` keeps every socket on the loopback interface: ranks on one host need no other network, and
    nothing of a benchmark should leave the machine. Multi-node launches (inside an allocation) pass False.
    """
    env = dict(os.environ if base is None else base)
    # Containers and CI run as root; Open MPI refuses that unless told twice.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # Ranks that spin while waiting steal the core a busy rank needs; oversubscribed runs doubled their step
    # times on the 2-core reference machine without this.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    # Shared memory's large-message copy: cross-memory attach (one copy) where this host allows it, else
    # copy-in/copy-out; probed once per host and cached (bench/launch/transport.py). A value already set wins.
    env[SHARED_MEMORY_VARIABLE] = env.get(SHARED_MEMORY_VARIABLE) or shared_memory
    for name, value in HOROVOD_SETTINGS.items():
        # Set empty (a point's launch_env), a knob is left unset: Horovod's own default, which HOROVOD_AUTOTUNE may
        # tune (it leaves alone what the environment fixes).
        if env.setdefault(name, value) == "":
            del env[name]
    allocator = env.setdefault(ALLOCATOR_VARIABLE, DEFAULT_ALLOCATOR)
    if allocator not in ALLOCATORS:
        raise UsageError(f"{ALLOCATOR_VARIABLE}={allocator} is not an allocator setting: use one of "
                         f"{', '.join(ALLOCATORS)}")
    for name, value in ALLOCATORS[allocator].items():
        env.setdefault(name, value)
    if single_host:
        env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
        env.setdefault("HOROVOD_GLOO_IFACE", "lo")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if single_host and is_oversubscribed(np):
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    # mpirun_command passes the binding as flags (they reach an mpirun started on another host too); the same
    # policy as MCA variables puts it into every sweep's environment.json (launch_environment, per np).
    policy = binding_policy(np, single_host)
    env["OMPI_MCA_hwloc_base_binding_policy"] = policy
    if policy == "core":
        env["OMPI_MCA_rmaps_base_mapping_policy"] = "core"
    return env


def binding_policy(np: int, single_host: bool = True) -> str:
    """What a launch of np ranks binds them to, from ALURE_BENCH_BIND in this process's environment (BINDINGS):
    'core' only where asked and the ranks fit this host's cores, else 'none'."""
    binding = os.environ.get(BIND_VARIABLE, DEFAULT_BINDING)
    if binding not in BINDINGS:
        raise UsageError(f"{BIND_VARIABLE}={binding} is not a binding: use one of {', '.join(BINDINGS)}")
    return "core" if binding == "core" and single_host and not is_oversubscribed(np) else "none"


def mpirun_command(np: int, argv: list[str], *, single_host: bool = True) -> list[str]:
    """`mpirun -np N ... argv`. On one host it may oversubscribe the cores; inside an allocation mpirun reads the
    hosts and slots from the scheduler, and asking for more ranks than slots is an error there, as it should be."""
    if np < 1:
        raise ValueError(f"np must be at least 1 (got {np})")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise UsageError("mpirun not found: run `make setup` (or `module load` an MPI) first")
    policy = binding_policy(np, single_host)
    cmd = [mpirun, "-np", str(np), *(["--map-by", "core"] if policy == "core" else []), "--bind-to", policy]
    if single_host and is_oversubscribed(np):
        cmd.append("--oversubscribe")
    return cmd + list(argv)


@dataclass(frozen=True, slots=True)
class Launcher:
    """How a point's ranks are started: mpirun on this host (the default), or inside a Slurm allocation."""

    kind: str = "mpirun"
    """mpirun, or srun (Slurm's launcher; needs an MPI built with PMIx support, as Debian's is)."""
    single_host: bool = True
    """All ranks on this host: sockets stay on loopback and oversubscription is allowed (and flagged)."""
    hosts: tuple[str, ...] = ()
    """Hosts to place ranks on (mpirun -H), ranks_per_host to each, the first hosts first; empty: this host, or
    the allocation's hosts inside one (bench.launch.hosts builds launchers over hosts)."""
    ranks_per_host: int = 1
    """Ranks on each of `hosts`."""
    agent: str = ""
    """Open MPI's remote launch agent (plm_rsh_agent) instead of ssh; mpirun itself then runs on the first host
    through it, so the daemons it starts can call back (the emulated cluster of slurm/cluster.sh)."""
    tcp_subnet: str = ""
    """Confine Open MPI's TCP traffic (ranks and daemons) to this subnet (CIDR); empty: Open MPI's choice."""
    interface: str = ""
    """The interface Gloo (Horovod's and torch's) uses between hosts; empty: Gloo's choice."""
    controller: str = "mpi"
    """Horovod's controller and CPU collectives: mpi, or gloo (rank 0 serves Horovod's rendezvous; mpirun only)."""

    def command(self, np: int, argv: list[str]) -> list[str]:
        if self.controller == "gloo":
            if self.kind != "mpirun":
                raise UsageError("Horovod's Gloo controller is launched with mpirun only (it reads mpirun's ranks): "
                                 "drop --controller gloo or launch with mpirun")
            used = self.hosts_for(np)
            placed = {h: min(self.ranks_per_host, np - i * self.ranks_per_host) for i, h in enumerate(used)}
            argv = wrap(argv, placed or {socket.gethostname(): np}, used[0] if used else "127.0.0.1")
        if self.kind == "srun":  # srun's ranks live under slurmstepd, which ends them with the step
            return ["srun", "--mpi=pmix", f"--ntasks={np}", *argv]
        if self.kind != "mpirun":
            raise ValueError(f"unknown launcher {self.kind!r}: use mpirun or srun")
        # Outermost, so that whatever the rank runs (a Gloo wrap included) dies with mpirun: bench.launch.lifetime.
        cmd = mpirun_command(np, lifetime.guarded_argv(argv), single_host=self.single_host)
        if not self.hosts:
            return cmd
        used = self.hosts_for(np)
        if np > len(used) * self.ranks_per_host:
            raise UsageError(f"np={np} does not fit on {len(self.hosts)} host(s) x {self.ranks_per_host} ranks: "
                             f"give more hosts or ranks per host, or a smaller np")
        cmd[1:1] = ["-H", ",".join(f"{h}:{self.ranks_per_host}" for h in used)]
        if not self.agent:
            return cmd
        cmd[1:1] = ["--mca", "plm_rsh_agent", self.agent]
        # The agent joins its words for a shell, as ssh does: one quoted word keeps the argv intact.
        return [self.agent, used[0], shlex.join(cmd)]

    def hosts_for(self, np: int) -> tuple[str, ...]:
        """The hosts a launch of np ranks uses: the first ceil(np / ranks_per_host) of `hosts`."""
        return self.hosts[:-(-np // self.ranks_per_host)]

    def environment(self, np: int, base: dict[str, str] | None = None, *, shared_memory: str) -> dict[str, str]:
        env = mpi_environment(np, base, shared_memory=shared_memory, single_host=self.single_host)
        if self.tcp_subnet:
            # By subnet, not interface name: Open MPI compares names across hosts ("unreachable proc" otherwise).
            env["OMPI_MCA_btl_tcp_if_include"] = env["OMPI_MCA_oob_tcp_if_include"] = self.tcp_subnet
        if self.hosts or self.tcp_subnet:
            # One TCP connection per peer carries both directions: the rendezvous replies of one rank queue behind
            # its own bulk data and the collectives stay well below the link rate; four connections per peer come
            # much closer (docs/cluster.md "A cluster on one machine").
            env.setdefault("OMPI_MCA_btl_tcp_links", "4")
        if self.interface:
            env["HOROVOD_GLOO_IFACE"] = env["GLOO_SOCKET_IFNAME"] = self.interface
        return env


LOCAL = Launcher()


@dataclass(slots=True)
class RankRun:
    """What came of one launch of ranks."""

    returncode: int | None
    """mpirun's exit code; None when it was killed for running past its timeout."""
    timed_out: bool
    """True when the launch ran past its timeout and was killed."""
    seconds: float
    """Wall time of the launch."""
    stdout: str
    """Everything the ranks printed to standard output."""
    stderr: str
    """Everything the ranks printed to standard error."""


def run_ranks(np: int, argv: list[str], *, shared_memory: str, timeout_s: float | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None, launcher: Launcher = LOCAL) -> RankRun:
    """Run `argv` on `np` ranks (`shared_memory`: see mpi_environment). However the launch ends (done, timeout, Ctrl-C or SIGTERM here, this process
    killed, mpirun dying mid-spawn), none of its processes outlives it: see bench.launch.lifetime."""
    cmd = launcher.command(np, argv)
    launch_env, launch_id = lifetime.tag_environment(launcher.environment(np, env, shared_memory=shared_memory))
    start = time.perf_counter()
    # A session of its own, so the terminal's Ctrl-C reaches only this process, which ends the launch in order;
    # the parent-death signal takes mpirun down if this process is killed outright.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env,
                            cwd=cwd, start_new_session=True, preexec_fn=lifetime.die_with_caller())
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
            return RankRun(proc.returncode, False, time.perf_counter() - start, out, err)
        except subprocess.TimeoutExpired:
            lifetime.end_launch(proc, launch_id)
            out, err = proc.communicate()
            return RankRun(None, True, time.perf_counter() - start, out, err)
        except BaseException:
            # Ctrl-C or SIGTERM of the command: stop the launch, then let the interrupt go on.
            lifetime.end_launch(proc, launch_id)
            proc.communicate()
            raise
    finally:
        lifetime.reap_launch(launch_id)
