"""The command-listener thread: reads the commands of every identified client.

One thread and one ``selectors`` selector (epoll on Linux, so there is no
1024-descriptor limit) watch every identified connection.  Handler threads
hand connections over with :meth:`CommandListener.add`; the selector is only
ever touched by the listener thread itself, which is woken through a socket
pair to pick new connections up.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import Iterable, List, Tuple

from messaging_server.protocol.lines import (
    Ack,
    BadAck,
    ConnectionClosed,
    Disconnect,
    InvalidCommand,
    LineTooLong,
    Ping,
    ServerEvent,
)
from messaging_server.server import metrics
from messaging_server.server.connection import ClientConnection

log = logging.getLogger(__name__)

def handle_events(conn: ClientConnection, events: Iterable[ServerEvent]) -> None:
    """Act on what a client said after its handshake: post replies to its handler thread.

    Never writes to the socket, so a client that does not read cannot block
    the command listener.  Once the connection is closed (by the client, a line
    too long, a takeover) nothing can be answered any more, but an ACK the client
    sent before still confirms its message: the handler takes the ACKs posted
    until the listener lets go of the connection.
    """
    protocol = conn.protocol
    for event in events:
        if conn.closed and not isinstance(event, Ack):
            continue
        if isinstance(event, Ack):
            metrics.COMMAND_ACK.inc()
            conn.post_ack(event.message_id)
        elif isinstance(event, Ping):
            metrics.COMMAND_PING.inc()
            conn.post(protocol.pong())
        elif isinstance(event, BadAck):
            metrics.COMMAND_INVALID.inc()
            conn.post(protocol.error(f"ACK needs a message id: {event.line}"))
        elif isinstance(event, InvalidCommand):
            metrics.COMMAND_INVALID.inc()
            conn.post(protocol.invalid_command(event.line))
        elif isinstance(event, Disconnect):
            metrics.COMMAND_DISCONNECT.inc()
            conn.leaving = True  # deliver nothing more (see ClientConnection.leaving)
            # Close after the replies already posted, as if written in order.
            conn.post(b"", close_reason="client sent DISCONNECT")
        elif isinstance(event, LineTooLong):
            metrics.COMMAND_INVALID.inc()
            conn.post(protocol.error(f"line too long (limit {event.limit} bytes)"),
                      close_reason=f"line longer than {event.limit} bytes")
        elif isinstance(event, ConnectionClosed):
            conn.close("client closed the connection")


class CommandListener(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="command-listener", daemon=True)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Never blocks a handler: a full buffer already holds wake-ups (see _wake).
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: List[ClientConnection] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def add(self, conn: ClientConnection) -> None:
        """Start reading ``conn``'s commands; ``conn.released`` is set when it is let go."""
        with self._lock:
            if self._stopping.is_set():
                conn.close("server shutting down")
                conn.released.set()
                return
            self._incoming.append(conn)
        self._wake()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self.join(timeout=5)

    def _wake(self) -> None:
        # A full socket buffer means the thread has wake-ups waiting already.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(timeout=1.0):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._read(key.data)
                self._register_incoming()
        except Exception:  # a bug here would silence every client: make it loud
            log.exception("command listener failed")
            raise
        finally:
            self._release_all()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _register_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for conn in incoming:
            if conn.closed:
                conn.released.set()
                continue
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _read(self, conn: ClientConnection) -> None:
        data = conn.receive()
        if data is None:  # nothing yet (a partial TLS record)
            return
        handle_events(conn, conn.protocol.receive_data(data))
        if conn.closed:
            self._release(conn)

    def _release(self, conn: ClientConnection) -> None:
        self._selector.unregister(conn.sock)
        conn.released.set()

    def _release_all(self) -> None:
        with self._lock:
            leftover: List[Tuple[ClientConnection, bool]] = [(c, False) for c in self._incoming]
            self._incoming = []
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                leftover.append((key.data, True))
        for conn, registered in leftover:
            conn.close("server shutting down")
            if registered:
                self._selector.unregister(conn.sock)
            conn.released.set()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
