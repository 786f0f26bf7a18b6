"""Queueing messages from the application side: ``enqueue()`` and :class:`Enqueuer`.

A message is committed to the database first and only then is its client's
server woken with a UDP datagram, so a wake-up never arrives before its
message is visible.  Either the message is committed or the caller gets an exception:
nothing is half-queued.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from messaging_server.config import settings
from messaging_server.config.addresses import Address, parse_peers
from messaging_server.errors import BodyRejected, ConfigurationError, NikiError, UnknownClient
from messaging_server.protocol.credentials import parse_credential, redact
from messaging_server.protocol.lines import MAX_CLIENT_ID
from messaging_server.protocol.wakeups import Carried, encode_carried
from messaging_server.storage import Queued, Storage, open_storage
from messaging_server.storage.records import ServerAddress
from messaging_server.wakeup import WakeupSender

ClientId = Union[int, str]
# The longest time to live: past it a ttl is surely a mistake (and dates
# beyond year 9999 overflow the databases' datetime types).
MAX_TTL_S = 10 * 366 * 86400
# The shortest: no delivery completes within a millisecond, so a message with a
# shorter ttl could never be sent; below it a value is a mistake (1e-300 would
# store an expiry of "now", as times are kept to the microsecond).
MIN_TTL_S = 0.001
# An application rarely needs more: enqueue is one short transaction.
ENQUEUE_POOL_SIZE = 4
# Items per enqueue_many call: one transaction, and SQL statements of bounded
# size (4 KiB bodies x 1000 stay well inside MySQL's default max_allowed_packet).
MAX_BATCH = 1000

# How long "this database has no wake-up key yet" is believed before asking again.
KEY_RECHECK_S = 10.0

# What was stored, as the wake-up needs it: client id, outcome, body, ttl.
Stored = Tuple[int, Queued, str, Optional[float]]

# wake_here(client_id, owner) -> True when the client's own connection, in this
# very process, was asked for a delivery pass and no datagram is needed.
# ``owner`` is the live owner enqueue found (None: offline, or broadcast mode).
WakeHere = Callable[[int, Optional[ServerAddress]], bool]
# What submit_many answers per item: the message id, None for a duplicate, or the error.
Submitted = Union[int, None, NikiError]
# An enqueue_many item: (client id, body), or (client id, body, ttl) with a ttl of its own.
Item = Union[Tuple[ClientId, Union[str, bytes]], Tuple[ClientId, Union[str, bytes], Optional[float]]]


def client_id_of(client_id: ClientId) -> int:
    """The numeric id of ``client_id``: an int, or the string the server handed out.

    The application side is trusted (it holds the database's credentials), so
    of a full ``<id>.<secret>`` credential only the id counts.
    """
    if isinstance(client_id, bool):
        raise UnknownClient(f"{client_id!r} is not a client id")
    if isinstance(client_id, int):
        value: Optional[int] = client_id if 0 < client_id <= MAX_CLIENT_ID else None
    elif isinstance(client_id, str):
        credential = parse_credential(client_id.strip(), MAX_CLIENT_ID)
        value = None if credential is None else credential.client_id
    else:
        value = None
    if value is None:
        shown = redact(client_id) if isinstance(client_id, str) else client_id
        raise UnknownClient(f"{shown!r} is not a client id")
    return value


def check_body(body: Union[str, bytes], max_bytes: int = settings.MAX_BODY_BYTES) -> str:
    """``body`` as text if the line protocol can carry it; BodyRejected otherwise."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyRejected("the message body is not valid UTF-8") from None
    if not isinstance(body, str):
        raise BodyRejected(f"the message body must be text, not {type(body).__name__}")
    if not body:
        raise BodyRejected("the message body is empty")
    if "\n" in body or "\r" in body:
        raise BodyRejected("the message body contains a line break")
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise BodyRejected("the message body is not valid Unicode text") from None
    if size > max_bytes:
        raise BodyRejected(f"the message body is {size} bytes; the limit is {max_bytes}")
    return body


def _peer_list(peers: Optional[Union[str, Sequence[Address]]]) -> Optional[List[Address]]:
    """The broadcast peers: as given, else NIKI_PEERS; None means routed mode.

    An empty list or string, given or in NIKI_PEERS, also means routed mode.
    """
    if peers is None:
        return settings.configured_peers()
    if isinstance(peers, str):
        return parse_peers(peers) or None
    return list(peers) or None


def check_ttl(ttl: Optional[float]) -> None:
    """BodyRejected unless ``ttl`` is None or a number of seconds in [MIN_TTL_S, MAX_TTL_S]."""
    if ttl is None:
        return
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or \
            not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise BodyRejected(f"ttl must be a number of seconds from {MIN_TTL_S:g} to {MAX_TTL_S}, "
                           f"not {ttl!r}")


def unpack_item(item: object) -> Tuple[int, Union[str, bytes], Optional[float]]:
    """An enqueue_many item as (client id, body, ttl or None), the id and ttl checked (the
    body is checked against the caller's own limit); UnknownClient or BodyRejected (a
    NikiError, so that it is that item's result, not the whole call's) when it is malformed."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        shape = f"{len(item)} elements" if isinstance(item, (tuple, list)) else type(item).__name__
        raise BodyRejected("an item must be (client_id, body) or (client_id, body, ttl), "
                           f"not {shape}")
    item_ttl = item[2] if len(item) == 3 else None
    check_ttl(item_ttl)
    return client_id_of(item[0]), item[1], item_ttl


class Enqueuer:
    """Queues messages into one database and wakes the servers that must know.

    Routed mode (the default, no peers configured): the one datagram for a
    message goes to the server that owns the client, if it is connected to a
    live server; an offline client costs no datagram.  Broadcast mode (peers
    given, or NIKI_PEERS set): every peer is woken for every message, as the
    original did.  Either way the servers' sweeps catch a lost datagram.

    Thread-safe; keep one per process and ``close()`` it when done.

    A server that queues on its own behalf (the HTTP API) passes its own
    ``storage`` (left open by ``close()``) and ``wake_here``, so that a client
    connected to that very server is served directly instead of by a datagram
    the server would send to itself.
    """

    max_batch = MAX_BATCH  # items per enqueue_many call

    def __init__(self, db: Optional[str] = None, peers: Optional[Union[str, Sequence[Address]]] = None,
                 *, max_body_bytes: int = settings.MAX_BODY_BYTES,
                 max_pending: Optional[int] = None,
                 storage: Optional[Storage] = None,
                 wake_here: Optional[WakeHere] = None) -> None:
        self.db = db or settings.default_db()
        self.peers = _peer_list(peers)
        self.max_body_bytes = max_body_bytes
        if max_pending is None:
            max_pending = settings.default_max_pending()
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigurationError(f"max_pending must be a whole number of at least 1, "
                                     f"not {max_pending!r}")
        self.max_pending = max_pending
        self._owns_storage = storage is None
        self._storage = storage or open_storage(self.db, pool_size=ENQUEUE_POOL_SIZE)
        self._wake_here = wake_here
        self._sender = WakeupSender(self.peers or ())
        self._count_lock = threading.Lock()
        self.datagrams_sent = 0  # for operators and tests: the cost of wake-ups
        self._key: Optional[bytes] = None  # signs wake-ups that carry their message
        self._key_checked = float("-inf")

    @property
    def mode(self) -> str:
        return "routed" if self.peers is None else "broadcast"

    def enqueue(self, client_id: ClientId, body: Union[str, bytes], *,
                ttl: Optional[float] = None) -> bool:
        """Queue ``body`` for ``client_id``; False when it duplicates one from the last 5 s.

        ``ttl``: seconds after which the message, if still undelivered, is never sent.
        Raises UnknownClient, BodyRejected, QueueFull or StorageUnavailable.
        """
        return self.submit(client_id, body, ttl=ttl) is not None

    def submit(self, client_id: ClientId, body: Union[str, bytes], *,
               ttl: Optional[float] = None) -> Optional[int]:
        """As :meth:`enqueue`, but return the new message's id (None for a duplicate),
        for callers that hand out receipts."""
        numeric_id = client_id_of(client_id)
        text = check_body(body, self.max_body_bytes)
        check_ttl(ttl)
        queued = self._storage.enqueue(numeric_id, text, settings.DUPLICATE_WINDOW_S,
                                       ttl=ttl, max_pending=self.max_pending,
                                       find_owner=self.peers is None)
        self._wake([(numeric_id, queued, text, ttl)])
        return queued.message_id

    def enqueue_many(self, items: Iterable[Item], *,
                     ttl: Optional[float] = None) -> List[Union[bool, NikiError]]:
        """Queue many messages in one transaction; one result per item, in order.

        A result is True (queued), False (a duplicate, also of an earlier item
        in the same call) or the error that refused that item alone:
        UnknownClient, BodyRejected or QueueFull (as with
        ``asyncio.gather(return_exceptions=True)``).  An item is ``(client_id, body)``,
        or ``(client_id, body, ttl)`` for a ttl of its own; an item of another shape
        gets BodyRejected, as a bad body or ttl does.  Messages for one client
        keep the order given.  Each server is woken once, with a datagram naming
        all its clients.  At most MAX_BATCH items per call (ValueError beyond);
        StorageUnavailable means nothing of the call was stored.
        """
        return [outcome if isinstance(outcome, NikiError) else outcome is not None
                for outcome in self.submit_many(items, ttl=ttl)]

    def submit_many(self, items: Iterable[Item], *, ttl: Optional[float] = None) -> List[Submitted]:
        """As :meth:`enqueue_many`, but each stored item's result is its message id
        (None for a duplicate) instead of True / False.  An item may carry its own ttl
        as a third element (None: ``ttl``)."""
        items = list(items)
        if len(items) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} messages per enqueue_many call, not {len(items)}")
        check_ttl(ttl)
        results: List[Submitted] = [None] * len(items)
        valid: List[Tuple[int, str, Optional[float]]] = []
        positions: List[int] = []
        for position, item in enumerate(items):
            try:
                client_id, body, item_ttl = unpack_item(item)
                valid.append((client_id, check_body(body, self.max_body_bytes), item_ttl))
                positions.append(position)
            except NikiError as exc:
                results[position] = exc
        stored = self._storage.enqueue_many(valid, settings.DUPLICATE_WINDOW_S, ttl=ttl,
                                            max_pending=self.max_pending,
                                            find_owner=self.peers is None)
        queued: List[Stored] = []
        for position, (client_id, body, item_ttl), outcome in zip(positions, valid, stored):
            if isinstance(outcome, NikiError):
                results[position] = outcome
            else:
                results[position] = outcome.message_id
                queued.append((client_id, outcome, body, ttl if item_ttl is None else item_ttl))
        self._wake(queued)
        return results

    def _wake(self, queued: Sequence[Stored]) -> None:
        """Tell the servers about what was stored (duplicates excepted), one datagram set
        per server: every peer in broadcast mode, each live owner in routed mode (an
        offline client costs none).  A client's only message of the call travels in
        its wake-up (see wakeup.py) when it fits and has no ttl (in broadcast mode only
        for a call of one message); the others are named."""
        stored = [(client_id, q, body, ttl) for client_id, q, body, ttl in queued
                  if q.message_id is not None]
        if self._wake_here is not None:
            # Broadcast mode still tells every peer: this process cannot tell
            # which of them (if any) is itself.
            owners = {client_id: q.owner for client_id, q, _, _ in stored}
            here = {client_id for client_id, owner in owners.items()
                    if self._wake_here(client_id, owner)}
            if self.peers is None:
                stored = [item for item in stored if item[0] not in here]
        if not stored:
            return
        per_client: Dict[int, int] = {}
        for client_id, _, _, _ in stored:
            per_client[client_id] = per_client.get(client_id, 0) + 1
        key = self._wakeup_key()
        # Per destination (None: every peer): datagrams carrying a message, and ids.
        carried: Dict[Optional[Tuple[str, int]], List[bytes]] = {}
        named: Dict[Optional[Tuple[str, int]], Set[int]] = {}
        now = time.time()
        for client_id, q, body, ttl in stored:
            if self.peers is not None:
                where: Optional[Tuple[str, int]] = None
            elif q.owner is not None:
                where = (q.owner.host, q.owner.port)
            else:
                continue  # offline: its connection's backlog pass will find it
            datagram = None
            # Broadcast mode carries a single message only: every peer gets every datagram.
            if key is not None and ttl is None and q.session and per_client[client_id] == 1 \
                    and (self.peers is None or len(stored) == 1):
                assert q.message_id is not None
                datagram = encode_carried(key, Carried(client_id, q.session, q.message_id,
                                                       q.previous, now, body))
            if datagram is not None:
                carried.setdefault(where, []).append(datagram)
            else:
                named.setdefault(where, set()).add(client_id)
        sent = 0
        for where, datagrams in carried.items():
            sent += (self._sender.broadcast_datagrams(datagrams) if where is None
                     else self._sender.send_datagrams(where, datagrams))
        for where, ids in named.items():
            sent += (self._sender.broadcast(sorted(ids)) if where is None
                     else self._sender.send(where, sorted(ids)))
        if sent:
            with self._count_lock:
                self.datagrams_sent += sent

    def _wakeup_key(self) -> Optional[bytes]:
        """The database's wake-up key, read once (a database without one yet: asked
        again every KEY_RECHECK_S; a failure to read it costs only the carrying)."""
        if self._key is None and time.monotonic() - self._key_checked > KEY_RECHECK_S:
            self._key_checked = time.monotonic()
            with contextlib.suppress(NikiError):
                self._key = self._storage.wakeup_key()
        return self._key

    def close(self) -> None:
        self._sender.close()
        if self._owns_storage:
            self._storage.close()

    def __enter__(self) -> Enqueuer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_shared: Dict[Tuple[str, Optional[Tuple[Address, ...]]], Enqueuer] = {}
_shared_lock = threading.Lock()


def _shared_enqueuer(db: Optional[str], peers: Optional[Union[str, Sequence[Address]]]) -> Enqueuer:
    db = db or settings.default_db()
    peer_list = _peer_list(peers)
    key = (db, None if peer_list is None else tuple(peer_list))
    with _shared_lock:
        enqueuer = _shared.get(key)
        if enqueuer is None:
            enqueuer = _shared[key] = Enqueuer(db, peer_list if peer_list is not None else "")
        return enqueuer


def enqueue(client_id: ClientId, body: Union[str, bytes], *, db: Optional[str] = None,
            peers: Optional[Union[str, Sequence[Address]]] = None,
            ttl: Optional[float] = None) -> bool:
    """Queue one message for a client and wake the server that holds it.

    ``client_id``: an int, or the string the server sent after ``SET_CLIENT_ID: ``.
    ``db`` defaults to NIKI_DB, as the server reads it.  ``peers`` (default
    NIKI_PEERS) switches to broadcast mode: every listed server is woken.
    ``ttl``: seconds after which the message, if still undelivered, expires unsent.
    Returns True when queued, False when the same body was queued for the same
    client in the last 5 seconds (it is then recorded as ignored).
    Raises UnknownClient, BodyRejected, QueueFull (the client has NIKI_MAX_PENDING,
    default 10,000, pending messages) or StorageUnavailable, and ConfigurationError
    for a malformed ``db`` or ``peers`` (all NikiError).
    """
    return _shared_enqueuer(db, peers).enqueue(client_id, body, ttl=ttl)


def enqueue_many(items: Iterable[Item], *, db: Optional[str] = None,
                 peers: Optional[Union[str, Sequence[Address]]] = None,
                 ttl: Optional[float] = None) -> List[Union[bool, NikiError]]:
    """Queue many ``(client_id, body)`` messages in one transaction; see
    :meth:`Enqueuer.enqueue_many` for the results."""
    return _shared_enqueuer(db, peers).enqueue_many(items, ttl=ttl)


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        for enqueuer in _shared.values():
            enqueuer.close()
        _shared.clear()
