"""Niki on a 3-node MariaDB Galera cluster on this machine, against the machine's single
MariaDB in the same run: queueing rate and end-to-end latency, with the producers on
the server's node (one writer node) and spread over all three nodes.

    python benchmarks/galera.py [--messages 4000] [--threads 8] [--latency 200]

Starts the cluster with tests/galera_cluster.py (about 10 s; run as root, the nodes run
as the mysql user), prints one table, removes the cluster.  The figures are for one
machine with two cores running all three nodes, Niki and the producers: Galera's network
round trips cost nothing here, its CPU does.  Not a test: nothing is judged.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pymysql  # noqa: E402

from messaging_server import Enqueuer  # noqa: E402
from messaging_server.client.sdk import Client  # noqa: E402
from messaging_server.storage import open_storage  # noqa: E402
from tests.galera_cluster import GaleraCluster, galera_missing  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402
from tests.private_mariadb import template_datadir  # noqa: E402

MACHINE_MYSQL = os.environ.get("NIKI_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/niki_test")


def on_server(url: str, statement: str) -> None:
    """Run one statement on the server of ``url`` (mysql://root@host:port/...)."""
    host, port = url.split("@")[1].split("/")[0].split(":")
    con = pymysql.connect(host=host, port=int(port), user="root", autocommit=True)
    try:
        con.cursor().execute(statement)
    finally:
        con.close()


def queue_rate(urls: Sequence[str], clients: Sequence[int], messages: int, threads: int) -> Tuple[float, int]:
    """Messages per second queued by ``threads`` producers (thread i on urls[i % len]),
    single enqueue() calls round-robin over ``clients``; and the slowest call in ms."""
    per_thread = messages // threads
    slowest = [0.0]
    lock = threading.Lock()

    def run(index: int) -> None:
        with Enqueuer(urls[index % len(urls)]) as enq:
            longest = 0.0
            for n in range(per_thread):
                started = time.perf_counter()
                enq.enqueue(clients[(index + n) % len(clients)], f"t{index} #{n}")
                longest = max(longest, time.perf_counter() - started)
        with lock:
            slowest[0] = max(slowest[0], longest)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - started), round(slowest[0] * 1000)


def latency(server_url: str, producer_url: str, count: int) -> Tuple[float, float]:
    """p50 and p99 (ms) from enqueue() called to the message read by a connected client."""
    with ServerProcess(server_url, "--advertise-host", "127.0.0.1") as server, \
            Client("127.0.0.1", server.port) as client, Enqueuer(producer_url) as enq:
        samples: List[float] = []
        for n in range(count):
            started = time.perf_counter()
            enq.enqueue(client.client_id, f"latency #{n}")
            assert client.receive(timeout=10) == f"latency #{n}"
            samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def conflicts(cluster: GaleraCluster) -> int:
    return sum(int(node.status().get("wsrep_local_cert_failures", 0)) +
               int(node.status().get("wsrep_local_bf_aborts", 0)) for node in cluster.nodes if node.running)


def measure(label: str, server_url: str, producer_urls: Sequence[str], args: argparse.Namespace,
            cluster: GaleraCluster | None) -> Dict[str, object]:
    with open_storage(server_url, create=True) as storage:
        storage.create_schema()
        clients = [storage.new_client().client_id for _ in range(100)]
    before = conflicts(cluster) if cluster else 0
    rate, slowest = queue_rate(producer_urls, clients, args.messages, args.threads)
    p50, p99 = latency(server_url, producer_urls[-1], args.latency)
    return {"set-up": label, "queued/s": round(rate), "slowest call ms": slowest,
            "latency p50 ms": round(p50, 2), "latency p99 ms": round(p99, 2),
            "conflicts": (conflicts(cluster) - before) if cluster else "-"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages queued per set-up")
    parser.add_argument("--threads", type=int, default=8, help="producer threads")
    parser.add_argument("--latency", type=int, default=200, help="messages timed end to end")
    args = parser.parse_args()
    reason = galera_missing()
    if reason:
        print(f"cannot start a Galera cluster: {reason}", file=sys.stderr)
        return 2
    rows = []
    name = f"niki_bench_{uuid.uuid4().hex[:8]}"
    single = MACHINE_MYSQL.rsplit("/", 1)[0] + "/" + name
    on_server(single, f"CREATE DATABASE `{name}`")
    try:
        rows.append(measure("single MariaDB (the machine's)", single, [single], args, None))
    finally:
        on_server(single, f"DROP DATABASE IF EXISTS `{name}`")
    cache = Path(tempfile.gettempdir()) / "niki-galera-cache"  # as python -m tests.galera_cluster
    cache.mkdir(exist_ok=True)
    template = template_datadir(cache)
    started = time.monotonic()
    with GaleraCluster(template) as cluster:
        print(f"Galera cluster of {cluster.size} up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        ports = [node.port for node in cluster.nodes]

        def url(first: int, db: str) -> str:
            order = ports[first:] + ports[:first]
            return f"mysql://root@{','.join(f'127.0.0.1:{p}' for p in order)}/{db}"

        for label, producers in (("Galera, producers on the server's node", [0]),
                                 ("Galera, producers on all 3 nodes", [0, 1, 2])):
            db = f"{name}_{len(producers)}"
            on_server(cluster.node(1).url, f"CREATE DATABASE `{db}`")
            rows.append(measure(label, url(0, db), [url(p, db) for p in producers], args, cluster))
    columns = list(rows[0])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
