"""Delivering pending messages to a connected client, and the delivery thread.

:func:`deliver` is the one way messages reach a socket.  The handler thread
calls it right after the handshake (the backlog); the delivery thread calls it
when a wake-up datagram names a client connected to this server.  It holds the
connection's ``delivery_lock`` for the whole pass, and the storage layer's
transaction locks the client's pending rows, so deliveries of one client never
overlap, in this process or across servers.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from .connection import ClientConnection
from .errors import StorageUnavailable
from .storage import Storage
from .wakeup import WakeupListener

log = logging.getLogger(__name__)


def deliver(storage: Storage, conn: ClientConnection, batch: int, *, wait: bool = False) -> int:
    """Write every pending message of ``conn``'s client to it; return how many.

    Wake-ups coalesce: a call that finds another pass running only raises
    ``delivery_wanted`` and returns; the running pass sees the flag and goes
    round again, so no wake-up is lost and none waits behind a long backlog.
    Before ``conn.ready`` (its SET_CLIENT_ID sent) a call only raises the flag.
    ``wait=True`` blocks for the lock instead (the handler's first pass).
    """
    conn.delivery_wanted.set()
    total = 0
    while conn.ready.is_set() and conn.delivery_wanted.is_set() and not conn.closed:
        if not conn.delivery_lock.acquire(blocking=wait):
            break
        try:
            while conn.delivery_wanted.is_set() and not conn.closed:
                conn.delivery_wanted.clear()
                total += _drain(storage, conn, batch)
        finally:
            conn.delivery_lock.release()
    if total:
        log.debug("client %s: delivered %d message(s)", conn.client_id, total)
    return total


def _drain(storage: Storage, conn: ClientConnection, batch: int) -> int:
    total = 0
    while not conn.closed and conn.client_id is not None:
        try:
            result = storage.deliver_pending(conn.client_id, conn.session,
                                             conn.write_messages, batch)
        except StorageUnavailable as exc:
            # Nothing was marked: the messages stay pending and go out on the
            # next wake-up or the client's next connection.
            log.warning("delivery to client %s postponed: database unavailable: %s",
                        conn.client_id, exc)
            return total
        total += result.delivered
        if result.taken_over:
            log.info("client %s: closing %s, taken over by a newer connection",
                     conn.client_id, conn.peer)
            conn.close("taken over by a newer connection")
        if not result.more:
            break
    return total


class DeliveryThread(threading.Thread):
    """Waits for wake-up datagrams and delivers to the clients they name."""

    def __init__(self, listener: WakeupListener,
                 lookup: Callable[[int], Optional[ClientConnection]],
                 storage: Storage, batch: int) -> None:
        super().__init__(name="delivery", daemon=True)
        self._listener = listener
        self._lookup = lookup
        self._storage = storage
        self._batch = batch
        self._stopping = threading.Event()
        self.wakeups = 0  # coalesced wake-up batches handled

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stopping.is_set():
            client_ids = self._listener.receive(timeout=0.5)
            if client_ids:
                self.wakeups += 1
                log.debug("wake-up for client(s) %s", ",".join(map(str, sorted(client_ids))))
            for client_id in client_ids:
                conn = self._lookup(client_id)
                if conn is not None:
                    try:
                        deliver(self._storage, conn, self._batch)
                    except Exception:  # keep delivering to everyone else
                        log.exception("delivery to client %s failed", client_id)
