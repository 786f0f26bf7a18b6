"""Correct under pressure: a real server, clients that misbehave, on SQLite and MariaDB.

Each test reproduces a defect that outside probing found (issue "Correct under
pressure"): an ACK flood, replies out of order, forged wake-ups that cost a
delivery transaction per client named, a slow reader that held database
connections and row locks, a takeover or a quick reconnect that sent messages
twice.  Every wait has a deadline; no test sleeps and hopes.
"""

from __future__ import annotations

import re
import socket
import time
from typing import List, Tuple

import pytest

from messaging_server import Enqueuer
from tests.helpers import RawClient, ServerProcess, numeric_id, recv_before, wait_until
from tests.test_metrics_e2e import http_port, scrape

pytestmark = pytest.mark.usefixtures("no_niki_environment")  # routed wake-ups

ACK_LINE = re.compile(r"MESSAGE ([1-9][0-9]*): (.*)")


def small_window(server: ServerProcess, rcvbuf: int = 32 * 1024) -> RawClient:
    """A client whose receive buffer does not grow: a backlog fills it quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return RawClient(sock, 10)


def read_all(client: RawClient, deadline: float) -> bytes:
    """Everything the server sends until it closes (or the deadline fails the test)."""
    chunks = [client.buf]
    client.buf = b""
    while True:
        data = recv_before(client.sock, deadline, "the server to close the connection")
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# --- 1. an ACK flood is bounded ---------------------------------------------------------------


def test_ack_flood_without_reading_is_disconnected(db_url: str) -> None:
    """``ACK <unknown>`` lines sent without reading the errors: the server holds at most
    64 KiB of waiting commands for the client, then disconnects it, long before the
    write timeout; another client is served meanwhile."""
    with ServerProcess(db_url, "--write-timeout", "60") as server:
        flooder = small_window(server, rcvbuf=4096)
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        assert flooder.read_line() == "GET_CLIENT_ID"
        flooder.send_line("NONE ACK")
        assert (flooder.read_line() or "").startswith("SET_CLIENT_ID: ")
        lines = b"".join(b"ACK %d\n" % (10**9 + i) for i in range(20_000))  # 240 KB
        deadline = time.monotonic() + 20
        cut = False
        while time.monotonic() < deadline and not cut:
            try:
                flooder.sock.settimeout(max(0.1, deadline - time.monotonic()))
                flooder.sock.sendall(lines)
            except (BrokenPipeError, ConnectionResetError):
                cut = True
            except socket.timeout:
                pass  # the server stopped reading: its limit, or still writing errors
            if server.log_contains("sent commands faster than it read the answers"):
                cut = True
        assert cut, "the flooding client is still connected after 20 s"
        wait_until(lambda: server.log_contains("sent commands faster than it read the answers"),
                   10, "the server to say why it closed the flooder")
        with server.connect() as other:
            other.handshake()
            other.send_line("PING")
            assert other.read_line() == "PONG"
        flooder.close()


# --- 2. replies in the order of the commands --------------------------------------------------


@pytest.mark.parametrize("attempt", range(3))
def test_replies_come_in_the_order_of_the_commands(db_url: str, attempt: int) -> None:
    with ServerProcess(db_url) as server, server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line("NONE ACK")
        assert (client.read_line() or "").startswith("SET_CLIENT_ID: ")
        client.send(b"PING\nACK 99\nPING\nnonsense\nACK 98\nPING\n")
        assert client.read_lines(6) == ["PONG", "ERROR: unknown message id 99", "PONG",
                                        "Invalid command: nonsense", "ERROR: unknown message id 98",
                                        "PONG"]


# --- 3. forged wake-ups cost no delivery pass -------------------------------------------------


def test_forged_wakeups_for_clients_with_nothing_new_run_no_pass(db_url: str) -> None:
    """Datagrams naming every client id (ids are sequential) against idle clients: no
    delivery pass runs for a client with nothing new; a real message still goes out."""
    clients = 40
    with ServerProcess(db_url, "--sweep-interval", "60") as server:
        url = f"http://127.0.0.1:{http_port(server)}/metrics"
        connected = []
        for _ in range(clients):
            client = server.connect()
            connected.append((client, numeric_id(client.handshake())))
        ids = ",".join(str(cid) for _, cid in connected).encode()
        before = scrape(url)
        datagrams = 30
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(datagrams):
                sock.sendto(b"NIKI1 " + ids, ("127.0.0.1", server.event_port))
        wait_until(lambda: scrape(url)["niki_wakeups_received_total"]
                   >= before["niki_wakeups_received_total"] + datagrams, 10, "the datagrams to arrive")
        wait_until(lambda: scrape(url)["niki_wakeups_nothing_new_total"]
                   > before.get("niki_wakeups_nothing_new_total", 0), 10, "the wake-ups to be checked")
        after = scrape(url)
        assert after["niki_delivery_passes_total"] == before["niki_delivery_passes_total"]
        # A real message is still delivered at once.
        target, target_id = connected[0]
        with Enqueuer(db_url) as enqueuer:
            assert enqueuer.enqueue(target_id, "real one") is True
        assert target.read_line() == "MESSAGE: real one"
        for client, _ in connected:
            client.close()


# --- 6. a slow reader stalls nobody (MariaDB held a pooled connection and the row lock) ---------


def test_slow_readers_do_not_stall_handshakes_or_enqueues(db_url: str) -> None:
    """Two clients stop reading their backlogs; with a pool of 2 connections, an unrelated
    handshake and an enqueue for a slow client must not wait for their write timeout."""
    with ServerProcess(db_url, "--pool-size", "2", "--write-timeout", "6") as server:
        slow: List[Tuple[RawClient, int]] = []
        body = "x" * 4000
        with Enqueuer(db_url) as enqueuer:
            for _ in range(2):
                client = small_window(server, rcvbuf=4096)
                credential = client.handshake()
                client.close()
                cid = numeric_id(credential)
                for start in range(0, 3000, 1000):  # 12 MB: more than the socket buffers hold
                    assert enqueuer.enqueue_many([(cid, f"{i} {body}") for i in range(start, start + 1000)])
                again = small_window(server, rcvbuf=4096)
                assert again.read_line() == "GET_CLIENT_ID"
                again.send_line(credential)
                assert again.read_line() == f"SET_CLIENT_ID: {credential}"
                slow.append((again, cid))
            # Both backlogs are being written to sockets nobody reads.
            started = time.monotonic()
            with server.connect(timeout=5) as other:
                other.handshake()
            handshake = time.monotonic() - started
            started = time.monotonic()
            assert enqueuer.enqueue(slow[0][1], "one more") is True
            enqueue = time.monotonic() - started
        for client, _ in slow:
            client.close()
        print(f"\nwith two slow readers: a handshake took {handshake * 1000:.1f} ms, "
              f"an enqueue for a slow reader {enqueue * 1000:.1f} ms")
        assert handshake < 2.0, f"an unrelated handshake took {handshake:.2f} s"
        assert enqueue < 2.0, f"enqueue for a slow reader took {enqueue:.2f} s"


# --- 7. a takeover during a backlog sends nothing twice --------------------------------------


@pytest.mark.parametrize("where", ["same server", "another server"])
def test_takeover_during_a_backlog_sends_nothing_twice(db_url: str, where: str) -> None:
    """A backlog is being written to connection 1, which reads nothing; connection 2 with
    the same credential takes over (on the same server, or on another one) and reads
    everything.  What connection 1 received whole plus what connection 2 received is
    every message exactly once."""
    total, pad = 3000, "p" * 2000
    with ServerProcess(db_url) as server, ServerProcess(db_url) as other:
        second = server if where == "same server" else other
        with server.connect() as first_contact:
            credential = first_contact.handshake()
        cid = numeric_id(credential)
        with Enqueuer(db_url) as enqueuer:
            # 6 MB: more than the socket buffers of a client that does not read (the
            # server's send buffer grows to 4 MB)
            for start in range(0, total, 1000):
                assert enqueuer.enqueue_many([(cid, f"m{i:05d} {pad}")
                                              for i in range(start, start + 1000)])
        one = small_window(server, rcvbuf=4096)
        assert one.read_line() == "GET_CLIENT_ID"
        one.send_line(credential)
        assert one.read_line() == f"SET_CLIENT_ID: {credential}"
        assert one.read_line() == f"MESSAGE: m00000 {pad}"  # the backlog is flowing
        got_one = [f"m00000 {pad}"]
        with second.connect() as two:
            assert two.read_line() == "GET_CLIENT_ID"
            two.send_line(credential)
            assert two.read_line() == f"SET_CLIENT_ID: {credential}"
            got_two: List[str] = []
            # connection 1 is closed by the takeover: read what it got, whole lines only
            rest = read_all(one, time.monotonic() + 20)
            got_one += [line[len("MESSAGE: "):] for line in rest.decode().split("\n")[:-1]]
            while len(got_one) + len(got_two) < total:
                line = two.read_line(timeout=20)
                assert line is not None and line.startswith("MESSAGE: "), line
                got_two.append(line[len("MESSAGE: "):])
        one.close()
        twice = set(got_one) & set(got_two)
        assert not twice, f"{len(twice)} message(s) sent on both connections"
        assert sorted(got_one + got_two) == [f"m{i:05d} {pad}" for i in range(total)]
        assert got_two == sorted(got_two)


# --- 8. acknowledged messages are not sent again after a quick reconnect ----------------------


def test_acknowledged_messages_are_not_sent_again_after_a_quick_reconnect(db_url: str) -> None:
    rounds, per_round = 5, 40
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enqueuer:
        with server.connect() as client:
            assert client.read_line() == "GET_CLIENT_ID"
            client.send_line("NONE ACK")
            credential = (client.read_line() or "")[len("SET_CLIENT_ID: "):]
        cid = numeric_id(credential)
        for n in range(rounds):
            assert enqueuer.enqueue_many([(cid, f"r{n}-{i}") for i in range(per_round)])
            with server.connect() as client:
                assert client.read_line() == "GET_CLIENT_ID"
                client.send_line(f"{credential} ACK")
                assert client.read_line() == f"SET_CLIENT_ID: {credential}"
                acks = []
                for _ in range(per_round):
                    match = ACK_LINE.fullmatch(client.read_line() or "")
                    assert match, "expected a MESSAGE line"
                    acks.append(f"ACK {match.group(1)}\n")
                client.send("".join(acks).encode())
            # closed right after its ACKs; the next connection comes at once
            with server.connect() as client:
                assert client.read_line() == "GET_CLIENT_ID"
                client.send_line(f"{credential} ACK")
                assert client.read_line() == f"SET_CLIENT_ID: {credential}"
                assert enqueuer.enqueue(cid, f"marker {n}") is True
                match = ACK_LINE.fullmatch(client.read_line() or "")
                assert match and match.group(2) == f"marker {n}", \
                    f"round {n}: an acknowledged message came again: {match and match.group(2)}"
                client.send_line(f"ACK {match.group(1)}")
                client.send_line("PING")
                assert client.read_line() == "PONG"
