"""A database that cannot be used: each failure fast, in one line that says what is wrong.

* A malformed port in the URL is a usage error (exit 2), for the server and niki-enqueue.
* A database that accepts TCP but never answers fails the server's start and an
  enqueue within the connect timeout, naming the host, instead of after 60 s.
* Borrowing a pooled connection waits at most the pool's time limit.
* An existing SQLite file on a read-only mount fails at once and says read-only.
* A MariaDB user with data privileges only runs on a schema prepared by an
  administrator; where something is missing, the line says which privilege it takes.
* The first error after MariaDB dies says what happened, not ``(0, '')``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional
from urllib.parse import urlsplit

import pytest

from messaging_server.errors import StorageUnavailable
from messaging_server.storage import open_storage
from messaging_server.storage.mysql import CONNECT_TIMEOUT_S
from messaging_server.storage.sql import split_sql_script
from tests.conftest import MYSQL_URL, mysql_connect
from tests.helpers import ServerProcess, wait_until

pytestmark = pytest.mark.usefixtures("no_niki_environment")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_SQL = os.path.join(ROOT, "schema.sql")
# What "fails fast" allows beyond the connect timeout: interpreter start, imports.
SLACK_S = 4.0


def run(args: List[str], timeout: float = 30.0, env: Optional[Dict[str, str]] = None,
        prefix: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    full_env.update(env or {})
    return subprocess.run([*(prefix or []), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def server(db: str, **kwargs) -> subprocess.CompletedProcess:
    return run(["-m", "messaging_server", "--db", db, "--port", "0", "--event-port", "0"], **kwargs)


def enqueue(db: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(["-m", "messaging_server.tools.niki_enqueue", "--db", db, "--peers", "", *args], **kwargs)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# --- the URL --------------------------------------------------------------------------------


def test_a_port_out_of_range_is_a_usage_error() -> None:
    url = "mysql://root@127.0.0.1:99999/x"
    for result in (server(url), enqueue(url, "1", "hello")):
        assert result.returncode == 2
        assert "port must be a number from 1 to 65535" in one_line(result)


# --- a database that never answers ------------------------------------------------------------


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word: a hung database."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(socket.timeout, OSError):
                accepted.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        sock.close()


def test_a_database_that_never_answers_fails_within_the_connect_timeout() -> None:
    with silent_listener() as port:
        url = f"mysql://root@127.0.0.1:{port}/niki"
        results: Dict[str, subprocess.CompletedProcess] = {}
        started = time.monotonic()
        threads = [threading.Thread(target=lambda: results.__setitem__("server", server(url))),
                   threading.Thread(target=lambda: results.__setitem__("enqueue",
                                                                       enqueue(url, "1", "hello")))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    assert elapsed < CONNECT_TIMEOUT_S + SLACK_S, elapsed
    for result in results.values():
        assert result.returncode == 1
        line = one_line(result)
        assert f"127.0.0.1:{port}" in line and "did not answer within" in line, line


# --- the pool's time limit ----------------------------------------------------------------------


def test_borrowing_a_connection_waits_at_most_the_pools_time_limit(db_url: str) -> None:
    with open_storage(db_url, pool_size=1, create=True) as store:
        store.create_schema()
        store._pool.wait_s = 0.3  # type: ignore[attr-defined]
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with store.transaction():
                holding.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert holding.wait(10)
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match=r"within 0\.3 s"):
                store.pending_count(1)
            assert time.monotonic() - started < 2
        finally:
            release.set()
            holder.join()
        assert store.pending_count(1) == 0  # the slot came back


# --- read-only SQLite ---------------------------------------------------------------------------


def read_only_mount(directory: str) -> List[str]:
    """A command prefix that runs a program with ``directory`` bind-mounted read-only, in a
    mount namespace of its own (nothing changes for the rest of the machine)."""
    script = ("mount --bind \"$0\" \"$0\" && mount -o remount,ro,bind \"$0\" \"$0\" "
              "&& exec \"$@\"")
    return ["unshare", "--mount", "sh", "-c", script, directory]


def test_an_sqlite_file_on_a_read_only_mount_fails_at_once(tmp_path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or \
            subprocess.run([*read_only_mount(str(tmp_path)), "true"], capture_output=True).returncode:
        pytest.skip("needs root and unshare to mount a directory read-only")
    path = tmp_path / "niki.sqlite3"
    with open_storage(f"sqlite:///{path}", create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    url = f"sqlite:///{path}"
    started = time.monotonic()
    results = [server(url, prefix=read_only_mount(str(tmp_path))),
               enqueue(url, str(client), "hello", prefix=read_only_mount(str(tmp_path)))]
    assert time.monotonic() - started < 2 * SLACK_S
    for result in results:
        assert result.returncode == 1
        line = one_line(result)
        assert "read-only" in line and "creates the database on its first start" not in line, line


# --- MariaDB: a user with data privileges only ----------------------------------------------------


@pytest.fixture
def data_only_user(mysql_url: str) -> Iterator[str]:
    """``mysql_url``'s database, created from schema.sql by root, and a URL for a new user
    that has SELECT, INSERT, UPDATE, DELETE on it and nothing else (dropped afterwards)."""
    database = urlsplit(mysql_url).path.lstrip("/")
    user, password = f"niki_data_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    root = mysql_connect()
    try:
        with root.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            cur.execute(f"USE `{database}`")
            with open(SCHEMA_SQL, encoding="utf-8") as handle:
                for statement in split_sql_script(handle.read()):
                    cur.execute(statement)
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
            cur.execute("CREATE USER %s@'localhost' IDENTIFIED BY %s", (user, password))
            for host in ("%", "localhost"):
                cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{database}`.* TO %s@%s",
                            (user, host))
        base = urlsplit(MYSQL_URL)
        yield f"mysql://{user}:{password}@{base.hostname}:{base.port or 3306}/{database}"
    finally:
        with root.cursor() as cur:
            for host in ("%", "localhost"):
                cur.execute("DROP USER IF EXISTS %s@%s", (user, host))
        root.close()


@pytest.mark.mysql
def test_a_user_with_data_privileges_runs_on_a_prepared_schema(data_only_user: str) -> None:
    with ServerProcess(data_only_user) as proc, proc.connect() as raw:
        assert raw.handshake()


@pytest.mark.mysql
def test_what_a_data_only_user_may_not_create_is_named(data_only_user: str) -> None:
    database = urlsplit(data_only_user).path.lstrip("/")
    root = mysql_connect(database)
    try:
        root.cursor().execute("DROP TABLE servers")
        result = server(data_only_user)
        assert result.returncode == 1
        line = one_line(result)
        assert "table servers is missing" in line and "CREATE privilege" in line, line
        root.cursor().execute("ALTER TABLE messages DROP COLUMN acknowledged_at")
        result = server(data_only_user.replace(f"/{database}", f"/{database}_absent"))
        line = one_line(result)
        assert result.returncode == 1 and "does not exist" in line and "CREATE privilege" in line, line
    finally:
        root.close()


# --- MariaDB dies -------------------------------------------------------------------------------------


MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"


@pytest.fixture(scope="session")
def mariadb_datadir(tmp_path_factory) -> str:
    """A fresh MariaDB data directory, made once per session (copied for each server)."""
    if os.geteuid() != 0 or not os.path.exists(MARIADBD) or shutil.which("mariadb-install-db") is None:
        pytest.skip("needs root, mariadbd and mariadb-install-db for a private MariaDB")
    datadir = str(tmp_path_factory.mktemp("mariadb") / "data")
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    return datadir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_mariadb(mariadb_datadir: str, tmp_path) -> Iterator[subprocess.Popen]:
    """A MariaDB of this test's own on a free port (never the machine's): ``.port`` set."""
    datadir = str(tmp_path / "data")
    shutil.copytree(mariadb_datadir, datadir)
    port = free_port()
    proc = subprocess.Popen([MARIADBD, "--no-defaults", f"--datadir={datadir}", f"--port={port}",
                             "--bind-address=127.0.0.1", f"--socket={tmp_path}/s.sock",
                             "--user=root", "--innodb-buffer-pool-size=16M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.port = port  # type: ignore[attr-defined]

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            return bool(s.recv(1))
        return False

    try:
        wait_until(answers, 30)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.mysql
def test_the_first_error_after_mariadb_dies_says_what_happened(private_mariadb) -> None:
    url = f"mysql://root@127.0.0.1:{private_mariadb.port}/niki"
    with open_storage(url) as store:
        store.create_schema()
        client = store.new_client().client_id
        store.enqueue(client, "before", 5)  # a pooled connection, idle now
        os.kill(private_mariadb.pid, signal.SIGKILL)
        private_mariadb.wait(10)
        with pytest.raises(StorageUnavailable) as caught:
            store.enqueue(client, "after", 5)
    message = str(caught.value)
    assert "(0, '')" not in message, message
    assert f"127.0.0.1:{private_mariadb.port}" in message and "Can't connect" in message, message
