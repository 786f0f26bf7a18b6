"""Niki on a 3-node MariaDB Galera cluster (tests/galera_cluster.py).

A server runs on node 1 while two producers queue 50 messages each for one connected
client at once; the client must get every message exactly once, each producer's in its
order, and no producer may see an exception.  With both producers on node 1 too (one
writer node, as docs/SCALING.md recommends) the other nodes only replicate; with the
producers on nodes 2 and 3 the writes meet only through Galera replication.

Skipped when mariadbd, galera-4 or rsync is missing; with CI=true that fails instead.

Opt-in for now (NIKI_TEST_GALERA=1): Galera support is work in progress (the producers
on other nodes leave messages stranded, the expected failure below), and the module
starts a cluster of three servers per xdist worker; it joins the default run once that
is fixed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from messaging_server import Enqueuer
from messaging_server.client import Client
from tests.galera_cluster import GaleraCluster, galera_missing
from tests.helpers import ServerProcess, assert_no_traceback, query, run_threads, wait_until
from tests.private_mariadb import template_datadir

pytestmark = [
    pytest.mark.galera,
    pytest.mark.usefixtures("no_niki_environment"),
    pytest.mark.skipif(os.environ.get("NIKI_TEST_GALERA") != "1",
                       reason="Galera tests are opt-in while the work is in progress: "
                              "set NIKI_TEST_GALERA=1"),
]

IN_CI = os.environ.get("CI", "").lower() == "true"
PER_PRODUCER = 50
# After the producers finish (they take well under a second here): a stranded message
# stays pending for the whole connection (see below), so waiting longer shows nothing new.
RECEIVE_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def galera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GaleraCluster]:
    """One cluster for the module's tests in this process: starting it (a bootstrap and
    two state transfers) takes about 10 s.  Under xdist the two tests may land on both
    workers, each starting a cluster of its own, in parallel (--dist loadgroup with
    xdist_group did not keep them together with pytest 9.2 / xdist 3.8)."""
    reason = galera_missing()
    if reason:
        if IN_CI:
            pytest.fail(f"cannot start a Galera cluster: {reason}")
        pytest.skip(f"cannot start a Galera cluster: {reason}")
    root = tmp_path_factory.getbasetemp()
    template: Path = template_datadir(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root)
    started = time.monotonic()
    with GaleraCluster(template) as cluster:
        print(f"\nGalera cluster of {cluster.size} up in {time.monotonic() - started:.1f} s")
        yield cluster


def missing(url: str, bodies: List[str], got: List[str]) -> str:
    """The stored rows (id, status) of the messages that did not arrive, for a failure."""
    lost = [body for body in bodies if body not in got]
    rows = query(url, "SELECT id, body, status FROM messages ORDER BY id")
    return "\n".join(f"  {row}" for row in rows if row[1] in lost)


def create_database(galera: GaleraCluster, name: str) -> List[str]:
    """Create ``name`` on node 1, wait until node 3 has it (it replicates), and return
    its URL on each node."""
    con = galera.node(1).connect()
    try:
        con.cursor().execute(f"CREATE DATABASE `{name}`")
    finally:
        con.close()
    wait_until(lambda: query(galera.node(3).url, "SHOW DATABASES LIKE %s", (name,)), timeout=10,
               message="the database to replicate to node 3")
    return [url + name for url in galera.urls]


def deliver_from_two_producers(galera: GaleraCluster, server_url: str,
                               producer_urls: Dict[str, str]) -> None:
    """A server on ``server_url``, one client, a producer per ``producer_urls`` entry
    queuing PER_PRODUCER messages at once; every message must arrive once, in order."""
    with ServerProcess(server_url, "--advertise-host", "127.0.0.1") as server, \
            Client("127.0.0.1", server.port, ack=True) as client:
        client_id = client.client_id
        assert client_id is not None
        # Each producer's bodies sort in its order; the prefix says which one queued it.
        sent: Dict[str, List[str]] = {name: [f"{name} #{n:03d}" for n in range(PER_PRODUCER)]
                                      for name in producer_urls}

        def producer(name: str) -> None:
            with Enqueuer(producer_urls[name]) as enq:
                for body in sent[name]:
                    assert enq.enqueue(client_id, body), f"{body} taken for a duplicate"

        started = time.monotonic()
        run_threads([lambda name=name: producer(name) for name in producer_urls], timeout=60)
        queued_in = time.monotonic() - started
        total = PER_PRODUCER * len(producer_urls)
        received: List[str] = []
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while len(received) < total and time.monotonic() < deadline:
            try:
                body = client.receive(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            assert body is not None, f"the server closed after {len(received)} messages"
            received.append(body)
        received_in = time.monotonic() - started
        # Nothing more may come: a duplicate would arrive right behind the last one.
        with pytest.raises(TimeoutError):
            extra = client.receive(timeout=0.5)
            pytest.fail(f"an extra message arrived: {extra!r}")

    statuses = [node.status() for node in galera.nodes]
    conflicts = sum(int(st.get("wsrep_local_cert_failures", 0)) + int(st.get("wsrep_local_bf_aborts", 0))
                    for st in statuses)
    print(f"\n{total} messages queued through {sorted(set(producer_urls.values()))} in {queued_in:.1f} s; "
          f"{len(received)} received after {received_in:.1f} s; "
          f"certification failures and brute-force aborts so far: {conflicts}")
    assert_no_traceback([server])
    assert len(received) == len(set(received)), "a message arrived twice"
    for name, bodies in sent.items():
        got = [body for body in received if body.startswith(name + " ")]
        assert got == bodies, f"{name}: lost or out of order; on node 1:\n{missing(server_url, bodies, got)}"
    assert len(received) == total


def test_one_writer_node_delivers_everything_once_in_order(galera: GaleraCluster) -> None:
    urls = create_database(galera, "niki_one_writer")
    deliver_from_two_producers(galera, urls[0], {"first": urls[0], "second": urls[0]})


def test_producers_on_two_other_nodes_deliver_everything_once_in_order(galera: GaleraCluster) -> None:
    urls = create_database(galera, "niki_three_writers")
    deliver_from_two_producers(galera, urls[0], {"node2": urls[1], "node3": urls[2]})
