"""The line protocol over WebSocket (GET /v1/ws on the HTTP port) of a real server
process, spoken with a wsproto client over real sockets, on SQLite and on MariaDB."""

from __future__ import annotations

import re
import socket

import pytest

from messaging_server import Enqueuer
from messaging_server.client import Client
from tests.helpers import ServerProcess, wait_until
from tests.ws_client import WsClient, WsRefused

ID_LINE = re.compile(r"SET_CLIENT_ID: (\d+\.[A-Za-z0-9_-]{24})")


def test_the_same_protocol_as_telnet(db_url: str) -> None:
    with ServerProcess(db_url) as server, Enqueuer(db_url) as enq:
        with WsClient(server.http_port) as ws:
            assert ws.read_line() == "GET_CLIENT_ID"
            ws.send_line("NONE ACK")
            credential = ID_LINE.fullmatch(ws.read_line() or "").group(1)
            assert enq.enqueue(credential, "hello browser")
            line = ws.read_line()
            assert re.fullmatch(r"MESSAGE (\d+): hello browser", line or ""), line
            message_id = line.split()[1].rstrip(":")
            ws.send_line(f"ACK {message_id}\n")  # a trailing newline is not doubled
            ws.send_line("PING")
            assert ws.read_line() == "PONG"
            ws.send_line("FOO")
            assert ws.read_line() == "Invalid command: FOO"
            ws.send_line("DISCONNECT")
            assert ws.read_line() is None and ws.closed == 1000
        assert enq.enqueue(credential, "while away")
        # The same client over TCP gets what was queued meanwhile, and not the ACKed one.
        with Client("127.0.0.1", server.port, client_id=credential, ack=True) as tcp:
            assert tcp.receive(timeout=10) == "while away"
        # And a takeover works across transports: a TCP connection takes a WebSocket over.
        with WsClient(server.http_port) as ws:
            assert ws.read_line() == "GET_CLIENT_ID"
            ws.send_line(credential)
            assert ws.read_line() == f"SET_CLIENT_ID: {credential}"
            with Client("127.0.0.1", server.port, client_id=credential):
                assert ws.read_line() is None  # closed: taken over
        assert "Traceback" not in server.log


def test_origins_other_than_its_own_need_listing(sqlite_url: str) -> None:
    with ServerProcess(sqlite_url, "--ws-origins", "https://app.example.com") as server:
        own = f"http://127.0.0.1:{server.http_port}"
        for origin in (None, own, "https://app.example.com"):
            with WsClient(server.http_port, origin=origin) as ws:
                assert ws.read_line() == "GET_CLIENT_ID", origin
        for origin in ("https://evil.example", "null"):
            with pytest.raises(WsRefused) as refused:
                WsClient(server.http_port, origin=origin)
            assert refused.value.status == 403


def test_the_client_ports_caps_apply(sqlite_url: str) -> None:
    with ServerProcess(sqlite_url, "--max-connections-per-address", "1") as server:
        with WsClient(server.http_port) as first:
            assert first.read_line() == "GET_CLIENT_ID"
            with pytest.raises(WsRefused) as refused:
                WsClient(server.http_port)
            assert refused.value.status == 503
        # The first's end frees its place.
        wait_until(lambda: _opens(server.http_port), 10, "a WebSocket to be admitted again")


def _opens(port: int) -> bool:
    try:
        with WsClient(port) as ws:
            return ws.read_line() == "GET_CLIENT_ID"
    except WsRefused:
        return False


def test_bad_frames_and_requests(sqlite_url: str) -> None:
    with ServerProcess(sqlite_url) as server:
        with WsClient(server.http_port) as ws:
            assert ws.read_line() == "GET_CLIENT_ID"
            ws.send_line("x" * 10_000)
            assert ws.read_line() is None and ws.closed == 1009
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as plain:
            plain.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert plain.recv(100).startswith(b"HTTP/1.1 426 Upgrade Required")
        assert "Traceback" not in server.log
