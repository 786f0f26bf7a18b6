"""What a flood of forged wake-up datagrams costs a connected client's delivery latency.

    python benchmarks/wakeup_flood.py [--db sqlite|mysql] [--idle 1000] [--rate 40]
                                      [--seconds 10]

Starts its own server on a fresh database (a temporary SQLite file, or a fresh
MariaDB database at mysql://root@127.0.0.1:3306, dropped at the end), connects
``--idle`` clients that have nothing pending and one *canary* client, then
measures the canary's delivery latency (enqueue() returned -> line read) for
``--seconds`` without a flood and again while ``--rate`` datagrams a second,
each naming as many of the idle clients' ids as fit in 1,200 bytes (ids are
sequential, so a stranger can name them all), hit the server's UDP port.
Prints p50/p99/max of both runs and the server's delivery passes and
nothing-new wake-ups (from /metrics).  A benchmark, not a test: it prints
figures and decides nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Dict, List, Tuple

import pymysql

from messaging_server import Enqueuer
from messaging_server.wakeup import encode

LISTENING = re.compile(r"port (\d+) \(clients, TCP\) and port (\d+) \(wake-ups, UDP\)")
HTTP = re.compile(r"HTTP API on http://[^:]+:(\d+)")


def start_server(db: str, log_path: str) -> Tuple[subprocess.Popen, int, int, int]:
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "messaging_server", "-p", "0", "--db", db,
                                 "--http-port", "0", "--max-connections", "5000"],
                                stderr=log_file, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        listening, http = LISTENING.search(text), HTTP.search(text)
        if listening and http:
            return proc, int(listening.group(1)), int(listening.group(2)), int(http.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path) as f:
        raise SystemExit(f"server did not start:\n{f.read()}")


def connect(port: int) -> Tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline() == b"GET_CLIENT_ID\n"
    sock.sendall(b"NONE\n")
    line = reader.readline().decode()
    assert line.startswith("SET_CLIENT_ID: "), line
    return sock, int(line[len("SET_CLIENT_ID: "):].split(".")[0])


def metrics(http_port: int) -> Dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def latencies(db: str, canary: socket.socket, canary_id: int, seconds: float) -> List[float]:
    reader = canary.makefile("rb")
    got: List[float] = []
    with Enqueuer(db) as enqueuer:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            body = f"canary {n}"
            started = time.monotonic()
            enqueuer.enqueue(canary_id, body)
            line = reader.readline().decode().strip()
            got.append(time.monotonic() - started)
            assert line == f"MESSAGE: {body}", line
            n += 1
            time.sleep(0.02)
    return got


def describe(values: List[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{len(values)} messages: p50 {statistics.median(ordered) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "mysql"), default="sqlite")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="niki-flood-")
    name = f"niki_flood_{uuid.uuid4().hex[:8]}"
    db = (f"sqlite:///{tmp}/niki.sqlite3" if args.db == "sqlite"
          else f"mysql://root@127.0.0.1:3306/{name}")
    proc, port, event_port, http_port = start_server(db, os.path.join(tmp, "server.log"))
    try:
        idle = [connect(port) for _ in range(args.idle)]
        canary, canary_id = connect(port)
        quiet = latencies(db, canary, canary_id, args.seconds)
        before = metrics(http_port)
        datagrams = encode(cid for _, cid in idle)
        stop = threading.Event()

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                i = 0
                while not stop.wait(1.0 / args.rate):
                    sock.sendto(datagrams[i % len(datagrams)], ("127.0.0.1", event_port))
                    i += 1

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        loud = latencies(db, canary, canary_id, args.seconds)
        stop.set()
        flooder.join()
        after = metrics(http_port)
        print(f"{args.db}, {args.idle} idle clients, {args.rate:g} datagrams/s of "
              f"{len(datagrams[0])} bytes ({len(datagrams)} distinct):")
        print(f"  without the flood: {describe(quiet)}")
        print(f"  during the flood:  {describe(loud)}")
        for key in ("niki_wakeups_received_total", "niki_delivery_passes_total",
                    "niki_wakeups_nothing_new_total"):
            if key in after:
                print(f"  {key} during the flood: {after[key] - before.get(key, 0):.0f}")
        for sock, _ in idle:
            sock.close()
        canary.close()
    finally:
        proc.terminate()
        proc.wait(30)
        if args.db == "mysql":
            con = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
            con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
            con.close()


if __name__ == "__main__":
    main()
