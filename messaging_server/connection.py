"""One client connection, as the server's threads share it.

The connection's own handler thread creates it and does the handshake; the
command-listener thread reads from it; the handler thread and the delivery
thread write messages to it.  Writes are serialised by ``write_lock``;
deliveries by ``delivery_lock`` (one pass at a time per connection; see
:func:`messaging_server.delivery.deliver`).  ``close()`` may be called from
any thread, any number of times: it shuts the socket down, which the command listener sees as
end-of-file; the listener then lets go of the socket and sets ``released``,
and only then does the handler thread return and the socket get closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Optional, Sequence

from .protocol import ServerConnection
from .storage import StoredMessage

log = logging.getLogger(__name__)


class ClientConnection:
    def __init__(self, sock: socket.socket, peer: str, write_timeout: float = 10.0) -> None:
        self.sock = sock
        self.write_timeout = write_timeout
        self.peer = peer
        self.protocol = ServerConnection()
        self.client_id: Optional[int] = None
        self.session = 0
        self.write_lock = threading.Lock()
        self.delivery_lock = threading.Lock()
        self.delivery_wanted = threading.Event()
        self.ready = threading.Event()  # SET_CLIENT_ID sent: messages may follow
        self.released = threading.Event()
        self._closed = threading.Event()
        self.close_reason = ""

    def __repr__(self) -> str:
        return f"<connection client={self.client_id} peer={self.peer}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, data: bytes) -> bool:
        """Write ``data`` whole; on failure close the connection and return False."""
        return self._send_counting(data) == len(data)

    def write_messages(self, messages: Sequence[StoredMessage]) -> int:
        """Write MESSAGE lines; return how many, from the first, were written whole."""
        lines = [self.protocol.message(m.body) for m in messages]
        sent = self._send_counting(b"".join(lines))
        count = end = 0
        for line in lines:
            end += len(line)
            if end > sent:
                break
            count += 1
        return count

    def _send_counting(self, data: bytes) -> int:
        view = memoryview(data)
        sent = 0
        with self.write_lock:
            if self.closed:
                return 0
            # One deadline for the whole write, however many send() calls it
            # takes: a client that reads slowly cannot stretch it.
            deadline = time.monotonic() + self.write_timeout
            try:
                while sent < len(data):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise socket.timeout("write timed out")
                    self.sock.settimeout(remaining)
                    sent += self.sock.send(view[sent:])
            except OSError as exc:  # includes the write timeout
                why = "write timed out" if isinstance(exc, socket.timeout) else f"write failed: {exc}"
                self.close(why)
        return sent

    def close(self, reason: str) -> None:
        """Shut the connection down (idempotent); the first reason given is kept."""
        if self._closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self._closed.set()
        with contextlib.suppress(OSError):  # already gone
            self.sock.shutdown(socket.SHUT_RDWR)
