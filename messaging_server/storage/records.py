"""What the storage hands back: message, delivery, claim, server and client records.

Plain frozen dataclasses, shared by the interface (``interface.py``), the SQL that
fills them (``sql.py``) and their callers.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

# A message's status in the database.
PENDING, DELIVERED, IGNORED, EXPIRED = "pending", "delivered", "ignored", "expired"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    body: str
    # When it was queued, in seconds since the epoch (the database's clock), for
    # the enqueue-to-delivery latency; 0.0: not known.  Not part of equality: a
    # message is its id and body.
    created_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Delivery:
    """What one delivery pass did."""

    delivered: int  # written (and, unless the caller marks later, marked delivered)
    taken_over: bool = False
    write_failed: bool = False
    more: bool = False
    last_id: int = 0  # the highest message id written in this pass
    busy: bool = False  # another delivery of this client holds its lease: try again soon


@dataclass(frozen=True)
class Acquired:
    """What :meth:`Storage.acquire_delivery` got: the lease and a batch, or why not."""

    messages: List[StoredMessage] = field(default_factory=list)
    taken_over: bool = False  # the session is no longer the client's current one
    busy: bool = False  # a connection of an older session still holds the lease


@dataclass(frozen=True)
class ServerAddress:
    """Where a server listens for wake-ups."""

    server_id: int
    host: str
    port: int


@dataclass(frozen=True)
class Claim:
    """A client identified on a server: its new session, and who held it before."""

    client_id: int
    session: int
    # The live server that owned the client until now, if another one: it must
    # be told to close its connection.
    previous_owner: Optional[ServerAddress] = None
    has_secret: bool = False  # a secret hash is stored for it (not a --legacy-ids client)
    # The session holds the client's delivery lease from the start (a new client:
    # nobody else can have sent it anything).
    holds_lease: bool = False


@dataclass(frozen=True)
class Queued:
    """What ``enqueue`` stored: the message id (None for a duplicate) and the live owner."""

    message_id: Optional[int]
    owner: Optional[ServerAddress] = None
    # The client's session when it was stored, and its newest pending message before
    # this one (0: none): what a wake-up carrying the message tells the owner.  Both
    # are read under the client row's lock, so no enqueue can come between.  (A
    # delivery may mark ``previous`` delivered meanwhile; status 'pending' counts,
    # expired or not.)  Both 0 for a duplicate.  enqueue_many gives ``previous``
    # (chained per client through the batch) but leaves ``session`` 0: the Enqueuer
    # then names the batch's clients in wake-ups instead of carrying each message.
    session: int = 0
    previous: int = 0


@dataclass(frozen=True)
class Activity:
    """The whole database's message flow at one moment, for the status page and the
    per-minute log line: ids handed out so far (their rise is what was queued, in every
    server's and enqueuer's name, duplicates recorded as ignored included) and the
    messages still pending."""

    newest_message_id: int
    id_step: int  # ids advance by this much per message (a Galera node: the cluster's size)
    pending: int


@dataclass(frozen=True)
class ServerInfo:
    """A registered server, for operators (times: ISO 8601, UTC)."""

    server_id: int
    host: str
    port: int
    event_host: str
    event_port: int
    pid: int
    started_at: str
    heartbeat_at: str
    alive: bool  # its heartbeat is fresh
    clients: int  # connected clients it owns


@dataclass(frozen=True)
class ClientInfo:
    """A client as the database sees it (times: ISO 8601, UTC)."""

    client_id: int
    pending: int  # messages waiting for delivery (not expired)
    server: Optional[ServerInfo]  # the live server holding its connection; None: offline
    created_at: str
    last_seen_at: Optional[str]
    has_secret: bool

    @property
    def connected(self) -> bool:
        return self.server is not None


# What a message's status reads as from outside: ACKNOWLEDGED is a delivered
# message that an ACK-mode client confirmed.
ACKNOWLEDGED = "acknowledged"


@dataclass(frozen=True)
class MessageInfo:
    """One message's fate: a delivery receipt (times: ISO 8601, UTC)."""

    message_id: int
    client_id: int
    status: str  # pending, delivered, acknowledged, expired or ignored
    created_at: str
    expires_at: Optional[str]
    delivered_at: Optional[str]
    acknowledged_at: Optional[str]


def iso_time(value: Any) -> Optional[str]:
    """A stored time (a MySQL datetime, a SQLite text) as ISO 8601 UTC with a Z."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = str(value).replace(" ", "T", 1)
    return text if text.endswith("Z") else text + "Z"


@dataclass(frozen=True)
class SweepResult:
    """This server's clients as the database sees them: id -> (session, has pending)."""

    registered: bool
    owned: Dict[int, Tuple[int, bool]] = field(default_factory=dict)


# enqueue_many's items: (client id, body) or (client id, body, ttl or None).
BatchItem = Union[Tuple[int, str], Tuple[int, str, Optional[float]]]
# A message row as _insert_messages writes it: client id, body, body hash, status, ttl.
Row = Tuple[int, str, bytes, str, Optional[float]]

# write(messages) -> how many of them, from the first, reached the socket.
Writer = Callable[[Sequence[StoredMessage]], int]

