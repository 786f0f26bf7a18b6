"""Where one ``Enqueuer.enqueue`` to a connected client spends its time, on MariaDB.

    python benchmarks/enqueue_profile.py mysql://root@127.0.0.1:3306/
    python benchmarks/enqueue_profile.py mysql://root@127.0.0.1:3306/ -n 2000

Creates a fresh database (dropped at the end), a fake server (a UDP socket that
receives the wake-ups) owning one client, and times N calls of ``Enqueuer.enqueue``
under cProfile (every 50 calls, untimed, the messages are marked delivered, as a
reading client's would be): the p50 of one call, then the functions by their own time.  The
time spent in ``recv_into`` is the wait for MariaDB's answer; the rest is Python
(PyMySQL reading the result, Niki's storage layer, the signed wake-up).  Then the
same database answers the statements alone, without Python's share: ``SELECT 1``, a
bare ``INSERT`` and its ``COMMIT``, and the enqueue procedure's ``CALL``.  Prints
figures; decides nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import socket
import statistics
import time
from typing import Callable, List

import pymysql
from mysql_counts import MysqlServer

from messaging_server import Enqueuer
from messaging_server.storage import open_storage
from messaging_server.storage.mysql import ENQUEUE_PROCEDURE


def p50_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1000


def timed(calls: int, call: Callable[[int], None], between: Callable[[], None]) -> List[float]:
    """Time each call; ``between`` runs untimed every 50 calls."""
    samples = []
    for i in range(calls):
        if i % 50 == 0:
            between()
        started = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - started)
    return samples


def delivered(mysql: MysqlServer, database: str) -> Callable[[], None]:
    """Mark every pending message delivered, as a reading client's server would: the
    client's backlog stays small (the queue cap's count reads it)."""
    def mark() -> None:
        with pymysql.connect(host=mysql.host, port=mysql.port, user=mysql.user,
                             password=mysql.password, database=database, autocommit=True) as conn, \
                conn.cursor() as cur:
            cur.execute("UPDATE messages SET status = 'delivered' WHERE status = 'pending'")
    return mark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mysql_url", help="a MariaDB server, e.g. mysql://root@127.0.0.1:3306/")
    parser.add_argument("-n", type=int, default=1000, help="calls to time (default 1000)")
    args = parser.parse_args()
    mysql = MysqlServer.from_url(args.mysql_url)
    with mysql.scratch_database("niki_profile") as name:
        url = mysql.url(name)
        with open_storage(url, create=True) as storage, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wakeups:
            storage.create_schema()
            wakeups.bind(("127.0.0.1", 0))
            server = storage.register_server("profile", 1, "127.0.0.1", wakeups.getsockname()[1], 1)
            client = storage.new_client(server).client_id
            with Enqueuer(url) as enqueuer:
                for i in range(50):  # the pool's connection, the key, the procedure's cache
                    enqueuer.enqueue(client, f"warm-up {i}")
                profile = cProfile.Profile()
                profile.enable()
                samples = timed(args.n, lambda i: enqueuer.enqueue(client, f"message {i}"),
                                delivered(mysql, name))
                profile.disable()
            print(f"Enqueuer.enqueue to a connected client, {args.n} calls under cProfile: "
                  f"p50 {p50_ms(samples):.3f} ms")
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
            bare(mysql, name, client, args.n)


def bare(mysql: MysqlServer, database: str, client: int, calls: int) -> None:
    """The database's own share: the same statements from a bare connection."""
    conn = pymysql.connect(host=mysql.host, port=mysql.port, user=mysql.user,
                           password=mysql.password, database=database, autocommit=False)
    cur = conn.cursor()

    def select_one(i: int) -> None:
        cur.execute("SELECT 1")
        cur.fetchall()

    def insert_commit(i: int) -> None:
        body = f"bare {i} {time.time()}"
        cur.execute("INSERT INTO messages (client_id, body, body_hash, status, created_at) "
                    "VALUES (%s, %s, %s, 'pending', NOW(6))",
                    (client, body, hashlib.sha256(body.encode()).digest()))
        conn.commit()

    def call(i: int) -> None:
        body = f"call {i} {time.time()}"
        cur.execute(f"CALL {ENQUEUE_PROCEDURE}(%s, %s, %s, %s, %s, %s, %s)",
                    (client, body, hashlib.sha256(body.encode()).digest(), 5_000_000, None,
                     10_000, 15_000_000))
        cur.fetchall()
        while cur.nextset():
            pass

    try:
        for label, fn in (("SELECT 1", select_one), ("INSERT + COMMIT", insert_commit),
                          (f"CALL {ENQUEUE_PROCEDURE}", call)):
            samples = timed(calls, fn, delivered(mysql, database))
            print(f"  bare connection, {label}: p50 {p50_ms(samples):.3f} ms")
    finally:
        conn.close()


if __name__ == "__main__":
    main()
