"""Test helpers: a real server process, a raw line client, direct SQL, and waiting with a deadline."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import pymysql
import pytest

LISTENING_RE = re.compile(r"port (\d+) \(clients, TCP\) and port (\d+) \(wake-ups, UDP\)")
# With --workers N > 1: the supervisor's line once every worker listens.
SERVING_RE = re.compile(r" supervisor (\d+) workers serving clients on port (\d+)")
# A worker's tag in its log lines (``w1``) before LISTENING_RE's text.
WORKER_LISTENING_RE = re.compile(r" (w\d+) listening on .*" + LISTENING_RE.pattern)
# Logged before LISTENING_RE's line when the server has an HTTP API.
HTTP_API_RE = re.compile(r"HTTP API on http://(?:\[[^\]]*\]|[^\s:/]+):(\d+)")
DEFAULT_TIMEOUT = 10.0
# What SET_CLIENT_ID: hands out by default: the id, a dot, 24 URL-safe characters (144 bits).
CREDENTIAL = r"[1-9][0-9]*\.[A-Za-z0-9_-]{24}"
CREDENTIAL_RE = re.compile(CREDENTIAL)


def numeric_id(credential: str) -> int:
    """The client id in ``credential`` (``<id>.<secret>`` or a bare ``<id>``), for SQL and storage calls."""
    head = str(credential).partition(".")[0]
    assert head.isascii() and head.isdigit(), f"not a credential: {credential!r}"
    return int(head)


def wait_until(predicate: Callable[[], object], timeout: float = DEFAULT_TIMEOUT,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.01)


# The servers started during the current test, newest last: their logs go into the
# report of a test that fails (conftest.py), since CI keeps nothing else of them.
STARTED: List[ServerProcess] = []


class ServerProcess:
    """``python -m messaging_server`` on free ports, its log collected in the background.

    One process (``--workers 1``) unless ``workers`` asks for more, so that a test
    that looks at the server's pid (/proc, kill -9) looks at the server itself.
    With more, :attr:`proc` is the supervisor and :attr:`event_ports` has each
    worker's wake-up port (``w0`` first).
    """

    def __init__(self, db_url: Optional[str], *args: str, env: Optional[Dict[str, str]] = None,
                 port: int = 0, event_port: Optional[int] = None, workers: int = 1,
                 http_follows_port: bool = False) -> None:
        self.db_url = db_url
        self.workers = workers
        self.args = ["--workers", str(workers), *args]
        if port and not http_follows_port and "--http-port" not in args:
            # A fixed client port (a restart on the same one) would put the HTTP API on
            # port + 2, which another test may hold: off, unless the test wants it there.
            self.args += ["--http-port", "0"]
        self.extra_env = env or {}
        self.requested_port = port
        self.requested_event_port = event_port
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.event_port = 0
        self.event_ports: Dict[str, int] = {}  # worker tag -> its wake-up port (workers > 1)
        self.http_port = 0  # the HTTP API's port, when it has one (--http-port)
        self.lines: List[str] = []
        self._lock = threading.Lock()

    def start(self, timeout: float = 20.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "messaging_server", "-p", str(self.requested_port)]
        if self.requested_event_port is not None:
            cmd += ["--event-port", str(self.requested_event_port)]
        cmd += self.args
        env = dict(os.environ, NIKI_DB=self.db_url, PYTHONUNBUFFERED="1", **self.extra_env)
        if not self.db_url:  # the default database
            del env["NIKI_DB"]
        STARTED.append(self)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, text=True, encoding="utf-8", errors="replace")
        threading.Thread(target=self._collect, daemon=True).start()
        ready = self._listening if self.workers == 1 else self._serving
        match = wait_until(lambda: ready() or self.proc.poll() is not None, timeout,
                           "the server to listen")
        if not isinstance(match, re.Match):
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
        if self.workers > 1:
            self.event_ports = {m.group(1): int(m.group(3))
                                for m in WORKER_LISTENING_RE.finditer(self.log)}
            match = self._listening()
            assert match is not None
        self.port, self.event_port = int(match.group(1)), int(match.group(2))
        http = HTTP_API_RE.search(self.log)
        self.http_port = int(http.group(1)) if http else 0
        return self

    def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _listening(self) -> Optional[re.Match]:
        with self._lock:
            for line in self.lines:
                m = LISTENING_RE.search(line)
                if m:
                    return m
        return None

    def _serving(self) -> Optional[re.Match]:
        return SERVING_RE.search(self.log)

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def log_contains(self, text: str) -> bool:
        return text in self.log

    def dump_stacks(self, timeout: float = 2.0) -> None:
        """Have a running server write every thread's stack to its log (SIGUSR1)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        before = len(self.lines)
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any("most recent call first" in line for line in self.lines[before:]):
                    time.sleep(0.2)  # the rest of the dump
                    return
            time.sleep(0.02)

    @property
    def peers(self) -> str:
        return f"127.0.0.1:{self.event_port}"

    def connect(self, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        return RawClient.connect("127.0.0.1", self.port, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"server did not exit within {timeout} s of {sig!r}\n{self.log}") from None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def stop_together(procs: Sequence[ServerProcess], timeout: float = 10.0) -> None:
    """SIGTERM every server still running at once, then wait for each (a server takes
    about half a second to stop, so one after another adds up); kill what does not exit."""
    running = [p.proc for p in procs if p.proc is not None and p.proc.poll() is None]
    for popen in running:
        popen.send_signal(signal.SIGTERM)
    for popen in running:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def assert_no_traceback(procs: Sequence[ServerProcess]) -> None:
    for proc in procs:
        assert "Traceback" not in proc.log, proc.log


class ServerGroup:
    """The servers one test starts, each with ``default_args`` first; stopped together at
    the end by :meth:`close`, which also fails the test if any logged a traceback."""

    def __init__(self, *default_args: str) -> None:
        self.default_args = default_args
        self.procs: List[ServerProcess] = []

    def start(self, db_url: str, *args: str, env: Optional[Dict[str, str]] = None) -> ServerProcess:
        proc = ServerProcess(db_url, *self.default_args, *args, env=env)
        self.procs.append(proc)
        return proc.start()

    def close(self) -> None:
        stop_together(self.procs)
        assert_no_traceback(self.procs)


class RawClient:
    """A byte-exact client for transcript tests: every line the server sends is seen."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = b""

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock, timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_line(self, text: str, crlf: bool = False) -> None:
        self.send(text.encode("utf-8") + (b"\r\n" if crlf else b"\n"))

    def read_line(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next line without its newline; None when the server closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within the timeout (buffer {self.buf!r})")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line.decode("utf-8")
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8")

    def read_lines(self, count: int, timeout: Optional[float] = None) -> List[str]:
        lines = []
        for _ in range(count):
            line = self.read_line(timeout)
            assert line is not None, f"server closed after {lines!r}"
            lines.append(line)
        return lines

    def handshake(self, client_id: Optional[str] = None) -> str:
        assert self.read_line() == "GET_CLIENT_ID"
        self.send_line(client_id or "NONE")
        line = self.read_line()
        assert line is not None and line.startswith("SET_CLIENT_ID: "), line
        return line[len("SET_CLIENT_ID: "):]

    def assert_silent(self, seconds: float) -> None:
        """Nothing arrives for ``seconds`` (used after a positive marker, never alone)."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            data = None
        assert not self.buf and data is None, f"unexpected data: {self.buf!r} {data!r}"

    def wait_closed(self, timeout: Optional[float] = None) -> List[str]:
        """Read until the server closes; return the lines read on the way."""
        lines = []
        while True:
            line = self.read_line(timeout)
            if line is None:
                return lines
            lines.append(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def query(db_url: str, sql: str, params: Sequence[object] = ()) -> List[Tuple[object, ...]]:
    """Run one statement directly on the database behind ``db_url`` (``%s`` placeholders)."""
    if db_url.startswith("sqlite:"):
        con = sqlite3.connect(db_url.split(":///", 1)[1], isolation_level=None)
        try:
            return [tuple(row) for row in con.execute(sql.replace("%s", "?"), tuple(params))]
        finally:
            con.close()
    parts = urlsplit(db_url)
    con = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                          password=parts.password or "", database=parts.path.lstrip("/"),
                          charset="utf8mb4", autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(sql, tuple(params))
            return [tuple(row) for row in cur.fetchall()]
    finally:
        con.close()


class DatagramCounter:
    """A plain UDP socket on 127.0.0.1 that keeps every wake-up datagram apart.

    WakeupListener merges waiting datagrams; counting them needs a raw socket.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self.peers = f"127.0.0.1:{self.port}"

    def drain(self) -> List[List[int]]:
        """The ids of every datagram waiting (loopback UDP is queued before sendto() returns);
        a datagram carrying a message names its client (its signature is not checked here)."""
        from messaging_server.protocol.wakeups import CARRY_MAGIC, TAG_HEX, decode

        got = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return got
            if data.startswith(CARRY_MAGIC):
                got.append([int(data[len(CARRY_MAGIC) + TAG_HEX + 1:].split(b" ", 1)[0])])
            else:
                got.append(decode(data))

    def raw(self) -> List[bytes]:
        """Every datagram waiting, as received."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(65536))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()


def seconds_ago_sql(db_url: str, seconds: float) -> str:
    """A SQL expression for the time ``seconds`` ago, in the format the backend stores."""
    if db_url.startswith("sqlite:"):
        return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-{seconds} seconds')"
    return f"(NOW(6) - INTERVAL {int(seconds * 1_000_000)} MICROSECOND)"


def insert_message(db_url: str, client_id: int, body: str, status: str, seconds_ago: float) -> None:
    """A message row as if stored ``seconds_ago``: history the duplicate rule must read right."""
    from messaging_server.storage.interface import body_hash

    query(db_url, "INSERT INTO messages (client_id, body, body_hash, status, created_at) "
          f"VALUES (%s, %s, %s, %s, {seconds_ago_sql(db_url, seconds_ago)})",
          (client_id, body, body_hash(body), status))


def recv_before(sock: socket.socket, deadline: float, failure: str, size: int = 65536) -> bytes:
    """One ``recv`` that must return before ``deadline`` (time.monotonic()); b"" when the
    peer closed or reset the connection.  Past the deadline the test fails with ``failure``."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(failure)
        sock.settimeout(remaining)
        try:
            return sock.recv(size)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return b""


def run_threads(targets: List[Callable[[], None]], timeout: float = 30.0) -> None:
    """Run ``targets`` in threads; re-raise the first exception any of them raised, and fail
    if any is still running after ``timeout`` (a deadlock)."""
    errors: List[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised in the test thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running after the timeout (deadlock?)"
    if errors:
        raise errors[0]


REFUSED_BODY = "refused by the database"


def refuse_body(db_url: str, body: str = REFUSED_BODY) -> None:
    """Make the database refuse to store ``body`` (a trigger): a statement error that is not
    the database being unavailable, reachable through the public API."""
    literal = "'" + body.replace("'", "''") + "'"  # a trigger takes no parameters
    if db_url.startswith("sqlite:"):
        query(db_url, f"CREATE TRIGGER refuse_body BEFORE INSERT ON messages WHEN NEW.body = {literal} "
                      "BEGIN SELECT RAISE(ABORT, 'this body is refused'); END")
    else:
        query(db_url, "CREATE TRIGGER refuse_body BEFORE INSERT ON messages FOR EACH ROW "
                      f"BEGIN IF NEW.body = {literal} THEN SIGNAL SQLSTATE '45000' "
                      "SET MESSAGE_TEXT = 'this body is refused'; END IF; END")


def port_with_free_neighbours() -> int:
    """A free TCP port p with p + 1 (UDP, wake-ups) and p + 2 (TCP, HTTP) free too."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as http_:
                udp.bind(("", port + 1))
                http_.bind(("127.0.0.1", port + 2))
            return port
        except OSError:
            continue
    pytest.skip("no free port with free neighbours")
