"""Delivering pending messages to a connected client, and the delivery thread.

:func:`deliver` is the one way messages reach a socket, and it runs only on
the connection's own handler thread: right after the handshake (the backlog),
and whenever the delivery thread (a wake-up datagram), the sweeper or an ACK
asks for a pass.  Requests coalesce and a connection runs one pass at a time.

No database connection or lock is held while a socket is written: a pass
reads a batch in one short transaction, writes it with none open, then
records what was written in another.  What keeps two connections of one
client (an old one being taken over, on this server or another) from sending
the same message is the client's delivery lease (see storage.Storage): only
the session holding it delivers, and it keeps it until everything it sent is
recorded (legacy: marked delivered; ACK mode: acknowledged, or its
connection ended).  A session that finds the lease held waits, without
polling, for the holder to give it back: the holder's server then wakes the
client's current connection (:meth:`NikiServer.release`), and the sweep asks
again anyway.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional, Sequence

from . import metrics
from .connection import ClientConnection
from .errors import StorageUnavailable
from .storage import Storage, StoredMessage
from .wakeup import WakeupListener

log = logging.getLogger(__name__)

# Connected clients whose state one wake-up check reads in one query.
WAKEUP_CHECK_CHUNK = 500


def deliver(storage: Storage, conn: ClientConnection, batch: int, server_id: Optional[int]) -> int:
    """Write the pending messages of ``conn``'s client to it; return how many were written.

    Runs on the connection's handler thread only.  Legacy connections: each
    batch is marked delivered once written; if the mark cannot commit (the
    database went away), the ids written are remembered and marked first on
    the next pass (or when the connection ends), so nothing is written twice
    to this connection.  ACK connections: nothing is marked here; at most
    ``conn.max_inflight`` messages wait for their ACK, and delivery pauses at
    that limit until acks free room.
    """
    if conn.client_id is None or not _mark_remembered(storage, conn):
        return 0
    metrics.DELIVERY_PASSES.inc()
    client_id, session = conn.client_id, conn.session
    ack_mode = conn.protocol.ack_mode
    total = 0
    while not conn.closed and not conn.leaving:
        room = min(batch, conn.max_inflight - len(conn.inflight)) if ack_mode else batch
        if room <= 0:
            break  # paused: acks will ask for the next pass
        try:
            messages = storage.read_batch(client_id, session, room, after_id=conn.last_sent_id)
            if messages and not conn.holds_lease:
                acquired = storage.acquire_delivery(client_id, session, server_id, room,
                                                    after_id=conn.last_sent_id)
                if acquired.busy:
                    # An older connection of this client has sent messages it has not
                    # recorded yet; its server wakes us when it lets go.
                    log.debug("client %s: waiting for an older connection to finish", client_id)
                    break
                messages = None if acquired.taken_over else acquired.messages
                conn.holds_lease = not acquired.taken_over
        except StorageUnavailable as exc:
            metrics.DELIVERIES_POSTPONED.inc()
            log.warning("delivery to client %s postponed: database unavailable: %s", client_id, exc)
            break
        if messages is None:
            close_taken_over(conn)
            break
        if not messages:
            if conn.holds_lease and not conn.inflight:
                _mark_written(storage, conn, [], release=True)  # nothing left unconfirmed
            break
        written = _write(conn, messages)
        total += len(written)
        full = len(written) == len(messages) == room
        if not ack_mode and not _mark_written(storage, conn, written, release=not full):
            break
        if not full:
            break
    if total:
        log.debug("client %s: delivered %d message(s)", client_id, total)
    return total


def close_taken_over(conn: ClientConnection) -> None:
    """Close a connection whose client identified again elsewhere (any thread)."""
    log.info("client %s: closing %s, taken over by a newer connection", conn.client_id, conn.peer)
    conn.close("taken over by a newer connection")


def _write(conn: ClientConnection, messages: Sequence[StoredMessage]) -> List[int]:
    """Write ``messages`` (no transaction open); the ids of those written whole."""
    count = conn.write_messages(messages)
    written = [m.id for m in messages[:count]]
    if written:
        metrics.observe_latency(m.created_at for m in messages[:count])
        conn.last_sent_id = max(conn.last_sent_id, written[-1])
        if conn.protocol.ack_mode:
            conn.inflight.update(written)
            metrics.MESSAGES_DELIVERED.inc(len(written))
    return written


def _mark_written(storage: Storage, conn: ClientConnection, written: List[int], release: bool) -> bool:
    """Legacy: record ``written`` as delivered, giving the lease back when ``release``
    (nothing more to send now); False when the database failed (they are remembered)."""
    assert conn.client_id is not None
    if not written and not release:
        return True
    try:
        storage.mark_delivered(conn.client_id, written,
                               release_session=conn.session if release else None)
    except StorageUnavailable as exc:
        conn.unmarked.extend(written)
        metrics.DELIVERIES_POSTPONED.inc()
        log.warning("client %s: %d delivered message(s) not yet marked: %s",
                    conn.client_id, len(written), exc)
        return False
    metrics.MESSAGES_DELIVERED.inc(len(written))
    if release:
        conn.holds_lease = False
    return True


def _mark_remembered(storage: Storage, conn: ClientConnection) -> bool:
    """Commit marks that failed before (legacy writes, ACKs); False if it still fails.

    The lease goes back with them when nothing else is unconfirmed (legacy: the
    pass that follows takes it again if there is more to send)."""
    assert conn.client_id is not None
    for ids, acknowledged in ((conn.unmarked, False), (conn.acked_unmarked, True)):
        if not ids:
            continue
        last = not (conn.unmarked if acknowledged else conn.acked_unmarked)
        release = last and not conn.inflight
        try:
            storage.mark_delivered(conn.client_id, ids, acknowledged=acknowledged,
                                   release_session=conn.session if release else None)
        except StorageUnavailable as exc:
            log.warning("client %s: %d delivered message(s) not yet marked: %s",
                        conn.client_id, len(ids), exc)
            return False
        metrics.count_marked(len(ids), acknowledged)
        if release:
            conn.holds_lease = False
        ids.clear()
    return True


def check_acks(conn: ClientConnection, message_ids: Sequence[int]) -> List[int]:
    """Of the client's ACKs, those of messages in flight on this connection (taken out of
    flight); unknown ones are the caller's to answer."""
    known = [m for m in message_ids if m in conn.inflight]
    conn.inflight.difference_update(known)
    return known


def acknowledge(storage: Storage, conn: ClientConnection, known: Sequence[int]) -> None:
    """Record acknowledged messages (handler thread); on failure they are kept and
    committed before the next delivery, or when the connection ends."""
    if not known:
        return
    conn.acked_unmarked.extend(known)
    _mark_remembered(storage, conn)
    conn.request_delivery()  # room was freed


class DeliveryThread(threading.Thread):
    """Waits for wake-up datagrams and asks the connections they name for a delivery pass.

    It never writes to a socket itself, so no client can hold it up.
    """

    def __init__(self, listener: WakeupListener,
                 lookup: Callable[[int], Optional[ClientConnection]],
                 storage: Optional[Storage] = None) -> None:
        super().__init__(name="delivery", daemon=True)
        self._listener = listener
        self._lookup = lookup
        self._storage = storage
        self._stopping = threading.Event()
        self.wakeups = 0  # coalesced wake-up batches handled
        # Client wake-ups that found a pass already due, and ones for a client not
        # connected here; written by this thread only, read by metrics scrapes.
        self.coalesced = 0
        self.not_connected = 0
        self.nothing_new = 0  # wake-ups for a client with nothing new: no pass

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stopping.is_set():
            client_ids = self._listener.receive(timeout=0.5)
            if not client_ids:
                continue
            self.wakeups += 1
            log.debug("wake-up for client(s) %s", ",".join(map(str, sorted(client_ids))))
            named: Dict[int, ClientConnection] = {}
            for client_id in client_ids:
                conn = self._lookup(client_id)
                if conn is None:
                    self.not_connected += 1
                elif not conn.closed:
                    named[client_id] = conn
            try:
                self._wake(named)
            except Exception:  # a bug here would silence every wake-up: make it loud
                log.exception("wake-up handling failed")

    def _wake(self, named: Dict[int, ClientConnection]) -> None:
        """Ask for a pass only where the database shows something new for the connection:
        a newer session (taken over) or a pending message above the last one it wrote.

        Anyone who can reach the UDP port can name every client id; this way a wake-up
        for a client with nothing new costs a share of one indexed read, not a delivery
        transaction, and the work per datagram is bounded by the connected clients it names.
        """
        ids = sorted(named)
        for start in range(0, len(ids), WAKEUP_CHECK_CHUNK):
            chunk = ids[start:start + WAKEUP_CHECK_CHUNK]
            state: Dict[int, tuple] = {}
            if self._storage is not None:
                try:
                    state = self._storage.wakeup_state(chunk)
                except StorageUnavailable as exc:
                    # A pass could do nothing either; the sweep asks once it is back.
                    log.warning("wake-ups ignored: database unavailable: %s", exc)
                    return
            for client_id in chunk:
                conn = named[client_id]
                known = state.get(client_id)
                if known is not None and known[0] != conn.session:
                    # Taken over: close it now, from here, even if its thread is in the
                    # middle of a write, so that its session's lease comes back at once.
                    close_taken_over(conn)
                elif known is not None and known[1] <= conn.last_sent_id:
                    self.nothing_new += 1
                elif not conn.request_delivery():
                    self.coalesced += 1
