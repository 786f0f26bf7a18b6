"""The private MariaDB helper, and the session's check that the machine's server is left alone.

The check (conftest's ``pytest_sessionfinish``) compares the machine server's start
time before and after the run; these tests show, on a private server, that the start
time stays put while the server runs and moves when it restarts, so the check catches
a restart and does not cry wolf.
"""

from __future__ import annotations

import time

import pymysql
import pytest

from messaging_server import Enqueuer
from messaging_server.storage import open_storage
from tests.conftest import START_TIME_TOLERANCE, machine_server_started_at, server_started_at
from tests.helpers import wait_until
from tests.private_mariadb import PrivateMariaDB

pytestmark = pytest.mark.mariadbd


def _started_at(db: PrivateMariaDB) -> int:
    con = db.connect()
    try:
        return server_started_at(con)
    finally:
        con.close()


def test_private_server_answers_as_root_stops_and_starts_again_by_its_pid(
        private_mariadb: PrivateMariaDB) -> None:
    db = private_mariadb
    assert db.url == f"mysql://root@127.0.0.1:{db.port}/niki_test"
    store = open_storage(db.url, create=True)
    store.create_schema()
    cid = store.new_client().client_id
    store.close()
    with Enqueuer(db.url) as enq:
        assert enq.enqueue(cid, "kept across a graceful stop") is True
    first_pid = db.proc.pid
    db.stop()
    assert db.proc.returncode == 0, db.error_log
    db.start()
    assert db.proc.pid != first_pid
    db.kill()
    assert db.proc.returncode == -9
    db.start()  # crash recovery, same port and data
    con = db.connect()
    try:
        with con.cursor() as cur:
            cur.execute("SELECT body FROM niki_test.messages")
            assert cur.fetchall() == (("kept across a graceful stop",),)
    finally:
        con.close()


def test_close_removes_the_directory_and_the_process(private_mariadb_template) -> None:
    db = PrivateMariaDB(private_mariadb_template)
    with db:
        workdir, proc = db.workdir, db.proc
        assert workdir is not None and (workdir / "s.sock").exists()
    assert proc.poll() is not None
    assert not workdir.exists()
    with pytest.raises(pymysql.err.OperationalError):
        db.connect()


def test_the_start_time_check_sees_a_restart_and_nothing_else(private_mariadb: PrivateMariaDB) -> None:
    db = private_mariadb
    before = _started_at(db)
    assert abs(_started_at(db) - before) <= START_TIME_TOLERANCE, "no restart, no change"
    db.stop()
    # Each reading may be a second early: a restart is certain to show once the clock is
    # three seconds past the first start.
    wait_until(lambda: time.time() >= before + START_TIME_TOLERANCE + 3, timeout=10,
               message="the clock to pass the tolerance")
    db.start()
    assert _started_at(db) - before > START_TIME_TOLERANCE, "the restart is seen"


def test_the_machine_server_is_read_the_same_way(mysql_available: None) -> None:
    """The session check reads the machine's server with this function; it answers there."""
    assert machine_server_started_at() is not None
