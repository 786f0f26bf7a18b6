"""End to end over TCP: a real ``python -m messaging_server`` process on SQLite and MariaDB.

Every test speaks the wire protocol byte for byte (``RawClient``) and asserts
the exact transcript the seed README's telnet walkthrough promises:
``GET_CLIENT_ID`` / ``NONE`` / ``SET_CLIENT_ID: <id>.<secret>`` / ``MESSAGE: <body>`` /
``Invalid command: <line>`` / ``DISCONNECT``.  Silence is only ever asserted
after a positive marker message arrived, so "nothing more" means something.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from messaging_server import Enqueuer, UnknownClient
from messaging_server.client.sdk import Client
from messaging_server.storage import open_storage
from tests.helpers import CREDENTIAL, RawClient, ServerProcess, numeric_id, wait_until

ID_LINE = re.compile(rf"SET_CLIENT_ID: ({CREDENTIAL})")
SILENCE = 0.3  # after a marker: long enough for a stray redelivery to show up on loopback

Put = Callable[..., bool]


@pytest.fixture
def put(server: ServerProcess) -> Iterator[Put]:
    """``put(client_id, body)``: queue a message for ``server`` (its database, its event port)."""
    with Enqueuer(server.db_url, server.peers) as enqueuer:
        yield enqueuer.enqueue


def identify(client: RawClient, answer: str = "NONE") -> str:
    """The handshake, transcript checked: GET_CLIENT_ID, ``answer``, SET_CLIENT_ID: <credential>."""
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line(answer)
    line = client.read_line()
    assert line is not None
    match = ID_LINE.fullmatch(line)
    assert match, f"expected SET_CLIENT_ID: <id>.<secret>, got {line!r}"
    return match.group(1)


def assert_drained(client: RawClient, put: Put, client_id: str, marker: str) -> None:
    """Nothing is left for ``client``: a fresh marker is the very next line, then silence."""
    assert put(client_id, marker) is True
    assert client.read_line() == f"MESSAGE: {marker}"
    client.assert_silent(SILENCE)


def disconnected(server: ServerProcess, client_id: str) -> Callable[[], bool]:
    """True once the server has forgotten ``client_id``'s connection (its handler logged the end).

    A client that goes away without DISCONNECT leaves a window in which a write
    to its socket still succeeds locally; tests queue "while away" messages only
    after the server has noticed, which is when the contract starts to apply.
    """
    number = numeric_id(client_id)
    return lambda: re.search(rf"client {number} disconnected from ", server.log) is not None


def run_cli(*args: str, env: Optional[Dict[str, str]] = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "messaging_server", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --- handshake ----------------------------------------------------------------


def test_handshake_ids(server: ServerProcess, put: Put) -> None:
    with server.connect() as first, server.connect() as second:
        a = identify(first)
        b = identify(second)
        assert a != b
        first.send_line("DISCONNECT")
        assert first.wait_closed() == []

    # A stored id is kept.
    with server.connect() as again:
        assert identify(again, a) == a
        assert_drained(again, put, a, "still a")
        again.send_line("DISCONNECT")
        assert again.wait_closed() == []

    # Unknown and malformed ids get a new client, distinct from every other one; so do
    # a's bare id and a's id with a wrong secret (knowing an id is not enough).
    seen = {numeric_id(a), numeric_id(b)}
    wrong_secret = f"{numeric_id(a)}.{'A' * 24}"
    for answer in ["999999", "abc", "-5", "0", "12abc", "", "99999999999999999999999999",
                   str(numeric_id(a)), wrong_secret]:
        with server.connect() as client:
            new = identify(client, answer)
            assert numeric_id(new) not in seen, f"answer {answer!r} got an id already handed out"
            seen.add(numeric_id(new))
            assert_drained(client, put, new, f"to the client made for {answer!r}")
    with pytest.raises(UnknownClient):
        put("999999", "no such client was created")


# --- messages -----------------------------------------------------------------


def test_live_then_backlog_then_no_redelivery(server: ServerProcess, put: Put) -> None:
    with server.connect() as client:
        cid = identify(client)
        for i in range(5):
            assert put(cid, f"live {i}") is True
        assert client.read_lines(5) == [f"MESSAGE: live {i}" for i in range(5)]
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []

    for i in range(5):
        assert put(cid, f"backlog {i}") is True

    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line(cid)
        # Queued while the backlog is being delivered: must come after all of it.
        assert put(cid, "live after reconnect") is True
        assert client.read_lines(7) == (
            [f"SET_CLIENT_ID: {cid}"]
            + [f"MESSAGE: backlog {i}" for i in range(5)]
            + ["MESSAGE: live after reconnect"]
        )
        assert_drained(client, put, cid, "marker 1")
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []

    # Nothing delivered before comes again.
    with server.connect() as client:
        assert identify(client, cid) == cid
        assert_drained(client, put, cid, "marker 2")


def test_large_backlog_then_live(server: ServerProcess, put: Put) -> None:
    """More than one delivery batch of up to 4 KB bodies, with live ones queued meanwhile."""
    with server.connect() as client:
        cid = identify(client)
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    backlog = [f"backlog {i} " + "x" * (i * 37 % 4000) for i in range(620)]
    for body in backlog:
        assert put(cid, body) is True

    live = [f"live {i}" for i in range(30)]
    errors: List[BaseException] = []

    def queue_live() -> None:
        # Another thread: the reader below must keep reading while the backlog
        # (megabytes) goes out, or the server's writes would block.
        try:
            with Enqueuer(server.db_url, server.peers) as enqueuer:
                for body in live:
                    assert enqueuer.enqueue(cid, body) is True
        except BaseException as exc:
            errors.append(exc)

    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line(cid)
        worker = threading.Thread(target=queue_live)
        worker.start()
        try:
            lines = client.read_lines(1 + len(backlog) + len(live))
        finally:
            worker.join(30)
        assert not errors, errors
        assert lines[0] == f"SET_CLIENT_ID: {cid}"
        assert lines[1:] == [f"MESSAGE: {body}" for body in backlog + live]
        assert_drained(client, put, cid, "after the backlog")


def test_commands(server: ServerProcess, put: Put) -> None:
    with server.connect() as client:
        cid = identify(client)
        client.send_line("FOO")
        assert client.read_line() == "Invalid command: FOO"
        client.send_line("")
        assert client.read_line() == "Invalid command: "
        client.send_line("FOO BAR", crlf=True)
        assert client.read_line() == "Invalid command: FOO BAR"
        client.send_line("h\u00e9llo \U0001f600")
        assert client.read_line() == "Invalid command: h\u00e9llo \U0001f600"
        client.send(b"ONE\nTWO\r\nTHREE\n")
        assert client.read_lines(3) == ["Invalid command: ONE", "Invalid command: TWO",
                                        "Invalid command: THREE"]
        assert_drained(client, put, cid, "still open")
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []

    # Telnet's line ends, for the id and for DISCONNECT.
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send(b"NONE\r\n")
        assert ID_LINE.fullmatch(client.read_line() or "")
        client.send(b"DISCONNECT\r\n")
        assert client.wait_closed() == []

    # The id and a command in one packet.
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send(b"NONE\nFOO\n")
        line = client.read_line() or ""
        assert ID_LINE.fullmatch(line), line
        other = ID_LINE.fullmatch(line).group(1)
        assert client.read_line() == "Invalid command: FOO"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []

    # A stored id, a backlog and commands in one packet ending in DISCONNECT: the
    # answers come, but nothing is delivered to a client that is leaving (it may close
    # at once, and a message written then would be lost); the backlog waits for it.
    assert put(other, "waiting 1") is True
    assert put(other, "waiting 2") is True
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send(f"{other}\nFOO\nDISCONNECT\n".encode())
        assert client.wait_closed() == [f"SET_CLIENT_ID: {other}", "Invalid command: FOO"]
    with server.connect() as client:
        assert client.handshake(other) == other
        assert client.read_lines(2) == ["MESSAGE: waiting 1", "MESSAGE: waiting 2"]
    # Without DISCONNECT, the backlog comes first, then the answers.
    assert put(other, "waiting 3") is True
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send(f"{other}\nFOO\n".encode())
        assert client.read_lines(3) == [f"SET_CLIENT_ID: {other}", "MESSAGE: waiting 3",
                                        "Invalid command: FOO"]


def test_duplicate_rule(server: ServerProcess, put: Put) -> None:
    with server.connect() as c1, server.connect() as c2:
        a = identify(c1)
        b = identify(c2)
        assert put(a, "same") is True
        assert put(a, "same") is False
        assert put(a, "other") is True
        assert put(b, "same") is True  # another client: not a duplicate
        assert c1.read_lines(2) == ["MESSAGE: same", "MESSAGE: other"]
        assert c2.read_line() == "MESSAGE: same"
        assert_drained(c1, put, a, "marker a")
        assert_drained(c2, put, b, "marker b")

        # The same body queued by several enqueuers at once: exactly one wins.
        results: List[bool] = []
        barrier = threading.Barrier(4)

        def race() -> None:
            with Enqueuer(server.db_url, server.peers) as enqueuer:
                barrier.wait(timeout=10)
                results.append(enqueuer.enqueue(a, "raced"))

        racers = [threading.Thread(target=race) for _ in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        assert sorted(results) == [False, False, False, True]
        assert c1.read_line() == "MESSAGE: raced"
        assert_drained(c1, put, a, "marker a after the race")


def test_takeover_repeated(server: ServerProcess, put: Put) -> None:
    old = server.connect()
    try:
        cid = identify(old)
        for round_ in range(5):
            new = server.connect()
            assert identify(new, cid) == cid
            assert put(cid, f"round {round_}") is True
            assert old.wait_closed() == [], "the older connection must be closed and get nothing"
            assert new.read_line() == f"MESSAGE: round {round_}"
            new.send_line("FOO")
            assert new.read_line() == "Invalid command: FOO"
            old.close()
            old = new
        assert_drained(old, put, cid, "after the takeovers")
    finally:
        old.close()


def test_isolation_and_utf8(server: ServerProcess, put: Put) -> None:
    wide = "4-byte \U0001f600 \U0001d11e \U00020000, 2-byte \u00f1, 3-byte \u4e2d\u20ac"
    with server.connect() as c1, server.connect() as c2:
        a = identify(c1)
        b = identify(c2)
        assert put(a, "for a") is True
        assert put(b, "for b") is True
        assert put(a, wide) is True
        assert c1.read_lines(2) == ["MESSAGE: for a", f"MESSAGE: {wide}"]
        assert c2.read_line() == "MESSAGE: for b"
        assert_drained(c1, put, a, "marker a")
        assert_drained(c2, put, b, "marker b")


def test_order_under_concurrent_enqueues(server: ServerProcess, put: Put) -> None:
    threads, per_client = 4, 15
    clients = [server.connect() for _ in range(3)]
    try:
        ids = [identify(c) for c in clients]
        barrier = threading.Barrier(threads)
        errors: List[BaseException] = []

        def work(t: int) -> None:
            try:
                with Enqueuer(server.db_url, server.peers) as enqueuer:
                    barrier.wait(timeout=10)
                    for i in range(per_client):
                        for cid in ids:
                            assert enqueuer.enqueue(cid, f"t{t} c{cid} {i}") is True
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors

        for client, cid in zip(clients, ids):
            lines = client.read_lines(threads * per_client)
            assert all(line.startswith("MESSAGE: ") for line in lines), lines
            bodies = [line[len("MESSAGE: "):] for line in lines]
            assert len(set(bodies)) == len(bodies), "a message was delivered twice"
            assert set(bodies) == {f"t{t} c{cid} {i}" for t in range(threads) for i in range(per_client)}
            for t in range(threads):
                mine = [body for body in bodies if body.startswith(f"t{t} ")]
                assert mine == [f"t{t} c{cid} {i}" for i in range(per_client)], f"thread {t} out of order"
        for client, cid in zip(clients, ids):
            assert_drained(client, put, cid, f"marker {cid}")
    finally:
        for client in clients:
            client.close()


def test_client_vanishes_without_disconnect(server: ServerProcess, put: Put) -> None:
    fin, rst = server.connect(), server.connect()
    fin_id, rst_id = identify(fin), identify(rst)
    assert put(fin_id, "before") is True
    assert put(rst_id, "before") is True
    assert fin.read_line() == "MESSAGE: before"
    assert rst.read_line() == "MESSAGE: before"

    fin.close()  # FIN
    rst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()  # RST
    wait_until(disconnected(server, fin_id), message=f"the server to notice client {fin_id} left")
    wait_until(disconnected(server, rst_id), message=f"the server to notice client {rst_id} left")

    for cid in (fin_id, rst_id):
        assert put(cid, "while away 1") is True
        assert put(cid, "while away 2") is True
    with open_storage(server.db_url) as storage:
        assert storage.pending_count(numeric_id(fin_id)) == 2
        assert storage.pending_count(numeric_id(rst_id)) == 2

    # The server survived: a new client is served.
    with server.connect() as other:
        other_id = identify(other)
        assert_drained(other, put, other_id, "server alive")

    for cid in (fin_id, rst_id):
        with server.connect() as back:
            assert identify(back, cid) == cid
            assert back.read_lines(2) == ["MESSAGE: while away 1", "MESSAGE: while away 2"]
            assert_drained(back, put, cid, f"marker {cid}")


def test_line_too_long(server: ServerProcess, put: Put) -> None:
    # 1025 bytes and no newline yet: over the limit.
    with server.connect() as client:
        identify(client)
        client.send(b"x" * 1025)
        assert client.wait_closed() == ["ERROR: line too long (limit 1024 bytes)"]

    # 1024 bytes with the newline is allowed; 1025 is not.
    with server.connect() as client:
        identify(client)
        client.send(b"y" * 1023 + b"\n")
        assert client.read_line() == "Invalid command: " + "y" * 1023
        client.send(b"z" * 1024 + b"\n")
        assert client.wait_closed() == ["ERROR: line too long (limit 1024 bytes)"]

    # During the handshake.
    with server.connect() as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send(b"1" * 3000)
        assert client.wait_closed() == ["ERROR: line too long (limit 1024 bytes)"]

    with server.connect() as client:
        cid = identify(client)
        assert_drained(client, put, cid, "server alive")


# --- options, signals, restarts -------------------------------------------------


def test_handshake_timeout(db_url: str) -> None:
    with ServerProcess(db_url, "--handshake-timeout", "1") as proc, Enqueuer(db_url, proc.peers) as enq:
        start = time.monotonic()  # before the server's clock for these connections starts
        silent, partial, prompt = proc.connect(), proc.connect(), proc.connect()
        try:
            assert silent.read_line() == "GET_CLIENT_ID"
            assert partial.read_line() == "GET_CLIENT_ID"
            partial.send(b"12")  # no newline: not an answer yet
            cid = identify(prompt)

            for client in (silent, partial):
                lines = client.wait_closed(timeout=5)
                assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
                assert "1 s" in lines[0], lines
            assert time.monotonic() - start >= 0.99, "closed before the handshake timeout"

            # Identified in time: the timeout no longer applies.
            prompt.send_line("FOO")
            assert prompt.read_line() == "Invalid command: FOO"
            assert_drained(prompt, enq.enqueue, cid, "still connected")
        finally:
            for client in (silent, partial, prompt):
                client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown(db_url: str, sig: signal.Signals) -> None:
    proc = ServerProcess(db_url).start()
    identified = handshaking = None
    try:
        identified, handshaking = proc.connect(), proc.connect()
        with Enqueuer(db_url, proc.peers) as enq:
            cid = identify(identified)
            assert enq.enqueue(cid, "before shutdown") is True
            assert identified.read_line() == "MESSAGE: before shutdown"
        assert handshaking.read_line() == "GET_CLIENT_ID"

        assert proc.proc is not None
        start = time.monotonic()
        proc.proc.send_signal(sig)
        for client in (identified, handshaking):
            lines = client.wait_closed(timeout=3)
            assert all(line.startswith("ERROR: ") for line in lines), lines
        try:
            status = proc.proc.wait(timeout=max(0.1, 3 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within 3 s of {sig.name}:\n{proc.log}")
        assert status == 0, proc.log
        assert "Traceback" not in proc.log, proc.log
    finally:
        for client in (identified, handshaking):
            if client is not None:
                client.close()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def test_restart_delivers_pending(db_url: str) -> None:
    with ServerProcess(db_url) as first, Enqueuer(db_url, first.peers) as enq:
        with first.connect() as client:
            cid = identify(client)
            assert enq.enqueue(cid, "before restart") is True
            assert client.read_line() == "MESSAGE: before restart"
            client.send_line("DISCONNECT")
            assert client.wait_closed() == []
        assert first.stop() == 0
        for i in range(3):
            assert enq.enqueue(cid, f"while down {i}") is True

        # Back on the same ports (as an init system would restart it), so the
        # enqueuer's peer list stays right; the old connections' TIME_WAIT
        # must not keep it from listening.
        second = ServerProcess(db_url, port=first.port, event_port=first.event_port)
        with second, second.connect() as client:
            assert identify(client, cid) == cid
            assert client.read_lines(3) == [f"MESSAGE: while down {i}" for i in range(3)]
            assert enq.enqueue(cid, "live after restart") is True
            assert client.read_line() == "MESSAGE: live after restart"
            assert_drained(client, enq.enqueue, cid, "after restart")


def test_two_servers_one_database(db_url: str) -> None:
    with ServerProcess(db_url) as a, ServerProcess(db_url) as b, \
            Enqueuer(db_url, f"{a.peers},{b.peers}") as enq:
        put = enq.enqueue
        on_a, on_b, mover_a = a.connect(), b.connect(), a.connect()
        mover_b: Optional[RawClient] = None
        try:
            id_a, id_b, mover = identify(on_a), identify(on_b), identify(mover_a)
            assert put(id_a, "to a client of A") is True
            assert put(id_b, "to a client of B") is True
            assert put(mover, "first, on A") is True
            assert on_a.read_line() == "MESSAGE: to a client of A"
            assert on_b.read_line() == "MESSAGE: to a client of B"
            assert mover_a.read_line() == "MESSAGE: first, on A"
            assert_drained(on_a, put, id_a, "marker A")
            assert_drained(on_b, put, id_b, "marker B")

            # The mover connects to B while still connected to A.
            mover_b = b.connect()
            assert identify(mover_b, mover) == mover
            assert put(mover, "after the move") is True
            assert mover_b.read_line() == "MESSAGE: after the move"
            assert mover_a.wait_closed() == [], "A must close the old connection, delivering nothing"
            assert_drained(mover_b, put, mover, "marker mover")

            # And back to A while still connected to B.
            mover_a.close()
            mover_a = a.connect()
            assert identify(mover_a, mover) == mover
            assert put(mover, "back on A") is True
            assert mover_a.read_line() == "MESSAGE: back on A"
            assert mover_b.wait_closed() == [], "B must close the old connection, delivering nothing"
            assert_drained(mover_a, put, mover, "marker mover on A")
            # Both servers still serve their own clients.
            assert_drained(on_a, put, id_a, "marker A again")
            assert_drained(on_b, put, id_b, "marker B again")
        finally:
            for client in (on_a, on_b, mover_a, mover_b):
                if client is not None:
                    client.close()


def test_client_class(server: ServerProcess, put: Put) -> None:
    client = Client("127.0.0.1", server.port, timeout=10)
    cid = client.connect()
    assert cid == client.client_id and ID_LINE.fullmatch(f"SET_CLIENT_ID: {cid}")
    assert put(cid, "hello client") is True
    assert client.receive(timeout=10) == "hello client"
    client.send_command("FOO")
    assert client.read_line(timeout=10) == "Invalid command: FOO"
    client.disconnect()
    assert client.closed
    wait_until(disconnected(server, cid), message="the server to see the DISCONNECT")

    assert put(cid, "away 1") is True
    assert put(cid, "away 2") is True
    with Client("127.0.0.1", server.port, client_id=cid, timeout=10) as again:
        assert again.client_id == cid
        assert again.receive(timeout=10) == "away 1"
        assert again.receive(timeout=10) == "away 2"
        assert put(cid, "live") is True
        assert again.receive(timeout=10) == "live"
        again.send_command("DISCONNECT")
        assert again.receive(timeout=10) is None  # the server closed the connection
        assert again.notices == []

    with Client("127.0.0.1", server.port, client_id="not-an-id", timeout=10) as fresh:
        assert fresh.client_id not in (None, cid)


# --- command line -----------------------------------------------------------------


def test_help_exits_0() -> None:
    result = run_cli("-h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m messaging_server")
    for option in ("--port", "--db", "--event-port", "--handshake-timeout"):
        assert option in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("url", ["postgres://localhost/niki", "sqlite:///", "mysql://127.0.0.1"])
def test_bad_db_url_exits_2(url: str) -> None:
    result = run_cli("-p", "0", "--db", url)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("messaging_server: "), result.stderr
    assert repr(url) in result.stderr or url in result.stderr, result.stderr
    assert "sqlite:///" in result.stderr or "mysql://" in result.stderr, "no valid form shown"


def test_unreachable_mysql_exits_1() -> None:
    result = run_cli("-p", "0", "--db", "mysql://root@127.0.0.1:1/x")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("messaging_server: "), result.stderr
    assert "Can't connect" in last and "127.0.0.1" in last, result.stderr


def test_port_in_use_exits_1(db_url: str) -> None:
    env = {"NIKI_DB": db_url}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("-p", str(port), "--event-port", "0", env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot listen: cannot bind the client port (TCP)" in result.stderr, result.stderr
    assert f"port {port}: Address already in use" in result.stderr, result.stderr

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        result = run_cli("-p", "0", "--event-port", str(port), env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot listen: cannot bind the wake-up port (UDP)" in result.stderr, result.stderr
    assert f"port {port}: Address already in use" in result.stderr, result.stderr

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("-p", "0", "--http-port", str(port), env=env)
    assert result.returncode == 1, result.stderr
    assert "cannot listen: cannot bind the HTTP API port (TCP)" in result.stderr, result.stderr
    assert f"127.0.0.1:{port}: Address already in use" in result.stderr, result.stderr
