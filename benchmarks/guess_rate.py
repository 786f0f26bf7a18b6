"""What one address guessing credentials costs: guesses/s answered, client rows, log bytes.

    python benchmarks/guess_rate.py [--db sqlite|mysql] [--seconds 10] [--threads 4]
                                    [--source 127.0.0.2] [--none]

Starts its own server on a fresh database (a temporary SQLite file, or a fresh
MariaDB database at mysql://root@127.0.0.1:3306, dropped at the end), makes
one real client, then for ``--seconds`` has ``--threads`` connections in a loop
from ``--source`` (not 127.0.0.1, which the throttle exempts) present client 1
with a wrong secret (``--none``: say ``NONE``).  Prints how many guesses were
answered with a new client (``SET_CLIENT_ID``) and how many refused
(``ERROR``), per second; the client rows and log lines/bytes the run added;
and whether the real client, from the same address, is still served.  A
benchmark, not a test: it prints figures and decides nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Tuple

import pymysql
from mysql_counts import bench_database

LISTENING = re.compile(r"port (\d+) \(clients, TCP\)")
WRONG_SECRET = "A" * 24


def start_server(db: str, log_path: str) -> Tuple[subprocess.Popen, int]:
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "messaging_server", "-p", "0", "--db", db],
                                stderr=log_file, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            match = LISTENING.search(f.read())
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path) as f:
        raise SystemExit(f"server did not start:\n{f.read()}")


def handshake(port: int, source: str, answer: str) -> str:
    """The server's answer to ``answer`` (first line after GET_CLIENT_ID), or "closed"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        reader = sock.makefile("rb")
        if reader.readline() != b"GET_CLIENT_ID\n":
            return "closed"
        sock.sendall(answer.encode() + b"\n")
        line = reader.readline().decode().strip()
        if line.startswith("SET_CLIENT_ID: "):
            sock.sendall(b"DISCONNECT\n")
        return line or "closed"
    finally:
        sock.close()


def count_clients(db: str) -> int:
    if db.startswith("sqlite:"):
        con = sqlite3.connect(db.split(":///", 1)[1])
        try:
            return int(con.execute("SELECT COUNT(*) FROM clients").fetchone()[0])
        finally:
            con.close()
    con = pymysql.connect(host="127.0.0.1", user="root", database=db.rsplit("/", 1)[1])
    try:
        with con.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM clients")
            return int(cur.fetchone()[0])
    finally:
        con.close()


def log_size(path: str) -> Tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n"), len(data)


def run(db: str, log_path: str, seconds: float, threads: int, source: str, none: bool) -> None:
    proc, port = start_server(db, log_path)
    try:
        real = handshake(port, "127.0.0.1", "NONE")[len("SET_CLIENT_ID: "):]
        guess = "NONE" if none else f"{real.partition('.')[0]}.{WRONG_SECRET}"
        rows0, (lines0, bytes0) = count_clients(db), log_size(log_path)
        answers: Counter = Counter()
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def loop() -> None:
            while time.monotonic() < stop:
                answer = handshake(port, source, guess)
                kind = answer.split(":", 1)[0] if answer.startswith(("SET_CLIENT_ID", "ERROR")) else answer
                with lock:
                    answers[kind] += 1

        workers = [threading.Thread(target=loop) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # The log is written by the server's threads: let the last lines land.
        time.sleep(0.5)
        rows, (lines, size) = count_clients(db) - rows0, log_size(log_path)
        served = handshake(port, source, real)
        total = sum(answers.values())
        print(f"{'NONE' if none else 'wrong-secret'} handshakes from {source} for {seconds:g} s "
              f"with {threads} connections in a loop:")
        print(f"  {total / seconds:8.1f} handshakes/s in all; answered SET_CLIENT_ID "
              f"{answers['SET_CLIENT_ID'] / seconds:.1f}/s, ERROR {answers['ERROR'] / seconds:.1f}/s"
              f"{'' if set(answers) <= {'SET_CLIENT_ID', 'ERROR'} else f', other {dict(answers)}'}")
        print(f"  client rows added: {rows}; log: {lines - lines0} lines, {size - bytes0} bytes")
        print(f"  the real client from {source} afterwards: {served.split(':', 1)[0]}"
              f"{' (its own credential)' if served == 'SET_CLIENT_ID: ' + real else ''}")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "mysql"), default="sqlite")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--source", default="127.0.0.2", help="address the guesses come from")
    parser.add_argument("--none", action="store_true", help="say NONE instead of guessing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_database(args.db, tmp) as db:
        run(db, os.path.join(tmp, "server.log"), args.seconds, args.threads, args.source, args.none)
    return 0


if __name__ == "__main__":
    sys.exit(main())
