"""A real MariaDB restart while messages are being queued and delivered.

The server and the enqueuer must ride it out: enqueues during the outage fail
with StorageUnavailable (the caller knows they were not queued); every
accepted message reaches its client exactly once, in order, once the database
is back; the server keeps running throughout.

This test stops and starts the MariaDB server itself, as root, with the same
commands the machine uses (``mysqladmin shutdown``;
``start-stop-daemon --start --exec /usr/sbin/mariadbd``).  It is skipped when
those tools are missing or the database is not local, unless CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Dict, List, Tuple

import pytest

from messaging_server import Enqueuer, StorageUnavailable
from messaging_server.client import Client
from tests.conftest import IN_CI, MYSQL_URL
from tests.helpers import ServerProcess, query, wait_until

pytestmark = pytest.mark.mysql

MARIADBD = "/usr/sbin/mariadbd"


def _ping() -> bool:
    return subprocess.run(["mysqladmin", "--protocol=tcp", "-h", "127.0.0.1", "-u", "root", "ping"],
                          capture_output=True, timeout=10).returncode == 0


def _restart_mariadb() -> float:
    """Stop MariaDB, start it again, wait until it answers; return the seconds it was down."""
    down_at = time.monotonic()
    subprocess.run(["mysqladmin", "--protocol=tcp", "-h", "127.0.0.1", "-u", "root", "shutdown"],
                   check=True, capture_output=True, timeout=60)
    wait_until(lambda: not _ping(), timeout=30, message="MariaDB to stop")
    # start-stop-daemon --oknodo does nothing while the old process is still exiting.
    wait_until(lambda: subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True).returncode != 0,
               timeout=60, message="the old mariadbd process to exit")
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", MARIADBD],
                   check=True, capture_output=True, timeout=30)
    wait_until(_ping, timeout=60, message="MariaDB to start again")
    return time.monotonic() - down_at


@pytest.fixture
def restartable(mysql_url: str) -> str:
    missing = [tool for tool in ("mysqladmin", "start-stop-daemon", "pgrep") if shutil.which(tool) is None]
    local = "127.0.0.1" in MYSQL_URL or "localhost" in MYSQL_URL
    if missing or not os.path.exists(MARIADBD) or not local or os.geteuid() != 0:
        reason = f"cannot restart MariaDB here (missing {missing or MARIADBD}, or not local/root)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return mysql_url


class Receiver(threading.Thread):
    """A client that reads (and, in ACK mode, acknowledges) everything, reconnecting if cut."""

    def __init__(self, port: int, client_id: str, ack: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.client_id, self.ack = port, client_id, ack
        self.bodies: List[str] = []
        self.connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with Client("127.0.0.1", self.port, client_id=self.client_id, ack=self.ack,
                            timeout=5) as client:
                    self.connections += 1
                    while not self.stop.is_set():
                        try:
                            body = client.receive(timeout=0.2)
                        except TimeoutError:
                            continue
                        if body is None:
                            break
                        self.bodies.append(body)
            except Exception:  # the server refused us during the outage: try again
                time.sleep(0.2)


@pytest.mark.exclusive_mariadb
def test_mariadb_restart_loses_and_duplicates_nothing(restartable: str, monkeypatch) -> None:
    db_url = restartable
    monkeypatch.delenv("NIKI_PEERS", raising=False)  # routed wake-ups, for the server too
    with ServerProcess(db_url, "--advertise-host", "127.0.0.1", "--sweep-interval", "0.5") as server:
        ids = {}
        for mode in ("legacy", "ack"):
            with Client("127.0.0.1", server.port, ack=(mode == "ack")) as first:
                ids[mode] = first.client_id
        receivers = {mode: Receiver(server.port, ids[mode], ack=(mode == "ack")) for mode in ids}
        for r in receivers.values():
            r.start()
        wait_until(lambda: all(r.connections for r in receivers.values()), message="receivers")

        accepted: Dict[str, List[str]] = {mode: [] for mode in ids}
        refused: List[Tuple[str, str]] = []
        restarted = threading.Event()
        down_for: List[float] = []

        def produce() -> None:
            with Enqueuer(db_url) as enq:
                for n in range(240):
                    for mode, cid in ids.items():
                        body = f"{mode} #{n:03d}"
                        try:
                            if enq.enqueue(cid, body):
                                accepted[mode].append(body)
                        except StorageUnavailable:
                            refused.append((mode, body))
                    if n == 80:
                        restarted.set()
                    time.sleep(0.01)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        assert restarted.wait(60)
        down_for.append(_restart_mariadb())
        producer.join(120)
        assert not producer.is_alive()

        def all_arrived() -> bool:
            return all(len(receivers[m].bodies) >= len(accepted[m]) for m in ids)

        try:
            wait_until(all_arrived, timeout=30, message="every accepted message")
        finally:
            for r in receivers.values():
                r.stop.set()
        for mode in ids:
            got = receivers[mode].bodies
            assert len(got) == len(set(got)), f"{mode}: a message arrived twice"
            assert got == accepted[mode], f"{mode}: lost or out of order"
        assert server.proc.poll() is None, "the server kept running"
        delivered = query(db_url, "SELECT COUNT(*) FROM messages WHERE status = 'delivered'")[0][0]
        assert delivered == sum(len(v) for v in accepted.values())
        print(f"\nMariaDB restart: down {down_for[0]:.1f} s; accepted "
              f"{sum(len(v) for v in accepted.values())}, refused during the outage {len(refused)}, "
              f"received each once and in order; reconnections "
              f"{ {m: r.connections for m, r in receivers.items()} }")
