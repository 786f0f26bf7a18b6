"""Hostile input against a real server process, while a normal client keeps receiving.

Every test starts ``python -m messaging_server --handshake-timeout 1`` and a
*canary*: one connected client plus an enqueuer thread queueing ``canary <n>``
for it every ~20 ms.  Then it throws one kind of hostile input at the server
over real TCP or UDP -- random bytes, invalid UTF-8, NUL bytes, a 10 MiB line,
a flood of commands whose replies are never read, half handshakes, a
connect-and-close storm, commands instead of an id, garbage wake-up datagrams
-- twice: a warm-up round and a second, identical round.  After each round the
server must settle back to its baseline (threads, accepted client sockets, file
descriptors other than the database pool's, handlers still open according to
its log), and its resident memory after the second round must not exceed that
after the warm-up round by more than 3 MiB (plus 1 MiB per database connection
its pool opened during the second round).
At the end a fresh client must still handshake and receive a message, the
canary must have received every message it queued exactly once, in order and
within CANARY_MAX_DELAY, and the server's log must hold no traceback.

Process figures come from /proc/<pid>/status (VmRSS, VmHWM, Threads),
/proc/<pid>/fd and /proc/<pid>/net/{tcp,tcp6,udp,udp6}; each test prints
them (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest

from messaging_server import Enqueuer
from messaging_server.protocol.credentials import redact
from tests.helpers import CREDENTIAL, RawClient, ServerProcess, numeric_id, recv_before, wait_until

MiB = 1024 * 1024
LIMIT = 1024  # protocol.MAX_CLIENT_LINE, restated: the wire contract under test
TOO_LONG = b"ERROR: line too long (limit 1024 bytes)"
HANDSHAKE_TIMEOUT = "1"
HANDSHAKE_TIMED_OUT = b"ERROR: no client id within 1 s"
SERVER_ARGS = ("--handshake-timeout", HANDSHAKE_TIMEOUT)

CANARY_INTERVAL = 0.02
# The server sweeps every 2 s, so a wake-up datagram lost in a flood may cost
# one sweep interval; twice that is the bound on any canary message's delay.
CANARY_MAX_DELAY = 4.0
ROUND_GROWTH_LIMIT = 3 * MiB  # VmRSS after the second round minus after the warm-up round
# ...plus this much per database connection the server's pool opened during the second round
# (measured: about 0.8 MiB per PyMySQL connection; a SQLite connection has its page cache).
DB_CONNECTION_ALLOWANCE = 1 * MiB
BIG_LINE = 10 * MiB
BIG_LINE_GROWTH_LIMIT = 5 * MiB
SETTLE_TIMEOUT = 15.0
READ_TIMEOUT = 10.0
TCP_LISTEN = 0x0A
ID_RE = re.compile(rf"SET_CLIENT_ID: ({CREDENTIAL})".encode())
TRACEBACK_RE = re.compile(r"Traceback|Exception occurred|^\S+ \S+ (?:ERROR|CRITICAL) ", re.M)


# --- reading /proc -------------------------------------------------------------


def proc_status(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def tcp_sockets(pid: int) -> Dict[int, Tuple[int, int, int]]:
    """inode -> (local port, remote port, state) for every TCP socket in the server's namespace."""
    table: Dict[int, Tuple[int, int, int]] = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                table[int(parts[9])] = (int(parts[1].rsplit(":", 1)[1], 16),
                                        int(parts[2].rsplit(":", 1)[1], 16), int(parts[3], 16))
    return table


def tcp_rx_queue(pid: int, local_port: int, remote_port: int) -> Optional[int]:
    """Bytes the server has not read yet on its socket from ``remote_port``; None when gone."""
    for name in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if (int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16)) == (
                        local_port, remote_port):
                    return int(parts[4].split(":")[1], 16)
    return None


def udp_queue(pid: int, port: int) -> Tuple[int, int]:
    """(bytes waiting in the receive queue, datagrams dropped) of the UDP socket bound to ``port``."""
    for name in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return int(parts[4].split(":")[1], 16), int(parts[12])
    raise AssertionError(f"no UDP socket on port {port}")


def handler_ends(log: str) -> int:
    """Connection handlers the log shows ended: a connection's one INFO line is its end."""
    return log.count(" disconnected from ")


@dataclass(frozen=True)
class Snapshot:
    rss: int
    hwm: int
    threads: int
    clients: int  # accepted TCP connections on the client port
    fds: int  # every descriptor but the database pool's (which grows on demand)
    db_fds: int
    # Handlers the log shows ended; that every handler ends shows in ``threads`` (one each).
    ended_handlers: int

    def settled_like(self, base: Snapshot) -> bool:
        """Back to ``base``: fewer other descriptors than it is not a leak (a database
        connection being opened while ``base`` was taken is not yet known as one)."""
        return (self.threads, self.clients) == (base.threads, base.clients) and self.fds <= base.fds

    def describe(self) -> str:
        return (f"rss={self.rss / MiB:.1f} MiB threads={self.threads} clients={self.clients} "
                f"fds={self.fds} (+{self.db_fds} database) ended handlers={self.ended_handlers}")


# --- the canary ------------------------------------------------------------------


class Canary:
    """A connected client and a thread queueing ``canary <n>`` for it every CANARY_INTERVAL."""

    def __init__(self, server: ServerProcess, enqueuer: Enqueuer) -> None:
        self.enqueuer = enqueuer
        self.client = server.connect()
        self.client_id = self.client.handshake()
        self.sent: List[float] = []  # message n was queued at sent[n] (monotonic)
        self.arrived: List[Tuple[int, float]] = []
        self.problems: List[str] = []
        self._lock = threading.Lock()
        self._stop_sending = threading.Event()
        self._stop_reading = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="canary-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="canary-read", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._sender.start()
        wait_until(lambda: self.arrived or self.problems, 10, "the canary's first message")
        assert not self.problems, self.problems

    def _send_loop(self) -> None:
        n = 0
        while True:
            queued_at = time.monotonic()
            try:
                queued = self.enqueuer.enqueue(self.client_id, f"canary {n}")
            except Exception as exc:
                self._problem(f"enqueue of canary {n} failed: {exc!r}")
                return
            if not queued:
                self._problem(f"canary {n} was taken for a duplicate")
                return
            with self._lock:
                self.sent.append(queued_at)
            n += 1
            if self._stop_sending.wait(max(0.0, queued_at + CANARY_INTERVAL - time.monotonic())):
                return

    def _read_loop(self) -> None:
        sock, buf = self.client.sock, self.client.buf
        sock.settimeout(0.1)
        while not self._stop_reading.is_set():
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                self._problem(f"the canary's connection failed: {exc!r}")
                return
            now = time.monotonic()
            if not chunk:
                self._problem(f"the server closed the canary's connection (unread {buf!r})")
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                match = re.fullmatch(rb"MESSAGE: canary ([0-9]+)", line)
                if match is None:
                    self._problem(f"the canary got {line!r}")
                    continue
                with self._lock:
                    self.arrived.append((int(match.group(1)), now))

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def queued_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(start <= t <= end for t in self.sent)

    def stop(self) -> None:
        self._stop_sending.set()
        self._stop_reading.set()
        self._sender.join(5)
        self._reader.join(5)
        self.client.close()

    def verify(self) -> Dict[str, float]:
        """Stop queueing; every message must arrive once, in order, in time. Returns delay figures."""
        self._stop_sending.set()
        self._sender.join(10)
        assert not self._sender.is_alive(), "the canary's enqueue hangs"
        count = len(self.sent)

        def all_in() -> bool:
            with self._lock:
                return bool(self.problems) or {n for n, _ in self.arrived} >= set(range(count))

        try:
            wait_until(all_in, CANARY_MAX_DELAY + 5, f"all {count} canary messages")
        finally:
            self._stop_reading.set()
            self._reader.join(5)
        assert not self.problems, self.problems
        numbers = [n for n, _ in self.arrived]
        assert numbers == list(range(count)), (
            f"canary: {count} queued; arrived out of order, twice or not at all: "
            f"missing {sorted(set(range(count)) - set(numbers))[:20]}, "
            f"duplicated {sorted(n for n in set(numbers) if numbers.count(n) > 1)[:20]}, "
            f"first disorder at {next((i for i, n in enumerate(numbers) if n != i), None)}")
        delays = sorted(max(0.0, t - self.sent[n]) for n, t in self.arrived)
        figures = {"messages": count, "median_ms": statistics.median(delays) * 1000,
                   "p99_ms": delays[int(len(delays) * 0.99)] * 1000, "max_ms": delays[-1] * 1000}
        assert delays[-1] < CANARY_MAX_DELAY, f"a canary message took {delays[-1]:.2f} s: {figures}"
        return figures


# --- the harness: server, canary, baseline, rounds ----------------------------------


class Harness:
    def __init__(self, server: ServerProcess, db_url: str, name: str) -> None:
        self.server = server
        self.name = name
        self.pid = server.proc.pid
        self.db_url = db_url
        parts = urlsplit(db_url)
        self._sqlite_path = db_url.split(":///", 1)[1] if db_url.startswith("sqlite:") else None
        self._db_port = parts.port or 3306
        self.enqueuer = Enqueuer(db_url, peers=server.peers)
        self.canary = Canary(server, self.enqueuer)
        self.baseline: Optional[Snapshot] = None
        self.attacks: List[Tuple[float, float]] = []
        self.figures: List[str] = []
        self.reported = False

    def start(self) -> None:
        self.canary.start()
        # The canary's traffic can make the database pool open a connection at any
        # moment, and a socket between socket() and connect() is not yet known as the
        # database's: take as baseline three snapshots in a row that agree.
        recent: List[Snapshot] = []

        def steady() -> bool:
            recent.append(self.snapshot())
            return len(recent) >= 3 and all(s.settled_like(recent[-1]) and s.fds == recent[-1].fds
                                             for s in recent[-3:])

        wait_until(steady, 10, "a steady baseline")
        self.baseline = recent[-1]
        self.note(f"baseline {self.baseline.describe()}")

    def close(self) -> None:
        self.canary.stop()
        self.enqueuer.close()

    def note(self, text: str) -> None:
        self.figures.append(text)

    # --- measuring ---

    def snapshot(self) -> Snapshot:
        status = proc_status(self.pid)
        sockets = tcp_sockets(self.pid)
        clients = fds = db_fds = 0
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except FileNotFoundError:  # closed meanwhile
                continue
            match = re.fullmatch(r"socket:\[([0-9]+)\]", target)
            tcp = sockets.get(int(match.group(1))) if match else None
            if (self._sqlite_path and target.startswith(self._sqlite_path)) or (
                    tcp is not None and self._sqlite_path is None and tcp[1] == self._db_port):
                db_fds += 1
                continue
            fds += 1
            if tcp is not None and tcp[0] == self.server.port and tcp[2] != TCP_LISTEN:
                clients += 1
        log = self.server.log
        handlers = handler_ends(log)
        return Snapshot(_kib(status["VmRSS"]), _kib(status["VmHWM"]), int(status["Threads"]),
                        clients, fds, db_fds, handlers)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (``echo 5 > clear_refs``); False where not allowed."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def settle(self, what: str) -> Snapshot:
        """Wait until threads, sockets, descriptors and handlers are back to the baseline."""
        assert self.baseline is not None
        latest: List[Snapshot] = []

        def settled() -> bool:
            latest[:] = [self.snapshot()]
            return latest[0].settled_like(self.baseline)

        try:
            wait_until(settled, SETTLE_TIMEOUT, f"the server to settle after {what}")
        except AssertionError:
            raise AssertionError(
                f"the server did not return to its baseline within {SETTLE_TIMEOUT} s after {what}:\n"
                f"  baseline {self.baseline.describe()}\n  now      {latest[0].describe()}\n"
                f"log tail:\n{self.log_tail()}") from None
        self.assert_alive()
        return latest[0]

    def assert_alive(self) -> None:
        code = self.server.proc.poll()
        assert code is None, f"the server exited with {code}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.server.log.splitlines()[-lines:])

    # --- the rounds ---

    def two_rounds(self, attack: Callable[[int], None], what: str) -> None:
        """``attack(0)`` (warm-up), settle, ``attack(1)``, settle; memory must not keep growing."""
        settled_after: List[Snapshot] = []
        for round_no in range(2):
            peak = PeakSampler(self.pid)
            start = time.monotonic()
            with peak:
                attack(round_no)
            self.attacks.append((start, time.monotonic()))
            settled = self.settle(f"{what} (round {round_no + 1})")
            settled_after.append(settled)
            self.note(f"round {round_no + 1}: {time.monotonic() - start:.2f} s, peak threads "
                      f"{peak.threads}, peak rss {peak.rss / MiB:.1f} MiB; settled {settled.describe()}")
        warm, second = settled_after
        growth = second.rss - warm.rss
        # Database connections the pool opened during the second round are not a leak.
        fds_per_connection = 2 if self._sqlite_path else 1  # SQLite: the file and its WAL
        new_connections = max(0, -(-(second.db_fds - warm.db_fds) // fds_per_connection))
        limit = ROUND_GROWTH_LIMIT + new_connections * DB_CONNECTION_ALLOWANCE
        self.note(f"VmRSS after warm-up {warm.rss / MiB:.2f} MiB, after second round "
                  f"{second.rss / MiB:.2f} MiB: {growth / 1024:+.0f} KiB (limit {limit / MiB:.0f} MiB"
                  f"{f', {new_connections} new database connection(s)' if new_connections else ''})")
        assert growth < limit, (
            f"{what}: VmRSS grew by {growth / MiB:.2f} MiB over the second, identical round "
            f"({warm.rss} -> {second.rss} bytes; limit {limit / MiB:.0f} MiB)")

    # --- the end ---

    def finish(self) -> None:
        """A fresh client is served, the canary lost nothing, the log holds no traceback."""
        self.assert_alive()
        with self.server.connect() as fresh:
            cid = fresh.handshake()
            assert numeric_id(cid) != numeric_id(self.canary.client_id)
            sent = time.monotonic()
            assert self.enqueuer.enqueue(cid, "fresh client after the attack") is True
            assert fresh.read_line() == "MESSAGE: fresh client after the attack"
            self.note(f"fresh client {cid} served, message in {(time.monotonic() - sent) * 1000:.0f} ms")
            fresh.send_line("DISCONNECT")
            assert fresh.wait_closed() == []
        figures = self.canary.verify()
        during = sum(self.canary.queued_between(a, b) for a, b in self.attacks)
        self.note(f"canary: {figures['messages']} messages ({during} queued during the attacks), "
                  f"delay median {figures['median_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms, "
                  f"max {figures['max_ms']:.0f} ms")
        assert during > 0, "the canary queued nothing while the server was under attack"
        self.assert_log_clean()
        self.assert_alive()
        self.report()

    def report(self) -> None:
        if not self.reported:
            self.reported = True
            print(f"\n[{self.name}]\n  " + "\n  ".join(self.figures))

    def assert_log_clean(self) -> None:
        log = self.server.log
        match = TRACEBACK_RE.search(log)
        if match:
            start = max(0, match.start() - 2000)
            excerpt = log[start:match.start() + 3000]
            raise AssertionError(f"the server logged an error or a traceback:\n{excerpt}")


class PeakSampler:
    """Samples the server's thread count and RSS every few ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads = 0
        self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                status = proc_status(self.pid)
                self.threads = max(self.threads, int(status["Threads"]))
                self.rss = max(self.rss, _kib(status["VmRSS"]))
            if self._stop.wait(0.005):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def running_harness(db_url: str, name: str) -> Iterator[Harness]:
    with ServerProcess(db_url, *SERVER_ARGS) as server:
        harness = Harness(server, db_url, name)
        try:
            harness.start()
            yield harness
        finally:
            harness.report()  # the figures gathered so far, also when the test failed
            harness.close()


@pytest.fixture
def harness(db_url: str, request) -> Iterator[Harness]:
    with running_harness(db_url, request.node.name) as h:
        yield h


@pytest.fixture
def sqlite_harness(sqlite_url: str, request) -> Iterator[Harness]:
    with running_harness(sqlite_url, request.node.name) as h:
        yield h


# --- raw sockets ---------------------------------------------------------------------


def connect(port: int, timeout: float = READ_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_tolerant(sock: socket.socket, data: bytes) -> bool:
    """sendall; False when the server had already closed (EPIPE / ECONNRESET), which is allowed."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_until_closed(sock: socket.socket, timeout: float = READ_TIMEOUT) -> List[bytes]:
    """Every line until the server closes; an unterminated tail is returned as a last line."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        chunk = recv_before(sock, deadline, f"the server did not close the connection within "
                                            f"{timeout} s; read {buf[-300:]!r}")
        if not chunk:
            lines = buf.split(b"\n")
            return lines[:-1] if lines[-1] == b"" else lines
        buf += chunk


def read_line(sock: socket.socket, state: List[bytes], timeout: float = READ_TIMEOUT) -> Optional[bytes]:
    """One line (None when closed); ``state`` holds the bytes read past it."""
    deadline = time.monotonic() + timeout
    while b"\n" not in state[0]:
        chunk = recv_before(sock, deadline, f"no line within {timeout} s (buffer {state[0][-300:]!r})")
        if not chunk:
            return None
        state[0] += chunk
    line, _, state[0] = state[0].partition(b"\n")
    return line


# --- a model of the server's replies, for byte streams it must survive ------------------


def expected_replies(data: bytes) -> Tuple[List[Optional[bytes]], bool]:
    """What the server answers ``data`` sent right after connecting: (lines, closes).

    ``None`` stands for ``SET_CLIENT_ID: <a new id>``.  The rules are the wire
    contract: lines end in LF, one CR before it is dropped, a line of 1024 bytes
    or more (the LF counted) ends the connection with TOO_LONG, invalid UTF-8
    is replaced by U+FFFD, the first line is the id, DISCONNECT closes, PING is
    answered PONG and anything else is echoed as ``Invalid command: <line>``.
    """
    replies: List[Optional[bytes]] = [b"GET_CLIENT_ID"]
    identified = False
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            if len(data) - start > LIMIT:
                return [*replies, TOO_LONG], True
            return replies, False
        if end + 1 - start > LIMIT:
            return [*replies, TOO_LONG], True
        raw = data[start:end]
        start = end + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        line = raw.decode("utf-8", errors="replace")
        if not identified:
            identified = True
            replies.append(None)
            continue
        command = line.strip()
        if command == "DISCONNECT":
            return replies, True
        if command == "PING":
            replies.append(b"PONG")
        else:
            replies.append(b"Invalid command: " + line.encode("utf-8"))


def mismatch(lines: List[bytes], expected: List[Optional[bytes]]) -> Optional[str]:
    """None when ``lines`` are as ``expected``; else where they first differ."""
    for i, (got, want) in enumerate(zip(lines, expected)):
        if not (ID_RE.fullmatch(got) if want is None else got == want):
            return f"line {i}: got {got[:120]!r}, expected {(want or b'SET_CLIENT_ID: <id>')[:120]!r}"
    if len(lines) != len(expected):
        return (f"got {len(lines)} lines, expected {len(expected)}; the first extra or missing one: "
                f"{(lines[len(expected):] or expected[len(lines):])[0] or 'SET_CLIENT_ID: <id>'!r:.120}")
    return None


def random_payload(size: int) -> bytes:
    """os.urandom bytes whose first line does not name a client id (with --legacy-ids that
    would take the client over, by design) nor ask for ACK mode: any other first line gets a
    new client."""
    while True:
        data = os.urandom(size)
        words = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").split()
        if words and ((words[0].isascii() and words[0].isdigit())
                      or any(w.upper() == "ACK" for w in words[1:])):
            continue
        return data


# --- the tests -----------------------------------------------------------------------


def test_random_bytes(harness: Harness) -> None:
    """Many connections of os.urandom bytes, in odd-sized pieces, each followed by DISCONNECT,
    are answered exactly as the protocol says; more are cut off with an RST mid-stream."""
    port = harness.server.port
    outcomes: Dict[str, int] = {"closed: DISCONNECT": 0, "closed: line too long": 0, "reset by us": 0}
    lock = threading.Lock()

    def converse(seed: int) -> None:
        size = 2048 + (seed * 997) % 6144
        payload = random_payload(size)
        if seed % 5 == 4:  # random bytes, then vanish with an RST: nothing to check but cleanup
            sock = connect(port)
            send_tolerant(sock, payload)
            reset_close(sock)
            with lock:
                outcomes["reset by us"] += 1
            return
        data = payload + b"\nDISCONNECT\n"
        expected, closes = expected_replies(data)
        assert closes
        with connect(port) as sock:
            offset = 0
            while offset < len(data):  # in odd-sized pieces, each its own segment (TCP_NODELAY)
                size = 1 + (seed * 131 + offset) % 1500
                if not send_tolerant(sock, data[offset:offset + size]):
                    break
                offset += size
            lines = read_until_closed(sock)
        problem = mismatch(lines, expected)
        assert problem is None, f"random bytes {payload[:32].hex()}... ({size} bytes): {problem}"
        with lock:
            outcomes["closed: line too long" if expected[-1] == TOO_LONG else "closed: DISCONNECT"] += 1

    def attack(round_no: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(converse, range(100)))

    harness.two_rounds(attack, "random bytes")
    harness.note(f"200 connections of 2-8 KiB of random bytes: {outcomes}")
    harness.finish()


def _malformed_conversation(harness: Harness, id_line: bytes, commands: List[bytes],
                            split_line: Tuple[bytes, bytes], seen: set) -> None:
    """Malformed id -> a new id; malformed commands -> exact ``Invalid command:`` echoes;
    the connection then still answers PING, receives a message and honours DISCONNECT."""
    state = [b""]
    with connect(harness.server.port) as sock:
        assert read_line(sock, state) == b"GET_CLIENT_ID"
        sock.sendall(id_line + b"\n")
        line = read_line(sock, state)
        match = ID_RE.fullmatch(line or b"")
        assert match, f"id line {id_line!r}: got {line!r}"
        cid = match.group(1).decode()
        assert numeric_id(cid) != numeric_id(harness.canary.client_id), \
            f"id line {id_line!r} took the canary's id over"
        assert numeric_id(cid) not in seen, f"id line {id_line!r} got id {cid}, handed out before"
        seen.add(numeric_id(cid))
        sock.sendall(b"".join(c + b"\n" for c in commands))
        for command in commands:
            want = b"Invalid command: " + command.decode("utf-8", errors="replace").encode("utf-8")
            assert read_line(sock, state) == want, f"command {command!r}"
        # A line whose UTF-8 is split over two writes is decoded as a whole line.
        sock.sendall(split_line[0])
        sock.sendall(split_line[1] + b"\n")
        whole = (split_line[0] + split_line[1]).decode("utf-8", errors="replace").encode("utf-8")
        assert read_line(sock, state) == b"Invalid command: " + whole
        sock.sendall(b"PING\n")
        assert read_line(sock, state) == b"PONG"
        body = f"to the client of {id_line[:40]!r}"
        assert harness.enqueuer.enqueue(cid, body) is True
        assert read_line(sock, state) == f"MESSAGE: {body}".encode()
        sock.sendall(b"DISCONNECT\n")
        assert read_line(sock, state) is None and state[0] == b""


BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xe2\x82", b"caf\xe9", b"\x80\x80\x80", b"PING\xff", b"DISCONNECT\xc3"]
NUL_COMMANDS = [b"\x00", b"PING\x00", b"\x00PING", b"PI\x00NG", b"DISCONNECT\x00", b"\x00DISCONNECT",
                b"NONE\x00", b"\x00" * 1000, b"ACK\x001"]


@pytest.mark.parametrize("kind", ["invalid-utf8", "nul"])
def test_invalid_utf8_and_nul_bytes(harness: Harness, kind: str) -> None:
    """Invalid UTF-8 and NUL bytes in the id line and in commands: new ids (never the id the
    bytes around a NUL spell), exact ``Invalid command:`` echoes, the connection stays usable."""
    canary = harness.canary.client_id.encode()
    if kind == "invalid-utf8":
        id_lines = [*BAD_UTF8, canary + b"\xff", b"\xef\xbb\xbf" + canary, canary + b"\xc0"]
        commands, split = BAD_UTF8, (b"\xe2\x82", b"\xac euro")
    else:
        id_lines = [b"\x00", canary + b"\x00", b"\x00" + canary, canary + b"\x001", b"NONE\x00",
                    b"\x00" * 1000, canary[:1] + b"\x00" + canary[1:]]
        commands, split = NUL_COMMANDS, (b"PI", b"\x00NG")
    seen: set = set()

    def attack(round_no: int) -> None:
        for id_line in id_lines * 3:
            _malformed_conversation(harness, id_line, commands, split, seen)

    harness.two_rounds(attack, kind)
    malformed = harness.server.log.count("presented malformed client id")
    assert malformed >= 6 * len(id_lines), f"{malformed} malformed ids logged"
    harness.note(f"{6 * len(id_lines)} malformed id lines -> {len(seen)} new distinct ids; "
                 f"{6 * len(id_lines) * (len(commands) + 1)} malformed commands echoed")
    harness.finish()


def _blast(sock: socket.socket, data: bytes, total: int, result: Dict[str, object]) -> None:
    """Send ``total`` bytes of ``data`` repeated; record how far it got and why it stopped."""
    view = memoryview(data)
    sent = 0
    try:
        while sent < total:
            sent += sock.send(view[: min(len(data), total - sent)])
    except (BrokenPipeError, ConnectionResetError) as exc:
        result["error"] = type(exc).__name__
    except OSError as exc:  # a timeout: the server neither read nor closed
        result["error"] = repr(exc)
    result["sent"] = sent


def test_ten_mib_line(sqlite_harness: Harness) -> None:
    """10 MiB without a newline, as the id and as a command: the server answers TOO_LONG at
    once and closes, and never holds the line (peak RSS, VmHWM, grows by less than 5 MiB)."""
    harness = sqlite_harness
    port = harness.server.port

    def one(where: str) -> None:
        before = harness.snapshot()
        hwm_reset = harness.reset_peak()
        state = [b""]
        sock = connect(port)
        try:
            assert read_line(sock, state) == b"GET_CLIENT_ID"
            if where == "command":
                sock.sendall(b"NONE\n")
                assert ID_RE.fullmatch(read_line(sock, state) or b"")
            result: Dict[str, object] = {}
            filler = (b"1" if where == "id" else b"A") * 65536
            sender = threading.Thread(target=_blast, args=(sock, filler, BIG_LINE, result), daemon=True)
            started = time.monotonic()
            sender.start()
            lines = read_until_closed(sock)
            closed_after = time.monotonic() - started
            sender.join(READ_TIMEOUT)
            assert not sender.is_alive(), "sending went on after the server closed"
        finally:
            sock.close()
        assert state[0] == b"" and lines == [TOO_LONG], f"10 MiB {where} line: got {lines!r}"
        after = harness.snapshot()
        peak = max(after.hwm if hwm_reset else after.rss, after.rss)
        harness.note(f"10 MiB {where} line: closed after {closed_after * 1000:.0f} ms; the kernel took "
                     f"{result.get('sent', 0) / MiB:.2f} MiB before {result.get('error', 'no error')}; "
                     f"VmRSS {before.rss / MiB:.2f} -> {after.rss / MiB:.2f} MiB, peak (VmHWM"
                     f"{'' if hwm_reset else ' unavailable'}) {peak / MiB:.2f} MiB")
        assert peak - before.rss < BIG_LINE_GROWTH_LIMIT, (
            f"10 MiB {where} line: server memory peaked {(peak - before.rss) / MiB:.2f} MiB above "
            f"{before.rss / MiB:.2f} MiB: it buffered the line")
        assert after.rss - before.rss < BIG_LINE_GROWTH_LIMIT

    def attack(round_no: int) -> None:
        for where in ("id", "command", "id", "command"):
            one(where)

    harness.two_rounds(attack, "10 MiB lines")
    assert harness.server.log.count("(client id line too long)") == 4
    assert harness.server.log.count("(line longer than 1024 bytes)") == 4
    harness.finish()


FLOOD_BYTES = 2 * MiB
FLOOD_SECONDS = 3.0


@pytest.mark.parametrize("command", [b"PING", b"x"], ids=["PING", "junk"])
def test_command_flood_without_reading(sqlite_harness: Harness, command: bytes) -> None:
    """An identified client pipelines 2 MiB of short commands (PING, or junk that is echoed as
    ``Invalid command: x``) and never reads a reply.  Whatever the server does -- stop reading
    from it, or drop it -- it must not queue the replies without bound: its peak memory
    (VmHWM) stays within 5 MiB of where it was, like for the 10 MiB line."""
    harness = sqlite_harness
    port = harness.server.port
    chunk = (command + b"\n") * (65536 // (len(command) + 1))

    def attack(round_no: int) -> None:
        before = harness.snapshot()
        hwm_reset = harness.reset_peak()
        state = [b""]
        sock = connect(port)
        outcome = "all sent"
        sent = 0
        try:
            assert read_line(sock, state) == b"GET_CLIENT_ID"
            sock.sendall(b"NONE\n")
            assert ID_RE.fullmatch(read_line(sock, state) or b"")
            local_port = sock.getsockname()[1]
            sock.settimeout(0.5)  # no progress for 0.5 s: the server stopped reading from us
            deadline = time.monotonic() + FLOOD_SECONDS
            try:
                while sent < FLOOD_BYTES and time.monotonic() < deadline:
                    sent += sock.send(chunk)
            except socket.timeout:
                outcome = "the server stopped reading (back-pressure)"
            except (BrokenPipeError, ConnectionResetError) as exc:
                outcome = f"the server closed the connection ({type(exc).__name__})"
            flood_time = time.monotonic() - deadline + FLOOD_SECONDS
            # Let the server work through what reached it (a server applying back-pressure
            # leaves the rest unread: then this waits at most 5 s, which is fine too).
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not tcp_rx_queue(harness.pid, port, local_port), 5,
                           "the server to read what it was sent")
            unread = tcp_rx_queue(harness.pid, port, local_port)
            during = harness.snapshot()
        finally:
            reset_close(sock)
        peak = max(during.hwm if hwm_reset else during.rss, during.rss)
        harness.note(f"{command.decode()} flood: the kernel took {sent / MiB:.2f} MiB "
                     f"({sent // len(command + b'x')} commands) in {flood_time:.2f} s, {outcome}; "
                     f"{unread} bytes still unread by the server 5 s later; VmRSS "
                     f"{before.rss / MiB:.1f} -> {during.rss / MiB:.1f} MiB, peak (VmHWM) "
                     f"{peak / MiB:.1f} MiB")
        assert peak - before.rss < BIG_LINE_GROWTH_LIMIT, (
            f"{sent / MiB:.2f} MiB of {command.decode()!r} commands, replies unread: server memory "
            f"peaked {(peak - before.rss) / MiB:.1f} MiB above {before.rss / MiB:.1f} MiB "
            f"(RSS now {during.rss / MiB:.1f} MiB): the replies are queued without bound")

    harness.two_rounds(attack, f"a {command.decode()} flood")
    harness.finish()


def test_half_handshakes(harness: Harness) -> None:
    """Silent connections, partial id lines (the canary's id among them) and a slowloris that
    dribbles digits are all dropped after the 1 s handshake timeout, never sooner."""
    port = harness.server.port
    canary = harness.canary.client_id.encode()
    partials = [b"12", canary, b"NONE", b"  ", b"\xff\x00", b"9" * 1000]

    def dribble(sock: socket.socket, stop: threading.Event) -> None:
        # One digit every 50 ms, never a newline, until the server hangs up.
        while not stop.wait(0.05):
            try:
                sock.send(b"7")
            except OSError:
                return

    silent_count, slowloris_count = 100, 4
    greeted_then_dropped = [b"GET_CLIENT_ID", HANDSHAKE_TIMED_OUT]

    def attack(round_no: int) -> None:
        # (name, socket, when we started connecting, bytes read already, lines expected)
        socks: List[Tuple[str, socket.socket, float, List[bytes], List[bytes]]] = []
        stop = threading.Event()
        dribblers = []
        try:
            for i in range(silent_count):
                started = time.monotonic()
                socks.append((f"silent {i}", connect(port), started, [b""], greeted_then_dropped))
            for i, partial in enumerate(partials * 3):
                started = time.monotonic()
                sock = connect(port)
                state = [b""]
                assert read_line(sock, state) == b"GET_CLIENT_ID"
                sock.sendall(partial)
                socks.append((f"partial {partial[:10]!r} ({i})", sock, started, state, [HANDSHAKE_TIMED_OUT]))
            for i in range(slowloris_count):
                started = time.monotonic()
                sock = connect(port)
                thread = threading.Thread(target=dribble, args=(sock, stop), daemon=True)
                thread.start()
                dribblers.append(thread)
                socks.append((f"slowloris {i}", sock, started, [b""], greeted_then_dropped))
            for name, sock, started, state, expected in socks:
                lines = [*state[0].split(b"\n")[:-1], *read_until_closed(sock, timeout=5)]
                waited = time.monotonic() - started
                assert lines == expected, f"{name}: {lines!r}"
                assert waited >= 0.99, f"{name}: dropped after {waited:.2f} s, before the timeout"
        finally:
            stop.set()
            for thread in dribblers:
                thread.join(5)
            for entry in socks:
                entry[1].close()
        last = time.monotonic() - socks[0][2]
        harness.note(f"{len(socks)} half handshakes all dropped, the last {last:.2f} s after the first "
                     "connected")
        assert last < 1 + 4, "the handshake timeout was not enforced in time"

    harness.two_rounds(attack, "half handshakes")
    expected_drops = 2 * (silent_count + 3 * len(partials) + slowloris_count)
    assert harness.server.log.count("(handshake timed out)") == expected_drops
    harness.finish()


# (how far the client gets, whether it then closes with an RST rather than a FIN)
STORM_KINDS = [("connected", False), ("connected", True), ("greeted", False), ("greeted", True),
               ("sent id", False), ("sent id", True), ("got id", True), ("sent id+PING", False),
               ("sent id+commands", True)]


def _storm_cycle(port: int, stage: str, rst: bool) -> None:
    sock = connect(port)
    try:
        if stage != "connected":
            assert sock.recv(64).startswith(b"GET_CLIENT_ID")
        if stage == "sent id+commands":
            sock.sendall(b"NONE\nPING\nHELLO\n" + b"x" * 2000)
        elif stage == "sent id+PING":
            sock.sendall(b"NONE\nPING\n")
        elif stage in ("sent id", "got id"):
            sock.sendall(b"NONE\n")
        if stage == "got id":
            state = [b""]
            assert ID_RE.fullmatch(read_line(sock, state) or b"")
    finally:
        if rst:
            reset_close(sock)
        else:
            sock.close()


def test_connect_storm(sqlite_harness: Harness) -> None:
    """500 connect-and-close cycles per round (FIN or RST; at once, after the greeting, after
    the id): threads, sockets and descriptors return to the baseline, every handler ends."""
    harness = sqlite_harness
    port = harness.server.port
    cycles = [STORM_KINDS[i % len(STORM_KINDS)] for i in range(500)]

    def attack(round_no: int) -> None:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kind: _storm_cycle(port, *kind), cycles))
        harness.note(f"500 cycles in {time.monotonic() - started:.2f} s")

    harness.two_rounds(attack, "a connect storm")
    log = harness.server.log
    harness.note(f"log: {handler_ends(log)} connections ended, "
                 f"{log.count('(write failed')} failed writes, {log.count('closed during handshake')} "
                 "closed during the handshake")
    harness.finish()


BEFORE_HANDSHAKE = [b"DISCONNECT", b"PING", b"  PING  ", b"ACK 1", b"GET_CLIENT_ID", b"PONG", b"",
                    b"MESSAGE: canary 0", b"Invalid command: x", b"DISCONNECT\r"]


def test_commands_before_handshake(harness: Harness) -> None:
    """A command in place of the id is a malformed id: a new client, the connection stays open
    (DISCONNECT does not close it, PING gets no PONG); ``SET_CLIENT_ID: <canary>`` does not
    take the canary over."""
    port = harness.server.port
    canary = harness.canary.client_id.encode()
    seen: set = set()

    def expect_new_id(line: Optional[bytes], sent: bytes) -> str:
        match = ID_RE.fullmatch(line or b"")
        assert match, f"id line {sent!r}: got {line!r}"
        cid = match.group(1).decode()
        number = numeric_id(cid)
        assert number != numeric_id(harness.canary.client_id) and number not in seen, \
            f"id line {sent!r}: id {cid}"
        seen.add(number)
        return cid

    def attack(round_no: int) -> None:
        for id_line in [*BEFORE_HANDSHAKE, b"SET_CLIENT_ID: " + canary] * 3:
            state = [b""]
            with connect(port) as sock:
                assert read_line(sock, state) == b"GET_CLIENT_ID"
                sock.sendall(id_line + b"\n")
                cid = expect_new_id(read_line(sock, state), id_line)
                sock.sendall(b"PING\n")
                assert read_line(sock, state) == b"PONG"  # the first PONG: the id line got none
                body = f"round {round_no} after id line {id_line!r} (client {cid})"
                assert harness.enqueuer.enqueue(cid, body) is True
                assert read_line(sock, state) == f"MESSAGE: {body}".encode()
                sock.sendall(b"DISCONNECT\n")
                assert read_line(sock, state) is None
        # In one packet: the first line is the id, the second a command.
        for packet, after in [(b"DISCONNECT\nDISCONNECT\n", []), (b"PING\nPING\n", [b"PONG"]),
                              (b"DISCONNECT\nPING\nDISCONNECT\n", [b"PONG"])]:
            with connect(port) as sock:
                sock.sendall(packet)
                lines = read_until_closed(sock) if packet.endswith(b"DISCONNECT\n") else None
                if lines is None:
                    state = [b""]
                    lines = [read_line(sock, state) for _ in range(3)]
                    sock.sendall(b"DISCONNECT\n")
                    lines += read_until_closed(sock)
                    assert state[0] == b""
                assert lines[0] == b"GET_CLIENT_ID" and lines[2:] == after, f"{packet!r}: {lines!r}"
                expect_new_id(lines[1], packet)

    harness.two_rounds(attack, "commands before the handshake")
    log = harness.server.log
    for raw in ["DISCONNECT", "PING", "ACK 1", f"SET_CLIENT_ID: {redact(harness.canary.client_id)}"]:
        assert f"presented malformed client id {raw!r}" in log, raw
    assert harness.canary.client_id not in log  # the secret never reaches the log
    harness.note(f"{len(seen)} commands in place of the id -> {len(seen)} new distinct ids")
    harness.finish()


def _garbage_datagrams(canary: bytes) -> List[bytes]:
    magic = b"NIKI1 "
    fixed = [
        b"", b"NIKI1", magic, b"NIKI2 " + canary, b"niki1 " + canary, b"NIKI1" + canary,
        b" NIKI1 " + canary, b"NIKI1\t" + canary, magic + b"abc", magic + b"-1", magic + b"+" + canary,
        magic + canary + b"abc", magic + b"0", magic + b"1e3", magic + b"9" * 40, magic + b"0x10",
        magic + "\u0661\u0662".encode(), magic + "\uff11\uff12".encode(),  # digits, not ASCII ones
        magic + canary + b",,", magic + b"," + canary,
        magic + canary + b"\x00", magic + b"\x00" + canary, magic + b"\xff\xfe", magic + canary + b" ",
        magic + canary + b"\n", magic + canary + b"," + b"1" * 1200,
        magic + b",".join([canary] * 400),  # the canary's id, but oversized: not a wake-up
        magic + b"1," * 30000,  # 60 KB
        os.urandom(1201), os.urandom(9000), b"\x00" * 65507,
    ]
    return fixed


def test_garbage_datagrams(harness: Harness) -> None:
    """Thousands of datagrams to the UDP event port: random bytes, wrong magic, ids that are not
    digits, oversized ones, plus forged but valid wake-ups (for the canary and for unknown ids).
    Each is ignored or costs a delivery check; the canary sees no gap and no duplicate."""
    pid, event_port = harness.pid, harness.server.event_port
    canary = str(numeric_id(harness.canary.client_id)).encode()  # wake-ups name bare ids
    fixed = _garbage_datagrams(canary)
    forged = [b"NIKI1 " + canary, b"NIKI1 " + canary + b"," + canary, b"NIKI1 999999999,1,2,3"]
    counts = {"sent": 0, "send failed": 0}
    drops_before = udp_queue(pid, event_port)[1]

    def attack(round_no: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            def send(datagram: bytes) -> None:
                try:
                    udp.sendto(datagram, ("127.0.0.1", event_port))
                    counts["sent"] += 1
                except OSError:
                    counts["send failed"] += 1

            # 12 bursts of 100, each read by the server before the next: every one is parsed.
            for burst in range(12):
                for i in range(100):
                    k = burst * 100 + i
                    if k % 10 == 0:
                        send(fixed[(k // 10) % len(fixed)])
                    elif k % 10 == 1:
                        send(forged[(k // 10) % len(forged)])
                    else:
                        send(os.urandom(1 + (k * 37) % 1400))
                wait_until(lambda: udp_queue(pid, event_port)[0] == 0, 10,
                           "the server to read its wake-up socket empty")
            # Then a flood, as fast as we can send: the socket overflows, wake-ups are lost.
            for i in range(500):
                send(os.urandom(1 + (i * 53) % 1400) if i % 3 else fixed[i % len(fixed)])
            wait_until(lambda: udp_queue(pid, event_port)[0] == 0, 10,
                       "the server to read its wake-up socket empty after the flood")
            # And a flood sustained for a second, garbage only.
            junk = [os.urandom(1 + (i * 71) % 1400) for i in range(64)]
            end = time.monotonic() + 1.0
            i = 0
            while time.monotonic() < end:
                send(junk[i % len(junk)])
                i += 1
            wait_until(lambda: udp_queue(pid, event_port)[0] == 0, 10,
                       "the server to read its wake-up socket empty after the sustained flood")

    harness.two_rounds(attack, "garbage datagrams")
    drops = udp_queue(pid, event_port)[1] - drops_before
    harness.note(f"{counts['sent']} datagrams sent ({counts['send failed']} sends failed), "
                 f"{drops} dropped by the kernel (socket full)")
    # Wake-ups still work, not only the 2 s sweep: five messages, each well under a sweep interval.
    with RawClient.connect("127.0.0.1", harness.server.port) as client:
        cid = client.handshake()
        delays = []
        for i in range(5):
            sent = time.monotonic()
            assert harness.enqueuer.enqueue(cid, f"woken {i}") is True
            assert client.read_line() == f"MESSAGE: woken {i}"
            delays.append(time.monotonic() - sent)
        harness.note(f"after the flood, wake-up deliveries took {[round(d * 1000) for d in delays]} ms")
        assert sorted(delays)[2] < 0.5, f"wake-ups no longer work, only the sweep: {delays}"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    harness.finish()
