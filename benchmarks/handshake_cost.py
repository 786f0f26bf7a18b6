"""What credentials and TLS cost a connecting client: handshakes per second, plain and TLS.

    python benchmarks/handshake_cost.py [--db sqlite|mysql] [--count 500] [--tls]

Starts its own server on a fresh database (a temporary SQLite file, or a fresh
MariaDB database at mysql://root@127.0.0.1:3306), then, one connection after
another: ``NONE`` handshakes (a new client each), and reconnects presenting
a credential (the secret checked against its hash).  With ``--tls`` the same
over TLS, with a certificate made by ``openssl`` for the run.  Prints the rate
and the median and 99th percentile time per handshake.  A benchmark, not a
test: it prints figures and decides nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, Tuple

from mysql_counts import bench_database

LISTENING = re.compile(r"port (\d+) \(clients, TCP\)")


def start_server(db: str, extra: List[str]) -> Tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "messaging_server", "-p", "0", "--db", db, *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = LISTENING.search(line)
        if match:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def handshake(port: int, answer: str, context: Optional[ssl.SSLContext]) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        reader = sock.makefile("rb")
        assert reader.readline() == b"GET_CLIENT_ID\n"
        sock.sendall(answer.encode() + b"\n")
        line = reader.readline().decode().strip()
        assert line.startswith("SET_CLIENT_ID: "), line
        sock.sendall(b"DISCONNECT\n")
        return line[len("SET_CLIENT_ID: "):]


def measure(label: str, count: int, one: Callable[[int], None]) -> None:
    times = []
    start = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        one(i)
        times.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - start
    times.sort()
    print(f"{label:<34} {count / elapsed:8.0f} handshakes/s   p50 {statistics.median(times):6.2f} ms"
          f"   p99 {times[int(len(times) * 0.99) - 1]:6.2f} ms")


def run_variant(db: str, name: str, extra: List[str], context: Optional[ssl.SSLContext],
                count: int) -> None:
    proc, port = start_server(db, extra)
    try:
        credentials: List[str] = []
        measure(f"{name}: NONE (new client)", count,
                lambda i: credentials.append(handshake(port, "NONE", context)))
        measure(f"{name}: credential (secret checked)", count,
                lambda i: handshake(port, credentials[i], context))
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "mysql"), default="sqlite")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--tls", action="store_true", help="also measure over TLS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_database(args.db, tmp) as db:
        variants: List[Tuple[str, List[str], Optional[ssl.SSLContext]]] = [("plain", [], None)]
        if args.tls:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                            "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
            variants.append(("TLS", ["--tls-cert", cert, "--tls-key", key],
                             ssl.create_default_context(cafile=cert)))
        print(f"database {args.db}, {args.count} sequential handshakes each")
        for name, extra, context in variants:
            run_variant(db, name, extra, context, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
