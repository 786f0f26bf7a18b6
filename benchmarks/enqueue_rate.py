"""Enqueue rate for one caller, to a client that is offline and to one that is online.

    python benchmarks/enqueue_rate.py sqlite:///$(mktemp -d)/bench.sqlite3
    python benchmarks/enqueue_rate.py mysql://root@127.0.0.1:3306/niki_bench

Starts a server on a free port (routed wake-ups), connects one client, and
times N sequential enqueues to an offline client and then to the connected one,
checking that the connected client receives every message.  Prints figures;
decides nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from messaging_server import Enqueuer
from messaging_server.client.sdk import Client

LISTENING = re.compile(r"port (\d+) \(clients, TCP\)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", help="database URL (a fresh one: the schema is created)")
    parser.add_argument("-n", type=int, default=500, help="messages per case (default 500)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "NIKI_PEERS"}
    env["NIKI_DB"] = args.db
    server = subprocess.Popen([sys.executable, "-m", "messaging_server", "-p", "0",
                               "--advertise-host", "127.0.0.1"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = 0
        assert server.stderr is not None
        for line in server.stderr:
            match = LISTENING.search(line)
            if match:
                port = int(match.group(1))
                break
        os.environ.pop("NIKI_PEERS", None)
        with Enqueuer(args.db) as enqueuer:
            online = Client("127.0.0.1", port)
            online_id = online.connect()
            offline = Client("127.0.0.1", port)
            offline_id = offline.connect()
            offline.disconnect()
            for label, client_id in (("offline", offline_id), ("online", online_id)):
                start = time.perf_counter()
                for i in range(args.n):
                    enqueuer.enqueue(client_id, f"{label} {i}")
                took = time.perf_counter() - start
                print(f"{label}: {args.n / took:.0f} enqueues/s ({took / args.n * 1000:.2f} ms each)")
            received = sum(1 for _ in range(args.n) if online.receive(timeout=10) is not None)
            print(f"online client received {received} of {args.n}; datagrams sent "
                  f"{enqueuer.datagrams_sent}")
            online.disconnect()
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
