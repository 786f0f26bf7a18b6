"""Multi-host MySQL URLs (storage/hosts.py): parsing, the move to the next host when one
fails, within the failing call, and a quick error when no host is left.

The move is tested here between two plain MariaDB servers (a private one that is killed,
then the machine's); tests/test_galera_e2e.py tests it on a real Galera cluster."""

from __future__ import annotations

import logging
import time
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from benchmarks.mysql_counts import CountingProxy
from messaging_server.errors import ConfigurationError, StorageUnavailable
from messaging_server.storage import open_storage
from messaging_server.storage.hosts import HostList, parse_hosts
from tests.helpers import query
from tests.private_mariadb import PrivateMariaDB, free_port


@pytest.mark.parametrize(("hostlist", "expected"), [
    ("db1", [("db1", 3306)]),
    ("db1:3307", [("db1", 3307)]),
    ("db1:3306,db2:3307,db3", [("db1", 3306), ("db2", 3307), ("db3", 3306)]),
    ("[::1]:3310,[fe80::1]", [("::1", 3310), ("fe80::1", 3306)]),
])
def test_parse_hosts(hostlist: str, expected: list) -> None:
    assert parse_hosts(hostlist, "url") == expected


@pytest.mark.parametrize(("hostlist", "error"), [
    ("db1,,db2", "several hosts separated by commas"),
    ("db1:0", "the port must be a number from 1 to 65535"),
    ("db1:", "the port must be a number from 1 to 65535"),
    ("db1:x,db2", "the port must be a number from 1 to 65535"),
    ("db1:70000", "the port must be a number from 1 to 65535"),
    ("db1,db1:3306", "db1:3306 is named twice"),
    ("[::1]x", "cannot read the host"),
])
def test_parse_hosts_refuses(hostlist: str, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error):
        parse_hosts(hostlist, "url")


def test_a_multi_host_url_with_a_password_is_masked_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        open_storage("mysql://niki:s3cret@db1:3306,db2:0/niki")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_host_list_order_and_one_line_per_move(caplog: pytest.LogCaptureFixture) -> None:
    hosts = HostList([("a", 1), ("b", 2), ("c", 3)], "niki")
    assert hosts.several and hosts.current == ("a", 1)
    assert hosts.in_order() == [("a", 1), ("b", 2), ("c", 3)]
    with caplog.at_level(logging.WARNING):
        hosts.use(("b", 2), "a:1: refused")
        hosts.use(("b", 2), "a:1: refused")  # already there: no second line
    assert hosts.in_order() == [("b", 2), ("c", 3), ("a", 1)]
    moves = [r.getMessage() for r in caplog.records]
    assert moves == ["database 'niki': moved from a:1 to b:2 (a:1: refused)"]


def multi_host(*urls: str) -> str:
    """One URL naming the hosts of ``urls`` in order, with the last one's database."""
    parts = [urlsplit(url) for url in urls]
    hostlist = ",".join(f"{p.hostname}:{p.port}" for p in parts)
    return parts[-1]._replace(netloc=f"root@{hostlist}").geturl()


@pytest.mark.mysql
def test_a_dead_first_host_is_passed_over(mysql_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = multi_host(f"mysql://root@127.0.0.1:{free_port()}/", mysql_url)
    with caplog.at_level(logging.WARNING, logger="messaging_server.storage"):
        storage = open_storage(url)
        try:
            storage.create_schema()
            client = storage.new_client().client_id
            assert storage.enqueue(client, "hello", 5.0).message_id is not None
        finally:
            storage.close()
    moves = [r.getMessage() for r in caplog.records if "moved from" in r.getMessage()]
    assert len(moves) == 1 and "Connection refused" in moves[0], moves


@pytest.mark.mysql
def test_no_host_left_fails_at_once() -> None:
    """Every host refusing is not a failover: the caller hears it at once, not after
    FAILOVER_S, with each host's reason."""
    ports = [free_port(), free_port()]
    storage = open_storage(f"mysql://root@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/niki")
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable) as info:
            storage.enqueue(1, "hello", 5.0)
    finally:
        storage.close()
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{ports[0]}:" in str(info.value) and f"127.0.0.1:{ports[1]}:" in str(info.value)


@pytest.mark.mysql
@pytest.mark.mariadbd
def test_a_killed_host_is_left_for_the_next_within_the_call(
        private_mariadb: PrivateMariaDB, mysql_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two plain servers stand in for two nodes: each has the schema and client 1.  The
    storage starts on the private one; after a SIGKILL the next enqueue moves to the
    machine's server within the call (no error), and the pooled connection to the dead
    one is never used again."""
    database = urlsplit(mysql_url).path.lstrip("/")
    first = f"mysql://root@127.0.0.1:{private_mariadb.port}/{database}"
    for url in (first, mysql_url):
        with open_storage(url, create=True) as prepare:
            prepare.create_schema()
            assert prepare.new_client().client_id == 1
    storage = open_storage(multi_host(first, mysql_url), pool_size=4)
    try:
        assert storage.enqueue(1, "before", 5.0).message_id is not None
        assert storage.hosts.current == ("127.0.0.1", private_mariadb.port)
        private_mariadb.kill()
        with caplog.at_level(logging.WARNING, logger="messaging_server.storage"):
            assert storage.enqueue(1, "after", 5.0).message_id is not None  # no error
        assert storage.hosts.current == ("127.0.0.1", urlsplit(mysql_url).port)
        assert any("moved from" in r.getMessage() for r in caplog.records)
        for n in range(8):
            assert storage.enqueue(1, f"more {n}", 5.0).message_id is not None
        assert storage.connections_in_use() == 0
    finally:
        storage.close()
    assert [row[0] for row in query(mysql_url, "SELECT body FROM messages ORDER BY id")] == \
        ["after", *[f"more {n}" for n in range(8)]]


@pytest.fixture
def dying_host(mysql_url: str) -> Iterator[CountingProxy]:
    """A relay to the machine's server that stands for a first host which can die."""
    parts = urlsplit(mysql_url)
    relay = CountingProxy((parts.hostname or "127.0.0.1", parts.port or 3306))
    yield relay
    relay.close()


@pytest.mark.mysql
@pytest.mark.parametrize("cut_after", ["CALL", "COMMIT"])
def test_a_host_that_dies_after_the_commit_queues_once_and_says_so(
        mysql_url: str, dying_host: CountingProxy, cut_after: str) -> None:
    """The first host commits the enqueue (the CALL; or, for a batch, its COMMIT) and
    dies before answering.  The call is run again on the next host, which finds the same
    body (the duplicate rule): the caller is told its message was queued, with the id of
    the one stored, and it is stored once."""
    with open_storage(mysql_url, create=True) as prepare:
        prepare.create_schema()
        client = prepare.new_client().client_id
    direct = urlsplit(mysql_url)
    url = multi_host(f"mysql://root@127.0.0.1:{dying_host.port}/", mysql_url)
    storage = open_storage(url)
    try:
        assert storage.enqueue(client, "warm-up", 5.0).message_id is not None
        dying_host.cut_once_after = cut_after
        if cut_after == "CALL":
            queued = storage.enqueue(client, "hello", 5.0)
            results = [queued]
        else:
            results = storage.enqueue_many([(client, "hello"), (client, "world")], 5.0)
        assert storage.hosts.current == (direct.hostname, direct.port)
    finally:
        storage.close()
    rows = query(mysql_url, "SELECT id, body, status FROM messages ORDER BY id")
    pending = [(row[0], row[1]) for row in rows if row[2] == "pending"]
    bodies = ["hello"] if cut_after == "CALL" else ["hello", "world"]
    assert [body for _, body in pending] == ["warm-up", *bodies]
    assert [r.message_id for r in results] == [i for i, body in pending if body in bodies]
