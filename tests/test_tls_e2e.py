"""TLS on the client port, end to end: a real server started with ``--tls-cert``.

A self-signed certificate for ``localhost`` and ``127.0.0.1`` is made once per
module with the real ``openssl req``.  The clients are the real
``openssl s_client`` (what an operator types), the Python ``Client`` with a
verifying context, and raw sockets for the hostile cases: plaintext on the TLS
port, a client that never starts TLS, one that never sends its id, and one
that offers only TLS 1.1.  TLS does not depend on the database: SQLite only.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

import messaging_server
from messaging_server.client.sdk import Client
from tests.helpers import RawClient, ServerProcess, query, recv_before, wait_until

IN_CI = os.environ.get("CI", "").lower() == "true"
OPENSSL = shutil.which("openssl")
ID_LINE = re.compile(r"SET_CLIENT_ID: ([1-9][0-9]*\.[A-Za-z0-9_-]{24})")
TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # self-signed, CN=localhost, SAN DNS:localhost and IP:127.0.0.1
    key: Path
    other_key: Path  # a valid key that does not belong to ``cert``


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if OPENSSL is None:
        reason = "the openssl program is not installed (Debian: apt-get install openssl)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("tls")
    files = TlsFiles(where / "cert.pem", where / "key.pem", where / "other-key.pem")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(files.key), "-out", str(files.cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    subprocess.run([OPENSSL, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(files.other_key)], check=True, capture_output=True, timeout=60)
    return files


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('tls-db') / 'niki.sqlite3'}"


@pytest.fixture(scope="module")
def server(tls_files: TlsFiles, db: str) -> Iterator[ServerProcess]:
    """One TLS server for the module (default handshake timeout: 30 s)."""
    with ServerProcess(db, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)) as proc:
        yield proc


@pytest.fixture(scope="module")
def trusting(tls_files: TlsFiles) -> ssl.SSLContext:
    """A client context that trusts exactly the test certificate and checks host names."""
    return ssl.create_default_context(cafile=str(tls_files.cert))


class SClient:
    """``openssl s_client -quiet`` as a line client: stdin in, stdout lines out, with deadlines."""

    def __init__(self, port: int, cafile: Path) -> None:
        assert OPENSSL is not None
        # -verify_return_error and -verify_ip: stop unless the certificate checks out for 127.0.0.1.
        self.proc = subprocess.Popen(
            [OPENSSL, "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cafile),
             "-verify_return_error", "-verify_ip", "127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", bufsize=1)
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self.errors: List[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_errors, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # s_client ended: the server closed (or the check failed)

    def _pump_errors(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(line.rstrip("\n") for line in self.proc.stderr)

    def read_line(self, timeout: float = TIMEOUT) -> Optional[str]:
        """The next line from the server; None once s_client has ended."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from s_client within {timeout} s; "
                                 f"stderr: {self.errors!r}") from None

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def queue_backlog(db_url: str, credential: str, bodies: Sequence[str]) -> None:
    """Queue ``bodies`` for an offline client in one SQLite transaction, rows as enqueue() writes them.

    Set-up only: enqueue() commits (fsync) once per message, seconds for thousands.
    """
    client_id = int(credential.partition(".")[0])
    rows = [(client_id, body, hashlib.sha256(body.encode("utf-8")).digest()) for body in bodies]
    con = sqlite3.connect(db_url.split(":///", 1)[1], isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT INTO messages (client_id, body, body_hash, status, created_at) "
                        "VALUES (?, ?, ?, 'pending', strftime('%Y-%m-%d %H:%M:%f', 'now'))", rows)
        con.execute("COMMIT")
    finally:
        con.close()


def pending(db_url: str, credential: str) -> int:
    rows = query(db_url, "SELECT COUNT(*) FROM messages WHERE client_id = %s AND status = 'pending'",
                 (int(credential.partition(".")[0]),))
    return int(rows[0][0])  # type: ignore[call-overload]


def disconnected(server: ServerProcess, credential: str) -> bool:
    """The server has logged the end of this client's connection (it is offline)."""
    return f"client {credential.partition('.')[0]} disconnected from " in server.log


def read_until_closed(sock: socket.socket, timeout: float) -> Tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took; fails if it stays open."""
    start = time.monotonic()
    data = b""
    while True:
        chunk = recv_before(sock, start + timeout, f"still open after {timeout} s (got {data!r})")
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def tls_raw(port: int, context: ssl.SSLContext, host: str = "localhost") -> RawClient:
    """A line client over TLS that fails on a close without close_notify (no ragged EOFs)."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    return RawClient(context.wrap_socket(sock, server_hostname=host, suppress_ragged_eofs=False), TIMEOUT)


# --- the operator's client: openssl s_client ---------------------------------------


def test_openssl_s_client_session_and_backlog(server: ServerProcess, tls_files: TlsFiles, db: str) -> None:
    """The PROTOCOL.md walkthrough through ``openssl s_client -quiet``, certificate checked:
    greeting, new credential, a live message, PING, DISCONNECT; then the backlog on reconnect."""
    first = SClient(server.port, tls_files.cert)
    try:
        assert first.read_line() == "GET_CLIENT_ID"
        first.send_line("NONE")
        line = first.read_line()
        match = ID_LINE.fullmatch(line or "")
        assert match, f"expected SET_CLIENT_ID: <id>.<secret>, got {line!r}"
        credential = match.group(1)
        assert messaging_server.enqueue(credential, "hello over TLS", db=db) is True
        assert first.read_line() == "MESSAGE: hello over TLS"
        first.send_line("PING")
        assert first.read_line() == "PONG"
        first.send_line("DISCONNECT")
        assert first.read_line() is None, "the server did not close after DISCONNECT"
        assert first.proc.wait(5) == 0, first.errors
    finally:
        first.close()
    assert "verify return:1" in "\n".join(first.errors), first.errors

    wait_until(lambda: disconnected(server, credential), message="the server to see the disconnect")
    for body in ("while away 1", "while away 2"):
        assert messaging_server.enqueue(credential, body, db=db) is True
    again = SClient(server.port, tls_files.cert)
    try:
        assert again.read_line() == "GET_CLIENT_ID"
        again.send_line(credential)
        assert again.read_line() == f"SET_CLIENT_ID: {credential}"
        assert again.read_line() == "MESSAGE: while away 1"
        assert again.read_line() == "MESSAGE: while away 2"
        again.send_line("PING")  # a marker: nothing else came between the backlog and it
        assert again.read_line() == "PONG"
        again.send_line("DISCONNECT")
        assert again.read_line() is None
    finally:
        again.close()


# --- the Python client ----------------------------------------------------------------


def test_python_client_checks_the_certificate(server: ServerProcess, trusting: ssl.SSLContext) -> None:
    """The server's certificate is really checked: an untrusted certificate or a host name
    it does not name is refused, the trusted one for 127.0.0.1 (IP SAN) is accepted."""
    for host, context in (("localhost", ssl.create_default_context()),  # system CAs only
                          ("127.0.0.2", trusting)):  # reachable, but not in the certificate
        client = Client(host, server.port, ssl_context=context, timeout=5)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.connect()
        finally:
            client.close()
    with Client("127.0.0.1", server.port, ssl_context=trusting, timeout=5) as client:
        assert ID_LINE.fullmatch(f"SET_CLIENT_ID: {client.client_id}")


def test_python_client_large_backlog_in_order_exactly_once(server: ServerProcess, trusting: ssl.SSLContext,
                                                          db: str) -> None:
    """2,000 messages (4.4 MB; bodies of 305 to 4,064 bytes, with 2-byte characters that record
    boundaries cut) go out in 500-message writes of about 1.1 MB, some 70 TLS records each: every
    body arrives whole, in order, once; live messages follow; every row ends up delivered.
    (Writes cut short by a client that stops reading: the stalled-reader test below.)"""
    with Client("localhost", server.port, ssl_context=trusting) as first:
        credential = first.client_id
    assert credential is not None
    wait_until(lambda: disconnected(server, credential), message="the server to see the disconnect")
    bodies = [f"{i:04d} " + "x" * (300 + (i * 37) % 1200) + "é" * ((i * 53) % 1300) for i in range(2000)]
    assert max(len(b.encode("utf-8")) for b in bodies) <= 4096
    queue_backlog(db, credential, bodies)

    client = Client("localhost", server.port, client_id=credential, ssl_context=trusting)
    try:
        assert client.connect() == credential
        start = time.monotonic()
        received = [client.receive(timeout=TIMEOUT) for _ in bodies]
        backlog_s = time.monotonic() - start
        assert received == bodies
        live = ["live 1", "live 2", "live 3"]
        for body in live:
            assert messaging_server.enqueue(credential, body, db=db) is True
        assert [client.receive(timeout=5) for _ in live] == live
        with pytest.raises(TimeoutError):  # nothing twice
            client.receive(timeout=0.3)
        assert client.notices == []
    finally:
        client.disconnect()
    wait_until(lambda: pending(db, credential) == 0, message="every message marked delivered")
    print(f"backlog of {len(bodies)} messages over TLS received in {backlog_s:.2f} s")


def test_python_client_ack_mode(server: ServerProcess, trusting: ssl.SSLContext, db: str) -> None:
    """Acknowledged delivery over TLS: 250 messages (more than --max-inflight 100, so delivery
    pauses for acks) arrive in order with increasing ids; once acked they never come again."""
    with Client("localhost", server.port, ack=True, ssl_context=trusting) as first:
        credential = first.client_id
    assert credential is not None
    wait_until(lambda: disconnected(server, credential), message="the server to see the disconnect")
    bodies = [f"acked {i:03d}" for i in range(250)]
    queue_backlog(db, credential, bodies)

    client = Client("localhost", server.port, client_id=credential, ack=True, ssl_context=trusting)
    try:
        client.connect()
        messages = [client.receive_message(timeout=TIMEOUT) for _ in bodies]
    finally:
        client.disconnect()  # acknowledges the last one first
    assert [m.body for m in messages if m is not None] == bodies
    ids = [m.message_id for m in messages if m is not None]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids)), ids[:5]  # type: ignore[type-var]
    wait_until(lambda: pending(db, credential) == 0, message="every acknowledgement recorded")

    with Client("localhost", server.port, client_id=credential, ack=True, ssl_context=trusting) as again:
        assert messaging_server.enqueue(credential, "after the acks", db=db) is True
        assert again.receive(timeout=5) == "after the acks"  # not one of the 250 again


def test_stalled_tls_reader_loses_nothing_and_gets_nothing_twice(tls_files: TlsFiles, tmp_path: Path,
                                                                 trusting: ssl.SSLContext) -> None:
    """A TLS client that stops reading mid-backlog makes the server's writes partial, then time
    out (--write-timeout 1).  Over TLS a write counts only whole 16 KiB records: the whole lines
    the stalled client can still read, plus what its next connection gets, are the backlog
    exactly, in order, with nothing twice (a cut-off record or line is sent again whole)."""
    db = f"sqlite:///{tmp_path / 'niki.sqlite3'}"
    with ServerProcess(db, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
                       "--write-timeout", "1") as server:
        with Client("127.0.0.1", server.port, ssl_context=trusting) as first:
            credential = first.client_id
        assert credential is not None
        wait_until(lambda: disconnected(server, credential), message="the server to see the disconnect")
        # About 6 MB: more than loopback buffers between a fixed 64 KiB receive buffer and the
        # server's send buffer (at most 4 MB here), so the server must wait, and then give up.
        backlog = [f"{i:04d} " + "s" * (2000 + (i * 41) % 1990) for i in range(2000)]
        queue_backlog(db, credential, backlog)

        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # fixed: no autotuning
        raw.settimeout(TIMEOUT)
        raw.connect(("127.0.0.1", server.port))
        stalled = RawClient(trusting.wrap_socket(raw, server_hostname="127.0.0.1"), TIMEOUT)
        try:
            assert stalled.read_line() == "GET_CLIENT_ID"
            stalled.send_line(credential)
            assert stalled.read_line() == f"SET_CLIENT_ID: {credential}"  # then it reads nothing
            timed_out = re.compile(rf"client {credential.partition('.')[0]} disconnected from "
                                   r".*\(write timed out\)")
            wait_until(lambda: timed_out.search(server.log), timeout=15,
                       message="the stalled client to be dropped for its write timeout")
            # Now read what reached it: whole records, then EOF or the cut-off last record.
            data = stalled.buf
            while True:
                try:
                    chunk = stalled.sock.recv(1 << 16)
                except (ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            stalled.close()
        *whole, _cut_off = data.split(b"\n")
        lines = [line.decode("utf-8") for line in whole]
        assert all(line.startswith("MESSAGE: ") for line in lines), [x[:40] for x in lines[:3]]
        seen = [line[len("MESSAGE: "):] for line in lines]
        assert seen == backlog[:len(seen)], "the stalled client got lines out of order or damaged"
        assert len(seen) < len(backlog), "the stall did not cut the backlog: nothing was tested"

        with Client("127.0.0.1", server.port, client_id=credential, ssl_context=trusting) as again:
            rest = [again.receive(timeout=TIMEOUT) for _ in backlog[len(seen):]]
            assert rest == backlog[len(seen):]
            assert messaging_server.enqueue(credential, "after the stall", db=db) is True
            assert again.receive(timeout=5) == "after the stall"  # nothing in between: nothing twice
        wait_until(lambda: pending(db, credential) == 0, message="every message marked delivered")
        print(f"stalled TLS reader: {len(seen)} whole lines ({len(data)} bytes) before the write "
              f"timeout, {len(rest)} on the next connection")


def test_clean_close_sends_close_notify(server: ServerProcess, trusting: ssl.SSLContext) -> None:
    """After DISCONNECT the server ends TLS properly: the client sees close_notify, not a
    truncated stream (the socket raises on a ragged EOF)."""
    with tls_raw(server.port, trusting) as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line("NONE")
        assert ID_LINE.fullmatch(client.read_line() or "")
        client.send_line("DISCONNECT")
        assert client.wait_closed(timeout=5) == []


# --- what is refused ------------------------------------------------------------------


def test_plaintext_client_on_tls_port_is_closed(server: ServerProcess, trusting: ssl.SSLContext,
                                                db: str) -> None:
    """A telnet-style client on the TLS port gets no GET_CLIENT_ID (nothing in the clear) and is
    closed at once, not after the handshake timeout; TLS clients are served as before."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(b"NONE\n")
        data, closed_after = read_until_closed(sock, timeout=5)
    assert b"GET_CLIENT_ID" not in data and b"SET_CLIENT_ID" not in data, data
    assert data == b"" or data[:1] == b"\x15", f"expected nothing or a TLS alert record, got {data!r}"
    assert closed_after < 3, f"closed only after {closed_after:.2f} s"
    wait_until(lambda: f"127.0.0.1:{local_port}: TLS handshake failed" in server.log,
               message="the failed handshake in the log")

    with Client("localhost", server.port, ssl_context=trusting) as client:
        assert client.client_id is not None
        assert messaging_server.enqueue(client.client_id, "still serving TLS", db=db) is True
        assert client.receive(timeout=5) == "still serving TLS"


def test_tls_1_1_is_refused(server: ServerProcess, tls_files: TlsFiles) -> None:
    """A client that offers at most TLS 1.1 gets a protocol-version alert; the same client
    allowed TLS 1.2 gets GET_CLIENT_ID (so the version, nothing else, was refused)."""

    def context(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(tls_files.cert))
        with warnings.catch_warnings():  # setting TLS 1.0/1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
        try:  # OpenSSL 3 only offers TLS 1.0/1.1 at security level 0
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except ssl.SSLError:
            pytest.skip("the local OpenSSL cannot lower its security level to offer TLS 1.1")
        return ctx

    old = context(ssl.TLSVersion.TLSv1_1)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    local_port = sock.getsockname()[1]
    try:
        with pytest.raises(ssl.SSLError) as refused:
            old.wrap_socket(sock, server_hostname="localhost")
    finally:
        sock.close()
    if refused.value.reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "UNSUPPORTED_PROTOCOL"):
        pytest.skip(f"the local OpenSSL cannot offer TLS 1.1 ({refused.value.reason})")
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    wait_until(lambda: re.search(rf"127\.0\.0\.1:{local_port}: TLS handshake failed: .*unsupported protocol",
                                 server.log), message="the refusal in the log")

    with tls_raw(server.port, context(ssl.TLSVersion.TLSv1_2)) as client:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        assert client.read_line() == "GET_CLIENT_ID"


def test_handshake_timeout_covers_tls_and_id(tls_files: TlsFiles, tmp_path: Path,
                                             trusting: ssl.SSLContext) -> None:
    """With --handshake-timeout 1: a client that never starts TLS is dropped without a line, one
    that finishes TLS but sends no id gets the timeout error, both after 1 s, not before; a
    silent one does not hold up the others' handshakes; TLS and id share one deadline."""
    db = f"sqlite:///{tmp_path / 'niki.sqlite3'}"
    with ServerProcess(db, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
                       "--handshake-timeout", "1") as server:
        start = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        idle = tls_raw(server.port, trusting)
        late = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        late_start = time.monotonic()
        try:
            assert idle.read_line() == "GET_CLIENT_ID"
            # The silent client's handshake waits in its own thread: it is still open now.
            silent.setblocking(False)
            with pytest.raises(BlockingIOError):
                silent.recv(1)
            silent.setblocking(True)

            # The late client waits 0.6 s before it starts TLS (and sees nothing meanwhile) ...
            late.settimeout(0.6)
            with pytest.raises(socket.timeout):
                late.recv(1)
            late_tls = RawClient(trusting.wrap_socket(late, server_hostname="localhost",
                                                      suppress_ragged_eofs=False), TIMEOUT)
            assert late_tls.read_line() == "GET_CLIENT_ID"
            # ... so it has only what is left of the one deadline to send its id.
            assert late_tls.wait_closed(timeout=5) == ["ERROR: no client id within 1 s"]
            late_s = time.monotonic() - late_start

            assert idle.wait_closed(timeout=5) == ["ERROR: no client id within 1 s"]
            idle_s = time.monotonic() - start
            data, _ = read_until_closed(silent, timeout=5)
            silent_s = time.monotonic() - start
        finally:
            for sock in (silent, late, idle.sock):
                sock.close()
        assert data == b"", f"a client that never started TLS got {data!r}"
        assert 0.95 <= idle_s < 4, idle_s
        assert 0.95 <= silent_s < 4, silent_s
        assert 0.95 <= late_s < 1.45, f"late client closed after {late_s:.2f} s: not one deadline"
        wait_until(lambda: "no TLS handshake within 1 s" in server.log, message="the TLS timeout logged")
        print(f"dropped after: no TLS {silent_s:.2f} s, no id {idle_s:.2f} s, late TLS {late_s:.2f} s")


def test_busy_tls_port_closes_without_a_line(tls_files: TlsFiles, tmp_path: Path,
                                             trusting: ssl.SSLContext) -> None:
    """Beyond --max-connections a TLS port has no session to carry ``ERROR: server busy``:
    the connection is closed at once with not one byte, and the client inside is unaffected."""
    db = f"sqlite:///{tmp_path / 'niki.sqlite3'}"
    with ServerProcess(db, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
                       "--max-connections", "1") as server:
        with Client("localhost", server.port, ssl_context=trusting) as inside:
            assert inside.client_id is not None
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                data, closed_after = read_until_closed(sock, timeout=5)
            assert data == b"", data
            assert closed_after < 1.0, closed_after
            refused = Client("localhost", server.port, ssl_context=trusting, timeout=5)
            try:
                with pytest.raises((ssl.SSLError, ConnectionError)):  # EOF in the TLS handshake
                    refused.connect()
            finally:
                refused.close()
            assert messaging_server.enqueue(inside.client_id, "inside the cap", db=db) is True
            assert inside.receive(timeout=5) == "inside the cap"
        wait_until(lambda: "server busy (1 connections; 1 refused since start)" in server.log,
                   message="the refusal warning")


@pytest.mark.parametrize("case", ["missing certificate", "key of another certificate", "key alone"])
def test_unusable_tls_files_stop_the_server(case: str, tls_files: TlsFiles, tmp_path: Path) -> None:
    """The server never falls back to plaintext: unusable TLS files make it exit at start,
    with a message naming the problem (status 1; 2 for a bad option combination)."""
    missing = tmp_path / "no-such-cert.pem"
    args, status, text = {
        "missing certificate": (["--tls-cert", str(missing)], 1,
                                f"cannot use TLS certificate '{missing}'"),
        "key of another certificate": (["--tls-cert", str(tls_files.cert), "--tls-key",
                                        str(tls_files.other_key)], 1, "cannot use TLS certificate"),
        "key alone": (["--tls-key", str(tls_files.key)], 2, "--tls-key needs --tls-cert"),
    }[case]
    proc = ServerProcess(f"sqlite:///{tmp_path / 'niki.sqlite3'}", *args)
    with pytest.raises(AssertionError, match="server exited with"):
        proc.start()
    assert proc.proc is not None and proc.proc.returncode == status, proc.log
    wait_until(lambda: text in proc.log, timeout=5, message=f"{text!r} in the log")
    assert not (tmp_path / "niki.sqlite3").exists(), "a database was created before the check"


def test_niki_client_without_tls_on_a_tls_port_is_told_to_use_it(server: ServerProcess,
                                                                  tmp_path: Path) -> None:
    """A TLS server waits for a ClientHello and never says GET_CLIENT_ID to plain text:
    niki-client gives up at its --timeout with status 1 and suggests --tls."""
    done = subprocess.run([sys.executable, "-m", "messaging_server.client.subscriber",
                           f"127.0.0.1:{server.port}", "--timeout", "2",
                           "--credential-file", str(tmp_path / "credential")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "connect with --tls" in done.stderr and "never connected" in done.stderr, done.stderr
