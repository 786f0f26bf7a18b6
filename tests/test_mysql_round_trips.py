"""MariaDB: what one enqueue sends, and pooled connections that died while idle.

Commands are counted by benchmarks/mysql_counts.py's CountingProxy, a relay between
the storage and the real MariaDB server.  Connections are killed with KILL from
another session (our own sessions only; the machine's server is never touched).
"""

from __future__ import annotations

import logging
from typing import Iterator, List
from urllib.parse import urlsplit

import pytest

from benchmarks.mysql_counts import CountingProxy, count_delta
from messaging_server.errors import QueueFull, StorageUnavailable, UnknownClient
from messaging_server.storage import Storage, open_storage
from messaging_server.storage.mysql import ENQUEUE_PROCEDURE, _Link
from tests.conftest import mysql_connect
from tests.helpers import query, wait_until

pytestmark = pytest.mark.mysql

WINDOW = 5.0


@pytest.fixture
def proxy(mysql_url: str) -> Iterator[CountingProxy]:
    parts = urlsplit(mysql_url)
    relay = CountingProxy((parts.hostname or "127.0.0.1", parts.port or 3306))
    yield relay
    relay.close()


def through(url: str, relay: CountingProxy) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{relay.port}").geturl()


def sessions(url: str) -> List[int]:
    """The ids of the MariaDB sessions connected to ``url``'s database."""
    database = urlsplit(url).path.lstrip("/")
    admin = mysql_connect()
    try:
        with admin.cursor() as cursor:
            cursor.execute("SELECT id FROM information_schema.processlist WHERE db = %s", (database,))
            return [int(row[0]) for row in cursor.fetchall()]
    finally:
        admin.close()


def kill_sessions(url: str) -> None:
    """KILL every session on ``url``'s database, and wait until the server has closed them."""
    victims = sessions(url)
    assert victims, "the pool holds an open connection"
    admin = mysql_connect()
    try:
        with admin.cursor() as cursor:
            for victim in victims:
                cursor.execute(f"KILL {victim}")
    finally:
        admin.close()
    wait_until(lambda: not set(victims) & set(sessions(url)), 10)


def test_one_enqueue_is_one_command(mysql_url: str, proxy: CountingProxy) -> None:
    """Queueing one message is one CALL: no PING, no BEGIN, no COMMIT of its own; also
    when the client is unknown, its queue is full, or the message is a duplicate."""
    with open_storage(mysql_url, create=True) as admin:
        admin.create_schema()
        client = admin.new_client().client_id
    with open_storage(through(mysql_url, proxy), pool_size=2) as storage:
        storage.enqueue(client, "warm-up: opens the connection", WINDOW)
        before = proxy.snapshot()
        for n in range(5):
            assert storage.enqueue(client, f"m{n}", WINDOW, max_pending=100).message_id
        assert count_delta(before, proxy.snapshot()) == {"CALL": 5}
        before = proxy.snapshot()
        assert storage.enqueue(client, "m0", WINDOW).message_id is None  # a duplicate
        with pytest.raises(UnknownClient):
            storage.enqueue(client + 1000, "nobody", WINDOW)
        with pytest.raises(QueueFull):
            storage.enqueue(client, "full", WINDOW, max_pending=3)
        assert count_delta(before, proxy.snapshot()) == {"CALL": 3}
    assert query(mysql_url, "SELECT status, COUNT(*) FROM messages GROUP BY status ORDER BY status") == \
        [("pending", 6), ("ignored", 1)]


def test_an_idle_connection_the_server_killed_is_replaced_unseen(mysql_url: str,
                                                                 proxy: CountingProxy) -> None:
    """KILL of an idle pooled connection: the next enqueue sees the closed socket before it
    sends anything, opens a new connection and stores the message once."""
    with open_storage(mysql_url, create=True) as admin:
        admin.create_schema()
        client = admin.new_client().client_id
    with open_storage(through(mysql_url, proxy), pool_size=1) as storage:
        storage.enqueue(client, "before", WINDOW)
        kill_sessions(mysql_url)
        before = proxy.snapshot()
        queued = storage.enqueue(client, "after", WINDOW)
        assert queued.message_id is not None
        # The new connection's set-up, then the CALL: nothing was sent on the dead one.
        assert count_delta(before, proxy.snapshot())["CALL"] == 1
    bodies = [row[0] for row in query(mysql_url, "SELECT body FROM messages ORDER BY id")]
    assert bodies == ["before", "after"]


def test_a_first_statement_on_a_connection_that_died_unseen_is_sent_again(
        mysql_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the look at the socket misses the death (the server's FIN still on its way:
    simulated by skipping the look), a transaction's first statement fails.  A
    statement that cannot have committed (no COMMIT was sent) runs again on a fresh
    connection; the enqueue CALL, which commits by itself, is not sent again: the caller
    gets StorageUnavailable, the message is stored at most once, and the dead
    connection is not pooled again."""
    with open_storage(mysql_url, create=True, pool_size=1) as storage:
        storage.create_schema()
        client = storage.new_client().client_id
        monkeypatch.setattr(_Link, "idle_and_open", lambda self: True)
        kill_sessions(mysql_url)
        claim = storage.claim_client(client)  # SELECT … FOR UPDATE first: sent again
        assert claim is not None and claim.session == 2
        kill_sessions(mysql_url)
        with pytest.raises(StorageUnavailable):
            storage.enqueue(client, "lost or not?", WINDOW)
        assert storage.enqueue(client, "next", WINDOW).message_id is not None  # a fresh connection
    bodies = [row[0] for row in query(mysql_url, "SELECT body FROM messages ORDER BY id")]
    assert bodies == ["next"]  # the killed session never ran the CALL; nothing twice
    assert query(mysql_url, "SELECT session FROM clients WHERE id = %s", (client,)) == [(2,)]


def test_without_the_procedure_enqueue_runs_the_statements(mysql_url: str, proxy: CountingProxy,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A database without the procedure (prepared from schema.sql by a user who may not
    create routines): one warning, then the same guarantees from the statements, with no
    PING and no BEGIN."""
    with open_storage(mysql_url, create=True) as admin:
        admin.create_schema()
        client = admin.new_client().client_id
    database = urlsplit(mysql_url).path.lstrip("/")
    root = mysql_connect(database)
    try:
        root.cursor().execute(f"DROP PROCEDURE {ENQUEUE_PROCEDURE}")
    finally:
        root.close()
    storage: Storage = open_storage(through(mysql_url, proxy), pool_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="messaging_server.storage.mysql"):
            first = storage.enqueue(client, "m0", WINDOW)
            before = proxy.snapshot()
            second = storage.enqueue(client, "m1", WINDOW, max_pending=10)
        # The UPDATE locks (and writes) the client row; one SELECT does every check.
        assert count_delta(before, proxy.snapshot()) == {"UPDATE": 1, "SELECT": 1, "INSERT": 1,
                                                         "COMMIT": 1}
        assert second.previous == first.message_id
        assert storage.enqueue(client, "m1", WINDOW).message_id is None
        warnings = [r for r in caplog.records if ENQUEUE_PROCEDURE in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    finally:
        storage.close()
