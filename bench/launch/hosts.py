"""Ranks across hosts: host lists, the emulated cluster of slurm/cluster.sh, and what a record says about the network.

A launch over `--hosts node1,node2 --ranks-per-host K` places ranks K to a host, filling the first hosts first: a
point of np ranks uses the first ceil(np / K) hosts. Where the hosts are those of the emulated cluster on this
machine (network namespaces, see slurm/cluster.sh), mpirun runs inside the first host and starts its daemons on the
others through the cluster's agent instead of ssh, and TCP is confined to the cluster's subnet; elsewhere the hosts
are reached with ssh, as Open MPI does by default.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from bench.errors import UsageError
from bench.launch.mpirun import LOCAL, Launcher
from bench.results.records import atomic_write_json

CLUSTER_DIR_VARIABLE = "ALURE_CLUSTER_DIR"
DEFAULT_CLUSTER_DIR = Path("/run/alure-cluster")
"""Where slurm/cluster.sh keeps its state (state.json, the hosts file, Slurm's files); not under /tmp, which every
emulated Slurm node has a private copy of."""
CONTROLLERS = ("mpi", "gloo")
HOSTS_FILE = "hosts.json"
"""The host layout of a sweep, kept in its folder so `--resume` launches alike."""
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


@dataclass(frozen=True, slots=True)
class EmulatedCluster:
    """The emulated cluster slurm/cluster.sh made on this machine, as its state.json describes it."""

    hosts: tuple[str, ...]
    """Host names, node1..nodeN; each is a network namespace alure-<name>."""
    addresses: dict
    """Host name -> IPv4 address on the cluster's bridge."""
    subnet: str
    """The cluster's subnet (CIDR): Open MPI's TCP traffic is confined to it."""
    interface: str
    """The one interface name every host has on the bridge (Gloo needs a name, not a subnet)."""
    agent: str
    """The script that runs a command on a host (Open MPI's plm_rsh_agent here)."""
    link_rate: str | None
    """The rate given to `cluster.sh start --link-rate`, or None when unshaped (records read tc instead)."""


def cluster_dir() -> Path:
    return Path(os.environ.get(CLUSTER_DIR_VARIABLE) or DEFAULT_CLUSTER_DIR)


def emulated_cluster() -> EmulatedCluster | None:
    """The emulated cluster running on this machine, or None when there is none."""
    path = cluster_dir() / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return EmulatedCluster(hosts=tuple(state["hosts"]), addresses=dict(state["addresses"]), subnet=state["subnet"],
                           interface=state["interface"], agent=state["agent"], link_rate=state.get("link_rate"))


def parse_hosts(text: str) -> tuple[str, ...]:
    """'node1,node2' -> ('node1', 'node2'); a repeated or malformed name is a usage error."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    bad = [h for h in hosts if not _HOST_NAME.match(h)]
    if not hosts or bad:
        raise UsageError(f"--hosts {text!r} is not a comma-separated list of host names, e.g. node1,node2")
    if len(set(hosts)) != len(hosts):
        raise UsageError(f"--hosts {text!r} names a host twice: give each host once and set --ranks-per-host")
    return hosts


def hosts_launcher(hosts: tuple[str, ...], ranks_per_host: int = 1) -> Launcher:
    """The launcher over `hosts`: through the emulated cluster's agent where they are its hosts, else ssh."""
    if ranks_per_host < 1:
        raise UsageError(f"--ranks-per-host {ranks_per_host} is below 1: place at least one rank on each host")
    cluster = emulated_cluster()
    if cluster is not None and set(hosts) <= set(cluster.hosts):
        return Launcher(single_host=False, hosts=tuple(hosts), ranks_per_host=ranks_per_host, agent=cluster.agent,
                        tcp_subnet=cluster.subnet, interface=cluster.interface)
    emulated = [h for h in hosts if cluster is not None and h in cluster.hosts]
    if emulated:
        raise UsageError(f"--hosts mixes hosts of the emulated cluster ({', '.join(emulated)}) with others: use "
                         f"only {', '.join(cluster.hosts)} or only real hosts")
    return Launcher(single_host=False, hosts=tuple(hosts), ranks_per_host=ranks_per_host)


def allocation_launcher(kind: str) -> Launcher:
    """The launcher inside a Slurm allocation: the scheduler names the hosts; on the emulated cluster TCP is
    confined to its subnet as for any launch over its hosts."""
    cluster = emulated_cluster()
    if cluster is not None and socket.gethostname() in cluster.hosts:
        return Launcher(kind=kind, single_host=False, tcp_subnet=cluster.subnet, interface=cluster.interface)
    return Launcher(kind=kind, single_host=False)


def check_fits(launcher: Launcher, nps) -> None:
    """Every process count must fit the hosts at their ranks per host: one line otherwise, before anything runs."""
    if not launcher.hosts:
        return
    slots = len(launcher.hosts) * launcher.ranks_per_host
    too_many = [n for n in nps if n > slots]
    if too_many:
        raise UsageError(f"np {max(too_many)} does not fit on {len(launcher.hosts)} host(s) x "
                         f"{launcher.ranks_per_host} rank(s) per host ({slots} slots): add hosts or raise "
                         f"--ranks-per-host")


# --- command line -------------------------------------------------------------------------------------------------

def add_host_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", help="run the ranks on these hosts, e.g. node1,node2 (the emulated cluster's hosts "
                                   "from slurm/cluster.sh, or real hosts reached with ssh); default: this host")
    p.add_argument("--ranks-per-host", type=int, default=None,
                   help="ranks placed on each host, filling the first hosts first (default 1; needs --hosts)")
    p.add_argument("--horovod-controller", choices=CONTROLLERS, default="mpi",
                   help="Horovod's controller and CPU collectives: mpi (default), or gloo (Horovod's rendezvous "
                        "is served by rank 0)")


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    """The launcher the --hosts / --ranks-per-host flags ask for (this host alone without them)."""
    hosts = getattr(args, "hosts", None)
    per_host = getattr(args, "ranks_per_host", None)
    controller = getattr(args, "horovod_controller", None) or "mpi"
    if not hosts:
        if per_host is not None:
            raise UsageError("--ranks-per-host places ranks on the hosts of --hosts: give --hosts too")
        return replace(LOCAL, controller=controller)
    return replace(hosts_launcher(parse_hosts(hosts), 1 if per_host is None else per_host), controller=controller)


def save_layout(sweep_dir: Path, launcher: Launcher) -> None:
    """Keep a sweep's host layout in its folder (only for launches over hosts)."""
    if launcher.hosts or launcher.controller != "mpi":
        atomic_write_json(Path(sweep_dir) / HOSTS_FILE, {"hosts": list(launcher.hosts),
                                                         "ranks_per_host": launcher.ranks_per_host,
                                                         "controller": launcher.controller})


def load_layout(sweep_dir: Path) -> Launcher:
    """The launcher a sweep was started with: over its saved hosts, or this host alone."""
    path = Path(sweep_dir) / HOSTS_FILE
    if not path.exists():
        return LOCAL
    try:
        layout = json.loads(path.read_text())
        launcher = hosts_launcher(tuple(layout["hosts"]), int(layout["ranks_per_host"])) if layout["hosts"] else LOCAL
        return replace(launcher, controller=layout.get("controller", "mpi"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UsageError(f"{path} is not a host layout (hosts, ranks_per_host): restore it, or delete it to "
                         f"resume on this host alone") from None


# --- what a record says about the network -------------------------------------------------------------------------

def network_of_ranks(ranks: list[dict]) -> dict:
    """hosts, ranks_per_host and transport of a point from its ranks' host names: ranks on one host exchange
    through shared memory, ranks on several through TCP between the hosts (shared memory within each)."""
    per_host: dict[str, int] = {}
    for r in ranks:
        per_host[r["host"]] = per_host.get(r["host"], 0) + 1
    transport = "none" if len(ranks) == 1 else "tcp" if len(per_host) > 1 else "shared-memory"
    return {"hosts": sorted(per_host), "ranks_per_host": max(per_host.values()), "transport": transport}


def link_as_configured(prefix: tuple[str, ...] = ()) -> dict | None:
    """A host's egress towards the other hosts, read back from the kernel (tc), not from a flag: the interface
    that carries an IPv4 address other than loopback, its queueing discipline, and the rate, burst and latency of a
    tbf (token bucket) shaper. `prefix` runs the commands on another host (the emulated cluster's agent and the
    host). None where tc or ip are missing or say nothing."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return None

    def ask(*cmd: str) -> list:
        argv = [*prefix, shlex.join(cmd)] if prefix else list(cmd)
        return json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout or "[]")
    try:
        addrs, qdiscs = ask("ip", "-j", "-4", "addr", "show"), ask("tc", "-j", "qdisc", "show")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    interfaces = [a["ifname"] for a in addrs if a.get("ifname") != "lo" and a.get("addr_info")]
    if not interfaces:
        return None
    dev = interfaces[0]
    root = next((q for q in qdiscs if q.get("dev") == dev and q.get("root")), None)
    link = {"interface": dev, "qdisc": root["kind"] if root else None, "rate_gbps": None, "burst_bytes": None,
            "latency_ms": None}
    if root and root["kind"] == "tbf":
        options = root.get("options", {})
        # tc's JSON gives the rate in bytes per second and the latency in microseconds.
        link.update(rate_gbps=options["rate"] * 8 / 1e9 if "rate" in options else None,
                    burst_bytes=options.get("burst"),
                    latency_ms=options["lat"] / 1000 if "lat" in options else None)
    return link


def link_of_host(launcher: Launcher) -> dict | None:
    """The link of the first host of a launch over the emulated cluster's hosts (its shaping is every host's);
    None for a launch on this host alone or over real hosts."""
    if not launcher.hosts or not launcher.agent:
        return None
    link = link_as_configured((launcher.agent, launcher.hosts[0]))
    return link and {"host": launcher.hosts[0], **link}


def network_summary(launcher: Launcher, np: int, link: dict | None) -> dict:
    """What a comm result says about the network it ran over."""
    used = list(launcher.hosts_for(np)) if launcher.hosts else [socket.gethostname()]
    transport = "tcp" if len(used) > 1 else "shared-memory" if np > 1 else "none"
    return {"hosts": used, "ranks_per_host": launcher.ranks_per_host if launcher.hosts else np,
            "transport": transport, "link": link}


LINK_CHECK_FROM_BYTES = 4 << 20
"""From this size up, a collective over a shaped link should be limited by the link, not by its latency."""
LINK_CHECK_BOUNDS = (0.7, 1.0)
"""busbw / link rate of allreduce and allgather at P=2 over the link: nothing can beat the link, and a transport
that loses more than 30% to protocol and buffers is not measuring the link."""


def link_fraction_rows(rows: list[dict], link: dict) -> list[dict]:
    """busbw / link rate of every allreduce and allgather row from LINK_CHECK_FROM_BYTES up: `fraction` from the
    median iteration, `fraction_best` from the fastest one (what the path does when no other process holds the
    CPU: on a shared machine the median also measures the neighbours)."""
    if not link or not link.get("rate_gbps"):
        return []
    rate_gb_per_s = link["rate_gbps"] / 8  # rows are in GB/s (1e9 bytes/s), links in Gbit/s
    return [{"backend": r["backend"], "op": r["op"], "size_bytes": r["size_bytes"],
             "fraction": r["busbw_gbps"] / rate_gb_per_s,
             "fraction_best": r["busbw_gbps"] * r["latency_us_median"] / r["latency_us_min"] / rate_gb_per_s}
            for r in rows if r["op"] in ("allreduce", "allgather") and r["backend"] != "memcpy"
            and r["size_bytes"] >= LINK_CHECK_FROM_BYTES]


def link_fractions(rows: list[dict], link: dict) -> str:
    """One paragraph: the link as tc has it and busbw / link rate per backend and op, from 4 MiB up."""
    head = (f"link ({link.get('host', 'this host')} {link['interface']}, read from tc): {link['qdisc'] or 'no qdisc'}"
            + (f" rate {link['rate_gbps']:g} Gbit/s, burst {link['burst_bytes']} B, latency {link['latency_ms']:g} ms"
               if link.get("rate_gbps") else ", unshaped"))
    fractions = link_fraction_rows(rows, link)
    if not fractions:
        return head
    lo, hi = LINK_CHECK_BOUNDS
    parts = []
    for key in dict.fromkeys((f["backend"], f["op"]) for f in fractions):
        mine = [f for f in fractions if (f["backend"], f["op"]) == key]
        median, best = [f["fraction"] for f in mine], [f["fraction_best"] for f in mine]
        parts.append(f"{key[0]} {key[1]} {min(median):.2f}-{max(median):.2f} [{min(best):.2f}-{max(best):.2f}]")
    inside = all(lo <= f["fraction"] <= hi for f in fractions)
    return (f"{head}\nbusbw / link rate from {LINK_CHECK_FROM_BYTES >> 20} MiB up, median [fastest iteration]: "
            f"{'; '.join(parts)} (medians {'all within' if inside else 'NOT all within'} [{lo}, {hi}])")


def shares_one_machine(hosts: list[str]) -> bool:
    """True when every host is an emulated host of this machine: their ranks time-share its cores."""
    cluster = emulated_cluster()
    return cluster is not None and len(hosts) > 0 and set(hosts) <= set(cluster.hosts)

