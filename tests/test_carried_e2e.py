"""Wake-ups that carry their message, against a real server, on both databases.

The owner writes a carried message without reading the database only when its
connection has written the client's previous pending message (or there was
none); every other case falls back to a delivery pass.  These tests drive the
cases that must fall back -- a lost wake-up, wake-ups reordered or repeated, a
replay after a reconnect, a forged one -- and the races: two producers, a
backlog being written, a takeover; and they check the fast path is taken when
it should be (the server's own counters over ``/metrics``).
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import urllib.request
from typing import Dict, Iterator, List

import pytest

from messaging_server import Enqueuer
from messaging_server.protocol.wakeups import Carried, encode_carried
from messaging_server.storage import Storage, open_storage
from messaging_server.storage.interface import LEASE_HANDOVER_S
from tests.helpers import RawClient, ServerProcess, numeric_id, query, wait_until

WINDOW = 5.0
METRIC_RE = re.compile(r"^(niki_[a-z_]+) ([0-9.e+]+)$", re.M)


@pytest.fixture
def server(db_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(db_url, "--sweep-interval", "30") as proc:
        yield proc


@pytest.fixture
def storage(db_url: str, server: ServerProcess) -> Iterator[Storage]:
    with open_storage(db_url) as store:
        yield store


def metrics(server: ServerProcess) -> Dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
        return {name: float(value) for name, value in METRIC_RE.findall(r.read().decode())}


def send_carried(server: ServerProcess, key: bytes, message: Carried) -> None:
    datagram = encode_carried(key, message)
    assert datagram is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(datagram, ("127.0.0.1", server.event_port))


def session_of(db_url: str, client_id: int) -> int:
    return int(query(db_url, "SELECT session FROM clients WHERE id = %s", (client_id,))[0][0])


def bodies(lines: List[str]) -> List[str]:
    assert all(line.startswith("MESSAGE: ") for line in lines), lines
    return [line[len("MESSAGE: "):] for line in lines]


def test_a_connected_clients_messages_travel_in_their_wakeups(server: ServerProcess, db_url: str):
    """No delivery pass at all: each message is written as its wake-up carried it."""
    with server.connect() as client, Enqueuer(db_url) as enqueuer:
        cid = numeric_id(client.handshake())
        before = metrics(server)
        for n in range(20):
            assert enqueuer.enqueue(cid, f"m{n}")
            assert client.read_line() == f"MESSAGE: m{n}"
        carried = "niki_carried_messages_written_total"

        def counted() -> Dict[str, float]:
            now = metrics(server)  # counted just after the write: the last may be on its way
            return now if now[carried] - before[carried] >= 20 else {}

        after = wait_until(counted, 5, "the server to count 20 carried messages")
        assert isinstance(after, dict)
    assert after[carried] - before[carried] == 20
    assert after["niki_delivery_passes_total"] == before["niki_delivery_passes_total"]


def test_a_lost_wakeup_is_made_up_for_by_the_database(server: ServerProcess, storage: Storage,
                                                     db_url: str):
    """m1's wake-up never came: m2's names m1 as its predecessor, which this connection has
    not written, so the server reads the database and writes both, in order."""
    with server.connect() as client, Enqueuer(db_url) as enqueuer:
        cid = numeric_id(client.handshake())
        assert storage.enqueue(cid, "m1", WINDOW).message_id  # stored, nobody told
        assert enqueuer.enqueue(cid, "m2")
        assert client.read_lines(2) == ["MESSAGE: m1", "MESSAGE: m2"]
        client.assert_silent(0.3)


def test_reordered_and_repeated_wakeups_write_each_message_once_in_order(
        server: ServerProcess, storage: Storage, db_url: str):
    with server.connect() as client:
        cid = numeric_id(client.handshake())
        key = storage.wakeup_key()
        assert key is not None
        first = storage.enqueue(cid, "m1", WINDOW)
        second = storage.enqueue(cid, "m2", WINDOW)
        assert first.message_id and second.message_id and second.previous == first.message_id
        session = session_of(db_url, cid)
        m1 = Carried(cid, session, first.message_id, first.previous, time.time(), "m1")
        m2 = Carried(cid, session, second.message_id, second.previous, time.time(), "m2")
        for message in (m2, m1, m2, m1):
            send_carried(server, key, message)
        assert client.read_lines(2) == ["MESSAGE: m1", "MESSAGE: m2"]
        client.assert_silent(0.5)


def test_a_wakeup_replayed_to_a_later_connection_is_not_written(server: ServerProcess,
                                                                storage: Storage, db_url: str):
    """A datagram is good for the session it names only: replayed after the client
    reconnected (say, by someone who recorded it), it writes nothing."""
    key = storage.wakeup_key()
    assert key is not None
    with server.connect() as client, Enqueuer(db_url) as enqueuer:
        credential = client.handshake()
        cid = numeric_id(credential)
        assert enqueuer.enqueue(cid, "once")
        assert client.read_line() == "MESSAGE: once"
        message_id = int(query(db_url, "SELECT MAX(id) FROM messages WHERE client_id = %s", (cid,))[0][0])
        old_session = session_of(db_url, cid)
        client.send_line("DISCONNECT")
        client.wait_closed()
    wait_until(lambda: query(db_url, "SELECT status FROM messages WHERE id = %s", (message_id,))
               == [("delivered",)], 5, "the message to be marked delivered")
    with server.connect() as again:
        assert again.handshake(credential) == credential
        replay = Carried(cid, old_session, message_id, 0, time.time(), "once")
        send_carried(server, key, replay)
        send_carried(server, key, Carried(cid, session_of(db_url, cid), message_id, 0, time.time(),
                                          "once"))  # even naming the new session
        again.assert_silent(0.5)


def test_a_forged_wakeup_writes_nothing(server: ServerProcess, storage: Storage, db_url: str):
    with server.connect() as client:
        cid = numeric_id(client.handshake())
        forged = Carried(cid, session_of(db_url, cid), 10**9, 0, time.time(), "not from the app")
        send_carried(server, b"a guessed key".ljust(32, b"!"), forged)
        wait_until(lambda: metrics(server)["niki_wakeups_invalid_total"] >= 1, 5,
                   "the forged datagram to be counted invalid")
        client.send_line("PING")
        assert client.read_line() == "PONG"


def test_two_producers_during_a_backlog(server: ServerProcess, storage: Storage, db_url: str):
    """A client comes back to 1,500 queued messages, reading slowly at first, while two
    producers queue 200 more each: every message once, in the order they were stored."""
    with server.connect() as first:
        credential = first.handshake()
        first.send_line("DISCONNECT")
        first.wait_closed()
    cid = numeric_id(credential)
    with Enqueuer(db_url) as enqueuer:
        for start in (0, 750):
            assert all(r is True for r in enqueuer.enqueue_many(
                [(cid, f"backlog {n}") for n in range(start, start + 750)]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    client = RawClient(sock, 20.0)
    got: List[str] = []
    try:
        assert client.handshake(credential) == credential
        got += bodies(client.read_lines(10))  # the backlog has begun

        def producer(name: str) -> None:
            with Enqueuer(db_url) as enqueuer:
                for n in range(200):
                    assert enqueuer.enqueue(cid, f"{name} {n}")

        threads = [threading.Thread(target=producer, args=(name,)) for name in ("a", "b")]
        for t in threads:
            t.start()
        got += bodies(client.read_lines(1500 + 400 - 10))
        for t in threads:
            t.join(30)
        client.assert_silent(0.5)
    finally:
        client.close()
    stored = [row[0] for row in query(
        db_url, "SELECT body FROM messages WHERE client_id = %s ORDER BY id", (cid,))]
    assert got == stored
    assert len(set(got)) == 1900


def test_a_takeover_while_messages_stream(server: ServerProcess, db_url: str):
    """ACK mode: the first connection acknowledges 50 messages and stalls while a producer
    goes on; a second connection takes the client over and gets exactly the other 250
    (those written to the first but not acknowledged included), once each, in order."""
    with server.connect() as a:
        assert a.read_line() == "GET_CLIENT_ID"
        a.send_line("NONE ACK")
        credential = (a.read_line() or "")[len("SET_CLIENT_ID: "):]
        cid = numeric_id(credential)

        def produce() -> None:
            with Enqueuer(db_url) as enqueuer:
                for n in range(300):
                    assert enqueuer.enqueue(cid, f"s{n}")

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            for n in range(50):
                match = re.fullmatch(r"MESSAGE ([0-9]+): (s[0-9]+)", a.read_line() or "")
                assert match and match.group(2) == f"s{n}"
                a.send_line(f"ACK {match.group(1)}")
            acknowledged = ("SELECT COUNT(*) FROM messages WHERE client_id = %s "
                            "AND acknowledged_at IS NOT NULL")
            wait_until(lambda: query(db_url, acknowledged, (cid,)) == [(50,)], 10,
                       "the first 50 acknowledgements to be recorded")
            with server.connect() as b:  # while the producer goes on
                assert b.read_line() == "GET_CLIENT_ID"
                b.send_line(f"{credential} ACK")
                assert b.read_line() == f"SET_CLIENT_ID: {credential}"
                rest: List[str] = []
                while len(rest) < 250:
                    match = re.fullmatch(r"MESSAGE ([0-9]+): (s[0-9]+)", b.read_line(10) or "")
                    assert match, rest[-3:]
                    b.send_line(f"ACK {match.group(1)}")
                    rest.append(match.group(2))
                b.send_line("PING")
                assert b.read_line() == "PONG"  # and nothing more came
        finally:
            producer.join(60)
    assert rest == [f"s{n}" for n in range(50, 300)]


def test_an_idle_connection_gives_its_lease_back(db_url: str):
    """A connection that has delivered keeps its client's delivery lease while busy, and
    gives it back once idle: when its server is then killed, the client's next
    connection, on another server, is served at once, not after LEASE_HANDOVER_S."""
    with ServerProcess(db_url, "--lease-idle", "0.5") as a, ServerProcess(db_url) as b, \
            Enqueuer(db_url) as enqueuer:
        with a.connect() as first:
            credential = first.handshake()
            cid = numeric_id(credential)
            assert enqueuer.enqueue(cid, "before")
            assert first.read_line() == "MESSAGE: before"
            lease = "SELECT delivery_session FROM clients WHERE id = %s"
            wait_until(lambda: query(db_url, lease, (cid,)) == [(None,)], 5,
                       "the idle connection to give the lease back")
            a.stop(signal.SIGKILL)
        with b.connect() as second:
            assert second.handshake(credential) == credential
            started = time.monotonic()
            assert enqueuer.enqueue(cid, "after")
            assert second.read_line(timeout=LEASE_HANDOVER_S) == "MESSAGE: after"
            took = time.monotonic() - started
    assert took < LEASE_HANDOVER_S / 2, f"served {took:.2f} s after the message was queued"
