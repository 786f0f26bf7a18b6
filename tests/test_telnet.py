"""The seed README's telnet walkthrough, typed into the real ``telnet`` program.

telnet runs on a pseudo-terminal (``pty.openpty``) exactly as it would in a
person's terminal: what we type goes through the terminal's line discipline
(which echoes it), telnet sends each line with ``\\r\\n``, and we read what
telnet prints from the master side with ``select`` and deadlines.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from typing import Iterator, List

import pytest

from messaging_server import Enqueuer
from tests.helpers import CREDENTIAL, ServerProcess, numeric_id, wait_until

IN_CI = os.environ.get("CI", "").lower() == "true"
TELNET = "/usr/bin/telnet" if os.access("/usr/bin/telnet", os.X_OK) else shutil.which("telnet")
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def telnet() -> str:
    if TELNET is None:
        reason = "the telnet program is not installed (Debian: apt-get install telnet)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return TELNET


class TelnetSession:
    """``telnet host port`` on a pseudo-terminal."""

    def __init__(self, program: str, host: str, port: int) -> None:
        self.host = host
        self.master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", LC_ALL="C")
        try:
            self.proc = subprocess.Popen([program, host, str(port)], stdin=slave, stdout=slave,
                                         stderr=slave, env=env, start_new_session=True)
        finally:
            os.close(slave)
        self.output = b""
        self.typed: List[str] = []
        self.eof = False
        self._pos = 0

    def _read(self, deadline: float) -> None:
        """Read what telnet printed, waiting until ``deadline`` for something."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            return
        ready, _, _ = select.select([self.master], [], [], remaining)
        if not ready:
            return
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every slave descriptor closed (telnet exited)
            data = b""
        if data:
            self.output += data
        else:
            self.eof = True

    def expect_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The next line telnet prints that is not an echo of what we typed must match ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.output.find(b"\r\n", self._pos)
            if end >= 0:
                line = self.output[self._pos:end].decode("utf-8", errors="replace")
                self._pos = end + 2
                if line in self.typed:
                    continue
                match = re.fullmatch(pattern, line)
                assert match, f"expected {pattern!r}, telnet printed {line!r}; so far:\n{self.text}"
                return match
            if self.eof or time.monotonic() >= deadline:
                raise AssertionError(f"telnet printed no line matching {pattern!r} within {timeout} s; "
                                     f"so far:\n{self.text}")
            self._read(deadline)

    def type(self, text: str) -> None:
        """Type a line at the keyboard."""
        self.typed.append(text)
        os.write(self.master, text.encode("utf-8") + b"\n")

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """Wait for telnet to exit, collecting the rest of what it prints."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"telnet still running after {timeout} s:\n{self.text}") from None

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def lines(self) -> List[str]:
        """Everything telnet printed, by line, echoes of our typing removed."""
        return [line for line in self.text.split("\r\n") if line and line not in self.typed]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        os.close(self.master)


@pytest.fixture
def sessions(telnet: str) -> Iterator[list]:
    opened: List[TelnetSession] = []
    yield opened
    for session in opened:
        session.close()


def open_session(sessions: list, program: str, host: str, port: int) -> TelnetSession:
    session = TelnetSession(program, host, port)
    sessions.append(session)
    session.expect_line(r"Trying \S+\.\.\.")
    session.expect_line(rf"Connected to {re.escape(host)}\.")
    session.expect_line(r"Escape character is '\^\]'\.")
    return session


def close_with_disconnect(session: TelnetSession) -> None:
    session.type("DISCONNECT")
    session.expect_line(r"Connection closed by foreign host\.")
    # telnet's own exit status is its business (inetutils: 0); it must exit by itself.
    assert session.wait_exit() >= 0


def assert_transcript(session: TelnetSession, server_lines: List[str]) -> None:
    """Everything telnet printed, exactly: its banner, the server's lines, its goodbye."""
    lines = session.lines()
    assert re.fullmatch(r"Trying \S+\.\.\.", lines[0]), lines
    assert lines[1:3] == [f"Connected to {session.host}.", "Escape character is '^]'."], lines
    assert lines[3:] == [*server_lines, "Connection closed by foreign host."], lines


def test_readme_walkthrough(server: ServerProcess, telnet: str, sessions: list) -> None:
    host = socket.gethostname()
    with Enqueuer(server.db_url, server.peers) as enq:
        # Initial handshake: GET_CLIENT_ID, answer NONE, store the credential (<id>.<secret>).
        first = open_session(sessions, telnet, host, server.port)
        first.expect_line("GET_CLIENT_ID")
        first.type("NONE")
        client_id = first.expect_line(rf"SET_CLIENT_ID: ({CREDENTIAL})").group(1)

        # Enqueue from the application side, as the README does from irb.
        assert enq.enqueue(client_id, "hello client") is True
        first.expect_line("MESSAGE: hello client")
        first.type("FOO")
        first.expect_line("Invalid command: FOO")
        close_with_disconnect(first)
        assert_transcript(first, ["GET_CLIENT_ID", f"SET_CLIENT_ID: {client_id}",
                                  "MESSAGE: hello client", "Invalid command: FOO"])

        # Queued while the client is away: delivered, in order, when the user pastes back the
        # whole credential.
        assert enq.enqueue(client_id, "while away 1") is True
        assert enq.enqueue(client_id, "while away 2") is True
        second = open_session(sessions, telnet, host, server.port)
        second.expect_line("GET_CLIENT_ID")
        second.type(client_id)
        second.expect_line(re.escape(f"SET_CLIENT_ID: {client_id}"))
        second.expect_line("MESSAGE: while away 1")
        second.expect_line("MESSAGE: while away 2")
        close_with_disconnect(second)
        assert_transcript(second, ["GET_CLIENT_ID", f"SET_CLIENT_ID: {client_id}",
                                   "MESSAGE: while away 1", "MESSAGE: while away 2"])

        # The original needed the host name; this server also answers on localhost.
        assert enq.enqueue(client_id, "via localhost") is True
        third = open_session(sessions, telnet, "localhost", server.port)
        third.expect_line("GET_CLIENT_ID")
        third.type(client_id)
        third.expect_line(re.escape(f"SET_CLIENT_ID: {client_id}"))
        third.expect_line("MESSAGE: via localhost")
        # Nothing from the earlier sessions comes again: the next line is this live one.
        assert enq.enqueue(client_id, "live marker") is True
        third.expect_line("MESSAGE: live marker")
        close_with_disconnect(third)
        assert_transcript(third, ["GET_CLIENT_ID", f"SET_CLIENT_ID: {client_id}",
                                  "MESSAGE: via localhost", "MESSAGE: live marker"])


def test_telnet_escape_quit_leaves_messages_pending(server: ServerProcess, telnet: str,
                                                    sessions: list) -> None:
    """Leaving telnet with its escape key (no DISCONNECT) loses nothing queued afterwards."""
    host = socket.gethostname()
    with Enqueuer(server.db_url, server.peers) as enq:
        session = open_session(sessions, telnet, host, server.port)
        session.expect_line("GET_CLIENT_ID")
        session.type("NONE")
        client_id = session.expect_line(rf"SET_CLIENT_ID: ({CREDENTIAL})").group(1)
        # Ctrl-] then "quit": telnet closes the connection itself, no DISCONNECT sent.
        os.write(session.master, b"\x1d")
        session.type("quit")
        assert session.wait_exit() >= 0
        assert "Connection closed." in session.text, session.text
        wait_until(lambda: f"client {numeric_id(client_id)} disconnected from " in server.log,
                   message="the server to see telnet leave")
        assert enq.enqueue(client_id, "after quit") is True

        back = open_session(sessions, telnet, host, server.port)
        back.expect_line("GET_CLIENT_ID")
        back.type(client_id)
        back.expect_line(re.escape(f"SET_CLIENT_ID: {client_id}"))
        back.expect_line("MESSAGE: after quit")
        close_with_disconnect(back)
        assert_transcript(back, ["GET_CLIENT_ID", f"SET_CLIENT_ID: {client_id}", "MESSAGE: after quit"])
