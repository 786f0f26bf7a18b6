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
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union, cast

from messaging_server.protocol.lines import ServerProtocol
from messaging_server.protocol.wakeups import Carried
from messaging_server.server import metrics
from messaging_server.storage import StoredMessage

log = logging.getLogger(__name__)

# Commands waiting for the handler thread (their replies: PONG, Invalid command,
# errors; and ACKs), counted in bytes of reply.  A client that sends commands
# faster than it reads the answers would otherwise make the server hold them
# without bound; past this it is disconnected.
MAX_UNWRITTEN_REPLIES = 64 * 1024
# What a waiting ACK counts for against that cap: about the length of the error
# line it may get (``ERROR: unknown message id <n>``), so the cap bounds the
# replies an ACK flood can make the server write, too.
ACK_COST = 32

# Carried messages waiting for the handler thread, at most; past it a delivery
# pass is asked for instead (it reads them from the database).
MAX_WAITING_CARRIED = 64

# Bytes taken per read: enough for many command lines at once.
READ_CHUNK = 4096

# TLS writes go out one record (16 KiB) at a time, so that after a failed write
# the count of bytes sent, and of messages written whole, is exact to a record.
TLS_RECORD = 16 * 1024


# One command's work for the handler thread: a reply to write, as (line, close
# reason or ""), or the id of an ACK to check and record.
WorkItem = Union[Tuple[bytes, str], int]


@dataclass
class Work:
    """What other threads asked the handler thread to do, taken all at once.

    ``items`` are in the order of the client's commands, replies and ACKs alike,
    so that the answers go out in that order too.
    """

    items: List[WorkItem] = field(default_factory=list)
    deliver: bool = False
    carried: List[Carried] = field(default_factory=list)  # messages wake-ups carried

    def __bool__(self) -> bool:
        return bool(self.items or self.deliver or self.carried)


class ClientConnection:
    def __init__(self, sock: socket.socket, peer: str, write_timeout: float = 10.0,
                 max_inflight: int = 100) -> None:
        # Non-blocking: every wait is an explicit poll with a deadline.  The
        # handler thread writes while the command listener reads, so each call
        # into the socket holds _io_lock (a TLS session must not be used by two
        # threads at once); no one holds it while waiting.
        sock.setblocking(False)
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._io_lock = threading.Lock()
        self.peer = peer
        self.write_timeout = write_timeout
        self.protocol = ServerProtocol(max_inflight=max_inflight)
        self.client_id: Optional[int] = None
        self.credential = ""  # what SET_CLIENT_ID told the client to present next time
        self.new_client = False  # created by this connection's handshake
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
        # This session holds the client's delivery lease (see storage.Storage): it has
        # sent messages it has not yet recorded as delivered, or is sending some.
        # (The ACK window is the protocol's: self.protocol.)
        self.holds_lease = False

    def __repr__(self) -> str:
        return f"<connection client={self.client_id} peer={self.peer}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- asking the handler thread for work (any thread) ---

    def post(self, line: bytes, close_reason: str = "") -> None:
        """Have ``line`` written; then close the connection if ``close_reason`` is given."""
        self._add((line, close_reason), len(line))

    def post_ack(self, message_id: int) -> None:
        """Have an ACK checked and recorded, in its place among the replies."""
        self._add(message_id, ACK_COST)

    def _add(self, item: WorkItem, cost: int) -> None:
        """Queue ``item``; a client whose waiting commands pass MAX_UNWRITTEN_REPLIES is
        disconnected instead (the bound is enforced here, where items are added)."""
        with self._cond:
            flooding = self._reply_bytes + cost > MAX_UNWRITTEN_REPLIES
            if not flooding:
                self._reply_bytes += cost
                self._work.items.append(item)
                self._cond.notify()
        if flooding:
            self.close("sent commands faster than it read the answers")

    def request_delivery(self) -> bool:
        """Ask for a delivery pass; requests made while one runs coalesce into one more.

        False when a pass was already due (asked for and not yet begun): this
        request adds nothing to it.
        """
        with self._cond:
            due, self._work.deliver = self._work.deliver, True
            self._cond.notify()
        return not due

    def post_carried(self, message: Carried) -> None:
        """Have a message a wake-up carried written (or, past MAX_WAITING_CARRIED waiting,
        a delivery pass made instead)."""
        with self._cond:
            if len(self._work.carried) < MAX_WAITING_CARRIED:
                self._work.carried.append(message)
            else:
                self._work.deliver = True
            self._cond.notify()

    def take_work(self, timeout: float) -> Work:
        """Wait up to ``timeout`` for work (or close); take all of it."""
        with self._cond:
            if not (self._work.items or self._work.deliver or self._work.carried or self.closed):
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
        step = TLS_RECORD if self.tls else len(data)
        try:
            while sent < len(data):
                try:
                    with self._io_lock:
                        sent += self.sock.send(view[sent:sent + step])
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    if not self._wait(select.POLLOUT, deadline):
                        raise socket.timeout("write timed out") from None
        except OSError as exc:  # includes the write timeout
            timed_out = isinstance(exc, socket.timeout)
            (metrics.WRITE_TIMEOUTS if timed_out else metrics.WRITE_ERRORS).inc()
            why = "write timed out" if timed_out else f"write failed: {exc}"
            self.close(why)
        return sent

    # --- reading (the handler thread during the handshake, then the command listener) ---

    def receive(self, timeout: float = 0.0) -> Optional[bytes]:
        """What the client sent: b"" at its end (or a read error); None if nothing
        arrived within ``timeout`` seconds (0: do not wait)."""
        deadline = time.monotonic() + timeout
        while True:
            data = self._receive_now()
            if data is not None or not self._wait(select.POLLIN, deadline):
                return data

    def _receive_now(self) -> Optional[bytes]:
        try:
            with self._io_lock:
                data = self.sock.recv(READ_CHUNK)
                # TLS: bytes already decrypted do not make the socket readable
                # again, so take them now or the selector would never report them.
                while data and self.tls and cast(ssl.SSLSocket, self.sock).pending():
                    data += self.sock.recv(cast(ssl.SSLSocket, self.sock).pending())
                return data
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError:  # reset, TLS failure: the end of this client, as the protocol sees it
            return b""

    def tls_handshake(self, timeout: float) -> str:
        """Do the TLS handshake within ``timeout``; "" when done, else why it failed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                cast(ssl.SSLSocket, self.sock).do_handshake()
                return ""
            except ssl.SSLWantReadError:
                ready = self._wait(select.POLLIN, deadline)
            except ssl.SSLWantWriteError:
                ready = self._wait(select.POLLOUT, deadline)
            except (ssl.SSLError, OSError) as exc:
                return f"TLS handshake failed: {exc}"
            if not ready:
                return f"no TLS handshake within {timeout:g} s"

    def _wait(self, event: int, deadline: float) -> bool:
        """Wait until the socket is ready for ``event`` (or fails); False at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        poller = select.poll()  # not select(): descriptors past 1024 are normal here
        poller.register(self.sock, event)
        return bool(poller.poll(max(1, int(remaining * 1000))))

    def close(self, reason: str) -> None:
        """Shut the connection down (idempotent); the first reason given is kept."""
        if self._closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self._closed.set()
        if self.tls:  # say goodbye properly (close_notify), without waiting for an answer
            with self._io_lock, contextlib.suppress(OSError, ValueError):
                cast(ssl.SSLSocket, self.sock).unwrap()
        with contextlib.suppress(OSError):  # already gone
            # The plain socket's shutdown, also for TLS: SSLSocket.shutdown() would
            # drop the TLS state under a thread that may be reading or writing.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        with self._cond:
            self._cond.notify()
