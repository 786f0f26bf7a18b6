"""Transactions that lose a conflict are retried, never reported (MariaDB).

InnoDB ends one of two deadlocked transactions with error 1213, and a Galera
cluster ends a transaction that lost certification against another node's the
same way, at commit.  Either way the loser was rolled back as a whole, so running
it again is safe, and it must be: the caller should never see a conflict as an
error.  Here a real deadlock is made on the MariaDB server, with Niki's
transaction its chosen victim (InnoDB rolls back the one that changed fewer rows).
"""

from __future__ import annotations

import threading
from typing import List

import pytest

from messaging_server.storage import Storage
from tests.conftest import mysql_connect
from tests.helpers import query, wait_until

pytestmark = pytest.mark.mysql
WINDOW = 5.0


@pytest.fixture
def db_url(mysql_url: str) -> str:
    return mysql_url


def waiting_for_a_lock(db_url: str) -> bool:
    database = db_url.rsplit("/", 1)[1]
    rows = query(db_url, "SELECT COUNT(*) FROM information_schema.innodb_trx t "
                 "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                 "WHERE t.trx_state = 'LOCK WAIT' AND p.db = %s", (database,))
    return int(rows[0][0]) > 0


def test_a_batch_that_loses_a_deadlock_is_retried(storage: Storage, db_url: str) -> None:
    """enqueue_many locks its clients' rows in id order; another transaction that has
    changed many rows holds the second and then asks for the first: a deadlock, which
    InnoDB resolves by rolling the batch back.  The batch runs again and stores each
    message once."""
    first, second, third = (storage.new_client().client_id for _ in range(3))
    database = db_url.rsplit("/", 1)[1]
    other = mysql_connect()
    results: List[object] = []
    try:
        cur = other.cursor()
        cur.execute(f"USE `{database}`")
        cur.execute("BEGIN")
        for i in range(50):  # the heavier transaction: InnoDB keeps it, rolls back the batch
            cur.execute("INSERT INTO messages (client_id, body, body_hash, status, created_at) "
                        "VALUES (%s, %s, UNHEX(SHA2(%s, 256)), 'delivered', NOW(6))",
                        (third, f"other {i}", f"other {i}"))
        cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (second,))

        def batch() -> None:
            try:
                results.extend(storage.enqueue_many([(first, "a"), (second, "b")], WINDOW))
            except Exception as exc:  # reported below
                results.append(exc)

        thread = threading.Thread(target=batch)
        thread.start()
        wait_until(lambda: waiting_for_a_lock(db_url), 10, "the batch to wait for the second row")
        cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (first,))  # the deadlock
        other.commit()
        thread.join(30)
    finally:
        other.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert [r.message_id is not None for r in results] == [True, True]  # type: ignore[union-attr]
    assert query(db_url, "SELECT client_id, body FROM messages WHERE client_id IN (%s, %s) "
                 "ORDER BY id", (first, second)) == [(first, "a"), (second, "b")]
