"""/healthz tells the truth about writes, on SQLite and on MariaDB.

A server whose database answers reads but refuses every write (a full disk, a
read-only file or server) cannot queue a message or hand out a client id; its
/healthz must say so within a few heartbeats, and say ok again once writes work.
Writes are broken for real, never mocked:

* SQLite: the database lives on a small tmpfs of its own, which the test fills up.
* MariaDB: a private mariadbd (never the machine's), the server connecting as a
  user without admin rights, and ``SET GLOBAL read_only=ON`` on that instance.

The recorder itself (latest outcome, staleness) is tested alone with a clock.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pymysql
import pytest

from messaging_server.storage.interface import HEARTBEAT_INTERVAL_S, WRITE_STALE_S
from messaging_server.storage.write_health import WriteHealth
from tests.conftest import IN_CI
from tests.helpers import ServerProcess, wait_until

pytestmark = pytest.mark.usefixtures("no_niki_environment")

# A failed write shows within one heartbeat; this leaves room for a slow machine.
TURNS_WITHIN_S = 3 * HEARTBEAT_INTERVAL_S
MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"


def health(port: int) -> Tuple[int, Dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def handshake(server: ServerProcess) -> str:
    """The server's answer to a new client: SET_CLIENT_ID or its error line."""
    with server.connect() as raw:
        assert raw.read_line() == "GET_CLIENT_ID"
        raw.send_line("NONE")
        return raw.read_line() or ""


def assert_health_follows_writes(server: ServerProcess, break_writes: Any, repair: Any) -> None:
    assert health(server.http_port) == (200, {"status": "ok", "database": "ok", "listener": "ok"})
    break_writes()
    try:
        wait_until(lambda: health(server.http_port)[0] == 503, TURNS_WITHIN_S,
                   "/healthz to see that writes fail")
        status, answer = health(server.http_port)
        assert status == 503 and answer["database"] == "unavailable", answer
        assert answer["status"] == "unavailable" and "write" in answer["error"], answer
        assert handshake(server).startswith("ERROR: ")  # the truth: no client id to be had
    finally:
        repair()
    wait_until(lambda: health(server.http_port)[0] == 200, TURNS_WITHIN_S,
               "/healthz to see that writes work again")
    assert handshake(server).startswith("SET_CLIENT_ID: ")


# --- the recorder alone ----------------------------------------------------------------------


def test_the_latest_outcome_counts_and_silence_is_a_failure() -> None:
    now = [100.0]
    writes = WriteHealth(stale_after=6.0, clock=lambda: now[0])
    assert not writes.state().ok  # nothing written yet
    writes.succeeded()
    assert writes.state().ok
    writes.failed()
    assert not writes.state().ok and "failed" in writes.state().problem
    now[0] += 1
    writes.succeeded()
    assert writes.state().ok
    now[0] += 6.5  # no write for longer than stale_after: stuck
    assert not writes.state().ok and "6 s" in writes.state().problem
    writes.succeeded()
    assert writes.state().ok


# --- SQLite on a disk that fills up ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own (the test runs as root, as CI does)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> None:
    # Unbuffered, so that closing has nothing left to write; ENOSPC ends it: full.
    with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
        while True:
            filler.write(b"\0" * 65536)


def test_sqlite_disk_full_turns_healthz_503_and_back(small_disk: Path) -> None:
    url = f"sqlite:///{small_disk / 'niki.sqlite3'}"
    with ServerProcess(url) as server:
        assert_health_follows_writes(server, lambda: fill(small_disk),
                                     lambda: (small_disk / "filler").unlink())


# --- MariaDB that turns read-only -------------------------------------------------------------


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[Tuple[str, Any]]:
    """A mariadbd of this test's own on a free port, and a user of it without admin rights
    (``read_only`` binds that user, not root): (the user's URL, a root connection)."""
    if not (os.path.exists(MARIADBD) and os.path.exists(INSTALL_DB)):
        if IN_CI:
            pytest.fail("MariaDB server binaries not installed")
        pytest.skip("MariaDB server binaries not installed")
    data = tmp_path / "mariadb"
    installed = subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={data}", "--user=root",
                                "--auth-root-authentication-method=normal", "--skip-test-db"],
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = subprocess.Popen([MARIADBD, "--no-defaults", f"--datadir={data}", f"--port={port}",
                               "--bind-address=127.0.0.1", f"--socket={data}/s.sock", "--user=root",
                               "--skip-log-bin", "--innodb-buffer-pool-size=16M"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def connect() -> Any:
            try:
                return pymysql.connect(host="127.0.0.1", port=port, user="root", autocommit=True)
            except pymysql.err.OperationalError:
                assert daemon.poll() is None, "the private mariadbd exited"
                return None
        root = wait_until(connect, 30, "the private mariadbd to accept connections")
        with root.cursor() as cursor:
            cursor.execute("CREATE DATABASE niki_health")
            cursor.execute("CREATE USER 'niki'@'127.0.0.1' IDENTIFIED BY 'pw'")
            cursor.execute("GRANT ALL PRIVILEGES ON niki_health.* TO 'niki'@'127.0.0.1'")
        yield f"mysql://niki:pw@127.0.0.1:{port}/niki_health", root
        root.close()
    finally:
        daemon.kill()  # only this test's own instance, by its process
        daemon.wait(10)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.mysql
def test_mariadb_read_only_turns_healthz_503_and_back(private_mariadb: Tuple[str, Any]) -> None:
    url, root = private_mariadb

    def read_only(on: bool) -> None:
        with root.cursor() as cursor:
            cursor.execute(f"SET GLOBAL read_only = {'ON' if on else 'OFF'}")

    with ServerProcess(url) as server:
        assert_health_follows_writes(server, lambda: read_only(True), lambda: read_only(False))


def test_write_stale_window_is_within_the_liveness_window() -> None:
    from messaging_server.storage.interface import HEARTBEAT_STALE_S

    assert HEARTBEAT_INTERVAL_S < WRITE_STALE_S < HEARTBEAT_STALE_S
