"""Fixtures: a fresh database on SQLite and on MariaDB, and a running server.

MariaDB/MySQL is found at NIKI_TEST_MYSQL_URL (default
mysql://root@127.0.0.1:3306/niki_test); each test gets its own database named
after that one, dropped afterwards.  When the server cannot be reached the
MySQL tests are skipped, except with CI=true, where they fail.

The suite runs on two workers (pytest-xdist, see setup.cfg).  A test that
restarts MariaDB (marked ``exclusive_mariadb``) takes an exclusive file lock;
every other MariaDB test holds it shared, so none runs during a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import uuid
from typing import Iterator
from urllib.parse import urlsplit

import pymysql
import pytest

from messaging_server.storage import Storage, open_storage
from messaging_server.wakeup import WakeupListener
from tests.helpers import ServerProcess

MYSQL_URL = os.environ.get("NIKI_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/niki_test")
IN_CI = os.environ.get("CI", "").lower() == "true"
DATABASES = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


def _mysql_connect(database: str = ""):
    parts = urlsplit(MYSQL_URL)
    return pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "", database=database or None,
                           connect_timeout=3, autocommit=True)


@pytest.fixture(scope="session")
def mysql_available() -> None:
    try:
        _mysql_connect().close()
    except pymysql.err.MySQLError as exc:
        reason = (f"MariaDB/MySQL not reachable at {MYSQL_URL} ({exc}); start it, or point "
                  "NIKI_TEST_MYSQL_URL at one, to run the MySQL tests")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


MARIADB_LOCK = os.path.join(tempfile.gettempdir(), "niki-tests-mariadb.lock")


@contextlib.contextmanager
def mariadb_lock(exclusive: bool) -> Iterator[None]:
    """Shared: this test uses MariaDB; exclusive: this test stops and starts it."""
    with open(MARIADB_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def mysql_url(mysql_available: None, request) -> Iterator[str]:
    """A URL to a database that does not exist yet (the code under test creates it)."""
    with mariadb_lock(exclusive=request.node.get_closest_marker("exclusive_mariadb") is not None):
        yield from fresh_mysql_url()


def fresh_mysql_url() -> Iterator[str]:
    """Yield the URL of a database that does not exist yet; drop it when resumed."""
    base = urlsplit(MYSQL_URL)
    name = f"{base.path.lstrip('/') or 'niki_test'}_{uuid.uuid4().hex[:10]}"
    yield base._replace(path=f"/{name}").geturl()
    con = _mysql_connect()
    try:
        con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        con.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'niki.sqlite3'}"


@pytest.fixture(params=DATABASES)
def db_url(request) -> str:
    """A fresh, empty database on each backend in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def storage(db_url: str) -> Iterator[Storage]:
    store = open_storage(db_url, create=True)
    store.create_schema()
    yield store
    store.close()


@pytest.fixture
def server(db_url: str) -> Iterator[ServerProcess]:
    """A running server on a fresh database, on free ports."""
    with ServerProcess(db_url) as proc:
        yield proc


@pytest.fixture
def listener() -> Iterator[WakeupListener]:
    """A wake-up listener on a free UDP port of 127.0.0.1."""
    lst = WakeupListener("127.0.0.1", 0)
    yield lst
    lst.close()


@pytest.fixture
def no_niki_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by the test see no NIKI_* setting of the caller (NIKI_PEERS would
    switch to broadcast mode, NIKI_LEGACY_IDS to bare ids); NIKI_TEST_* stay."""
    for name in list(os.environ):
        if name.startswith("NIKI_") and not name.startswith("NIKI_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Context managers entered by the test, all exited at its end."""
    with contextlib.ExitStack() as st:
        yield st
