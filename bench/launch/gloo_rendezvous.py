"""Run a rank program under Horovod's Gloo controller inside an mpirun launch (`Launcher(controller="gloo")`).

Horovod's Gloo controller does not use MPI to find its peers: horovodrun normally starts an HTTP rendezvous
server and hands every rank its place (HOROVOD_RANK, HOROVOD_LOCAL_RANK, HOROVOD_CROSS_RANK, ...). Here mpirun has
already placed the ranks, so each rank takes its place from Open MPI's variables, rank 0 serves the rendezvous on
the first host (reachable from every host, unlike the launching process on the emulated cluster), and the program
then runs in this process:

    python -m bench.launch.gloo_rendezvous --hosts node1:1,node2:1 --addr node1 --port P MODULE ARGS...
"""
from __future__ import annotations

import argparse
import os
import runpy
import socket
import sys


def free_port() -> int:
    """A TCP port nothing listens on here now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap(argv: list[str], hosts: dict[str, int], addr: str) -> list[str]:
    """`python -m MODULE ARGS` as a rank program under the Gloo controller; hosts: host -> ranks placed on it."""
    if len(argv) < 3 or argv[1] != "-m":
        raise ValueError(f"the Gloo controller runs python -m programs only (got {argv[:3]})")
    return [argv[0], "-m", "bench.launch.gloo_rendezvous", "--hosts", ",".join(f"{h}:{n}" for h, n in hosts.items()),
            "--addr", addr, "--port", str(free_port()), *argv[2:]]


def place_of_this_rank(hosts: str, size: int, rank: int):
    """This rank's SlotInfo in Horovod's own host assignment, and the whole plan (the rendezvous needs it)."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    plan = get_host_assignments(parse_hosts(hosts), size)
    return plan[rank], plan


def serve_rendezvous(port: int, plan) -> None:
    """Horovod's rendezvous server on `port`, in a daemon thread of this process (it lives as long as rank 0)."""
    import threading

    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    server.init(plan)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launch.gloo_rendezvous")
    parser.add_argument("--hosts", required=True, help="host:slots,... as mpirun placed the ranks")
    parser.add_argument("--addr", required=True, help="where rank 0 serves the rendezvous (the first host)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    slot, plan = place_of_this_rank(args.hosts, size, rank)
    if slot.hostname != socket.gethostname() and args.addr != "127.0.0.1":
        raise RuntimeError(f"rank {rank} runs on {socket.gethostname()}, but Horovod's plan puts it on "
                           f"{slot.hostname}: launch with the ranks filled host by host")
    if rank == 0:
        serve_rendezvous(args.port, plan)
    os.environ.update({
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": args.addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(args.port),
        "HOROVOD_HOSTNAME": slot.hostname, "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size)})
    sys.argv = [args.module, *args.args]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
