"""The HTTP transport under the API: a server and a request handler that bound what a
caller can make them hold.

``http.server`` alone would keep a connection (and its thread) for as long as a
client trickles bytes, read headers without limit, and accept connections without
end.  Here:

- at most MAX_HTTP_CONNECTIONS connections; beyond them, a 503 written by the
  accepting thread and the connection closed, before any thread exists for it;
- each request must arrive in full within ``request_timeout`` (an overall
  deadline, not one per read), its head within MAX_HEAD_BYTES (431 beyond);
- a body declared over MAX_REQUEST_BYTES is refused before a byte of it is read;
- a kept-alive connection idle for KEEPALIVE_IDLE_S after an answer is closed;
- answers are written within ``write_timeout``.

What the requests mean is :mod:`messaging_server.http_api`'s business.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.client import HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Type

log = logging.getLogger("messaging_server.http")

# Concurrent HTTP connections; each costs a thread and, while it runs a
# request, a database connection from the server's pool.
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

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``)."""
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isascii() and length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            self._body_unread = True
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return False
        return super().handle_expect_100()

    def handle_one_request(self) -> None:
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
            return bool(self.rfile.peek(1))  # bytes already buffered, or one read
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
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
        self._active: set = set()
        self._active_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        super().__init__((host, port), handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse lookup of the address (slow where DNS is)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection, or answer 503 at once and close it (on the accepting thread,
        before a thread exists for it; the answer goes into an empty send buffer)."""
        if self._slots.acquire(blocking=False):
            return True
        log.warning("HTTP connection from %s refused: %d connections already",
                    client_address[0], MAX_HTTP_CONNECTIONS)
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it: it never ran, so it never frees its slot
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            self._active.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.discard(request)
            self._slots.release()

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
        with self._active_lock:
            active = list(self._active)
        for request in active:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        self.server_close()
