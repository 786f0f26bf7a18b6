"""niki-client end to end: the real command as a process, against real servers.

Against a real server on both databases: queued and live messages, the
credential file kept and reused, a server restart survived with every message
printed exactly once and in order, the JSON output, ``--timeout``, and the
acknowledgement sent only after the line is out (the client's stdout is a pipe
the test does not read, so the client blocks printing; it is then killed).

Against a scripted server (a real listening socket whose side of the
conversation the test writes line by line) for what a real server does not do
on cue: lose an ACK with the connection, refuse a credential, leave a PING
unanswered; and to see the DISCONNECT a signal makes the client send.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import messaging_server
from messaging_server import Enqueuer
from tests.helpers import RawClient, ServerProcess, numeric_id, query, wait_until

pytestmark = pytest.mark.usefixtures("no_niki_environment")

IN_CI = os.environ.get("CI", "").lower() == "true"
TIMEOUT = 10.0
QUICK_EXIT = 3.0  # seconds a signalled client may take to be gone
IDLE = 2.0  # --timeout where a real server must first hand out a credential and deliver
SECRET = "AbCdEfGhIjKlMnOpQrStUv_-"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named in Python 3.10+


class SubscriberProcess:
    """``python -m messaging_server.client.subscriber`` with its output lines collected as they come."""

    def __init__(self, address: str, *args: str, credential_file: Optional[Path] = None,
                 env: Optional[Dict[str, str]] = None, read_stdout: bool = True) -> None:
        cmd = [sys.executable, "-m", "messaging_server.client.subscriber", address,
               "--max-backoff", "0.5", *args]
        if credential_file is not None:
            cmd += ["--credential-file", str(credential_file)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, **(env or {})))
        self.lines: List[str] = []
        self.errors: List[str] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._collect, args=(self.proc.stderr, self.errors),
                                          daemon=True)]
        if read_stdout:
            self._readers.append(threading.Thread(target=self._collect, args=(self.proc.stdout, self.lines),
                                                  daemon=True))
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, into: List[str]) -> None:
        for raw in stream:
            with self._lock:
                into.append(raw.decode("utf-8").rstrip("\n"))

    def output(self) -> List[str]:
        with self._lock:
            return list(self.lines)

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.errors)

    def wait_lines(self, count: int, timeout: float = TIMEOUT) -> List[str]:
        wait_until(lambda: len(self.output()) >= count, timeout,
                   f"{count} lines from niki-client (got {self.output()}; stderr {self.log!r})")
        return self.output()

    def wait_log(self, text: str, count: int = 1, timeout: float = TIMEOUT) -> None:
        wait_until(lambda: self.log.count(text) >= count, timeout,
                   f"{text!r} x{count} on niki-client's stderr (got {self.log!r})")

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status, once the output readers have seen everything."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"niki-client still running after {timeout} s:\n{self.log}") from None
        for reader in self._readers:
            reader.join(TIMEOUT)
        return status

    def __enter__(self) -> SubscriberProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class ScriptedServer:
    """A listening socket on 127.0.0.1; each accepted connection is a RawClient the test
    drives, playing the server's side of the protocol."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def accept(self, timeout: float = TIMEOUT) -> RawClient:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        return RawClient(conn, timeout)

    def handshake(self, expect: str, assign: str, timeout: float = TIMEOUT) -> RawClient:
        """Accept a connection, check the id line, answer SET_CLIENT_ID."""
        conn = self.accept(timeout)
        conn.send_line("GET_CLIENT_ID")
        assert conn.read_line() == expect
        conn.send_line(f"SET_CLIENT_ID: {assign}")
        return conn

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def credential_in(path: Path) -> str:
    wait_until(path.exists, TIMEOUT, f"{path} to be written")
    return path.read_text().strip()


def closed_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- against a real server, on both databases ---

def test_queued_and_live_messages_and_the_credential_file(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "config"
    env = {"XDG_CONFIG_HOME": str(config)}
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enq:
        address = f"127.0.0.1:{server.port}"
        path = config / "niki" / f"credential-localhost-{server.port}"  # one host, any spelling
        with SubscriberProcess(address, "--count", "1", env=env) as first:
            credential = credential_in(path)
            enq.enqueue(credential, "live one")
            assert first.wait() == 0, first.log
        assert first.output() == ["live one"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert re.fullmatch(rf"{numeric_id(credential)}\.[A-Za-z0-9_-]{{24}}", credential)
        assert f"registered as new client {numeric_id(credential)}.***" in first.log
        assert credential.split(".")[1] not in first.log

        enq.enqueue(credential, "queued one")
        enq.enqueue(credential, "queued two")
        with SubscriberProcess(f"localhost:{server.port}", "--count", "3", env=env) as second:
            assert second.wait_lines(2) == ["queued one", "queued two"]
            enq.enqueue(credential, "live two")
            assert second.wait() == 0, second.log
        assert second.output() == ["queued one", "queued two", "live two"]
        assert path.read_text() == credential + "\n"
        assert "registered" not in second.log and "did not accept" not in second.log
        # No temporary file left behind; the lock file stays (one subscriber per credential).
        assert sorted(os.listdir(path.parent)) == [path.name, path.name + ".lock"]


def test_survives_a_server_restart_and_prints_everything_exactly_once(db_url: str, tmp_path: Path) -> None:
    """The done-criterion: messages before, during and after a restart, each once, in order."""
    bodies = [f"message {n}" for n in range(1, 10)]
    path = tmp_path / "credential"
    first = ServerProcess(db_url).start()
    try:
        address = f"127.0.0.1:{first.port}"
        with SubscriberProcess(address, "--count", "9", credential_file=path) as sub, \
                Enqueuer(db_url) as enq:
            credential = credential_in(path)
            for body in bodies[:3]:
                enq.enqueue(credential, body)
            sub.wait_lines(3)
            assert first.stop(signal.SIGTERM) == 0
            sub.wait_log(f"connection to {address} lost")
            for body in bodies[3:6]:  # straight into the database: no server is running
                enq.enqueue(credential, body)
            sub.wait_log(f"cannot connect to {address}")
            with ServerProcess(db_url, port=first.port, event_port=first.event_port):
                sub.wait_lines(6)
                for body in bodies[6:]:
                    enq.enqueue(credential, body)
                assert sub.wait() == 0, sub.log
        assert sub.output() == bodies
        assert f"reconnected to {address} as {numeric_id(credential)}.***" in sub.log
        assert credential.split(".")[1] not in sub.log
        assert path.read_text().strip() == credential
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.stop()


def test_json_output_ids_and_idle_timeout(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "credential"
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enq:
        address = f"127.0.0.1:{server.port}"
        with SubscriberProcess(address, "--json", "--timeout", str(IDLE), credential_file=path) as acked:
            credential = credential_in(path)
            enq.enqueue(credential, 'héllo "world" 🎉')
            enq.enqueue(credential, "second")
            acked.wait_lines(2)
            last_line_at = time.monotonic()
            assert acked.wait() == 27, acked.log  # --timeout passed: mosquitto_sub -W's status
        assert time.monotonic() - last_line_at < IDLE + QUICK_EXIT, "--timeout left it running"
        records = [json.loads(line) for line in acked.output()]
        stored = query(db_url, "SELECT id, body FROM messages WHERE client_id = %s ORDER BY id",
                       (numeric_id(credential),))
        assert [(r["id"], r["body"]) for r in records] == [(int(i), b) for i, b in stored]
        assert all(ISO_UTC.match(r["received_at"]) for r in records)

        enq.enqueue(credential, "legacy mode")
        with SubscriberProcess(address, "--json", "--no-ack", "--count", "1", credential_file=path) as legacy:
            assert legacy.wait() == 0, legacy.log
        (record,) = [json.loads(line) for line in legacy.output()]
        assert record["id"] is None and record["body"] == "legacy mode"


def test_a_message_is_acknowledged_only_after_it_was_printed(db_url: str, tmp_path: Path) -> None:
    """stdout is a pipe holding exactly four lines that nobody reads: the client prints
    four messages, blocks printing the fifth, and is killed there.  Exactly the four
    printed ones are acknowledged; the next run gets the other four."""
    page = os.sysconf("SC_PAGE_SIZE")
    if page != 4096:
        pytest.skip(f"the pipe arithmetic assumes 4 KiB pages, not {page}")
    bodies = [f"{n:04d}".ljust(page - 1, "x") for n in range(8)]  # each line fills one pipe page
    path = tmp_path / "credential"
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enq:
        address = f"127.0.0.1:{server.port}"
        with SubscriberProcess(address, credential_file=path, read_stdout=False) as sub:
            assert sub.proc.stdout is not None
            assert fcntl.fcntl(sub.proc.stdout.fileno(), F_SETPIPE_SZ, 4 * page) == 4 * page
            client_id = numeric_id(credential_in(path))
            for body in bodies:
                enq.enqueue(client_id, body)

            def acknowledged() -> List[Tuple[object, ...]]:
                return query(db_url, "SELECT body FROM messages WHERE client_id = %s "
                             "AND acknowledged_at IS NOT NULL ORDER BY id", (client_id,))

            wait_until(lambda: len(acknowledged()) >= 4, TIMEOUT, "four acknowledgements")
            sub.proc.kill()
            sub.proc.wait()
            printed = sub.proc.stdout.read().decode("utf-8").splitlines()
            wait_until(lambda: query(db_url, "SELECT owner_server_id FROM clients WHERE id = %s",
                                     (client_id,)) == [(None,)], TIMEOUT, "the server to see the client gone")
        assert printed == bodies[:4]
        assert [body for (body,) in acknowledged()] == bodies[:4], "acknowledged but never printed"

        with SubscriberProcess(address, "--count", "4", credential_file=path) as again:
            assert again.wait() == 0, again.log
        assert again.output() == bodies[4:]


# --- TLS (SQLite only: TLS does not depend on the database) ---

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        reason = "the openssl program is not installed (Debian: apt-get install openssl)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_with_the_servers_certificate(sqlite_url: str, tmp_path: Path,
                                          certificate: Tuple[Path, Path]) -> None:
    cert, key = certificate
    path = tmp_path / "credential"
    with ServerProcess(sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key)) as server, \
            Enqueuer(sqlite_url) as enq:
        address = f"127.0.0.1:{server.port}"
        with SubscriberProcess(address, "--tls", "--credential-file", str(tmp_path / "other")) as untrusted:
            assert untrusted.wait() == 1
        assert "certificate is not trusted" in untrusted.log and "Traceback" not in untrusted.log
        assert not (tmp_path / "other").exists()

        with SubscriberProcess(address, "--cafile", str(cert), "--count", "1", credential_file=path) as sub:
            enq.enqueue(credential_in(path), "over TLS")
            assert sub.wait() == 0, sub.log
        assert sub.output() == ["over TLS"]


# --- against a scripted server ---

def test_a_message_sent_again_after_a_lost_ack_is_printed_once(scripted: ScriptedServer,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "credential"
    with SubscriberProcess(scripted.address, "--count", "2", credential_file=path) as sub:
        conn = scripted.handshake("NONE ACK", f"5.{SECRET}")
        conn.send_line("MESSAGE 41: first")
        assert conn.read_line() == "ACK 41"
        conn.close()  # as if the ACK had been lost with the connection
        conn = scripted.handshake(f"5.{SECRET} ACK", f"5.{SECRET}")
        conn.send_line("MESSAGE 41: first")
        conn.send_line("MESSAGE 42: second")
        assert conn.read_lines(2) == ["ACK 41", "ACK 42"], "the repeat is acknowledged again"
        assert conn.read_line() == "DISCONNECT"
        conn.close()
        assert sub.wait() == 0, sub.log
    assert sub.output() == ["first", "second"]
    assert "connection to" in sub.log and "lost (closed by the server)" in sub.log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_sends_disconnect_and_exits_0(scripted: ScriptedServer, tmp_path: Path,
                                               signum: signal.Signals) -> None:
    with SubscriberProcess(scripted.address, credential_file=tmp_path / "credential") as sub:
        conn = scripted.handshake("NONE ACK", f"5.{SECRET}")
        conn.send_line("MESSAGE 1: hello")
        assert conn.read_line() == "ACK 1"
        sub.wait_lines(1)
        sub.proc.send_signal(signum)
        assert conn.read_line() == "DISCONNECT"
        conn.close()
        assert sub.wait(QUICK_EXIT) == 0
    assert "Traceback" not in sub.log


def test_a_signal_while_waiting_to_reconnect_exits_0(tmp_path: Path) -> None:
    port = closed_port()
    with SubscriberProcess(f"127.0.0.1:{port}", credential_file=tmp_path / "credential") as sub:
        sub.wait_log("cannot connect")
        sub.proc.send_signal(signal.SIGINT)
        assert sub.wait(QUICK_EXIT) == 0
    assert "Traceback" not in sub.log


def test_refused_connects_are_retried_until_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "credential"
    path.write_text(f"7.{SECRET}\n")
    port = closed_port()
    started = time.monotonic()
    with SubscriberProcess(f"127.0.0.1:{port}", "--timeout", "1.5", "--max-backoff", "0.2",
                           credential_file=path) as sub:
        assert sub.wait() == 1, sub.log  # it never connected: not a quiet server
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 1.5 + QUICK_EXIT
    attempts = [line for line in sub.errors if "cannot connect" in line]
    assert len(attempts) >= 3, sub.log  # at most 0.2 s apart
    assert all(f"cannot connect to 127.0.0.1:{port}" in line and "as 7.***" in line for line in attempts)
    assert f"never connected to 127.0.0.1:{port} within --timeout 1.5 s (Connection refused)" in sub.log
    assert SECRET not in sub.log


def test_a_refused_credential_is_replaced_and_reported(scripted: ScriptedServer, tmp_path: Path) -> None:
    path = tmp_path / "credential"
    path.write_text(f"5.{SECRET}\n")
    new_secret = SECRET[::-1]
    with SubscriberProcess(scripted.address, "--count", "1", credential_file=path) as sub:
        conn = scripted.handshake(f"5.{SECRET} ACK", f"6.{new_secret}")
        wait_until(lambda: path.read_text() == f"6.{new_secret}\n", TIMEOUT, "the new credential stored")
        conn.send_line("MESSAGE 1: for the new client")
        assert conn.read_lines(2) == ["ACK 1", "DISCONNECT"]
        conn.close()
        assert sub.wait() == 0, sub.log
    assert sub.output() == ["for the new client"]
    assert "did not accept credential 5.***" in sub.log and "new client 6.***" in sub.log
    assert SECRET not in sub.log and new_secret not in sub.log
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keepalive_pings_and_gives_up_on_a_silent_server(scripted: ScriptedServer, tmp_path: Path) -> None:
    with SubscriberProcess(scripted.address, "--keepalive", "0.3", "--count", "1",
                           credential_file=tmp_path / "credential") as sub:
        silent = scripted.handshake("NONE ACK", f"5.{SECRET}")
        assert silent.read_line() == "PING"  # never answered
        alive = scripted.handshake(f"5.{SECRET} ACK", f"5.{SECRET}")
        sub.wait_log("no answer to PING within 0.3 s")
        for _ in range(2):
            assert alive.read_line() == "PING"
            alive.send_line("PONG")
        alive.send_line("MESSAGE 3: still here")
        assert alive.read_lines(2) == ["ACK 3", "DISCONNECT"]
        alive.close()
        assert sub.wait() == 0, sub.log
        silent.close()
    assert sub.output() == ["still here"]
    assert sub.log.count("no answer to PING") == 1, "a PONG keeps the connection"


def test_one_credential_file_one_subscriber_and_a_name_makes_another_client(db_url: str,
                                                                             tmp_path: Path) -> None:
    """Two subscribers on one credential would take each other over forever: the second
    refuses to start and says why; with --name it is a client of its own."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enq:
        address = f"127.0.0.1:{server.port}"
        with SubscriberProcess(address, "--count", "1", env=env) as first:
            credential = credential_in(tmp_path / "config" / "niki" / f"credential-localhost-{server.port}")
            with SubscriberProcess(address, "--count", "1", env=env) as second:
                assert second.wait() == 1, second.log
            assert "is in use by another niki-client" in second.log and "--name" in second.log
            with SubscriberProcess(address, "--count", "1", "--name", "tablet", env=env) as named:
                other = credential_in(tmp_path / "config" / "niki" /
                                      f"credential-localhost-{server.port}-tablet")
                assert numeric_id(other) != numeric_id(credential)
                enq.enqueue(other, "for the tablet")
                assert named.wait() == 0, named.log
            enq.enqueue(credential, "for the first")
            assert first.wait() == 0, first.log
        assert first.output() == ["for the first"] and named.output() == ["for the tablet"]


def test_every_entry_point_knows_its_version() -> None:
    for module in ("messaging_server", "messaging_server.tools.niki_enqueue",
                   "messaging_server.client.subscriber", "messaging_server.tools.admin"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.strip().endswith(messaging_server.__version__), \
            (module, done.stdout, done.stderr)
