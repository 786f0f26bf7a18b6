"""Delivering pending messages to a connected client, and the delivery thread.

Messages reach a socket only on the connection's own handler thread, two ways:

* :func:`deliver`, a *pass*: read the client's pending messages after the last
  one this connection wrote, write them.  It runs right after the handshake
  (the backlog), and whenever the delivery thread (a wake-up), the sweeper or
  an ACK asks for one.  Requests coalesce; a connection runs one pass at a time.
* :func:`write_carried`: a wake-up datagram that carries its message (see
  wakeup.py) is written without reading the database when the chain is
  unbroken: the connection holds the client's delivery lease, the message is
  of the connection's session, and the client's previous pending message (as
  the producer saw it, under the client's row lock) is one this connection has
  already written.  Every pending message before it was then written here, in
  order; anything else (a lost or reordered datagram, a backlog in progress, a
  takeover) falls back to a pass, which reads the database.

No database connection or lock is held while a socket is written.  Marks (legacy:
written; ACK mode: acknowledged) go to the MarkWriter, which commits many
connections' marks together; the connection does not wait for them, since it
never reads again what it wrote (``last_sent_id``).  What keeps two
connections of one client (an old one being taken over, on this server or
another) from sending the same message is the client's delivery lease (see
storage.Storage): only the session holding it delivers, and it keeps it for as
long as the connection lives, giving it back with its last marks when it ends
(NikiServer.release).  A session that finds the lease held waits, without
polling, for the holder to give it back: the holder's server then wakes the
client's current connection, and the sweep asks again anyway.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional, Sequence, Set

from messaging_server.errors import StorageUnavailable
from messaging_server.protocol.wakeups import Carried
from messaging_server.server import metrics
from messaging_server.server.connection import ClientConnection
from messaging_server.server.marks import MarkWriter
from messaging_server.storage import Storage, StoredMessage
from messaging_server.wakeup import WakeupListener

log = logging.getLogger(__name__)

# Connected clients whose state one wake-up check reads in one query.
WAKEUP_CHECK_CHUNK = 500


def deliver(storage: Storage, conn: ClientConnection, batch: int, server_id: Optional[int],
            marks: MarkWriter) -> int:
    """Write the pending messages of ``conn``'s client to it; return how many were written.

    Runs on the connection's handler thread only.  Legacy connections: what is
    written is handed to ``marks`` to be marked delivered.  ACK connections:
    nothing is marked here; the protocol's ACK window bounds the messages that wait
    for their ACK, and delivery pauses when it is full until acks free room.
    """
    if conn.client_id is None:
        return 0
    metrics.DELIVERY_PASSES.inc()
    client_id, session = conn.client_id, conn.session
    total = 0
    while not conn.closed and not conn.leaving:
        room = conn.protocol.room(batch)
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
            break
        written = _write(conn, messages, marks)
        total += len(written)
        if len(written) < len(messages) or len(messages) < room:
            break
    if total:
        log.debug("client %s: delivered %d message(s)", client_id, total)
    return total


def write_carried(conn: ClientConnection, carried: Sequence[Carried], marks: MarkWriter) -> bool:
    """Write the carried messages whose chain is unbroken (handler thread); True when every
    one was written or had been, False when a pass must read the database for the rest."""
    ready: List[StoredMessage] = []
    last = conn.last_sent_id
    room = conn.protocol.room(len(carried))
    complete = True
    for message in sorted(carried, key=lambda m: m.message_id):
        if message.message_id <= last:
            continue  # written already (by a pass that read it, or a repeated datagram)
        if not conn.holds_lease or message.session != conn.session or message.previous > last \
                or len(ready) >= room:
            complete = False  # chain broken (or ACK window full): the database knows the rest
            break
        ready.append(StoredMessage(message.message_id, message.body, message.queued_at))
        last = message.message_id
    if ready and len(_write(conn, ready, marks)) < len(ready):
        return True  # the write failed: the connection is closed
    if ready:
        metrics.CARRIED_WRITTEN.inc(len(ready))
        log.debug("client %s: delivered %d message(s) carried by wake-ups", conn.client_id, len(ready))
    return complete


def give_back_lease(storage: Storage, conn: ClientConnection, marks: MarkWriter) -> None:
    """Commit the connection's marks not yet committed and give the client's delivery lease
    back, in one transaction (handler thread; nothing may be in flight).  If the database
    is away, the marks go back to the writer and the lease stays."""
    assert conn.client_id is not None and not conn.protocol.awaiting_acks
    waiting = marks.withdraw(conn)
    try:
        if waiting.acknowledged:
            storage.mark_delivered(conn.client_id, waiting.acknowledged, acknowledged=True)
            metrics.count_marked(len(waiting.acknowledged), True)
            waiting.acknowledged = []
        storage.mark_delivered(conn.client_id, waiting.written, release_session=conn.session)
    except StorageUnavailable as exc:
        marks.add(conn, conn.client_id, waiting.written, waiting.acknowledged)
        log.debug("client %s: delivery lease kept: database unavailable: %s", conn.client_id, exc)
        return
    metrics.count_marked(len(waiting.written), False)
    conn.holds_lease = False


def close_taken_over(conn: ClientConnection) -> None:
    """Close a connection whose client identified again elsewhere (any thread)."""
    log.info("client %s: closing %s, taken over by a newer connection", conn.client_id, conn.peer)
    conn.close("taken over by a newer connection")


def _write(conn: ClientConnection, messages: Sequence[StoredMessage], marks: MarkWriter) -> List[int]:
    """Write ``messages`` (no transaction open); the ids of those written whole, which
    go to ``marks`` (legacy) or in flight (ACK mode)."""
    count = conn.write_messages(messages)
    written = [m.id for m in messages[:count]]
    if written:
        metrics.observe_latency(m.created_at for m in messages[:count])
        conn.last_sent_id = max(conn.last_sent_id, written[-1])
        if conn.protocol.ack_mode:
            conn.protocol.written(written)
            metrics.MESSAGES_DELIVERED.inc(len(written))
        else:
            marks.add(conn, conn.client_id or 0, written)
    return written


def check_acks(conn: ClientConnection, message_ids: Sequence[int]) -> List[int]:
    """Of the client's ACKs, those of messages in flight on this connection (taken out of
    flight); unknown ones are the caller's to answer."""
    return conn.protocol.acknowledged(message_ids)


def acknowledge(marks: MarkWriter, conn: ClientConnection, known: Sequence[int]) -> None:
    """Record acknowledged messages (handler thread): the mark writer commits them, or
    the connection's end does."""
    if not known:
        return
    marks.add(conn, conn.client_id or 0, acknowledged=known)
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
            taken = self._listener.receive(timeout=0.5)
            if not taken:
                continue
            self.wakeups += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("wake-up for client(s) %s", ",".join(map(str, sorted(taken.clients()))))
            named: Dict[int, ClientConnection] = {}
            try:
                check = self._hand_over(taken.carried)
                for client_id in taken.ids | check:
                    conn = self._lookup(client_id)
                    if conn is None:
                        self.not_connected += 1
                    elif not conn.closed:
                        named[client_id] = conn
                self._wake(named)
            except Exception:  # a bug here would silence every wake-up: make it loud
                log.exception("wake-up handling failed")

    def _hand_over(self, carried: Sequence[Carried]) -> Set[int]:
        """Give each carried message to its client's connection here; the clients whose
        connection is of another session (to be checked against the database)."""
        check: Set[int] = set()
        for message in carried:
            conn = self._lookup(message.client_id)
            if conn is None:
                self.not_connected += 1
            elif conn.session != message.session:
                check.add(message.client_id)
            elif not conn.closed:
                conn.post_carried(message)
        return check

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
