"""Several real server processes sharing one database (MariaDB, or one SQLite file).

What is proved here, end to end over loopback TCP and UDP:

* routed wake-ups: each message wakes its client's owner only, once;
* takeover across servers: the old server closes its connection on the datagram
  the new one sends, and on its own (its sweep) when that datagram is lost;
* no lost wake-up: with every datagram dropped, the sweep delivers within one
  sweep interval;
* crash safety: a SIGKILLed server loses and duplicates nothing, a server
  restarted on its port forgets the ownership it held, and a stale owner is not
  woken;
* a disconnected client has no owner, and costs no datagram.

Every wait has a deadline; silence is asserted only after a positive marker.
Run with ``pytest -s`` to see the figures measured (delays, accounting).
"""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from messaging_server import Enqueuer
from messaging_server.protocol.wakeups import CARRY_MAGIC
from messaging_server.storage.interface import LEASE_HANDOVER_S
from tests.helpers import (
    RawClient,
    ServerProcess,
    assert_no_traceback,
    numeric_id,
    query,
    stop_together,
    wait_until,
)

SWEEP = 0.5  # --sweep-interval of the servers whose sweep is under test
MARGIN = 0.5  # scheduling slack on a loaded 2-core box, on top of a sweep interval
SILENCE = 0.3  # after a marker: long enough for a stray redelivery to show on loopback
WAKEUP_RE = re.compile(r"wake-up for client\(s\) ([0-9,]+)")
DELIVERED_RE = re.compile(r"client ([0-9]+): delivered [0-9]+ message\(s\)")


# Routed mode needs NIKI_PEERS unset; no NIKI_* setting may leak into the servers.
pytestmark = pytest.mark.usefixtures("no_niki_environment")


def niki(db_url: str, *args: str, port: int = 0, event_port: Optional[int] = None) -> ServerProcess:
    """A server (not started) whose wake-up address recorded in the database is loopback."""
    return ServerProcess(db_url, "--advertise-host", "127.0.0.1", *args, port=port, event_port=event_port)


@contextlib.contextmanager
def running(*procs: ServerProcess) -> Iterator[Tuple[ServerProcess, ...]]:
    """Start ``procs``; on the way out stop them all at once (each takes up to half a second)."""
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        stop_together(procs)
    assert_no_traceback(procs)


def server_id(proc: ServerProcess) -> int:
    rows = query(proc.db_url, "SELECT id FROM servers WHERE port = %s", (proc.port,))
    assert len(rows) == 1, rows
    return int(rows[0][0])


def owner_of(db_url: str, client_id: str) -> Optional[int]:
    rows = query(db_url, "SELECT owner_server_id FROM clients WHERE id = %s", (numeric_id(client_id),))
    assert rows, f"no client {client_id}"
    return None if rows[0][0] is None else int(rows[0][0])


def pending_bodies(db_url: str) -> Dict[int, List[str]]:
    pending: Dict[int, List[str]] = {}
    sql = "SELECT client_id, body FROM messages WHERE status = 'pending' ORDER BY id"
    for cid, body in query(db_url, sql):
        pending.setdefault(int(cid), []).append(str(body))
    return pending


def woken(proc: ServerProcess) -> Set[int]:
    """Every client id named by a wake-up datagram batch ``proc`` received (needs ``-v``)."""
    return {int(i) for m in WAKEUP_RE.finditer(proc.log) for i in m.group(1).split(",")}


def delivered_by(proc: ServerProcess) -> Set[int]:
    """Every client ``proc`` wrote messages to (needs ``-v``)."""
    return {int(m.group(1)) for m in DELIVERED_RE.finditer(proc.log)}


def assert_all_silent(clients: List[RawClient], seconds: float = SILENCE) -> None:
    """None of ``clients`` gets anything for ``seconds`` (after their markers arrived)."""
    assert all(not c.buf for c in clients), [c.buf for c in clients]
    readable, _, _ = select.select([c.sock for c in clients], [], [], seconds)
    assert not readable, "a client received something after its marker"


def udp_sink(port: int = 0) -> socket.socket:
    """A bound UDP socket on loopback that nobody reads until the test drains it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    return sock


def drain(sock: socket.socket, wait: float = 0.0) -> List[bytes]:
    """The datagrams waiting in ``sock``, after waiting up to ``wait`` for the first one."""
    got: List[bytes] = []
    if wait > 0:
        sock.settimeout(wait)
        try:
            got.append(sock.recv(2048))
        except socket.timeout:
            return got
    sock.setblocking(False)
    while True:
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            return got


class Receiver(threading.Thread):
    """One client on its own thread, recording every MESSAGE with its arrival time.

    When its connection ends and ``reconnect_to`` is set, it reconnects there with
    its id.  An incomplete last line (a write cut by the close) is discarded, as
    the protocol tells clients to.
    """

    def __init__(self, port: int, client_id: Optional[str] = None) -> None:
        super().__init__(daemon=True)
        self.client = RawClient.connect("127.0.0.1", port)
        self.client_id = self.client.handshake(client_id)
        self.received: List[Tuple[float, str]] = []
        self.other_lines: List[str] = []
        self.reconnect_to: Optional[int] = None
        self.reconnected = threading.Event()
        self.reconnected_at = 0.0
        self.before_reconnect = 0  # messages received on the first connection
        self.cut_lines = 0
        self.errors: List[BaseException] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def bodies(self) -> List[str]:
        return [body for _, body in self.arrivals()]

    def arrivals(self) -> List[Tuple[float, str]]:
        with self._lock:
            return list(self.received)

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)
        self.client.close()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._read_some():
                    return
        except BaseException as exc:
            self.errors.append(exc)

    def _read_some(self) -> bool:
        """Read what is there; False when the connection ended for good."""
        sock = self.client.sock
        sock.settimeout(0.1)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            chunk = None
        except OSError:
            chunk = b""
        if chunk is None:
            return True
        now = time.monotonic()
        if chunk:
            self.client.buf += chunk
            *lines, self.client.buf = self.client.buf.split(b"\n")
            with self._lock:
                for raw in lines:
                    line = raw.decode("utf-8")
                    if line.startswith("MESSAGE: "):
                        self.received.append((now, line[len("MESSAGE: "):]))
                    else:
                        self.other_lines.append(line)
            return True
        if self.client.buf:
            self.cut_lines += 1
        self.client.close()
        if self.reconnect_to is None:
            return False
        with self._lock:
            self.before_reconnect = len(self.received)
        self.client = RawClient.connect("127.0.0.1", self.reconnect_to)
        assert self.client.handshake(self.client_id) == self.client_id
        self.reconnected_at = time.monotonic()
        self.reconnected.set()
        return True


@contextlib.contextmanager
def receivers(port: int, count: int) -> Iterator[List[Receiver]]:
    started = [Receiver(port) for _ in range(count)]
    for r in started:
        r.start()
    try:
        yield started
    finally:
        for r in started:
            r.stop()
    for r in started:
        assert not r.errors, r.errors
        assert not r.other_lines, r.other_lines


# --- routed wake-ups over three servers -------------------------------------------


def test_three_servers_routed_wakeups(db_url: str) -> None:
    per_server, per_client = 3, 10
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(running(*(niki(db_url, "-v") for _ in range(3))))
        enq = stack.enter_context(Enqueuer(db_url))
        assert enq.mode == "routed"
        clients: Dict[str, RawClient] = {}
        home: Dict[str, ServerProcess] = {}
        for proc in servers:
            for _ in range(per_server):
                client = stack.enter_context(proc.connect())
                cid = client.handshake()
                clients[cid], home[cid] = client, proc
        ids = list(clients)
        sids = {proc.port: server_id(proc) for proc in servers}
        owners = dict(query(db_url, "SELECT id, owner_server_id FROM clients"))
        assert {int(cid): owner for cid, owner in owners.items()} == \
            {numeric_id(cid): sids[home[cid].port] for cid in ids}, \
            "each client is owned by the server it identified on"

        # Interleaved over every client of every server.
        for i in range(per_client):
            for cid in ids:
                assert enq.enqueue(cid, f"{cid} #{i}") is True
        assert enq.datagrams_sent == per_client * len(ids), "one datagram per message"

        for cid, client in clients.items():
            assert client.read_lines(per_client) == [f"MESSAGE: {cid} #{i}" for i in range(per_client)]
        for cid in ids:
            assert enq.enqueue(cid, f"marker {cid}") is True
        for cid, client in clients.items():
            assert client.read_line() == f"MESSAGE: marker {cid}"
        assert_all_silent(list(clients.values()))

        rows = query(db_url, "SELECT status, COUNT(*) FROM messages GROUP BY status")
        assert dict(rows) == {"delivered": (per_client + 1) * len(ids)}

        for proc in servers:
            own = {numeric_id(cid) for cid in ids if home[cid] is proc}
            wait_until(lambda p=proc, o=own: woken(p) >= o, message=f"server :{proc.port} woken for {own}")
            assert woken(proc) == own, f"server :{proc.port} was woken for clients it does not hold"
            assert delivered_by(proc) == own, f"server :{proc.port} delivered to clients it does not hold"
        print(f"\n3 servers, {len(ids)} clients, {per_client + 1} messages each: "
              f"{enq.datagrams_sent} datagrams, each to the owner only")


# --- takeover across servers --------------------------------------------------------


def test_takeover_across_servers_closes_old_connection_within_a_second(db_url: str) -> None:
    # A sweep interval far longer than the deadline: only the datagram can close it in time.
    with running(niki(db_url, "--sweep-interval", "30"), niki(db_url, "--sweep-interval", "30")) as (a, b), \
            Enqueuer(db_url) as enq, contextlib.ExitStack() as stack:
        ids = {a.port: server_id(a), b.port: server_id(b)}
        old = stack.enter_context(a.connect())
        cid = old.handshake()
        assert enq.enqueue(cid, "on A") is True
        assert old.read_line() == "MESSAGE: on A"
        worst = 0.0
        for round_, joining in enumerate([b, a, b]):
            start = time.monotonic()
            new = stack.enter_context(joining.connect())
            assert new.handshake(cid) == cid
            assert old.wait_closed(timeout=5) == [], "the old connection must get nothing"
            elapsed = time.monotonic() - start
            worst = max(worst, elapsed)
            assert elapsed < 1.0, f"old connection closed after {elapsed:.3f} s"
            assert owner_of(db_url, cid) == ids[joining.port]

            sent = enq.datagrams_sent
            assert enq.enqueue(cid, f"after takeover {round_}") is True
            assert enq.datagrams_sent == sent + 1
            assert new.read_line() == f"MESSAGE: after takeover {round_}"
            old.close()
            old = new
        assert enq.enqueue(cid, "marker") is True
        assert old.read_line() == "MESSAGE: marker"
        old.assert_silent(SILENCE)
        number = numeric_id(cid)
        for proc in (a, b):
            assert f"client {number}: closing " in proc.log and "taken over by a newer connection" in proc.log
            assert "seen by sweep" not in proc.log, proc.log
            assert f"client {number} taken over from server" in proc.log
        print(f"\ntakeover across servers: old connection closed within {worst * 1000:.0f} ms (worst of 3)")


def test_missed_takeover_datagram_noticed_by_sweep(db_url: str) -> None:
    with running(niki(db_url, "--sweep-interval", str(SWEEP)), niki(db_url)) as (a, b), \
            Enqueuer(db_url) as enq, a.connect() as client:
        cid = client.handshake()
        assert enq.enqueue(cid, "before") is True
        assert client.read_line() == "MESSAGE: before"
        assert owner_of(db_url, cid) == server_id(a)

        # B took the client over, but its datagram to A was lost.
        other = server_id(b)
        start = time.monotonic()
        query(db_url, "UPDATE clients SET session = session + 1, owner_server_id = %s WHERE id = %s",
              (other, numeric_id(cid)))
        assert client.wait_closed(timeout=5) == [], "the old connection must get nothing"
        elapsed = time.monotonic() - start
        assert elapsed <= SWEEP + MARGIN, f"closed after {elapsed:.3f} s"
        number = numeric_id(cid)
        wait_until(lambda: f"client {number}: closing " in a.log and "seen by sweep" in a.log,
                   message="A to log the takeover its sweep saw")
        wait_until(lambda: re.search(rf"client {number} disconnected from ", a.log),
                   message="A's handler to end")
        assert owner_of(db_url, cid) == other, "closing the old connection must not release the new owner"
        print(f"\nmissed takeover datagram: A closed the connection after {elapsed * 1000:.0f} ms "
              f"(sweep interval {SWEEP * 1000:.0f} ms)")


# --- no lost wake-up ----------------------------------------------------------------


def test_every_datagram_lost_sweep_delivers_within_interval(db_url: str) -> None:
    messages = 30
    with niki(db_url, "-v", "--sweep-interval", str(SWEEP)) as proc, \
            contextlib.closing(udp_sink()) as sink, receivers(proc.port, 3) as clients:
        # Broadcast mode to a port nobody reads: every wake-up is lost.
        with Enqueuer(db_url, [("127.0.0.1", sink.getsockname()[1])]) as enq:
            assert enq.mode == "broadcast"
            queued: Dict[str, float] = {}
            for k in range(messages):
                receiver = clients[k % len(clients)]
                body = f"{receiver.client_id} #{k}"
                queued[body] = time.monotonic()
                assert enq.enqueue(receiver.client_id, body) is True
                # Spread over several sweeps, landing at every phase of one.
                time.sleep((k * 0.071) % 0.17)
            sent = enq.datagrams_sent
        assert sent == messages

        def all_received() -> bool:
            return sum(len(r.bodies()) for r in clients) >= messages

        wait_until(all_received, timeout=SWEEP + MARGIN + 2, message="every message")
        delays: List[float] = []
        for r in clients:
            got = r.arrivals()
            expected = [body for body in queued if body.startswith(f"{r.client_id} #")]
            assert [body for _, body in got] == expected, "in order, each once"
            delays += [at - queued[body] for at, body in got]
        assert len(drain(sink)) == sent, "every wake-up went to the sink, none to the server"
        assert not WAKEUP_RE.search(proc.log), "the server received a wake-up"
        assert re.search(r"sweep: [1-9][0-9]* client\(s\) with pending messages", proc.log)
        worst = max(delays)
        print(f"\nevery datagram lost: {messages} messages, worst delay {worst * 1000:.0f} ms, "
              f"mean {sum(delays) / len(delays) * 1000:.0f} ms (sweep interval {SWEEP * 1000:.0f} ms)")
        assert worst <= SWEEP + MARGIN, f"a message waited {worst:.3f} s"
        # The mark of the last batch may commit just after its lines arrive (SQLite marks
        # in a second short transaction, after the write).
        wait_until(lambda: query(db_url, "SELECT COUNT(*) FROM messages WHERE status = 'pending'")
                   == [(0,)], timeout=5, message="every delivered message to be marked")


# --- crashes ------------------------------------------------------------------------


def test_sigkill_during_enqueue_loses_nothing(db_url: str) -> None:
    clients_on_a, per_client = 10, 40
    total = clients_on_a * per_client
    with running(niki(db_url), niki(db_url)) as (a, b), receivers(a.port, clients_on_a) as clients:
        b_id = server_id(b)
        for r in clients:
            r.reconnect_to = b.port
        queued: List[Tuple[str, str, float]] = []  # client, body, when its enqueue returned
        halfway = threading.Event()
        errors: List[BaseException] = []

        def produce() -> None:
            try:
                with Enqueuer(db_url) as enq:
                    assert enq.mode == "routed"
                    for i in range(per_client):
                        for r in clients:
                            body = f"{r.client_id} #{i:03d}"
                            assert enq.enqueue(r.client_id, body) is True
                            queued.append((r.client_id, body, time.monotonic()))
                            if len(queued) == total // 2:
                                halfway.set()
                            # Pacing, not waiting for anything: a steady stream
                            # that the kill and the reconnects land in the middle of.
                            time.sleep(0.002)
            except BaseException as exc:
                errors.append(exc)
            finally:
                halfway.set()

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            assert halfway.wait(30)
            killed_at = time.monotonic()
            a.stop(signal.SIGKILL)
            for r in clients:
                assert r.reconnected.wait(10), f"client {r.client_id} did not reconnect to B"
        finally:
            producer.join(60)
        assert not errors, errors
        assert len(queued) == total

        expected: Dict[str, List[str]] = {r.client_id: [] for r in clients}
        for cid, body, _ in queued:
            expected[cid].append(body)
        # Queued after the kill while the client was still away: routed to the dead A, lost
        # datagram; B must hand them over as the backlog of the reconnection.
        in_window = sum(1 for cid, _, at in queued for r in clients
                        if r.client_id == cid and killed_at < at < r.reconnected_at)

        def resent(r) -> int:
            """How many of A's last lines to this client B sent again at once (0 if none)."""
            got = r.bodies()
            from_a, from_b = got[:r.before_reconnect], got[r.before_reconnect:]
            return max((k for k in range(1, min(len(from_a), len(from_b)) + 1)
                        if from_a[-k:] == from_b[:k]), default=0)

        def tally() -> Dict[str, int]:
            pending = pending_bodies(db_url)
            figures = dict(queued=total, received=0, pending=0, lost=0, duplicates=0,
                           received_and_pending=0)
            for r in clients:
                got, waiting = r.bodies(), set(pending.get(numeric_id(r.client_id), []))
                figures["received"] += len(got)
                figures["duplicates"] += len(got) - len(set(got))
                figures["pending"] += len(waiting)
                figures["received_and_pending"] += len(set(got) & waiting)
                figures["lost"] += len(set(expected[r.client_id]) - set(got) - waiting)
            return figures

        def show(figures: Dict[str, int]) -> str:
            text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())
            for r in clients:
                got = r.bodies()
                for body in sorted({b for b in got if got.count(b) > 1}):
                    where = ["A" if i < r.before_reconnect else "B" for i, b in enumerate(got) if b == body]
                    last_from_a = r.before_reconnect and got[r.before_reconnect - 1] == body
                    text += (f"; {body!r} received from {' then '.join(where)}"
                             f"{' (the last line A wrote before the kill)' if last_from_a else ''}")
            return text

        try:
            wait_until(lambda: tally()["lost"] == 0, timeout=10, message="every message received or pending")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {show(tally())}") from None
        figures = tally()
        print(f"\nSIGKILL accounting: {show(figures)}; "
              f"delivered by A {sum(r.before_reconnect for r in clients)}, "
              f"queued between the kill and the reconnection {in_window}, "
              f"cut lines discarded {sum(r.cut_lines for r in clients)}, all reconnected to B "
              f"{(max(r.reconnected_at for r in clients) - killed_at) * 1000:.0f} ms after the kill")
        assert figures["lost"] == 0, show(figures)
        # Without acknowledgements, the lines A wrote in the batch whose "delivered"
        # mark the kill rolled back are sent again by B: at-least-once across a crash.
        # They must be exactly the tail of what A wrote, repeated at the head of B's.
        for r in clients:
            got = r.bodies()
            clean = got[:r.before_reconnect] + got[r.before_reconnect + resent(r):]
            assert len(clean) == len(set(clean)), f"client {r.client_id} got a repeat that is not " \
                f"A's in-flight tail: {show(figures)}"

        # Every client is connected to B: what is still pending goes out within B's sweep
        # (2 s), once B may take the delivery lease that the killed A held for a client it
        # was writing to: LEASE_HANDOVER_S after the client identified on B.
        try:
            wait_until(lambda: tally()["received"] >= total and tally()["pending"] == 0,
                       timeout=LEASE_HANDOVER_S + 2 + 2 * MARGIN, message="B to deliver everything pending")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {show(tally())}") from None
        for r in clients:
            got = r.bodies()
            clean = got[:r.before_reconnect] + got[r.before_reconnect + resent(r):]
            assert clean == expected[r.client_id], f"client {r.client_id}: lost, duplicated or reordered"
            assert owner_of(db_url, r.client_id) == b_id
        print(f"messages A wrote whose mark the kill rolled back, sent again by B: "
              f"{sum(resent(r) for r in clients)}")
        wait_until(lambda: query(db_url, "SELECT COUNT(*) FROM messages WHERE status = 'delivered'")
                   == [(total,)], timeout=5, message="every delivered message to be marked")
        print(f"SIGKILL final: {show(tally())}")


def test_restart_on_same_port_clears_ownership(db_url: str) -> None:
    with niki(db_url) as a:
        first, second = a.connect(), a.connect()
        ids = [first.handshake(), second.handshake()]
        a_id = server_id(a)
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        for client in (first, second):
            assert client.wait_closed() == []
            client.close()
        assert [owner_of(db_url, cid) for cid in ids] == [a_id, a_id], "SIGKILL leaves the ownership behind"
        with Enqueuer(db_url) as enq:
            assert enq.enqueue(ids[0], "while A was dead") is True

        with niki(db_url, port=a.port, event_port=a.event_port) as again, Enqueuer(db_url) as enq:
            new_id = server_id(again)
            assert new_id != a_id
            assert query(db_url, "SELECT COUNT(*) FROM servers WHERE id = %s", (a_id,)) == [(0,)]
            assert [owner_of(db_url, cid) for cid in ids] == [None, None]
            assert enq.enqueue(ids[1], "to an offline client") is True
            assert enq.datagrams_sent == 0, "an offline client costs no datagram"
            with again.connect() as back:
                assert back.handshake(ids[0]) == ids[0]
                assert back.read_line() == "MESSAGE: while A was dead"
                assert owner_of(db_url, ids[0]) == new_id
                assert enq.enqueue(ids[0], "after the restart") is True
                assert back.read_line() == "MESSAGE: after the restart"
                back.assert_silent(SILENCE)


STALE_HEARTBEAT = {
    "sqlite": "UPDATE servers SET heartbeat_at = strftime('%Y-%m-%d %H:%M:%f','now','-60 seconds') "
              "WHERE id = %s",
    "mysql": "UPDATE servers SET heartbeat_at = NOW(6) - INTERVAL 60 SECOND WHERE id = %s",
}


def test_stale_owner_gets_no_datagram(db_url: str) -> None:
    with running(niki(db_url), niki(db_url)) as (a, b), Enqueuer(db_url) as enq:
        client = a.connect()
        cid = client.handshake()
        a_id = server_id(a)
        a.stop(signal.SIGKILL)
        assert client.wait_closed() == []
        client.close()
        assert owner_of(db_url, cid) == a_id

        # A's UDP port, now free, stands in for it: what would it be sent?
        with contextlib.closing(udp_sink(a.event_port)) as sink:
            # Heartbeat still fresh: the dead owner looks alive and is woken (a control).
            assert enq.enqueue(cid, "owner looks alive") is True
            assert enq.datagrams_sent == 1
            [datagram] = drain(sink, wait=5)  # carrying the message, or naming the client
            assert datagram == f"NIKI1 {numeric_id(cid)}".encode() or (
                datagram.startswith(CARRY_MAGIC) and datagram.endswith(b"\nowner looks alive"))

            backend = "sqlite" if db_url.startswith("sqlite:") else "mysql"
            query(db_url, STALE_HEARTBEAT[backend], (a_id,))
            assert enq.enqueue(cid, "owner is stale") is True
            assert enq.datagrams_sent == 1, "a stale owner must not be woken"
            # A live owner still is: its datagram is the marker after which the sink must be empty.
            with b.connect() as other:
                other_id = other.handshake()
                assert enq.enqueue(other_id, "to a client of B") is True
                assert enq.datagrams_sent == 2
                assert other.read_line() == "MESSAGE: to a client of B"
            assert drain(sink) == []

            # The reconnection gets both; B sends no takeover datagram to a stale owner either.
            with b.connect() as back:
                assert back.handshake(cid) == cid
                assert back.read_lines(2) == ["MESSAGE: owner looks alive", "MESSAGE: owner is stale"]
                assert owner_of(db_url, cid) == server_id(b)
                assert enq.enqueue(cid, "marker") is True
                assert back.read_line() == "MESSAGE: marker"
                back.assert_silent(SILENCE)
            assert drain(sink) == []
            assert f"client {numeric_id(cid)} taken over from server" not in b.log


# --- ownership follows the connection -------------------------------------------------


def disconnected(proc: ServerProcess, client_id: str) -> Callable[[], bool]:
    number = numeric_id(client_id)
    return lambda: re.search(rf"client {number} disconnected from ", proc.log) is not None


def test_disconnect_clears_owner_and_one_datagram_per_message(db_url: str) -> None:
    with niki(db_url, "-v") as proc, Enqueuer(db_url) as enq:
        sid = server_id(proc)
        polite, vanishing = proc.connect(), proc.connect()
        try:
            ids = [polite.handshake(), vanishing.handshake()]
            assert [owner_of(db_url, cid) for cid in ids] == [sid, sid]
            for i in range(5):
                for cid in ids:
                    assert enq.enqueue(cid, f"live {i}") is True
            assert enq.datagrams_sent == 10, "one datagram per message"
            assert enq.enqueue(ids[0], "live 4") is False, "a duplicate is ignored"
            assert enq.datagrams_sent == 10, "an ignored duplicate costs no datagram"
            for client in (polite, vanishing):
                assert client.read_lines(5) == [f"MESSAGE: live {i}" for i in range(5)]

            polite.send_line("DISCONNECT")
            assert polite.wait_closed() == []
            vanishing.close()  # no DISCONNECT: the server sees the end of the stream
        finally:
            polite.close()
            vanishing.close()
        for cid in ids:
            wait_until(disconnected(proc, cid), message=f"client {cid}'s handler to end")
            assert owner_of(db_url, cid) is None, f"client {cid} is offline but still owned"
        lines_before = len(WAKEUP_RE.findall(proc.log))
        for cid in ids:
            assert enq.enqueue(cid, "while offline") is True
        assert enq.datagrams_sent == 10, "an offline client costs no datagram"

        with proc.connect() as back:
            assert back.handshake(ids[0]) == ids[0]
            assert back.read_line() == "MESSAGE: while offline"
            assert owner_of(db_url, ids[0]) == sid
            assert enq.enqueue(ids[0], "marker") is True
            assert enq.datagrams_sent == 11
            assert back.read_line() == "MESSAGE: marker"
            back.assert_silent(SILENCE)
        assert len(WAKEUP_RE.findall(proc.log)) <= lines_before + 1
        assert query(db_url, "SELECT COUNT(*) FROM messages WHERE client_id = %s AND status = 'pending'",
                     (numeric_id(ids[1]),)) == [(1,)]
