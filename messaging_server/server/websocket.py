"""The line protocol over WebSocket (``GET /v1/ws`` on the HTTP port), for browsers.

A browser cannot open a TCP connection, so this module carries the very same
protocol in WebSocket text frames, one line per frame, in both directions.  It
does not speak the protocol itself: an accepted WebSocket gets one end of a
socket pair, and the other end is handed to the Niki server as a connection from
the WebSocket's peer (``NikiServer.adopt``).  The handshake, the commands, ACK
mode, delivery, takeover, the caps and the per-address limits are therefore the
TCP port's, with no second implementation to drift.

The framing is wsproto's (sans-I/O, like the protocol module): this module only
moves bytes between the two sockets, in one thread (the HTTP connection's):

* a text frame from the browser becomes its text plus ``\\n`` (a trailing
  newline in the frame is not doubled); a binary frame closes the WebSocket
  (1003), and so does a line over the protocol's limit (1009), also one sent as a
  flood of fragments;
* each line the server writes becomes one text frame, without its newline;
* the server closing the connection closes the WebSocket (1000), and the browser
  closing it (or vanishing) ends the connection as a TCP client's end would.

Every buffer is bounded: at most MAX_MESSAGE_BYTES of a message being received, one
read (64 KiB) of the server's lines at a time, written to the browser within the
server's write timeout or the connection is closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from messaging_server.protocol.lines import MAX_CLIENT_LINE
from messaging_server.server.http.auth import cross_site

log = logging.getLogger("messaging_server.server.websocket")

PATH = "/v1/ws"
# A message carries one line: at most the text of a client line (the protocol's limit
# counts the line end, which the frame does not carry).  Each fragment also costs
# FRAGMENT_COST, so that a flood of empty fragments is bounded too.
MAX_MESSAGE_BYTES = MAX_CLIENT_LINE - 1
FRAGMENT_COST = 16
READ_BYTES = 65536
CLOSE_NORMAL, CLOSE_UNSUPPORTED, CLOSE_TOO_BIG, CLOSE_GOING_AWAY = 1000, 1003, 1009, 1001

def _refusal(status: str, error: str, *headers: str) -> bytes:
    """A complete HTTP answer that refuses the upgrade (a JSON error, as the API's)."""
    body = json.dumps({"error": error}).encode("utf-8")
    head = [f"HTTP/1.1 {status}", *headers, "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


WRONG_VERSION = _refusal("426 Upgrade Required", "only WebSocket version 13 is spoken",
                         "Sec-WebSocket-Version: 13")
BAD_HANDSHAKE = _refusal("400 Bad Request", "expected a WebSocket upgrade request")
# Hands one end of a socket pair to the Niki server as a connection from ``peer``;
# False when the server refused it (at its connection caps).
Adopt = Callable[[socket.socket, Tuple[str, int]], bool]


def origin_allowed(origin: Optional[str], host_header: Optional[str], allowed: Sequence[str]) -> bool:
    """A WebSocket from a page of another site is refused unless its origin is listed
    (``--ws-origins``): programs send no Origin; the HTTP port's own pages may connect."""
    if origin is None or not cross_site(origin, host_header, None):
        return True
    origin = origin.strip().lower().rstrip("/")
    return "*" in allowed or origin in (a.lower().rstrip("/") for a in allowed)


def raw_request(request_line: bytes, headers: Iterable[Tuple[str, str]]) -> bytes:
    """The request head again, as wsproto reads it (http.server has parsed it already)."""
    lines = [request_line.rstrip(b"\r\n")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Bridge:
    """One WebSocket and its socket pair to the Niki server, pumped until either ends."""

    def __init__(self, sock: socket.socket, inner: socket.socket, ws: WSConnection,
                 write_timeout: float) -> None:
        self.sock = sock  # the browser's
        self.inner = inner  # our end of the pair; the server has the other
        self.ws = ws
        self.write_timeout = write_timeout
        self._partial: List[str] = []  # a text message arriving in several frames
        self._partial_bytes = 0
        self._from_server = b""  # a line the server has not finished writing
        self._closing = False

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ, "browser")
            selector.register(self.inner, selectors.EVENT_READ, "server")
            while not self._closing:
                for key, _ in selector.select():
                    if key.data == "browser":
                        self._from_browser()
                    else:
                        self._from_niki()
                    if self._closing:
                        break
        self._finish()

    def _from_browser(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except OSError:
            data = b""
        if not data:  # gone without a close frame
            self._closing = True
            return
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._text(event)
                elif isinstance(event, BytesMessage):
                    self._close(CLOSE_UNSUPPORTED, "text frames only: one protocol line each")
                elif isinstance(event, Ping):
                    self._send(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is not ConnectionState.CLOSED:
                        self._send(self.ws.send(event.response()))
                    self._closing = True
                if self._closing:
                    return
        except (RemoteProtocolError, LocalProtocolError) as exc:
            log.debug("WebSocket protocol error: %s", exc)
            self._closing = True

    def _text(self, event: TextMessage) -> None:
        self._partial.append(event.data)
        self._partial_bytes += len(event.data.encode("utf-8", "surrogatepass")) + FRAGMENT_COST
        # Room for a line end the frame may carry, and for the fragments' cost.
        if self._partial_bytes > MAX_MESSAGE_BYTES + 2 + FRAGMENT_COST * 64:
            self._too_big()
            return
        if not event.message_finished:
            return
        text, self._partial, self._partial_bytes = "".join(self._partial), [], 0
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        if len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
            self._too_big()
            return
        try:
            self.inner.sendall(text.encode("utf-8", "surrogateescape") + b"\n")
        except OSError:
            self._closing = True

    def _too_big(self) -> None:
        self._close(CLOSE_TOO_BIG, f"a frame carries one line of at most {MAX_MESSAGE_BYTES} bytes")

    def _from_niki(self) -> None:
        try:
            data = self.inner.recv(READ_BYTES)
        except OSError:
            data = b""
        if not data:  # the server closed the connection: so do we, cleanly
            self._close(CLOSE_NORMAL, "")
            return
        *lines, self._from_server = (self._from_server + data).split(b"\n")
        for line in lines:
            self._send(self.ws.send(TextMessage(data=line.rstrip(b"\r").decode("utf-8", "replace"))))
            if self._closing:
                return

    def _close(self, code: int, reason: str) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self._send(self.ws.send(CloseConnection(code=code, reason=reason)))
        self._closing = True

    def _send(self, data: bytes) -> None:
        """Write to the browser within the write timeout (a browser that does not read
        holds this thread no longer), or end the bridge."""
        try:
            self.sock.settimeout(self.write_timeout)
            self.sock.sendall(data)
        except OSError:
            self._closing = True

    def _finish(self) -> None:
        for sock in (self.inner, self.sock):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.inner.close()


def serve(sock: socket.socket, request_head: bytes, origin: Optional[str], host_header: Optional[str],
          allowed_origins: Sequence[str], adopt: Adopt, peer: Tuple[str, int],
          write_timeout: float) -> str:
    """Run one WebSocket on ``sock`` whose request head (already read) was
    ``request_head``, until it ends; return how it went, for the log."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(request_head)
        request = next((e for e in ws.events() if isinstance(e, Request)), None)
    except RemoteProtocolError as exc:
        version = "version" in str(exc).lower()
        sock.sendall(WRONG_VERSION if version else BAD_HANDSHAKE)
        return f"refused: not a WebSocket handshake ({exc})"
    if request is None:
        sock.sendall(BAD_HANDSHAKE)
        return "refused: not a WebSocket handshake"
    if not origin_allowed(origin, host_header, allowed_origins):
        sock.sendall(ws.send(RejectConnection(status_code=403, has_body=False)))
        return f"refused: origin {origin!r} is not allowed (--ws-origins)"
    inner, outer = socket.socketpair()
    if not adopt(outer, peer):  # the server is at its caps
        inner.close()
        sock.sendall(ws.send(RejectConnection(status_code=503, has_body=False)))
        return "refused: the server is at its connection limit"
    sock.sendall(ws.send(AcceptConnection()))
    Bridge(sock, inner, ws, write_timeout).run()
    return "closed"
