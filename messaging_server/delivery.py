"""Delivering pending messages to a connected client, and the delivery thread.

:func:`deliver` is the one way messages reach a socket, and it runs only on
the connection's own handler thread: right after the handshake (the backlog),
and whenever the delivery thread (a wake-up datagram), the sweeper or an ACK
asks for a pass.  Requests coalesce, a connection runs one pass at a time,
and the storage layer's transaction locks the client row, so deliveries of
one client never overlap, in this process or across servers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from . import metrics
from .connection import ClientConnection
from .errors import StorageUnavailable
from .storage import Storage, StoredMessage
from .wakeup import WakeupListener

log = logging.getLogger(__name__)

# A delivery lease outlives the write it covers by this much (SQLite; see storage).
LEASE_MARGIN_S = 5.0
# How long to wait before asking again when another delivery holds the lease.
BUSY_RETRY_S = 0.05


def deliver(storage: Storage, conn: ClientConnection, batch: int) -> int:
    """Write the pending messages of ``conn``'s client to it; return how many were written.

    Runs on the connection's handler thread only.  Legacy connections: each
    batch is written and marked delivered in one transaction; if the mark
    cannot commit (the database went away), the ids written are remembered
    and marked first on the next pass, so nothing is written twice to this
    connection.  ACK connections: nothing is marked here; at most
    ``conn.max_inflight`` messages wait for their ACK, and delivery pauses
    at that limit until acks free room.
    """
    if not _mark_remembered(storage, conn):
        return 0
    ack_mode = conn.protocol.ack_mode
    total = 0
    while not conn.closed and not conn.leaving and conn.client_id is not None:
        room = conn.max_inflight - len(conn.inflight) if ack_mode else batch
        if room <= 0:
            break  # paused: acks will ask for the next pass
        written: List[int] = []

        def write(messages: Sequence[StoredMessage], written: List[int] = written) -> int:
            count = conn.write_messages(messages)
            written.extend(m.id for m in messages[:count])
            metrics.observe_latency(m.created_at for m in messages[:count])
            return count

        try:
            result = storage.deliver_pending(conn.client_id, conn.session, write, min(batch, room),
                                             after_id=conn.last_sent_id, mark=not ack_mode,
                                             lease=conn.write_timeout + LEASE_MARGIN_S)
        except StorageUnavailable as exc:
            # Whatever was written stays "sent" for this connection.  The rest
            # stays pending and goes out when a wake-up or sweep asks again.
            _remember(conn, written, marked=False)
            metrics.DELIVERIES_POSTPONED.inc()
            log.warning("delivery to client %s postponed: database unavailable: %s",
                        conn.client_id, exc)
            return total + len(written)
        if result.busy:
            # Another connection of this client (an older one, maybe in another
            # process) is mid-write; it gives the lease back within its write timeout.
            time.sleep(BUSY_RETRY_S)
            conn.request_delivery()
            break
        _remember(conn, written, marked=True)
        total += len(written)
        if result.taken_over:
            log.info("client %s: closing %s, taken over by a newer connection",
                     conn.client_id, conn.peer)
            conn.close("taken over by a newer connection")
        if not result.more:
            break
    if total:
        log.debug("client %s: delivered %d message(s)", conn.client_id, total)
    return total


def _remember(conn: ClientConnection, written: List[int], marked: bool) -> None:
    if not written:
        return
    if marked or conn.protocol.ack_mode:  # else counted when the mark commits (count_marked)
        metrics.MESSAGES_DELIVERED.inc(len(written))
    conn.last_sent_id = max(conn.last_sent_id, written[-1])
    if conn.protocol.ack_mode:
        conn.inflight.update(written)
    elif not marked:
        conn.unmarked.extend(written)


def unfinished_marks(conn: ClientConnection) -> List[Tuple[List[int], bool]]:
    """(ids, acknowledged) whose "delivered" mark did not commit: written (legacy, False)
    and acknowledged (ACK, True)."""
    return [(ids, acknowledged) for ids, acknowledged in
            ((conn.unmarked, False), (conn.acked_unmarked, True)) if ids]


def commit_marks(storage: Storage, client_id: int, ids: Sequence[int], acknowledged: bool) -> None:
    """Mark messages whose mark could not commit before delivered, and count them
    (legacy writes, or ACKs); StorageUnavailable when it still fails."""
    storage.mark_delivered(client_id, ids, acknowledged=acknowledged)
    metrics.count_marked(len(ids), acknowledged)


def _mark_remembered(storage: Storage, conn: ClientConnection) -> bool:
    """Commit marks that failed before (legacy writes, ACKs); False if it still fails."""
    if conn.client_id is None:
        return True
    for ids, acknowledged in unfinished_marks(conn):
        try:
            commit_marks(storage, conn.client_id, ids, acknowledged)
        except StorageUnavailable as exc:
            log.warning("client %s: %d delivered message(s) not yet marked: %s",
                        conn.client_id, len(ids), exc)
            return False
        ids.clear()
    return True


def acknowledge(storage: Storage, conn: ClientConnection, message_ids: Sequence[int]) -> None:
    """Record the client's ACKs (handler thread): each id must be in flight on this connection."""
    known: List[int] = []
    for message_id in message_ids:
        if message_id in conn.inflight:
            conn.inflight.discard(message_id)
            known.append(message_id)
        else:
            conn.send(conn.protocol.error(f"unknown message id {message_id}"))
    if not known:
        return
    conn.acked_unmarked.extend(known)
    _mark_remembered(storage, conn)  # on failure, retried before the next delivery
    conn.request_delivery()  # room was freed


class DeliveryThread(threading.Thread):
    """Waits for wake-up datagrams and asks the connections they name for a delivery pass.

    It never writes to a socket itself, so no client can hold it up.
    """

    def __init__(self, listener: WakeupListener,
                 lookup: Callable[[int], Optional[ClientConnection]]) -> None:
        super().__init__(name="delivery", daemon=True)
        self._listener = listener
        self._lookup = lookup
        self._stopping = threading.Event()
        self.wakeups = 0  # coalesced wake-up batches handled
        # Client wake-ups that found a pass already due, and ones for a client not
        # connected here; written by this thread only, read by metrics scrapes.
        self.coalesced = 0
        self.not_connected = 0

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
                if conn is None:
                    self.not_connected += 1
                elif not conn.request_delivery():
                    self.coalesced += 1
