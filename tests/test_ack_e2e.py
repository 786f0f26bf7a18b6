"""Acknowledged delivery, slow clients, database outages, TTL and retention, end to end.

Real ``python -m messaging_server`` processes, real loopback sockets, SQLite and
MariaDB.  What is proved here:

* ACK mode (``NONE ACK`` / ``<id> ACK``): ``MESSAGE <id>: <body>``, the message
  stays pending until ``ACK <id>``; a client that vanishes gets every
  unacknowledged message again on its next connection, in order, before newer
  ones, never twice on one connection; at most --max-inflight in flight; ACKs of
  unknown, foreign or already-acknowledged ids get ``ERROR: unknown message id N``
  and change nothing; ``PING`` gets ``PONG``; the Python client's auto-ack; legacy
  clients see no difference.
* A client that stops reading blocks nobody else, is disconnected after the
  write timeout, and every message it did not get stays pending.
* MariaDB cut off (a proxy in the test drops every connection): the server keeps
  running, new clients get a one-line error instead of a hang, enqueue raises
  StorageUnavailable, and when the database is back everything accepted arrives,
  once, in order, also when the cut falls between a write and its "delivered" mark.
* TTL, retention purge, TCP keepalive.

Every wait has a deadline; silence is asserted only after a positive marker.
Run with ``pytest -s`` to see the figures measured.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import socket
import sqlite3
import struct
import subprocess
import termios
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

import pymysql
import pytest

from messaging_server import Enqueuer, StorageUnavailable
from messaging_server.client.sdk import Client
from tests.helpers import (
    CREDENTIAL,
    RawClient,
    ServerGroup,
    ServerProcess,
    assert_no_traceback,
    numeric_id,
    query,
    stop_together,
    wait_until,
)

SWEEP = 0.3  # --sweep-interval of every server here
MARGIN = 1.5  # scheduling slack on a loaded 2-core box, on top of a sweep interval
SILENCE = 0.3  # after a marker: long enough for a stray (re)delivery to show on loopback
# After a marker, in ACK mode: two sweeps happen meanwhile, each asking for a
# delivery pass while unacknowledged messages are pending.
SWEEP_SILENCE = 2 * SWEEP + SILENCE
ID_LINE = re.compile(rf"SET_CLIENT_ID: ({CREDENTIAL})")
ACK_MESSAGE = re.compile(r"MESSAGE ([1-9][0-9]*): (.*)")
DB_DOWN = "ERROR: database unavailable, try again later"
BIG = "x" * 4000  # with a short prefix, just under the 4096-byte body limit


# Routed mode needs NIKI_PEERS unset; no NIKI_* setting may leak into the servers.
pytestmark = pytest.mark.usefixtures("no_niki_environment")


@pytest.fixture
def launch(request: pytest.FixtureRequest) -> Iterator[Callable[..., ServerProcess]]:
    """``launch(db_url, *options)``: a started server whose wake-up address is loopback."""
    group = ServerGroup("--advertise-host", "127.0.0.1", "--sweep-interval", str(SWEEP))
    failed_before = request.session.testsfailed
    yield group.start
    stop_together(group.procs)
    if request.session.testsfailed > failed_before:  # the test failed: show what the servers said
        for proc in group.procs:
            print(f"--- server on port {proc.port}, last lines of its log ---")
            print("\n".join(proc.log.splitlines()[-40:]))
    assert_no_traceback(group.procs)


def enqueuer(stack: contextlib.ExitStack, db_url: str) -> Callable[..., bool]:
    """``put(client_id, body, ttl=None)`` in routed mode (NIKI_PEERS is unset)."""
    enq = stack.enter_context(Enqueuer(db_url))
    assert enq.mode == "routed"
    return enq.enqueue


def identify(client: RawClient, answer: str = "NONE") -> str:
    """The handshake, transcript checked: GET_CLIENT_ID, ``answer``, SET_CLIENT_ID: <credential>."""
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line(answer)
    line = client.read_line() or ""
    match = ID_LINE.fullmatch(line)
    assert match, f"expected SET_CLIENT_ID: <id>.<secret>, got {line!r}"
    return match.group(1)


def read_acked(client: RawClient, count: int, timeout: Optional[float] = None) -> List[Tuple[int, str]]:
    """``count`` ACK-mode MESSAGE lines as (message id, body)."""
    got = []
    for line in client.read_lines(count, timeout):
        match = ACK_MESSAGE.fullmatch(line)
        assert match, f"expected MESSAGE <id>: <body>, got {line!r}"
        got.append((int(match.group(1)), match.group(2)))
    return got


def message_rows(db_url: str, client_id: str) -> List[Tuple[int, str, str]]:
    """(id, body, status) of every message of ``client_id``, oldest first."""
    rows = query(db_url, "SELECT id, body, status FROM messages WHERE client_id = %s ORDER BY id",
                 (numeric_id(client_id),))
    return [(int(i), str(b), str(s)) for i, b, s in rows]


def statuses(db_url: str, ids: Sequence[int]) -> Dict[int, str]:
    if not ids:
        return {}
    marks = ", ".join(["%s"] * len(ids))
    rows = query(db_url, f"SELECT id, status FROM messages WHERE id IN ({marks})", list(ids))
    return {int(i): str(s) for i, s in rows}


def snapshot(db_url: str) -> List[Tuple[object, ...]]:
    """Every message row as it stands (status and delivery time included)."""
    return query(db_url, "SELECT id, client_id, status, delivered_at FROM messages ORDER BY id")


def queue_backlog(db_url: str, client_id: str, bodies: Sequence[str]) -> None:
    """Queue ``bodies`` for an offline client in one transaction, rows as enqueue() writes them.

    Set-up only: thousands of 4 KB enqueues, one fsync each, take seconds on MariaDB;
    every message a test is about goes through enqueue().
    """
    rows = [(numeric_id(client_id), body, hashlib.sha256(body.encode("utf-8")).digest()) for body in bodies]
    sql = ("INSERT INTO messages (client_id, body, body_hash, status, created_at) "
           "VALUES (%s, %s, %s, 'pending', {now})")
    if db_url.startswith("sqlite:"):
        con = sqlite3.connect(db_url.split(":///", 1)[1], isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(sql.replace("%s", "?").format(now="strftime('%Y-%m-%d %H:%M:%f', 'now')"),
                            rows)
            con.execute("COMMIT")
        finally:
            con.close()
        return
    parts = urlsplit(db_url)
    con = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                          password=parts.password or "", database=parts.path.lstrip("/"),
                          charset="utf8mb4", autocommit=False)
    try:
        with con.cursor() as cur:
            cur.executemany(sql.format(now="NOW(6)"), rows)
        con.commit()
    finally:
        con.close()


def disconnected(server: ServerProcess, client_id: str, times: int = 1) -> Callable[[], bool]:
    """True once ``client_id``'s handler has logged the end of ``times`` connections."""
    pattern = re.compile(rf"client {numeric_id(client_id)} disconnected from ")
    return lambda: len(pattern.findall(server.log)) >= times


def small_window_client(server: ServerProcess, rcvbuf: int = 65536) -> RawClient:
    """A client whose receive buffer is fixed (no autotuning): the server's writes block sooner."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return RawClient(sock, 10)


def drain(client: RawClient, quiet: float, limit: float = 30.0) -> Tuple[List[str], bool, bytes]:
    """Read until ``quiet`` s pass without data or the server closes.

    Return the complete lines, whether the server closed, and any trailing partial line.
    """
    deadline = time.monotonic() + limit
    closed = False
    while time.monotonic() < deadline:
        client.sock.settimeout(quiet)
        try:
            chunk = client.sock.recv(1 << 20)
        except socket.timeout:
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            closed = True
            break
        client.buf += chunk
    else:
        raise AssertionError(f"still receiving after {limit} s")
    *lines, rest = client.buf.split(b"\n")
    client.buf = rest
    return [line.decode("utf-8") for line in lines], closed, rest


class LineReader(threading.Thread):
    """Reads a client's lines on a thread, with their arrival times; in ACK mode ACKs each."""

    def __init__(self, client: RawClient, ack: bool = False) -> None:
        super().__init__(name="line-reader", daemon=True)
        self.client = client
        self.ack = ack
        self.lines: List[Tuple[float, str]] = []
        self.closed = False
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def bodies(self) -> List[str]:
        """The bodies received, legacy or ACK mode."""
        with self._lock:
            lines = [line for _, line in self.lines]
        out = []
        for line in lines:
            match = ACK_MESSAGE.fullmatch(line)
            if match:
                out.append(match.group(2))
            else:
                assert line.startswith("MESSAGE: "), f"unexpected line {line!r}"
                out.append(line[len("MESSAGE: "):])
        return out

    def arrivals(self) -> Dict[str, float]:
        """When each body arrived (the first time)."""
        with self._lock:
            lines = list(self.lines)
        out: Dict[str, float] = {}
        for when, line in lines:
            match = ACK_MESSAGE.fullmatch(line)
            body = match.group(2) if match else line[len("MESSAGE: "):]
            out.setdefault(body, when)
        return out

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def run(self) -> None:
        sock = self.client.sock
        buf, self.client.buf = self.client.buf, b""
        while not self._halt.is_set():
            *complete, buf = buf.split(b"\n")
            now = time.monotonic()
            for raw in complete:
                line = raw.decode("utf-8")
                with self._lock:
                    self.lines.append((now, line))
                match = ACK_MESSAGE.fullmatch(line)
                if self.ack and match:
                    with contextlib.suppress(OSError):  # closed: seen by the recv below
                        sock.sendall(f"ACK {match.group(1)}\n".encode())
            sock.settimeout(0.1)
            try:
                chunk = sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            buf += chunk


# --- ACK mode ---------------------------------------------------------------------


def test_ack_mode_transcript_and_ping(db_url: str, launch, stack) -> None:
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line("NONE ACK")
        line = client.read_line() or ""
        assert ID_LINE.fullmatch(line), line
        cid = ID_LINE.fullmatch(line).group(1)
        assert put(cid, "hello") is True
        [(hello_id, _, _)] = message_rows(db_url, cid)
        assert client.read_line() == f"MESSAGE {hello_id}: hello"
        client.send_line("PING")
        assert client.read_line() == "PONG"
        # Written, not acknowledged: still pending.
        assert statuses(db_url, [hello_id]) == {hello_id: "pending"}
        client.send_line(f"ACK {hello_id}")
        wait_until(lambda: statuses(db_url, [hello_id]) == {hello_id: "delivered"}, 5,
                   "the acknowledged message to be marked delivered")
        client.send_line("PING")
        assert client.read_line() == "PONG", "an ACK of a message in flight gets no reply"

        assert put(cid, "world") is True
        world_id = message_rows(db_url, cid)[-1][0]
        assert world_id > hello_id
        assert client.read_line() == f"MESSAGE {world_id}: world"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    assert statuses(db_url, [world_id]) == {world_id: "pending"}

    # The unacknowledged one comes again on the next connection; the acknowledged one does not.
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line(f"{cid} ACK")
        assert client.read_lines(2) == [f"SET_CLIENT_ID: {cid}", f"MESSAGE {world_id}: world"]
        client.send_line(f"ACK {world_id}")
        assert put(cid, "marker") is True
        [(marker_id, body)] = read_acked(client, 1)
        assert body == "marker"
        client.send_line(f"ACK {marker_id}")
        client.send_line("PING")
        assert client.read_line() == "PONG"
        client.assert_silent(SILENCE)
        wait_until(lambda: {s for _, _, s in message_rows(db_url, cid)} == {"delivered"}, 5,
                   "every acknowledged message to be marked delivered")


def test_legacy_client_unaffected(db_url: str, launch, stack) -> None:
    """No ACK after the id: plain ``MESSAGE: `` lines, marked delivered as written."""
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    with server.connect() as client:
        cid = identify(client)
        assert put(cid, "one") is True
        assert put(cid, "two") is True
        assert client.read_lines(2) == ["MESSAGE: one", "MESSAGE: two"]
        ids = [i for i, _, _ in message_rows(db_url, cid)]
        wait_until(lambda: set(statuses(db_url, ids).values()) == {"delivered"}, 5,
                   "legacy deliveries to be marked without any ACK")
        client.send_line("PING")
        assert client.read_line() == "PONG"
        client.send_line(f"ACK {ids[0]}")
        assert client.read_line() == f"Invalid command: ACK {ids[0]}"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    with server.connect() as client:
        assert identify(client, cid) == cid
        assert put(cid, "marker") is True
        assert client.read_line() == "MESSAGE: marker"
        client.assert_silent(SILENCE)


@pytest.mark.parametrize("vanish", ["closes", "stays open"])
def test_vanished_ack_client_gets_unacked_again(db_url: str, vanish: str, launch, stack) -> None:
    """A client stops reading and acking; its next connection gets every unacknowledged
    message again, in order, before newer ones, and nothing it acknowledged."""
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    first = server.connect()
    stack.callback(first.close)
    cid = identify(first, "NONE ACK")
    for i in range(5):
        assert put(cid, f"m{i}") is True
    got = read_acked(first, 5)
    assert [b for _, b in got] == [f"m{i}" for i in range(5)]
    acked = [got[0][0], got[1][0]]
    for message_id in acked:
        first.send_line(f"ACK {message_id}")
    wait_until(lambda: set(statuses(db_url, acked).values()) == {"delivered"}, 5, "the two ACKs")
    # From here on it neither reads nor acks; these are written to its socket.
    for i in range(5, 8):
        assert put(cid, f"m{i}") is True
    if vanish == "closes":
        first.close()  # unread data: the kernel resets the connection
        wait_until(disconnected(server, cid), 5, "the server to notice the closed connection")
    newer = ["n0", "n1"]
    for body in newer:
        assert put(cid, body) is True

    with server.connect() as second:
        assert identify(second, f"{cid} ACK") == cid
        expected = [f"m{i}" for i in range(2, 8)] + newer
        again = read_acked(second, len(expected))
        assert [b for _, b in again] == expected
        ids = [i for i, _ in again]
        assert ids == sorted(ids)
        if vanish == "stays open":
            first.wait_closed(5)  # the server closes the older connection (or this raises)
        # Never twice on this connection, though sweeps keep asking (all of it is pending).
        assert put(cid, "marker") is True
        [(marker_id, body)] = read_acked(second, 1)
        assert body == "marker"
        second.assert_silent(SWEEP_SILENCE)
        assert set(statuses(db_url, ids).values()) == {"pending"}
        for message_id in [*ids, marker_id]:
            second.send_line(f"ACK {message_id}")
        second.send_line("PING")
        assert second.read_line() == "PONG", "ACKs of messages in flight get no reply"
        wait_until(lambda: {s for _, _, s in message_rows(db_url, cid)} == {"delivered"}, 5,
                   "every message to be acknowledged")
        second.send_line("DISCONNECT")
        assert second.wait_closed() == []

    with server.connect() as third:
        assert identify(third, f"{cid} ACK") == cid
        assert put(cid, "last marker") is True
        assert [b for _, b in read_acked(third, 1)] == ["last marker"]
        third.assert_silent(SILENCE)


def test_inflight_limit(db_url: str, launch, stack) -> None:
    server = launch(db_url, "--max-inflight", "3")
    put = enqueuer(stack, db_url)
    with server.connect() as client:
        cid = identify(client, "NONE ACK")
        bodies = [f"a{i}" for i in range(6)]
        for body in bodies:
            assert put(cid, body) is True
        ids = [i for i, _, _ in message_rows(db_url, cid)]
        assert read_acked(client, 3) == list(zip(ids[:3], bodies[:3]))
        client.assert_silent(SWEEP_SILENCE)  # paused at the limit, through two sweeps
        client.send_line("PING")
        assert client.read_line() == "PONG", "replies still flow while deliveries are paused"

        client.send_line(f"ACK {ids[1]}")
        assert read_acked(client, 1) == [(ids[3], bodies[3])]
        client.assert_silent(SWEEP_SILENCE)

        # A message of its own that was not sent yet cannot be acknowledged.
        client.send_line(f"ACK {ids[5]}")
        assert client.read_line() == f"ERROR: unknown message id {ids[5]}"
        client.assert_silent(SILENCE)
        assert statuses(db_url, ids) == {
            ids[0]: "pending", ids[1]: "delivered", ids[2]: "pending",
            ids[3]: "pending", ids[4]: "pending", ids[5]: "pending"}

        client.send_line(f"ACK {ids[0]}")
        client.send_line(f"ACK {ids[2]}")
        assert read_acked(client, 2) == [(ids[4], bodies[4]), (ids[5], bodies[5])]
        for message_id in ids[3:]:
            client.send_line(f"ACK {message_id}")
        wait_until(lambda: set(statuses(db_url, ids).values()) == {"delivered"}, 5, "all ACKs")
        # Room again: a new one goes straight out.
        assert put(cid, "marker") is True
        assert [b for _, b in read_acked(client, 1)] == ["marker"]
        client.assert_silent(SILENCE)


def test_ack_errors_change_nothing(db_url: str, launch, stack) -> None:
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    with server.connect() as a, server.connect() as b:
        aid = identify(a, "NONE ACK")
        bid = identify(b, "NONE ACK")
        assert put(aid, "for a") is True
        assert put(bid, "for b") is True
        [(a_msg, _)] = read_acked(a, 1)
        [(b_msg, _)] = read_acked(b, 1)

        before = snapshot(db_url)
        a.send_line("ACK 999999999")
        assert a.read_line() == "ERROR: unknown message id 999999999"
        a.send_line(f"ACK {b_msg}")  # in flight, but on the other client's connection
        assert a.read_line() == f"ERROR: unknown message id {b_msg}"
        a.send_line("ACK x")
        assert a.read_line() == "ERROR: ACK needs a message id: ACK x"
        a.send_line("PING")
        assert a.read_line() == "PONG"
        assert snapshot(db_url) == before
        assert statuses(db_url, [a_msg, b_msg]) == {a_msg: "pending", b_msg: "pending"}

        a.send_line(f"ACK {a_msg}")
        wait_until(lambda: statuses(db_url, [a_msg])[a_msg] == "delivered", 5, "a's ACK")
        acked = snapshot(db_url)
        a.send_line(f"ACK {a_msg}")  # again
        assert a.read_line() == f"ERROR: unknown message id {a_msg}"
        a.send_line("PING")
        assert a.read_line() == "PONG"
        assert snapshot(db_url) == acked

        # b's message is still b's: it can acknowledge it, and a got nothing of it.
        b.send_line(f"ACK {b_msg}")
        wait_until(lambda: statuses(db_url, [b_msg])[b_msg] == "delivered", 5, "b's ACK")
        assert put(aid, "marker a") is True
        assert [x for _, x in read_acked(a, 1)] == ["marker a"]
        a.assert_silent(SILENCE)
        a.send_line("DISCONNECT")
        assert a.wait_closed() == []

    # Acknowledged on an earlier connection: unknown on this one.
    with server.connect() as again:
        assert identify(again, f"{aid} ACK") == aid
        [(marker_id, _)] = read_acked(again, 1)  # "marker a" was never acknowledged
        before = snapshot(db_url)
        again.send_line(f"ACK {a_msg}")
        assert again.read_line() == f"ERROR: unknown message id {a_msg}"
        again.send_line("PING")
        assert again.read_line() == "PONG"
        assert snapshot(db_url) == before
        again.send_line(f"ACK {marker_id}")
        wait_until(lambda: statuses(db_url, [marker_id])[marker_id] == "delivered", 5, "the ACK")


@pytest.mark.parametrize("then", ["DISCONNECT in the same packet", "close"])
def test_ack_right_before_the_end_is_recorded(db_url: str, then: str, launch, stack) -> None:
    """An ACK the server has read counts, even when the connection ends right after it."""
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    with server.connect() as client:
        cid = identify(client, "NONE ACK")
        assert put(cid, "last one") is True
        [(message_id, _)] = read_acked(client, 1)
        if then == "close":
            client.send_line(f"ACK {message_id}")
            client.close()
        else:
            client.send(f"ACK {message_id}\nDISCONNECT\n".encode())
            assert client.wait_closed() == []
    wait_until(disconnected(server, cid), 5, "the connection to end")
    wait_until(lambda: statuses(db_url, [message_id]) == {message_id: "delivered"}, 2,
               f"the ACK sent just before the end ({then}) to be recorded")
    with server.connect() as again:
        assert identify(again, f"{cid} ACK") == cid
        assert put(cid, "marker") is True
        assert [b for _, b in read_acked(again, 1)] == ["marker"], "an acknowledged message came again"
        again.assert_silent(SILENCE)


def test_python_client_ack_mode(db_url: str, launch, stack) -> None:
    """Client(ack=True): each message is acknowledged on the next receive or on disconnect."""
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    with Client("127.0.0.1", server.port, ack=True) as client:
        cid = client.client_id
    assert cid is not None
    for i in range(3):
        assert put(cid, f"c{i}") is True
    ids = [i for i, _, _ in message_rows(db_url, cid)]

    client = Client("127.0.0.1", server.port, client_id=cid, ack=True, timeout=5)
    stack.callback(client.close)
    client.connect()
    first = client.receive_message(5)
    assert first is not None and (first.message_id, first.body) == (ids[0], "c0")
    second = client.receive_message(5)  # acknowledges c0
    assert second is not None and (second.message_id, second.body) == (ids[1], "c1")
    wait_until(lambda: statuses(db_url, ids)[ids[0]] == "delivered", 5, "the auto-ACK of c0")
    client.close()  # vanishes: c1 (returned, not acknowledged) and c2 (written) are not acked
    wait_until(disconnected(server, cid, 2), 5, "the server to notice the closed connection")
    assert put(cid, "c3") is True
    ids.append(message_rows(db_url, cid)[-1][0])
    assert statuses(db_url, ids) == {ids[0]: "delivered", ids[1]: "pending", ids[2]: "pending",
                                     ids[3]: "pending"}

    with Client("127.0.0.1", server.port, client_id=cid, ack=True, timeout=5) as client:
        got = [client.receive_message(5) for _ in range(3)]
        assert [(m.message_id, m.body) for m in got if m] == list(zip(ids[1:], ["c1", "c2", "c3"]))
        # disconnect() (on leaving the block) acknowledges c3
    wait_until(lambda: set(statuses(db_url, ids).values()) == {"delivered"}, 2,
               "every message to be acknowledged, the last one by disconnect()")

    with server.connect() as raw:
        assert identify(raw, f"{cid} ACK") == cid
        assert put(cid, "marker") is True
        assert [b for _, b in read_acked(raw, 1)] == ["marker"]
        raw.assert_silent(SILENCE)


# --- a client that stops reading ---------------------------------------------------


def test_slow_client_blocks_nobody_and_loses_nothing(db_url: str, launch, stack) -> None:
    server = launch(db_url, "--write-timeout", "1")
    put = enqueuer(stack, db_url)
    # More than loopback can buffer (about 4 MB between the two sockets).
    total = 1500
    backlog = [f"slow {i:04d} {BIG}" for i in range(total)]
    with server.connect() as slow:
        sid = identify(slow)
        slow.send_line("DISCONNECT")
        assert slow.wait_closed() == []
    queue_backlog(db_url, sid, backlog)

    fast = server.connect()
    stack.callback(fast.close)
    fid = identify(fast)
    reader = LineReader(fast)
    reader.start()
    stack.callback(reader.stop)
    sent_at: Dict[str, float] = {}
    stop = threading.Event()
    errors: List[BaseException] = []

    def stream() -> None:
        try:
            with Enqueuer(db_url) as own:
                i = 0
                while not stop.is_set():
                    body = f"fast {i}"
                    sent_at[body] = time.monotonic()
                    assert own.enqueue(fid, body) is True
                    i += 1
                    stop.wait(0.02)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=stream, daemon=True)
    producer.start()
    wait_until(lambda: len(reader.lines) >= 5, 5, "the fast client's stream to start")

    stalled = small_window_client(server)
    stack.callback(stalled.close)
    started = time.monotonic()
    assert identify(stalled, sid) == sid  # then it reads nothing more
    timed_out = re.compile(rf"client {numeric_id(sid)} disconnected from .*\(write timed out\)")
    wait_until(lambda: timed_out.search(server.log), 10,
               "the stalled client to be disconnected for its write timeout")
    dropped_after = time.monotonic() - started
    mark = len(sent_at)
    wait_until(lambda: len(sent_at) >= mark + 10, 5, "a few more fast messages")
    stop.set()
    producer.join(10)
    assert not errors, errors
    wait_until(lambda: len(reader.lines) == len(sent_at), 5, "every fast message")
    arrivals = reader.arrivals()
    assert reader.bodies() == sorted(sent_at, key=lambda b: int(b.split()[1]))
    delays = {body: arrivals[body] - sent_at[body] for body in sent_at}
    worst = max(delays, key=delays.__getitem__)
    print(f"\n[{db_url.split(':')[0]}] stalled client dropped {dropped_after:.2f} s after connecting; "
          f"{len(delays)} fast messages meanwhile, worst delay {delays[worst]:.3f} s ({worst})")

    # Accounting: what the first connection can still read (whole lines only) plus
    # what is pending is everything, and the pending ones are exactly the rest.
    rows = message_rows(db_url, sid)
    pending = [b for _, b, s in rows if s == "pending"]
    delivered = [b for _, b, s in rows if s == "delivered"]
    first_lines, closed, partial = drain(stalled, quiet=2.0)
    assert closed, "the server must have closed the stalled connection"
    first = [line[len("MESSAGE: "):] for line in first_lines]
    print(f"  first connection: {len(first)} whole messages (+{len(partial)} bytes of a partial "
          f"one), {len(pending)} left pending, of {total}")
    assert first == backlog[:len(first)], "the first connection got something out of order"
    assert delivered == first, "marked delivered must be exactly what was written whole"
    assert pending, "the stalled client cannot have taken everything"
    assert len(first) + len(pending) == total
    assert pending == backlog[len(first):]

    with server.connect() as again:
        assert identify(again, sid) == sid
        rest = again.read_lines(len(pending), timeout=20)
        assert [line[len("MESSAGE: "):] for line in rest] == pending
        assert put(sid, "marker") is True
        assert again.read_line() == "MESSAGE: marker"
        again.assert_silent(SILENCE)
    assert {s for _, _, s in message_rows(db_url, sid)} == {"delivered"}
    # Last, so that a stall still gets the accounting above checked.
    assert delays[worst] < 0.5, f"the fast client waited {delays[worst]:.2f} s for {worst!r}"


# --- the database goes away ------------------------------------------------------------


class CuttableProxy:
    """A TCP forwarder to MariaDB that can drop every connection and refuse new ones."""

    def __init__(self, upstream: Tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.refused = 0
        self._cut = False
        self._open: Set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    def url(self, db_url: str) -> str:
        """``db_url`` pointed at this proxy."""
        parts = urlsplit(db_url)
        user = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=f"{user}@127.0.0.1:{self.port}" if user else
                              f"127.0.0.1:{self.port}").geturl()

    def cut(self) -> None:
        """Drop every open connection; refuse new ones until restore()."""
        with self._lock:
            self._cut = True
            doomed = list(self._open)
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closing = True
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut
            if refuse:
                self.refused += 1
                downstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                downstream.close()  # a reset, at once
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((downstream, upstream))
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open.discard(src)
        src.close()


@pytest.fixture
def proxy(mysql_url: str) -> Iterator[CuttableProxy]:
    parts = urlsplit(mysql_url)
    prox = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 3306))
    yield prox
    prox.close()


def assert_error_and_close_while_down(server: ServerProcess) -> float:
    """A new client gets the one-line database error and is closed; return how long it took."""
    started = time.monotonic()
    with server.connect(timeout=5) as newcomer:
        assert newcomer.read_line() == "GET_CLIENT_ID"
        newcomer.send_line("NONE")
        assert newcomer.wait_closed(timeout=5) == [DB_DOWN]
    return time.monotonic() - started


@pytest.mark.mysql
@pytest.mark.parametrize("mode", ["legacy", "ack"])
def test_database_outage_during_stream(mysql_url: str, mode: str, proxy: CuttableProxy,
                                       launch, stack) -> None:
    """The server reaches MariaDB through the proxy.  A producer queues a stream through
    the proxy too; when that raises StorageUnavailable it queues the same message
    straight to MariaDB instead, so messages pile up that the server cannot see."""
    via_proxy = proxy.url(mysql_url)
    server = launch(via_proxy)
    client = server.connect()
    stack.callback(client.close)
    cid = identify(client, "NONE ACK" if mode == "ack" else "NONE")
    reader = LineReader(client, ack=mode == "ack")
    reader.start()
    stack.callback(reader.stop)

    accepted: List[str] = []
    failed: List[str] = []
    stop = threading.Event()
    errors: List[BaseException] = []

    def stream() -> None:
        try:
            with Enqueuer(via_proxy) as proxied, Enqueuer(mysql_url) as direct:
                i = 0
                while not stop.is_set():
                    try:
                        assert proxied.enqueue(cid, f"s{i}") is True
                        accepted.append(f"s{i}")
                    except StorageUnavailable:
                        failed.append(f"s{i}")
                        assert direct.enqueue(cid, f"d{i}") is True
                        accepted.append(f"d{i}")
                    i += 1
                    stop.wait(0.01)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=stream, daemon=True)
    producer.start()
    try:
        wait_until(lambda: len(reader.lines) >= 20, 10, "the stream to flow")
        proxy.cut()
        cut_at = time.monotonic()
        wait_until(lambda: len(failed) >= 3, 10, "enqueue through the proxy to raise StorageUnavailable")
        took = assert_error_and_close_while_down(server)
    finally:
        stop.set()
        producer.join(10)
    assert not errors, errors
    assert server.proc is not None and server.proc.poll() is None, "the server must keep running"
    assert not reader.closed, "a connected client stays connected through the outage"
    queued_during = [b for b in accepted if b.startswith("d")]
    assert len(queued_during) >= 3
    received_during = len(reader.lines)
    # Those queued straight to MariaDB may arrive during the outage: their wake-ups carry
    # them, and the server writes them without reading the database (their marks wait).
    carried_during = len(set(queued_during) & set(reader.bodies()))
    proxy.restore()
    restored = time.monotonic()
    # Nothing wakes the server now: its sweep must find them.
    wait_until(lambda: set(accepted) <= set(reader.bodies()), SWEEP + MARGIN,
               "every accepted message, within a sweep interval of the restore")
    caught_up = max(reader.arrivals()[b] for b in accepted) - restored
    got = reader.bodies()
    assert len(got) == len(set(got)), "a message arrived twice on one connection"

    def order(body: str) -> Tuple[int, int]:
        # d<i> was queued after s<i> raised; an s<i> whose COMMIT's reply was lost
        # (it committed) therefore comes first.
        return int(body[1:]), 0 if body[0] == "s" else 1

    assert got == sorted(got, key=order), "messages out of order"
    # An enqueue that raised may still have committed (its COMMIT's reply lost): it may arrive.
    extra = [b for b in got if b not in set(accepted)]
    assert set(extra) <= set(failed), extra
    print(f"\n[{mode}] outage {restored - cut_at:.2f} s: {len(accepted)} accepted "
          f"({len(queued_during)} straight to MariaDB during it, {carried_during} of them "
          f"written during it), {len(failed)} refused with "
          f"StorageUnavailable ({len(extra)} of them arrived anyway), {received_during} received "
          f"before the restore; new client answered and closed in {took:.2f} s; all caught up "
          f"{caught_up:.2f} s after the restore; {proxy.refused} database connections refused")

    wait_until(lambda: {s for *_, s in message_rows(mysql_url, cid)} == {"delivered"}, 5,
               "every message to be marked delivered")
    assert set(accepted) <= {b for _, b, _ in message_rows(mysql_url, cid)}
    count = len(reader.lines)
    put = enqueuer(stack, via_proxy)
    assert put(cid, "marker") is True
    wait_until(lambda: len(reader.lines) == count + 1, 5, "the marker")
    assert reader.bodies()[-1] == "marker"
    time.sleep(SWEEP_SILENCE)  # after the marker: two sweeps' worth of silence
    assert len(reader.lines) == count + 1, "something arrived again after the marker"


def unread_bytes(client: RawClient) -> int:
    """Bytes that arrived at the client's socket and that it has not read yet."""
    return struct.unpack("i", fcntl.ioctl(client.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.mysql
@pytest.mark.parametrize("then", ["stays connected", "reconnects"])
def test_database_cut_between_write_and_mark(mysql_url: str, then: str, proxy: CuttableProxy,
                                             launch, stack) -> None:
    """The cut falls while a delivery batch is being written: the batch reaches the
    client but its "delivered" mark cannot commit.  Nothing may be written twice: not on
    that connection, and (docs/PROTOCOL.md, 9: a legacy message comes twice across
    connections "only if the server process died between the write and the mark") not
    on the next one either, when the client reconnects during the outage."""
    via_proxy = proxy.url(mysql_url)
    server = launch(via_proxy, "--write-timeout", "30")  # the blocked write must outlast the test's wait
    total, pause_at = 2400, 900
    backlog = [f"b{i:04d} {BIG}" for i in range(total)]
    put = enqueuer(stack, via_proxy)
    # Landing the cut inside the window between a write and its mark is a race the
    # test can lose (the mark commits first); then it starts over with a fresh client.
    for attempt in range(1, 6):
        with server.connect() as client:
            cid = identify(client)
            client.send_line("DISCONNECT")
            assert client.wait_closed() == []
        queue_backlog(mysql_url, cid, backlog)

        client = small_window_client(server)
        stack.callback(client.close)
        assert identify(client, cid) == cid
        first = client.read_lines(pause_at, timeout=20)
        # It stops reading: the server's write of a batch blocks (with no transaction
        # open), once the socket buffers are full and stay full.
        seen: List[int] = []

        def blocked(seen: List[int] = seen, client: RawClient = client) -> bool:
            seen.append(unread_bytes(client))
            return len(seen) >= 3 and seen[-1] > 0 and seen[-1] == seen[-2] == seen[-3]

        wait_until(blocked, 10, "the server's write to block on the full socket")
        proxy.cut()
        cut_at = time.monotonic()
        # It reads again: the batch's write completes, and its mark cannot commit.
        failed_mark = rf"client {numeric_id(cid)}: \d+ delivered message\(s\) not yet marked"
        # Or the cut fell while the server was reading its next batch, not writing one:
        # that read fails ("postponed"), nothing written waits for a mark, and this
        # attempt missed the window (the mark writer logs a failed mark within a second
        # or two of the failure, so a little grace after "postponed").
        missed = f"delivery to client {numeric_id(cid)} postponed"
        missed_at: Optional[float] = None
        more: List[str] = []
        while not re.search(failed_mark, server.log):
            assert time.monotonic() - cut_at < 15, "neither a failed mark nor a failed read was logged"
            if missed_at is None and missed in server.log:
                missed_at = time.monotonic()
            if missed_at is not None and time.monotonic() - missed_at > 3:
                break
            lines, closed, _ = drain(client, quiet=0.2, limit=15)
            assert not closed
            more += lines
        if not re.search(failed_mark, server.log):
            print(f"\n[{then}] attempt {attempt}: the cut fell between batches; again")
            proxy.restore()
            client.close()
            continue
        lines, closed, partial = drain(client, quiet=SILENCE, limit=15)
        assert not closed and not partial
        more += lines
        during = first + more
        delivered_now = sum(1 for *_, s in message_rows(mysql_url, cid) if s == "delivered")
        print(f"\n[{then}] attempt {attempt}: cut after {len(first)} read: {len(during)} written "
              f"before the failed mark, {delivered_now} of them marked")
        assert [line[len("MESSAGE: "):] for line in during] == backlog[:len(during)]
        if len(during) > delivered_now:
            break
        proxy.restore()
        client.close()
    else:
        raise AssertionError("in 5 attempts the cut never fell between a write and its mark")
    # The written-but-unmarked ones are still pending in the database; they must not come again.
    remaining = total - len(during)
    if then == "stays connected":
        took = assert_error_and_close_while_down(server)
        print(f"  a new client was answered and closed in {took:.2f} s")
        assert remaining > 0, "the failed batch was the last one: nothing left to test the restore with"
        proxy.restore()
        restored = time.monotonic()
        # Nothing wakes the server but its sweep.
        rest = client.read_lines(1, timeout=SWEEP + MARGIN)
        first_after = time.monotonic() - restored
        rest += client.read_lines(remaining - 1, timeout=10)
        all_after = time.monotonic() - restored
        print(f"  the rest ({len(rest)}) started {first_after:.2f} s and ended {all_after:.2f} s "
              "after the restore")
    else:
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
        wait_until(disconnected(server, cid, 2), 5, "the server to see the DISCONNECT")
        proxy.restore()
        client = server.connect()
        stack.callback(client.close)
        assert identify(client, cid) == cid
        # Everything it sends, until it has been quiet for a while after the last line.
        head = client.read_line(timeout=10)
        assert head is not None
        lines, closed, partial = drain(client, quiet=SWEEP_SILENCE)
        assert not closed and not partial
        rest = [head, *lines]
        unmarked = set(backlog[delivered_now:len(during)])
        again = [line for line in rest if line[len("MESSAGE: "):] in unmarked]
        print(f"  after the reconnect: {len(rest)} messages ({remaining} expected); {len(again)} of the "
              f"{len(unmarked)} written to the previous connection but not marked came again")
    assert [line[len("MESSAGE: "):] for line in rest] == backlog[len(during):], \
        "after the restore, something came twice or out of order"
    wait_until(lambda: {s for *_, s in message_rows(mysql_url, cid)} == {"delivered"}, 5,
               "every message to be marked delivered")
    assert put(cid, "marker") is True
    assert client.read_line() == "MESSAGE: marker"
    client.assert_silent(SWEEP_SILENCE)


def test_an_ack_sent_just_before_a_takeover_counts(db_url: str, launch, stack) -> None:
    """The client acknowledges and, at once, connects again (a phone switching networks):
    the ACK reached the old connection before the takeover closed it, so the message is
    acknowledged and never comes to the new one.  Twenty times, each a race the server
    must not lose."""
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    came_again = []
    for attempt in range(20):
        with server.connect() as old:
            cid = identify(old, "NONE ACK")
            assert put(cid, f"once {attempt}") is True
            [(message_id, _)] = read_acked(old, 1)
            new = server.connect()
            stack.callback(new.close)
            old.send(f"ACK {message_id}\n".encode())
            new.send(f"{cid} ACK\n".encode())  # sent before the greeting: read after it
            assert new.read_line() == "GET_CLIENT_ID"
            assert new.read_line() == f"SET_CLIENT_ID: {cid}"
            new.send_line("PING")
            line = new.read_line()
            if line != "PONG":
                came_again.append((attempt, line))
            new.close()
    assert not came_again, f"acknowledged messages came again: {came_again}"


@pytest.mark.mysql
def test_ack_taken_during_outage_is_not_resent(mysql_url: str, proxy: CuttableProxy,
                                               launch, stack) -> None:
    """An ACK the server took while MariaDB was away, then the client left: on its next
    connection it gets what it did not acknowledge, not what it did."""
    via_proxy = proxy.url(mysql_url)
    server = launch(via_proxy)
    put = enqueuer(stack, via_proxy)
    client = server.connect()
    stack.callback(client.close)
    cid = identify(client, "NONE ACK")
    assert put(cid, "acknowledged in the dark") is True
    assert put(cid, "never acknowledged") is True
    [(acked, _), (unacked, _)] = read_acked(client, 2)
    proxy.cut()
    client.send_line(f"ACK {acked}")
    unmarked = f"client {numeric_id(cid)}: 1 delivered message(s) not yet marked"
    wait_until(lambda: server.log_contains(unmarked), 5,
               "the server to take the ACK and fail to record it")
    client.send_line("DISCONNECT")
    assert client.wait_closed() == []
    wait_until(disconnected(server, cid), 5, "the server to see the DISCONNECT")
    proxy.restore()
    with server.connect() as again:
        assert identify(again, f"{cid} ACK") == cid
        got = read_acked(again, 1)
        assert got == [(unacked, "never acknowledged")], "an acknowledged message came again"
        assert put(cid, "marker") is True
        assert [b for _, b in read_acked(again, 1)] == ["marker"]
        again.assert_silent(SILENCE)


# --- TTL, retention, keepalive -----------------------------------------------------------


def db_now_passed(db_url: str, message_id: int) -> bool:
    """The database clock is past the message's expiry time."""
    now = "NOW(6)" if db_url.startswith("mysql") else "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    rows = query(db_url, f"SELECT expires_at < {now} FROM messages WHERE id = %s", (message_id,))
    return bool(rows[0][0])


def test_ttl_expired_message_never_sent(db_url: str, launch, stack) -> None:
    server = launch(db_url, "--purge-interval", "0.5")
    put = enqueuer(stack, db_url)
    with server.connect() as client:
        cid = identify(client)
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    assert put(cid, "short-lived", ttl=1) is True
    assert put(cid, "long-lived", ttl=60) is True
    assert put(cid, "durable") is True
    short_id = message_rows(db_url, cid)[0][0]
    wait_until(lambda: db_now_passed(db_url, short_id), 5, "the short-lived message to expire")
    with server.connect() as client:
        assert identify(client, cid) == cid
        assert client.read_lines(2) == ["MESSAGE: long-lived", "MESSAGE: durable"]
        client.assert_silent(SWEEP_SILENCE)
    wait_until(lambda: statuses(db_url, [short_id]) == {short_id: "expired"}, 5,
               "a purge run to mark it expired")
    with server.connect() as client:
        assert identify(client, f"{cid} ACK") == cid
        assert put(cid, "marker") is True
        assert [b for _, b in read_acked(client, 1)] == ["marker"]
        client.assert_silent(SILENCE)


def test_retention_purges_finished_messages_only(db_url: str, launch, stack) -> None:
    server = launch(db_url, "--retention-days", "0.00001", "--purge-interval", "0.5")  # ~0.9 s
    put = enqueuer(stack, db_url)
    with server.connect() as offline:
        oid = identify(offline)
        offline.send_line("DISCONNECT")
        assert offline.wait_closed() == []
    # Queued first, so these are the oldest rows: kept because they are pending.
    assert put(oid, "waiting 1") is True
    assert put(oid, "waiting 2") is True
    assert put(oid, "too late", ttl=0.2) is True
    with server.connect() as client:
        cid = identify(client)
        assert put(cid, "done 1") is True
        assert put(cid, "done 1") is False  # a duplicate: recorded as ignored
        assert put(cid, "done 2") is True
        assert client.read_lines(2) == ["MESSAGE: done 1", "MESSAGE: done 2"]
        assert len(message_rows(db_url, cid)) == 3
        wait_until(lambda: not message_rows(db_url, cid), 10,
                   "delivered and ignored messages to be purged")
        assert put(cid, "marker") is True
        assert client.read_line() == "MESSAGE: marker"
        client.assert_silent(SILENCE)
    wait_until(lambda: [(b, s) for _, b, s in message_rows(db_url, oid)] ==
               [("waiting 1", "pending"), ("waiting 2", "pending")], 10,
               "the expired message to be purged, the pending ones kept")
    with server.connect() as offline:
        assert identify(offline, oid) == oid
        assert offline.read_lines(2) == ["MESSAGE: waiting 1", "MESSAGE: waiting 2"]
    wait_until(lambda: not message_rows(db_url, oid), 10, "the delivered ones to be purged in turn")


SS_KEEPALIVE = re.compile(r"timer:\(keepalive,((?:[0-9]+min)?(?:[0-9]+(?:sec|\.))?(?:[0-9]+ms)?),")


def keepalive_seconds(text: str) -> float:
    """ss's timer (``59sec``, ``6.892ms`` = 6 s 892 ms, ``1min``, ``300ms``) in seconds."""
    match = re.fullmatch(r"(?:([0-9]+)min)?(?:([0-9]+)(sec|\.))?(?:([0-9]+)ms)?", text)
    assert match, text
    minutes, secs, _, millis = match.groups()
    return int(minutes or 0) * 60 + int(secs or 0) + int(millis or 0) / 1000


def test_keepalive_on_accepted_sockets(sqlite_url: str, launch) -> None:
    try:
        subprocess.run(["ss", "-V"], capture_output=True, check=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("ss (iproute2) is not available to read the server's socket timers")
    server = launch(sqlite_url, "--keepalive-idle", "7")

    def timers() -> List[str]:
        out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{server.port} )"],
                             capture_output=True, text=True, timeout=5).stdout
        return [m.group(1) for m in SS_KEEPALIVE.finditer(out)]

    with server.connect() as client:
        identify(client)
        # Once the handshake's bytes are acknowledged, the socket's only timer is keepalive's.
        found = wait_until(timers, 5, "a keepalive timer on the server's side of the connection")
        assert len(found) == 1, found
        remaining = keepalive_seconds(found[0])
        assert 0 < remaining <= 7, f"keepalive fires in {remaining} s; --keepalive-idle was 7"
