"""What one ``Storage.enqueue`` costs on MariaDB: commands sent, latency, single-thread rate.

    python benchmarks/enqueue_cost.py mysql://root@127.0.0.1:3306/
    python benchmarks/enqueue_cost.py mysql://root@127.0.0.1:3306/ -n 2000

Creates a fresh database (dropped at the end), applies the schema, creates one client
and then:

* counts the commands of N enqueues sent through a CountingProxy (mysql_counts.py),
  after one warm-up enqueue that opens the pool's connection: commands per enqueue,
  by kind (PING, BEGIN, SELECT, CALL, ...);
* times N enqueues without the relay, one after the other on one thread: the p50
  and p99 of one call, and the rate.

No server runs: this is the storage call alone (no wake-up datagram).  Prints
figures; decides nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mysql_counts import CountingProxy, MysqlServer, count_delta

from messaging_server.storage import open_storage

WINDOW = 5.0
MAX_PENDING = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", help="MariaDB URL without a database, e.g. mysql://root@127.0.0.1:3306/")
    parser.add_argument("-n", type=int, default=1000, help="enqueues per measurement (default 1000)")
    args = parser.parse_args()
    mysql = MysqlServer.from_url(args.server)
    with mysql.scratch_database("niki_cost") as database:
        with open_storage(mysql.url(database)) as storage:
            storage.create_schema()
            client = storage.new_client().client_id
        proxy = CountingProxy((mysql.host, mysql.port))
        try:
            with open_storage(mysql.url(database, proxy.port), pool_size=4) as counted:
                counted.enqueue(client, "warm-up", WINDOW, max_pending=MAX_PENDING)
                before = proxy.snapshot()
                for i in range(args.n):
                    counted.enqueue(client, f"counted {i}", WINDOW, max_pending=MAX_PENDING)
                delta = count_delta(before, proxy.snapshot())
        finally:
            proxy.close()
        per = {kind: count / args.n for kind, count in sorted(delta.items())}
        print(f"commands per enqueue (relay-counted, {args.n} enqueues): "
              f"{sum(per.values()):.2f}  " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        with open_storage(mysql.url(database), pool_size=4) as storage:
            storage.enqueue(client, "warm-up 2", WINDOW, max_pending=MAX_PENDING)
            times = []
            start = time.perf_counter()
            for i in range(args.n):
                t0 = time.perf_counter()
                storage.enqueue(client, f"timed {i}", WINDOW, max_pending=MAX_PENDING)
                times.append(time.perf_counter() - t0)
            took = time.perf_counter() - start
        times.sort()
        print(f"one enqueue: p50 {statistics.median(times) * 1000:.3f} ms, "
              f"p99 {times[int(len(times) * 0.99)] * 1000:.3f} ms; "
              f"rate {args.n / took:.0f}/s on one thread ({args.n} enqueues)")


if __name__ == "__main__":
    main()
