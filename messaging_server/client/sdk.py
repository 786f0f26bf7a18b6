"""A small blocking Python client for Niki servers.

    with Client("push.example.com", 8000, client_id=stored_id, ack=True) as client:
        save(client.client_id)             # keep it for the next connect
        for body in client.messages():     # pending ones first, then live ones
            print(body)

With ``ack=True`` the client asks for acknowledged delivery: each message is
acknowledged when the application asks for the next one (or disconnects), so
a message the application did not finish with comes again on the next
connection.  ``auto_ack=False`` leaves it to :meth:`Client.ack`.

The line protocol itself lives in :mod:`messaging_server.protocol.lines`; this
module only moves bytes between it and a socket.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import time
from typing import Deque, Iterator, List, Optional, Union

from messaging_server.errors import NikiError
from messaging_server.protocol.lines import (
    ClientEvent,
    ClientProtocol,
    ConnectionClosed,
    IdAssigned,
    IdRequested,
    LineTooLong,
    Message,
    Notice,
)


class ClientError(NikiError):
    """The server did not follow the protocol, or closed during the handshake."""


class Client:
    def __init__(self, host: str, port: int = 8000,
                 client_id: Optional[Union[int, str]] = None, timeout: float = 10.0,
                 ack: bool = False, auto_ack: bool = True,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.host = host
        self.ssl_context = ssl_context  # a server with --tls-cert: e.g. ssl.create_default_context()
        self.port = port
        self.requested_id = client_id
        self.timeout = timeout
        self.ack_mode = ack
        self.auto_ack = auto_ack
        self.last_message_id: Optional[int] = None  # ACK mode: the id of the last message received
        self._unacked: Optional[int] = None
        self.client_id: Optional[str] = None
        self.notices: List[str] = []  # lines other than messages (Invalid command: …)
        self.closed = False
        self._sock: Optional[socket.socket] = None
        self._protocol = ClientProtocol()
        self._events: Deque[ClientEvent] = collections.deque()  # during the handshake
        self._messages: Deque[Message] = collections.deque()

    def connect(self) -> str:
        """Connect and identify; return the client id to store for next time."""
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            self._sock = self.ssl_context.wrap_socket(self._sock, server_hostname=self.host)
        first = self._next_event(self.timeout)
        if not isinstance(first, IdRequested):
            raise ClientError(f"expected GET_CLIENT_ID, got {first!r}")
        self._sock.sendall(self._protocol.identify(self.requested_id, ack=self.ack_mode))
        answer = self._next_event(self.timeout)
        if not isinstance(answer, IdAssigned):
            raise ClientError(f"expected SET_CLIENT_ID, got {answer!r}")
        self.client_id = answer.client_id
        self._pump_handshake_leftovers()
        return self.client_id

    def _pump_handshake_leftovers(self) -> None:
        """Lines that arrived with SET_CLIENT_ID belong to the message stream."""
        while self._events:
            event = self._events.popleft()
            if isinstance(event, Message):
                self._messages.append(event)
            elif isinstance(event, Notice):
                self.notices.append(event.line)
            elif isinstance(event, (ConnectionClosed, LineTooLong)):
                self.closed = True

    def receive(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next message body; None when the server closed; TimeoutError after ``timeout``."""
        message = self.receive_message(timeout)
        return None if message is None else message.body

    def receive_message(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message (with its id in ACK mode); None when the server closed.

        In ACK mode with ``auto_ack``, first acknowledges the message returned before.
        """
        self._ack_previous()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if self.closed:
                return None
            self._pump(deadline)
        message = self._messages.popleft()
        self.last_message_id = message.message_id
        if self.ack_mode and self.auto_ack:
            self._unacked = message.message_id
        return message

    def ack(self, message_id: int) -> None:
        """Tell the server message ``message_id`` is safely received (ACK mode)."""
        assert self._sock is not None, "connect() first"
        self._sock.sendall(self._protocol.ack(message_id))

    def _ack_previous(self) -> None:
        if self._unacked is not None and not self.closed:
            message_id, self._unacked = self._unacked, None
            with contextlib.suppress(OSError):
                self.ack(message_id)

    def messages(self, timeout: Optional[float] = None) -> Iterator[str]:
        """Message bodies until the server closes the connection."""
        while True:
            body = self.receive(timeout)
            if body is None:
                return
            yield body

    def read_line(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next line that is not a message (``Invalid command: …``); None when closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.notices:
            if self.closed:
                return None
            self._pump(deadline)
        return self.notices.pop(0)

    def send_command(self, command: str) -> None:
        assert self._sock is not None, "connect() first"
        self._sock.sendall(self._protocol.command(command))

    def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT and read until the server closes, then close.

        Messages the server wrote before it saw DISCONNECT were marked delivered:
        they are kept, and ``receive()`` still returns them after this.
        """
        if self._sock is None:
            return
        deadline = time.monotonic() + timeout
        self._ack_previous()
        with contextlib.suppress(OSError, TimeoutError):  # closing anyway
            if not self.closed:
                self._sock.sendall(self._protocol.command("DISCONNECT"))
            while not self.closed and time.monotonic() < deadline:
                self._pump(deadline)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _next_event(self, timeout: Optional[float]) -> ClientEvent:
        """The next event during the handshake."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            if self.closed:
                return ConnectionClosed()
            self._events.extend(self._read(deadline))
        return self._events.popleft()

    def _pump(self, deadline: Optional[float]) -> None:
        """Read once and sort what arrived into messages and notices."""
        for event in self._read(deadline):
            if isinstance(event, Message):
                self._messages.append(event)
            elif isinstance(event, Notice):
                self.notices.append(event.line)

    def _read(self, deadline: Optional[float]) -> List[ClientEvent]:
        if self._sock is None:
            self.closed = True
            return [ConnectionClosed()]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"nothing from {self.host}:{self.port} within the timeout") from None
        except (ConnectionResetError, ConnectionAbortedError):
            data = b""
        events = self._protocol.receive_data(data)
        if any(isinstance(e, (ConnectionClosed, LineTooLong)) for e in events):
            self.closed = True
        return events
