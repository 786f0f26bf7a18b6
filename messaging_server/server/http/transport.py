"""The HTTP transport under the API: a server and a request handler that bound what a
caller can make them hold.

``http.server`` alone would keep a connection (and its thread) for as long as a
client trickles bytes, read headers without limit, and accept connections without
end.  Here:

- at most MAX_HTTP_CONNECTIONS connections.  One still waiting for a request head
  (a new connection, a kept-alive one between requests, or a slow stranger that
  never finishes its head) gives way to a newcomer when the cap is reached: the
  one that has waited longest is closed.  So connections that need no token
  cannot lock out ``/healthz`` or a caller with the token; only when every
  connection is serving a request does a newcomer get a 503, written by the
  accepting thread before any thread exists for it;
- a request whose body framing two HTTP implementations could read differently
  (RFC 9112 section 6.3: several Content-Length headers, one with
  Transfer-Encoding, one that is not ASCII digits, a malformed header line) gets
  400 and the connection is closed: a proxy reading it the other way would see
  another request;
- each request must arrive in full within ``request_timeout`` (an overall
  deadline, not one per read), its head within MAX_HEAD_BYTES (431 beyond);
- a body declared over MAX_REQUEST_BYTES is refused before a byte of it is read;
- a kept-alive connection idle for KEEPALIVE_IDLE_S after an answer is closed;
- answers are written within ``write_timeout``.

What the requests mean is :mod:`messaging_server.server.http.api`'s business.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import socketserver
import threading
import time
from email.message import Message
from http import HTTPStatus
from http.client import HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Type, cast

from messaging_server.errors import port_error

log = logging.getLogger("messaging_server.http")

# Concurrent HTTP connections; each costs a thread and, while it runs a
# request, a database connection from the server's pool.  Those waiting for a
# request head give way to newcomers (ConnectionSlots), so the cap bounds the
# threads without letting slow strangers lock everyone out.
MAX_HTTP_CONNECTIONS = 64
# A request body is refused beyond this, from its Content-Length.  A batch of
# the API's 100 bodies of 4 KiB fits with room for JSON escapes.
MAX_REQUEST_BYTES = 1024 * 1024
# Bytes read before the body begins: request line and headers (plus the first
# buffer of body bytes that may come with them).
MAX_HEAD_BYTES = 32 * 1024
# A kept-alive connection idle this long after a response is closed (at most
# the request timeout): an idle connection holds one of the MAX_HTTP_CONNECTIONS.
KEEPALIVE_IDLE_S = 5.0
# Reads from the socket, in bytes.
READ_BUFFER = 8192
# After refusing a request whose bytes were not all read, input is read and
# dropped for at most this long (and this much) before the socket is closed:
# closing over unread input resets the connection, and the reset can destroy
# the refusal before the client reads it.
LINGER_S = 1.0
LINGER_BYTES = 256 * 1024

BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 27\r\nConnection: close\r\n\r\n"
                 b'{"error": "server is busy"}')


class HeadTooLarge(HTTPException):
    """The request line and headers passed MAX_HEAD_BYTES.  An HTTPException, so that
    ``http.server`` answers 431 when it happens among the headers."""


def framing_problem(headers: Message) -> str:
    """Why the request's body framing is ambiguous, as RFC 9112 section 6.3 judges it;
    "" when it is not.

    Two lengths, even equal ones (the RFC allows refusing them, and nothing
    legitimate sends them), a length beside Transfer-Encoding, a length that is
    not plain ASCII digits: another implementation in the path (a proxy, a
    balancer) may pick another reading, and see another request in the same bytes.
    A header line the parser could not read (whitespace before the colon, no
    colon) ends ``http.client``'s headers early, dropping those after it, and a
    folded line (obs-fold) is read differently by different parsers: both refused.
    """
    if headers.defects or headers.get_payload():
        return "malformed header line"
    if any("\r" in value or "\n" in value for value in headers.values()):
        return "folded header line (obs-fold)"
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        return "more than one Content-Length header"
    if lengths and headers.get("Transfer-Encoding") is not None:
        return "Content-Length together with Transfer-Encoding"
    digits = lengths[0].strip(" \t") if lengths else "0"
    if not (digits.isascii() and digits.isdigit()):
        return "malformed Content-Length: not a number of ASCII digits"
    return ""


class ConnectionSlots:
    """The MAX_HTTP_CONNECTIONS slots, and which of their connections only wait for a request.

    A connection waits from its accept (and again after each answer, kept alive)
    until its request head is read; then it serves the request.  At the cap, a
    newcomer takes the slot of the connection that has waited longest, which is
    shut down (its thread, blocked reading, sees the end and exits); only when
    every connection is serving is the newcomer refused.  A stranger holding
    connections open with half a head therefore delays nobody: each newcomer
    (the probe, a caller with the token) displaces the oldest of them, and the
    stranger would have to open the cap's worth of new connections within the
    few milliseconds a caller takes to send its head to displace that caller.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        # Every connection holding a slot -> since when it waits for a request
        # head (time.monotonic()), or None while it serves a request.
        self._held: Dict[socket.socket, Optional[float]] = {}

    def admit(self, conn: socket.socket) -> bool:
        """Give ``conn`` a slot, displacing the longest-waiting connection at the cap;
        False when every slot is serving a request."""
        with self._lock:
            if len(self._held) >= self._limit:
                waiting = [(since, id(held), held) for held, since in self._held.items()
                           if since is not None]
                if not waiting:
                    return False
                _, _, displaced = min(waiting)
                del self._held[displaced]
                with contextlib.suppress(OSError):
                    displaced.shutdown(socket.SHUT_RDWR)
            self._held[conn] = time.monotonic()
            return True

    def waiting(self, conn: socket.socket) -> None:
        """``conn`` waits for its next request head (or lingers after its last answer)."""
        with self._lock:
            if conn in self._held:
                self._held[conn] = time.monotonic()

    def serving(self, conn: socket.socket) -> bool:
        """``conn``'s request head is read; False if it was displaced meanwhile."""
        with self._lock:
            if conn not in self._held:
                return False
            self._held[conn] = None
            return True

    def release(self, conn: socket.socket) -> None:
        with self._lock:
            self._held.pop(conn, None)

    def connections(self) -> List[socket.socket]:
        with self._lock:
            return list(self._held)


class DeadlineReader(io.RawIOBase):
    """The socket as the request handler reads it: within a deadline, and a byte budget.

    ``http.server`` reads the head line by line with a timeout per read, so a
    client trickling a byte at a time could hold its thread for ever.  Here
    every read waits only for what is left of the request's deadline, and the
    head may not exceed its budget.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = 0.0
        self.budget: Optional[int] = None  # bytes still allowed; None: no limit

    def begin(self, timeout: float, budget: int) -> None:
        self.deadline = time.monotonic() + timeout
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the request did not arrive in time")
        view = memoryview(buffer).cast("B")
        if self.budget is not None:
            if self.budget <= 0:
                raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
            view = view[:self.budget]
        self._sock.settimeout(remaining)
        count = self._sock.recv_into(view)
        if self.budget is not None:
            self.budget -= count
        return count


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """One HTTP connection: its requests one after the other (keep-alive), each read within
    the server's request timeout and the head's byte budget.

    A subclass that answers without reading a request's body sets ``_body_unread``
    (the connection then closes), and sets ``_linger`` when it closes the connection
    after an answer, so that the answer is not lost to a reset.
    """

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body go out as separate writes

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file; the deadline reader takes its place
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, READ_BUFFER)
        self._body_unread = False
        self._linger = False
        self._answered = 0  # requests answered on this connection

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._linger:
                self.server.slots.waiting(self.connection)  # only draining: it may give way
                self._drain()

    def _drain(self) -> None:
        """The answer is out; half-close, and swallow what the client still sends, briefly."""
        deadline = time.monotonic() + LINGER_S
        dropped = 0
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            while dropped < LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(READ_BUFFER)
                if not chunk:
                    break
                dropped += len(chunk)

    def parse_request(self) -> bool:
        """``http.server``'s parsing, then the checks of a head that is complete."""
        if not super().parse_request():
            return False
        return self._head_read()  # again, for a request without Expect: 100-continue

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``)."""
        if not self._head_read():
            return False
        length = self.content_length()
        if length is not None and length > MAX_REQUEST_BYTES:
            self._body_unread = True
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return False
        return super().handle_expect_100()

    def _head_read(self) -> bool:
        """The head is in: the connection now serves a request (unless it was displaced
        meanwhile), if the head's body framing is unambiguous."""
        if not self.server.slots.serving(self.connection):
            self.close_connection = True
            return False
        problem = framing_problem(self.headers)
        if problem:
            self._body_unread = True
            self.send_error(HTTPStatus.BAD_REQUEST, problem)
            return False
        return True

    def content_length(self) -> Optional[int]:
        """The request's Content-Length (None without one); valid once the head was read.
        Lengths too long to be worth converting count as one past MAX_REQUEST_BYTES."""
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        digits = text.strip(" \t").lstrip("0") or "0"
        return int(digits) if len(digits) <= len(str(MAX_REQUEST_BYTES)) else MAX_REQUEST_BYTES + 1

    def handle_one_request(self) -> None:
        self.server.slots.waiting(self.connection)
        if self._answered and not self._next_request_comes():
            self.close_connection = True
            return
        self._answered += 1
        self._reader.begin(self.server.request_timeout, MAX_HEAD_BYTES)
        self._body_unread = False
        try:
            super().handle_one_request()
        except HeadTooLarge:  # in the request line; among headers http.server answers 431
            self.close_connection = True
            self.requestline, self.request_version, self.command = "", "", ""
            with contextlib.suppress(OSError):
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if self._body_unread:  # its bytes would be read as the next request
            self.close_connection = True

    def _next_request_comes(self) -> bool:
        """After a response: whether the next request begins within the keep-alive idle time."""
        self._reader.begin(min(KEEPALIVE_IDLE_S, self.server.request_timeout), READ_BUFFER)
        try:
            return bool(cast(io.BufferedReader, self.rfile).peek(1))  # buffered, or one read
        except OSError:  # idle too long (a timeout), or the client went away
            return False


class BoundedHTTPServer(ThreadingHTTPServer):
    """An HTTP server that holds at most MAX_HTTP_CONNECTIONS, and owns its thread and shutdown."""

    daemon_threads = True
    # Connections waiting to be accepted (socketserver's default, 5, makes a burst
    # of clients wait for SYN retransmissions, a second each).
    request_queue_size = MAX_HTTP_CONNECTIONS

    def __init__(self, host: str, port: int, handler: Type[BoundedRequestHandler],
                 request_timeout: float, write_timeout: float) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.slots = ConnectionSlots(MAX_HTTP_CONNECTIONS)
        self._thread: Optional[threading.Thread] = None
        super().__init__((host, port), handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse lookup of the address (slow where DNS is)."""
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as exc:
            host, port = self.server_address[:2]
            raise port_error(exc, "HTTP API port (TCP)", str(host), int(port)) from exc
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = str(self.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection (displacing one that only waits, at the cap), or answer 503
        at once and close it (on the accepting thread, before a thread exists for it; the
        answer goes into an empty send buffer)."""
        if self.slots.admit(request):
            return True
        log.warning("HTTP connection from %s refused: %d connections already serving requests",
                    client_address[0], MAX_HTTP_CONNECTIONS)
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it: it never ran, so it never frees its slot
            self.slots.release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request (reset, closed mid-request): no traceback
        on stderr for what any client can cause."""
        log.debug("HTTP connection from %s ended with an error", client_address[0], exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end the open connections, and let go of the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        for request in self.slots.connections():
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        self.server_close()
