"""Rank program for tests/benchmarks/test_collectives.py: serve timed collective calls to the pytest process.

    python collective_server.py HOST PORT BACKEND        (on every rank, launched by bench.launch.mpirun.run_ranks)

Each rank connects to the pytest process, says hello (its rank, the world size and the launch settings it sees:
shared-memory mechanism, allocator, Horovod knobs) and obeys one JSON line at a time:
  {"cmd": "prepare", "op": ..., "size": ...}  build that point's buffers (bench.ranks.comm_rank, as `alure-bench comm`
                                              does), make `warmup` untimed calls, answer {"bytes_moved": ...}
  {"cmd": "run", "calls": K}                  make K back-to-back calls of the prepared collective, answer {}
  {"cmd": "noop"}                             answer {} at once (the control round trip, nothing else)
  {"cmd": "stop"}                             shut the backend down and exit
"""
import json
import os
import socket
import sys

from bench.launch.environment import launch_settings
from bench.ranks.comm_rank import BACKEND_CLASSES, geometry


def main(host: str, port: int, backend_name: str) -> None:
    backend = BACKEND_CLASSES[backend_name]()
    conn = socket.create_connection((host, port), timeout=600)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = conn.makefile("rw")

    def answer(obj):
        stream.write(json.dumps(obj) + "\n")
        stream.flush()

    answer({"rank": backend.rank, "size": backend.size, "launch": launch_settings(dict(os.environ))})
    call = None
    for line in stream:
        msg = json.loads(line)
        if msg["cmd"] == "prepare":
            call = None  # free the previous point's buffers first
            geo = geometry(msg["op"], msg["size"], backend.size)
            call = backend.prepare(msg["op"], geo, 1)
            for _ in range(msg.get("warmup", 1)):
                call()
            answer({"bytes_moved": geo.bytes_moved})
        elif msg["cmd"] == "run":
            for _ in range(msg["calls"]):
                call()
            answer({})
        elif msg["cmd"] == "noop":
            answer({})
        elif msg["cmd"] == "stop":
            break
    backend.close()
    answer({"stopped": True})
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
