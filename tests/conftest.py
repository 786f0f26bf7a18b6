"""Fixtures: a fresh database on SQLite and on MariaDB, and a running server.

MariaDB/MySQL is found at NIKI_TEST_MYSQL_URL (default
mysql://root@127.0.0.1:3306/niki_test); each test gets its own database named
after that one, dropped afterwards.  When the server cannot be reached the
MySQL tests are skipped, except with CI=true, where they fail.

The suite never stops, starts or reconfigures that server: a test that needs a
database to stop or die takes ``private_mariadb``, a ``mariadbd`` of its own on a free
port (tests/private_mariadb.py; marked ``mariadbd``).  The session checks this: when the
machine's server answered at the start, the run fails if it restarted meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import pymysql
import pytest

from messaging_server.errors import NikiError
from messaging_server.storage import Storage, open_storage
from messaging_server.wakeup import WakeupListener, Wakeups
from tests import helpers
from tests.helpers import ServerProcess
from tests.private_mariadb import PrivateMariaDB, missing_tools, template_datadir

MYSQL_URL = os.environ.get("NIKI_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/niki_test")
# Where that server is, for messages (the URL may hold a password).
MYSQL_ADDRESS = f"{urlsplit(MYSQL_URL).hostname}:{urlsplit(MYSQL_URL).port or 3306}"
IN_CI = os.environ.get("CI", "").lower() == "true"
DATABASES = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


def mysql_connect(database: str = ""):
    """A connection to the machine's server at MYSQL_URL."""
    parts = urlsplit(MYSQL_URL)
    return pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "", database=database or None,
                           connect_timeout=3, autocommit=True)


@pytest.fixture(scope="session")
def mysql_available() -> None:
    try:
        mysql_connect().close()
    except pymysql.err.MySQLError as exc:
        reason = (f"MariaDB/MySQL not reachable at {MYSQL_URL} ({exc}); start it, or point "
                  "NIKI_TEST_MYSQL_URL at one, to run the MySQL tests")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def mysql_url(mysql_available: None) -> Iterator[str]:
    """A URL to a database that does not exist yet (the code under test creates it)."""
    yield from fresh_mysql_url()


def fresh_mysql_url() -> Iterator[str]:
    """Yield the URL of a database that does not exist yet; drop it when resumed."""
    base = urlsplit(MYSQL_URL)
    name = f"{base.path.lstrip('/') or 'niki_test'}_{uuid.uuid4().hex[:10]}"
    yield base._replace(path=f"/{name}").geturl()
    con = mysql_connect()
    try:
        con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        con.close()


@pytest.fixture(scope="session")
def private_mariadb_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised MariaDB data directory for the whole run, shared by the xdist
    workers (their base temporary directories have the same parent)."""
    reason = missing_tools()
    if reason:
        if IN_CI:
            pytest.fail(f"cannot start a private MariaDB: {reason}")
        pytest.skip(f"cannot start a private MariaDB: {reason}")
    root = tmp_path_factory.getbasetemp()
    return template_datadir(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root)


@pytest.fixture
def private_mariadb(private_mariadb_template: Path) -> Iterator[PrivateMariaDB]:
    """A running MariaDB server of this test's own, free to stop, kill and start again."""
    with PrivateMariaDB(private_mariadb_template) as server:
        yield server


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


class KeyedListener(WakeupListener):
    """A wake-up listener that learns the test database's wake-up key before it receives,
    so that it reads the messages wake-ups carry as the server does."""

    def __init__(self, db_url: Optional[str]) -> None:
        super().__init__("127.0.0.1", 0)
        self._db_url = db_url

    def receive(self, timeout: Optional[float]) -> Wakeups:
        if self.key is None and self._db_url is not None:
            with contextlib.suppress(NikiError), open_storage(self._db_url) as store:
                self.key = store.wakeup_key()
        return super().receive(timeout)


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[WakeupListener]:
    """A wake-up listener on a free UDP port of 127.0.0.1 (with the key of the test's
    database, when it has one)."""
    db_url = request.getfixturevalue("db_url") if "db_url" in request.fixturenames else None
    lst = KeyedListener(db_url)
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


# --- the machine's MariaDB is left alone ----------------------------------------------------
# Checked in the process that runs the session (the xdist controller, or the only
# process): its start and finish enclose every worker's tests.

STARTED_AT_KEY = pytest.StashKey[Optional[int]]()
MACHINE_PROBLEM_KEY = pytest.StashKey[str]()
# Uptime is whole seconds, read at a whole-second clock: the same server's start time,
# computed twice, may differ by one.
START_TIME_TOLERANCE = 1


def server_started_at(con: pymysql.connections.Connection) -> int:
    """When the server behind ``con`` started (Unix seconds): a restart changes it."""
    with con.cursor() as cur:
        cur.execute("SELECT UNIX_TIMESTAMP() - VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                    "WHERE VARIABLE_NAME = 'UPTIME'")
        return int(cur.fetchone()[0])


def machine_server_started_at() -> Optional[int]:
    try:
        con = mysql_connect()
    except pymysql.err.MySQLError:
        return None
    try:
        return server_started_at(con)
    finally:
        con.close()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[STARTED_AT_KEY] = machine_server_started_at()


def pytest_sessionfinish(session: pytest.Session) -> None:
    before = session.config.stash.get(STARTED_AT_KEY, None)
    if _is_worker(session.config) or before is None:
        return
    after = machine_server_started_at()
    if after is None:
        problem = f"the MariaDB server at {MYSQL_ADDRESS} answered when the tests began and no longer does"
    elif abs(after - before) > START_TIME_TOLERANCE:
        problem = (f"the MariaDB server at {MYSQL_ADDRESS} restarted during the tests "
                   f"(started at {before}, now at {after})")
    else:
        return
    session.config.stash[MACHINE_PROBLEM_KEY] = (
        f"{problem}. Tests must leave it alone: a test that needs a database to stop or die "
        "uses the private_mariadb fixture.")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    problem = config.stash.get(MACHINE_PROBLEM_KEY, None)
    if problem:
        terminalreporter.section("the machine's MariaDB", sep="=", red=True, bold=True)
        terminalreporter.line(problem, red=True)


# The last lines of each server's log that a failing test shows.
LOG_LINES_ON_FAILURE = 200  # enough for a stack dump of a few dozen threads


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    helpers.STARTED.clear()  # each test reports only the servers it started


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test's report carries the end of the log of every server it started."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        # A server still running dumps its threads' stacks (SIGUSR1): where it waits.
        for proc in helpers.STARTED:
            proc.dump_stacks()
    if report.failed:
        for index, proc in enumerate(helpers.STARTED):
            tail = proc.log.splitlines()[-LOG_LINES_ON_FAILURE:]
            report.sections.append((f"server {index} log (last {len(tail)} lines)", "\n".join(tail)))
