"""The storage interface: everything the server and ``enqueue`` need from a database.

:class:`Storage` is abstract; ``sql.py`` implements it once in SQL for both databases.
The concurrency rules it promises are in ``sql.py``'s docstring and docs/STORAGE.md.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from messaging_server.errors import NikiError
from messaging_server.storage.records import (
    Acquired,
    Activity,
    BatchItem,
    Claim,
    ClientInfo,
    Delivery,
    MessageInfo,
    Queued,
    ServerAddress,
    ServerInfo,
    StoredMessage,
    SweepResult,
    Writer,
)
from messaging_server.storage.write_health import WriteHealth

# How long a new session waits for an older one to give the delivery lease back
# before it takes it anyway (the older one's server crashed but is not yet taken
# for dead).  Several sweep intervals: a live server gives it back sooner.
LEASE_HANDOVER_S = 5.0

# Client rows a departing server's clean-up locks per statement.
FORGET_BATCH = 500

# A server whose heartbeat is older than this is taken for dead: its clients
# count as offline.  Servers beat every HEARTBEAT_INTERVAL_S, so this allows
# several missed beats (a long delivery, a database hiccup) before that.
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_STALE_S = 15.0
# No committed write for this long (three heartbeats missed) and /healthz says
# the database is unavailable: writes are stuck (a lock held elsewhere, a
# database that hangs).  Well before HEARTBEAT_STALE_S, when other servers
# take this one for dead.
WRITE_STALE_S = 3 * HEARTBEAT_INTERVAL_S


class Storage(abc.ABC):
    """What Niki needs from a database.  All methods are thread-safe."""

    def __init__(self) -> None:
        # The outcome of this process's writes, for /healthz (see write_health).
        self.write_health = WriteHealth(WRITE_STALE_S)

    @abc.abstractmethod
    def create_schema(self) -> None:
        """Create the database objects if they do not exist (idempotent)."""

    @abc.abstractmethod
    def new_client(self, server_id: Optional[int] = None,
                   secret_hash: Optional[bytes] = None) -> Claim:
        """Create a client, owned by ``server_id``; its first session.

        ``secret_hash``: the hash of its credential's secret (None: a bare-id client).
        """

    @abc.abstractmethod
    def claim_client(self, client_id: int, server_id: Optional[int] = None,
                     accept: Optional[Callable[[Optional[bytes]], bool]] = None) -> Optional[Claim]:
        """Start a new session of an existing client on ``server_id``.

        None when it is unknown, or when ``accept`` (given the stored secret hash,
        under the client row's lock) refuses: then nothing about the client changes.
        """

    @abc.abstractmethod
    def release_client(self, client_id: int, session: int, server_id: Optional[int],
                       written: Sequence[int] = (),
                       acknowledged: Sequence[int] = ()) -> Optional[ServerAddress]:
        """The client's connection ended: it has no owner, unless a newer session took it,
        and the session's delivery lease is given back; all in one transaction.

        ``written`` / ``acknowledged``: messages the connection wrote (legacy) or
        had acknowledged (ACK mode) whose mark had not been committed: marked now,
        before the lease goes, so that the next session never sends them again.
        Returns the live server of a newer session that may be waiting for the
        lease (it should be woken), else None.
        """

    @abc.abstractmethod
    def enqueue(self, client_id: int, body: str, duplicate_window: float,
                ttl: Optional[float] = None, max_pending: Optional[int] = None,
                find_owner: bool = True) -> Queued:
        """Store a pending message (or, for a duplicate, an ignored one).

        ``find_owner``: also look up the live owner's wake-up address (routed
        mode); broadcast mode does not need it and saves the query.

        ``ttl``: seconds after which it is never sent.  Raises UnknownClient when
        no such client exists, QueueFull when it has ``max_pending`` pending.
        """

    @abc.abstractmethod
    def enqueue_many(self, items: Sequence[BatchItem], duplicate_window: float,
                     ttl: Optional[float] = None, max_pending: Optional[int] = None,
                     find_owner: bool = True) -> List[Union[Queued, NikiError]]:
        """Store many messages in one transaction: one result per item, in order.

        An item is ``(client_id, body)`` or ``(client_id, body, ttl)``; an item's ttl
        of None (or none at all) means ``ttl``.

        Each result is what :meth:`enqueue` would have returned for the item
        (a Queued; message_id None for a duplicate, also of an earlier item of
        the batch) or the UnknownClient / QueueFull it would have raised.
        Messages of one client are stored in the order given.
        """

    # Delivery never holds a database connection or a lock while it writes to a
    # socket.  Deliveries of one client are kept from overlapping by its delivery
    # lease instead: data on the client row naming the session (and server) whose
    # connection may have sent messages it has not yet marked delivered (legacy:
    # written, mark not committed; ACK mode: in flight, or acknowledged and not
    # committed).  Only the holder delivers.  A server's connection keeps it while
    # busy and gives it back with its last marks when idle or ended
    # (mark_delivered with release_session, release_client); a lease whose server
    # is dead is free.  So a message is never sent by two live connections, and a
    # takeover never repeats what the old connection sent.

    @abc.abstractmethod
    def read_batch(self, client_id: int, session: int, batch: int,
                   after_id: int = 0) -> Optional[List[StoredMessage]]:
        """Up to ``batch`` pending messages, oldest first, ids above ``after_id``, none
        expired; None when ``session`` is no longer current.  Reads only: for a session
        that holds the lease, or to see whether there is anything to take it for."""

    @abc.abstractmethod
    def acquire_delivery(self, client_id: int, session: int, server_id: Optional[int],
                         batch: int, after_id: int = 0) -> Acquired:
        """Take (or keep) the client's delivery lease for ``session`` on ``server_id`` and
        read a batch as :meth:`read_batch` does, in one short transaction."""

    def deliver_pending(self, client_id: int, session: int, write: Writer, batch: int,
                        after_id: int = 0, mark: bool = True,
                        server_id: Optional[int] = None) -> Delivery:
        """One whole delivery step: take the lease and a batch, ``write`` it (no
        transaction open), then (``mark``) mark what was written and give the lease back."""
        raise NotImplementedError

    @abc.abstractmethod
    def mark_delivered(self, client_id: int, message_ids: Sequence[int],
                       acknowledged: bool = False, release_session: Optional[int] = None) -> int:
        """Mark messages of ``client_id`` delivered; return how many were waiting.

        ``acknowledged``: an ACK-mode client confirmed them (their receipt says so).
        ``release_session``: in the same transaction, give back that session's
        delivery lease (it has nothing unconfirmed left).
        """

    @abc.abstractmethod
    def mark_groups(self, written: Sequence[int], acknowledged: Sequence[int]) -> None:
        """Mark the messages of many clients delivered (``acknowledged``: and acknowledged)
        in one transaction.  The callers hold each client's delivery lease."""

    @abc.abstractmethod
    def wakeup_key(self) -> Optional[bytes]:
        """The key that signs wake-ups carrying messages (None: a database created before
        there was one, not yet opened by a server)."""

    @abc.abstractmethod
    def wakeup_state(self, client_ids: Sequence[int]) -> Dict[int, Tuple[int, int]]:
        """For each existing client: (current session, id of its newest pending message or
        0), in one read-only query: what a wake-up needs to know before it costs a pass."""

    @abc.abstractmethod
    def expire_and_purge(self, retention: float, batch: int) -> Tuple[int, int]:
        """Mark pending messages past their TTL expired; delete at most ``batch`` finished
        messages older than ``retention`` seconds.  Return (expired, deleted)."""

    def purge(self, retention: float, batch: int, max_batches: Optional[int] = None) -> Tuple[int, int]:
        """:meth:`expire_and_purge` until a batch comes back short (or ``max_batches`` times),
        each batch its own short transaction; return (expired, deleted)."""
        expired = deleted = 0
        for _ in itertools.count() if max_batches is None else range(max_batches):
            e, d = self.expire_and_purge(retention, batch)
            expired, deleted = expired + e, deleted + d
            if e < batch and d < batch:
                break
        return expired, deleted

    @abc.abstractmethod
    def pending_count(self, client_id: int) -> int:
        """Messages of ``client_id`` that will still be sent: pending, not past their TTL."""

    @abc.abstractmethod
    def client_info(self, client_id: int) -> Optional[ClientInfo]:
        """What the database knows of a client; None when there is no such client."""

    @abc.abstractmethod
    def message_info(self, message_id: int) -> Optional[MessageInfo]:
        """A message's status and times; None when there is none (never, or purged)."""

    @abc.abstractmethod
    def activity(self) -> Activity:
        """The newest message id and the number of pending messages (two index reads)."""

    @abc.abstractmethod
    def list_servers(self) -> List[ServerInfo]:
        """Every registered server, by id."""

    @abc.abstractmethod
    def register_server(self, host: str, port: int, event_host: str, event_port: int,
                        pid: int) -> int:
        """Record a running server; return its id.

        A server that ran before at the same wake-up address (and crashed, or it
        would have unregistered) is forgotten, and so is its clients' ownership.
        """

    @abc.abstractmethod
    def unregister_server(self, server_id: int) -> None:
        """Forget a server that is shutting down, and its clients' ownership."""

    @abc.abstractmethod
    def sweep(self, server_id: int) -> SweepResult:
        """Beat this server's heartbeat and list the clients it owns, in one transaction."""

    @abc.abstractmethod
    def heartbeat(self, server_id: int) -> bool:
        """Beat this server's heartbeat; False when its row is gone."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every pooled connection."""

    def connections_in_use(self) -> int:
        """Pooled connections borrowed for a transaction at this moment (for the pool gauge)."""
        return 0

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def body_hash(body: str) -> bytes:
    """The duplicate-rule key: exact bytes, whatever the database's collation."""
    return hashlib.sha256(body.encode("utf-8")).digest()


