"""What a stranger can make a server hold, end to end: connection caps and wake-up floods.

A real ``python -m messaging_server`` on SQLite (the caps and the wake-up
listener do not depend on the database).  ``--max-connections`` and
``--max-connections-per-address`` are checked from the outside: the exact
refusal line, how fast it comes, that a freed slot is reused, and that
identified clients are served throughout.  A flood of forged ``NIKI1``
datagrams must cost no more than delivery checks: real messages and PING
answers still come promptly, and nothing twice.  (The handshake timeout and
the line cap are covered in test_server_e2e.py and test_hostile_e2e.py.)
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import messaging_server
from tests.helpers import RawClient, ServerProcess, query, wait_until

ID_LINE = re.compile(r"SET_CLIENT_ID: ([1-9][0-9]*\.[A-Za-z0-9_-]{24})")
BUSY = b"ERROR: server busy\n"
BUSY_ADDRESS = b"ERROR: server busy: too many connections from your address\n"
TIMEOUT = 10.0


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'niki.sqlite3'}"


def identify(client: RawClient) -> str:
    """GET_CLIENT_ID, NONE, SET_CLIENT_ID: <credential>; the credential."""
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line("NONE")
    line = client.read_line()
    match = ID_LINE.fullmatch(line or "")
    assert match, f"expected SET_CLIENT_ID: <id>.<secret>, got {line!r}"
    return match.group(1)


def numeric(credential: str) -> int:
    return int(credential.partition(".")[0])


def connect_from(port: int, source: str = "127.0.0.1") -> RawClient:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    return RawClient(sock, TIMEOUT)


def refusal(port: int, source: str = "127.0.0.1") -> Tuple[bytes, float]:
    """Connect and read until the server closes: all it sent, and how long from connect to close."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)) as sock:
        data = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                raise AssertionError(f"still open after {TIMEOUT} s (got {data!r})") from None
            if not chunk:
                return data, time.monotonic() - start
            data += chunk


def admitted(port: int, source: str = "127.0.0.1") -> Optional[RawClient]:
    """A new connection if the server admits it (greets with GET_CLIENT_ID), else None."""
    client = connect_from(port, source)
    if client.read_line() == "GET_CLIENT_ID":
        return client
    client.close()
    return None


def deliver_and_check(client: RawClient, credential: str, body: str, db: str) -> None:
    assert messaging_server.enqueue(credential, body, db=db) is True
    assert client.read_line() == f"MESSAGE: {body}"


def refusal_warnings(server: ServerProcess) -> List[str]:
    return [line for line in server.log.splitlines() if " WARNING refused " in line]


# --- connection caps --------------------------------------------------------------------


def test_max_connections_refuses_the_fourth_and_reuses_freed_slots(db: str) -> None:
    """--max-connections 3: identified and unidentified connections both count; the fourth gets
    exactly ``ERROR: server busy`` and EOF at once; a freed slot is taken again; the clients
    inside are served all along; a burst of refusals logs one warning."""
    with ServerProcess(db, "--max-connections", "3") as server:
        first, second, waiting = server.connect(), server.connect(), server.connect()
        try:
            cred_first, cred_second = identify(first), identify(second)
            assert waiting.read_line() == "GET_CLIENT_ID"  # holds a slot without an id
            deliver_and_check(first, cred_first, "before the cap", db)

            latencies = []
            for _ in range(5):
                data, seconds = refusal(server.port)
                assert data == BUSY, data
                latencies.append(seconds)
            assert max(latencies) < 1.0, latencies
            deliver_and_check(second, cred_second, "while refusing", db)
            first.send_line("PING")
            assert first.read_line() == "PONG"

            waiting.close()  # its handler ends, and with it its slot
            newcomer = wait_until(lambda: admitted(server.port), timeout=5,
                                  message="a connection to be admitted after one closed")
            assert isinstance(newcomer, RawClient)
            with newcomer:
                newcomer.send_line("NONE")
                line = newcomer.read_line()
                match = ID_LINE.fullmatch(line or "")
                assert match, line
                # The closed connection's line, logged after every refusal so far and before
                # its slot was free: once it is in, so is any refusal warning.
                wait_until(lambda: " unidentified client disconnected from " in server.log)
                warnings = refusal_warnings(server)
                assert len(warnings) == 1, warnings  # a burst of refusals, one line (one per 10 s)
                assert "server busy (3 connections; 1 refused since start)" in warnings[0], warnings
                deliver_and_check(newcomer, match.group(1), "after a slot was freed", db)
                deliver_and_check(first, cred_first, "still served", db)
                data, _ = refusal(server.port)  # full again
                assert data == BUSY, data
            print(f"refusal latency: max {max(latencies) * 1000:.1f} ms over {len(latencies)}")
        finally:
            for client in (first, second, waiting):
                client.close()


def test_max_connections_per_address(db: str) -> None:
    """--max-connections-per-address 2: the third connection from 127.0.0.1 is refused with the
    per-address line, while 127.0.0.2 (another address of the same host) gets its own two."""
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.2", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"cannot use 127.0.0.2 as a second loopback address: {exc}")
    with ServerProcess(db, "--max-connections-per-address", "2") as server:
        clients = [connect_from(server.port) for _ in range(2)]
        try:
            for client in clients:
                assert client.read_line() == "GET_CLIENT_ID"
            data, seconds = refusal(server.port)
            assert data == BUSY_ADDRESS, data
            assert seconds < 1.0, seconds

            others = [connect_from(server.port, "127.0.0.2") for _ in range(2)]
            clients += others
            credential = identify(others[0])
            assert others[1].read_line() == "GET_CLIENT_ID"
            deliver_and_check(others[0], credential, "from the second address", db)
            data, _ = refusal(server.port, "127.0.0.2")
            assert data == BUSY_ADDRESS, data

            clients[0].close()  # 127.0.0.1 gets a slot back once that handler ends
            again = wait_until(lambda: admitted(server.port), timeout=5,
                               message="127.0.0.1 to be admitted again")
            assert isinstance(again, RawClient)
            clients.append(again)
            wait_until(lambda: any("too many connections from your address" in line
                                   for line in refusal_warnings(server)), message="the refusal warning")
        finally:
            for client in clients:
                client.close()


# --- forged wake-ups ----------------------------------------------------------------------


class Flood(threading.Thread):
    """Sends forged wake-up datagrams to one port as fast as it can until stopped.

    Precomputed, so the loop is only sendto(): random ids (1 to 100 per datagram,
    up to the codec's 1,200 bytes), and every fourth datagram also names ``target``.
    """

    def __init__(self, port: int, target: int, minimum: int) -> None:
        super().__init__(name="flood", daemon=True)
        rng = random.Random(4711)
        self.datagrams: List[bytes] = []
        for i in range(1000):
            ids = [rng.randrange(1, 10**9) for _ in range(rng.randint(1, 100))]
            if i % 4 == 0:
                ids.insert(rng.randrange(len(ids) + 1), target)
            self.datagrams.append(b"NIKI1 " + ",".join(map(str, ids)).encode("ascii"))
        assert max(map(len, self.datagrams)) <= 1200
        self.port = port
        self.minimum = minimum
        self.sent = 0
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        address = ("127.0.0.1", self.port)
        try:
            while self.sent < self.minimum or not self._stop_event.is_set():
                for datagram in self.datagrams:
                    try:
                        sock.sendto(datagram, address)
                    except OSError:  # ENOBUFS and the like: a flood loses some, as it would
                        self.errors += 1
                    self.sent += 1
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive()


def line_within(client: RawClient, deadline: float) -> bool:
    """Whether a line from the server is (or starts to be) readable before ``deadline``."""
    if b"\n" in client.buf:
        return True
    return bool(select.select([client.sock], [], [], max(0.0, deadline - time.monotonic()))[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (``Threads``, ``VmRSS`` in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}: line")


# The delivery thread takes at most MAX_DATAGRAMS_PER_RECEIVE datagrams per call, so a
# flood cannot keep it from acting on wake-ups: a real message beats the sweep by far.
WAKEUP_BOUND_S = 2.0


def test_wakeup_flood_does_not_starve_delivery(db: str) -> None:
    """At least 20,000 forged datagrams, sent as fast as one thread can, for random ids and
    for the connected client: meanwhile real messages arrive in order and once, PING is
    answered within 1 s, the server starts no thread and its memory stays flat; and a
    real message still reaches its client by wake-up within 2 s.  --sweep-interval 30,
    so that the sweep cannot stand in for a starved wake-up path."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's threads, memory and CPU time from /proc (Linux)")
    with ServerProcess(db, "--sweep-interval", "30") as server:
        assert server.proc is not None
        pid = server.proc.pid
        client = server.connect()
        try:
            credential = identify(client)
            deliver_and_check(client, credential, "before the flood", db)
            threads_before = proc_status(pid, "Threads")
            rss_before = proc_status(pid, "VmRSS")
            cpu_before = cpu_seconds(pid)

            flood = Flood(server.event_port, numeric(credential), minimum=20_000)
            flood_start = time.monotonic()
            flood.start()
            wait_until(lambda: flood.sent >= 2000, timeout=5, message="the flood to be under way")
            delays: List[float] = []
            pings: List[float] = []
            sent: List[str] = []
            late = False  # a real message missed WAKEUP_BOUND_S: no point measuring further
            try:
                for i in range(5):
                    body = f"real message {i}"
                    before = flood.sent
                    start = time.monotonic()
                    assert messaging_server.enqueue(credential, body, db=db) is True
                    sent.append(body)
                    if not line_within(client, start + WAKEUP_BOUND_S):
                        late = True
                        break
                    assert client.read_line() == f"MESSAGE: {body}"
                    delays.append(time.monotonic() - start)
                    start = time.monotonic()
                    client.send_line("PING")
                    assert client.read_line() == "PONG"
                    pings.append(time.monotonic() - start)
                    assert flood.sent > before, "the flood was not running during this delivery"
                threads_during = proc_status(pid, "Threads")
                rss_during = proc_status(pid, "VmRSS")
                wait_until(lambda: flood.sent >= flood.minimum, timeout=30, message="the whole flood sent")
            finally:
                flood.stop()
            flood_s = time.monotonic() - flood_start
            cpu_used = cpu_seconds(pid) - cpu_before
            print(f"flood: {flood.sent} datagrams in {flood_s:.2f} s ({flood.sent / flood_s:.0f}/s, "
                  f"{flood.errors} send errors); server CPU {cpu_used:.2f} s, RSS {rss_before // 1024} -> "
                  f"{rss_during // 1024} MB, {threads_before} threads; delivery "
                  f"{', '.join(f'{d * 1000:.0f}' for d in delays)}{', late' if late else ''} ms; "
                  f"PONG {', '.join(f'{p * 1000:.0f}' for p in pings)} ms")
            if late:  # it must still come, once, when the flood is over
                assert client.read_line() == f"MESSAGE: {sent[-1]}"

            assert not pings or max(pings) < 1.0, pings
            assert threads_during == threads_before, (threads_before, threads_during)
            assert rss_during - rss_before < 50 * 1024, (rss_before, rss_during)
            # Nothing twice: after the flood, a marker is the very next line, then silence.
            deliver_and_check(client, credential, "after the flood", db)
            client.assert_silent(0.3)
            expected = ["before the flood", *sent, "after the flood"]
            bodies = query(db, "SELECT body FROM messages WHERE client_id = %s ORDER BY id",
                           (numeric(credential),))
            assert [row[0] for row in bodies] == expected
            wait_until(lambda: query(db, "SELECT COUNT(*) FROM messages WHERE client_id = %s "
                                     "AND status = 'delivered'", (numeric(credential),))[0][0]
                       == len(expected), timeout=5, message="every message marked delivered")

            assert not late, f"a real message took over {WAKEUP_BOUND_S} s under the flood"
            assert len(delays) == len(sent) == 5
        finally:
            client.close()
