"""One client connection, as the server's threads share it.

Only the connection's own handler thread ever writes to its socket: it
greets, identifies, delivers, answers commands and records acknowledgements.
The other threads only *post* work and wake it: the command listener posts
replies and acks (:meth:`post`, :meth:`post_ack`), the delivery and sweeper
threads ask for a delivery pass (:meth:`request_delivery`).  So a client that
stops reading can stall nobody but its own thread, for at most the write
timeout, after which it is disconnected.

``close()`` may be called from any thread, any number of times: it shuts the
socket down, which the command listener sees as end-of-file; the listener
then lets go of the socket and sets ``released``, and only then does the
handler thread return and the socket get closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, Tuple

from .protocol import ServerConnection
from .storage import StoredMessage

log = logging.getLogger(__name__)

# Replies (PONG, Invalid command, errors) waiting to be written to one client.
# A client that sends commands faster than it reads the answers would otherwise
# make the server hold them without bound; past this it is disconnected.
MAX_UNWRITTEN_REPLIES = 64 * 1024


@dataclass
class Work:
    """What other threads asked the handler thread to do, taken all at once."""

    replies: List[Tuple[bytes, str]] = field(default_factory=list)  # (line, close reason or "")
    acks: List[int] = field(default_factory=list)
    deliver: bool = False


class ClientConnection:
    def __init__(self, sock: socket.socket, peer: str, write_timeout: float = 10.0,
                 max_inflight: int = 100) -> None:
        self.sock = sock
        self.peer = peer
        self.write_timeout = write_timeout
        self.protocol = ServerConnection()
        self.client_id: Optional[int] = None
        self.credential = ""  # what SET_CLIENT_ID told the client to present next time
        self.session = 0
        self.released = threading.Event()
        self.ready = threading.Event()  # SET_CLIENT_ID sent: messages may follow
        self.close_reason = ""
        # Set by the command listener the moment the client says DISCONNECT: from
        # then on nothing more is delivered, although the connection is closed only
        # once the replies before it are written.  A message written to a client
        # that has left would be marked delivered and lost (the seed's bug).
        self.leaving = False
        self._closed = threading.Event()
        self._work = Work()
        self._reply_bytes = 0
        self._cond = threading.Condition()
        # Delivery bookkeeping, touched only by the handler thread.
        self.last_sent_id = 0  # every pending message up to here was written to this socket
        self.unmarked: List[int] = []  # written, but the "delivered" mark did not commit
        self.inflight: Set[int] = set()  # ACK mode: written, not yet acknowledged
        self.acked_unmarked: List[int] = []  # ACK mode: acknowledged, mark not yet committed
        self.max_inflight = max_inflight

    def __repr__(self) -> str:
        return f"<connection client={self.client_id} peer={self.peer}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- asking the handler thread for work (any thread) ---

    def post(self, line: bytes, close_reason: str = "") -> None:
        """Have ``line`` written; then close the connection if ``close_reason`` is given.

        A client whose unwritten replies pass MAX_UNWRITTEN_REPLIES is disconnected.
        """
        with self._cond:
            if self._reply_bytes + len(line) > MAX_UNWRITTEN_REPLIES:
                flooding = True
            else:
                flooding = False
                self._reply_bytes += len(line)
                self._work.replies.append((line, close_reason))
                self._cond.notify()
        if flooding:
            self.close("sent commands faster than it read the answers")

    def post_ack(self, message_id: int) -> None:
        with self._cond:
            self._work.acks.append(message_id)
            self._cond.notify()

    def request_delivery(self) -> None:
        """Ask for a delivery pass; requests made while one runs coalesce into one more."""
        with self._cond:
            self._work.deliver = True
            self._cond.notify()

    def take_work(self, timeout: float) -> Work:
        """Wait up to ``timeout`` for work (or close); take all of it."""
        with self._cond:
            if not (self._work.replies or self._work.acks or self._work.deliver or self.closed):
                self._cond.wait(timeout)
            work, self._work = self._work, Work()
            self._reply_bytes = 0
        return work

    # --- writing (the handler thread) ---

    def send(self, data: bytes) -> bool:
        """Write ``data`` whole; on failure close the connection and return False."""
        return self._send_counting(data) == len(data)

    def write_messages(self, messages: Sequence[StoredMessage]) -> int:
        """Write MESSAGE lines; return how many, from the first, were written whole."""
        if self.leaving:
            return 0
        lines = [self.protocol.message(m.body, m.id) for m in messages]
        sent = self._send_counting(b"".join(lines))
        count = end = 0
        for line in lines:
            end += len(line)
            if end > sent:
                break
            count += 1
        return count

    def _send_counting(self, data: bytes) -> int:
        if self.closed:
            return 0
        view = memoryview(data)
        sent = 0
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
        with self._cond:
            self._cond.notify()
