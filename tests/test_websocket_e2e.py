"""The line protocol over WebSocket (GET /v1/ws on the HTTP port) of a real server
process, spoken with a wsproto client over real sockets, on SQLite and on MariaDB."""

from __future__ import annotations

import re
import socket
from typing import Optional

import pytest

from messaging_server import Enqueuer
from messaging_server.client.sdk import Client
from tests.helpers import RawClient, ServerProcess, wait_until
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


def test_a_rebinding_page_is_refused_without_a_token(sqlite_url: str) -> None:
    """A page that rebinds its own name to 127.0.0.1 sends its name as Host and Origin:
    without a token the API serves this machine only, the WebSocket too."""
    with ServerProcess(sqlite_url) as server:
        evil = f"evil.example:{server.http_port}"
        with pytest.raises(WsRefused) as refused:
            WsClient(server.http_port, origin=f"http://{evil}", host=evil)
        assert refused.value.status == 403
    with ServerProcess(sqlite_url, "--api-token", "t0ken") as server:  # a public API: any name
        public = WsClient(server.http_port, host=f"push.example:{server.http_port}")
        with public:
            assert public.read_line() == "GET_CLIENT_ID"


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
            # One count per address, whichever way its connections came.
            with server.connect() as tcp:
                assert tcp.read_line() == "ERROR: server busy: too many connections from your address"
        tcp = wait_until(lambda: _greeted(server), 10, "the WebSocket's place to be free again")
        with tcp:
            assert _refused(server.http_port) == 503  # the TCP connection holds the place
        # The first's end frees its place.
        wait_until(lambda: _opens(server.http_port), 10, "a WebSocket to be admitted again")


def _greeted(server: ServerProcess) -> Optional[RawClient]:
    """A TCP connection the server admitted (it says GET_CLIENT_ID), else None."""
    client = server.connect()
    if client.read_line() == "GET_CLIENT_ID":
        return client
    client.sock.close()
    return None


def _refused(port: int) -> int:
    try:
        WsClient(port).close()
        return 0
    except WsRefused as refused:
        return refused.status


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
        # The protocol's limit is 1024 bytes with the line end: 1023 of text pass through
        # (and get the protocol's answer), 1024 close the WebSocket.
        with WsClient(server.http_port) as ws:
            assert ws.read_line() == "GET_CLIENT_ID"
            ws.send_line("NONE")
            assert ws.read_line().startswith("SET_CLIENT_ID: ")
            ws.send_line("x" * 1023)
            assert ws.read_line() == "Invalid command: " + "x" * 1023
            ws.send_line("x" * 1024)
            assert ws.read_line() is None and ws.closed == 1009
        # A flood of empty fragments is bounded as a long line is.
        with WsClient(server.http_port) as ws:
            assert ws.read_line() == "GET_CLIENT_ID"
            ws.send_line("P", finished=False)
            for _ in range(2000):
                ws.send_line("", finished=False)
            assert ws.read_line() is None and ws.closed == 1009
        for headers, status in ((b"Sec-WebSocket-Version: 8\r\n", b"426"),
                                (b"Content-Length: 5\r\n", b"400")):
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as plain:
                plain.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              + (b"" if b"Version" in headers else b"Sec-WebSocket-Version: 13\r\n")
                              + headers + b"\r\n" + (b"hello" if b"Length" in headers else b""))
                answer = plain.recv(500)
                assert answer.startswith(b"HTTP/1.1 " + status), answer
                if status == b"426":
                    assert b"Sec-WebSocket-Version: 13" in answer
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as plain:
            plain.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert plain.recv(100).startswith(b"HTTP/1.1 426 Upgrade Required")
        assert "Traceback" not in server.log
