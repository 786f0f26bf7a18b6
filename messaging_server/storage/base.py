"""The storage interface and the SQL that both databases share.

:class:`Storage` is everything the server and ``enqueue`` need from a database.
:class:`SqlStorage` implements it once in SQL; a backend (``sqlite.py``,
``mysql.py``) supplies only what differs: how a transaction is opened on a
pooled connection, which driver errors mean "unavailable", and a few dialect
fragments (clock, row locks).

Concurrency rules, in one place:

* Every operation borrows a connection for one transaction and returns it; no
  thread holds a connection while it waits for a client.
* Every transaction that must be serialised per client takes the client
  row's lock first (MySQL ``SELECT … FOR UPDATE``; SQLite has one write lock,
  taken by ``BEGIN IMMEDIATE``), and takes no other row lock before it, so
  lock order is the same everywhere and they cannot deadlock.
* Enqueues for one client are thus serialised, so message ids follow commit
  order per client and the duplicate check cannot race itself.
* Delivery, under the same lock, reads a batch of pending rows, writes them
  to the socket, marks the ones written as delivered and commits: two
  deliveries of one client never overlap, so a message is never delivered
  twice, and a failed write leaves it pending.  An enqueue for that client
  waits for the batch (at most the write timeout).
* Each identification bumps the client's ``session``; a delivery whose session
  is no longer current belongs to a connection that was taken over, possibly
  by another server, and is refused.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from ..errors import StorageUnavailable, UnknownClient

log = logging.getLogger(__name__)

PENDING, DELIVERED, IGNORED = "pending", "delivered", "ignored"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    body: str


@dataclass(frozen=True)
class Delivery:
    """What one delivery pass did."""

    delivered: int
    taken_over: bool = False
    write_failed: bool = False
    more: bool = False


# write(messages) -> how many of them, from the first, reached the socket.
Writer = Callable[[Sequence[StoredMessage]], int]


class Storage(abc.ABC):
    """What Niki needs from a database.  All methods are thread-safe."""

    @abc.abstractmethod
    def create_schema(self) -> None:
        """Create the database objects if they do not exist (idempotent)."""

    @abc.abstractmethod
    def new_client(self) -> Tuple[int, int]:
        """Create a client; return ``(client_id, session)``."""

    @abc.abstractmethod
    def claim_client(self, client_id: int) -> Optional[int]:
        """Start a new session of an existing client; None when the id is unknown."""

    @abc.abstractmethod
    def enqueue(self, client_id: int, body: str, duplicate_window: float) -> Optional[int]:
        """Store a pending message; return its id, or None for a duplicate (stored as ignored).

        Raises UnknownClient when no such client exists.
        """

    @abc.abstractmethod
    def deliver_pending(self, client_id: int, session: int, write: Writer, batch: int) -> Delivery:
        """Lock, write and mark delivered up to ``batch`` pending messages, oldest first."""

    @abc.abstractmethod
    def pending_count(self, client_id: int) -> int:
        """Messages of ``client_id`` still waiting for delivery."""

    @abc.abstractmethod
    def register_server(self, host: str, port: int, event_port: int, pid: int) -> int:
        """Record a running server; return its id."""

    @abc.abstractmethod
    def unregister_server(self, server_id: int) -> None:
        """Forget a server that is shutting down."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every pooled connection."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def body_hash(body: str) -> bytes:
    """The duplicate-rule key: exact bytes, whatever the database's collation."""
    return hashlib.sha256(body.encode("utf-8")).digest()


class SqlStorage(Storage):
    """The SQL both backends run; placeholders are written ``%s``."""

    # Dialect fragments, set by each backend.
    now_sql = ""
    # SQL for "the time `%s` microseconds ago", taking one parameter.
    micros_ago_sql = ""
    # Appended to a SELECT of a client row to lock it until commit.
    lock_rows_sql = ""

    # Driver exceptions that mean "the database is not usable now".
    unavailable_errors: Tuple[type, ...] = ()

    @abc.abstractmethod
    def _borrow(self) -> contextlib.AbstractContextManager:
        """A pooled connection, returned to the pool on exit."""

    @abc.abstractmethod
    def _begin(self, connection: Any) -> None:
        """Open an explicit transaction (never left to driver defaults)."""

    @staticmethod
    def _convert(sql: str) -> str:
        """Rewrite ``%s`` placeholders into the driver's style."""
        return sql

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Borrow a connection, begin, and yield a :class:`Tx`.

        Commits on success, rolls back on any exception, always returns the
        connection, and raises StorageUnavailable for driver errors.
        """
        try:
            with self._borrow() as connection:
                self._begin(connection)
                cursor = connection.cursor()
                try:
                    yield Tx(cursor, self._convert)
                    connection.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        connection.rollback()
                    raise
                finally:
                    with contextlib.suppress(Exception):
                        cursor.close()
        except self.unavailable_errors as exc:
            raise self.unavailable(exc) from exc

    # Where the data lives, for error messages (no password).
    location = ""

    def unavailable(self, exc: BaseException) -> StorageUnavailable:
        """The StorageUnavailable for a driver error, naming the database."""
        return StorageUnavailable(f"{self.location}: {describe_driver_error(exc)}")

    # --- clients ---

    def new_client(self) -> Tuple[int, int]:
        with self.transaction() as tx:
            tx.execute(
                f"INSERT INTO clients (session, created_at, last_seen_at) "
                f"VALUES (1, {self.now_sql}, {self.now_sql})"
            )
            return tx.lastrowid, 1

    def claim_client(self, client_id: int) -> Optional[int]:
        with self.transaction() as tx:
            changed = tx.execute(
                f"UPDATE clients SET session = session + 1, last_seen_at = {self.now_sql} "
                "WHERE id = %s",
                (client_id,),
            )
            if not changed:
                return None
            return tx.scalar("SELECT session FROM clients WHERE id = %s", (client_id,))

    # --- messages ---

    def enqueue(self, client_id: int, body: str, duplicate_window: float) -> Optional[int]:
        digest = body_hash(body)
        with self.transaction() as tx:
            if tx.scalar(self._lock_client_sql(), (client_id,)) is None:
                raise UnknownClient(f"no client with id {client_id}")
            recent = tx.scalar(
                "SELECT id FROM messages WHERE client_id = %s AND body_hash = %s "
                f"AND status <> '{IGNORED}' AND created_at > {self.micros_ago_sql} LIMIT 1",
                (client_id, digest, int(duplicate_window * 1_000_000)),
            )
            status = IGNORED if recent is not None else PENDING
            tx.execute(
                "INSERT INTO messages (client_id, body, body_hash, status, created_at) "
                f"VALUES (%s, %s, %s, %s, {self.now_sql})",
                (client_id, body, digest, status),
            )
            return None if recent is not None else tx.lastrowid

    def _lock_client_sql(self) -> str:
        return f"SELECT id FROM clients WHERE id = %s {self.lock_rows_sql}"

    def deliver_pending(self, client_id: int, session: int, write: Writer, batch: int) -> Delivery:
        with self.transaction() as tx:
            # The client row's lock serialises every delivery of this client, on
            # any server; reading the session under it sees any takeover that
            # committed while we waited.
            current = tx.scalar(
                f"SELECT session FROM clients WHERE id = %s {self.lock_rows_sql}", (client_id,))
            if current != session:
                return Delivery(0, taken_over=True)
            rows = tx.fetchall(
                f"SELECT id, body FROM messages WHERE client_id = %s AND status = '{PENDING}' "
                "ORDER BY id LIMIT %s",
                (client_id, batch),
            )
            if not rows:
                return Delivery(0)
            messages = [StoredMessage(int(mid), body) for mid, body in rows]
            written = write(messages)
            if written:
                ids = [m.id for m in messages[:written]]
                marks = ", ".join(["%s"] * len(ids))
                tx.execute(
                    f"UPDATE messages SET status = '{DELIVERED}', delivered_at = {self.now_sql} "
                    f"WHERE id IN ({marks})",
                    ids,
                )
            return Delivery(
                written,
                write_failed=written < len(messages),
                more=written == len(messages) == batch,
            )

    def pending_count(self, client_id: int) -> int:
        with self.transaction() as tx:
            return int(
                tx.scalar(
                    f"SELECT COUNT(*) FROM messages WHERE client_id = %s AND status = '{PENDING}'",
                    (client_id,),
                )
            )

    # --- servers ---

    def register_server(self, host: str, port: int, event_port: int, pid: int) -> int:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO servers (host, port, event_port, pid, started_at, heartbeat_at) "
                f"VALUES (%s, %s, %s, %s, {self.now_sql}, {self.now_sql})",
                (host, port, event_port, pid),
            )
            return tx.lastrowid

    def unregister_server(self, server_id: int) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM servers WHERE id = %s", (server_id,))


class Tx:
    """The cursor helper a backend's ``transaction()`` yields."""

    def __init__(self, cursor: Any, convert: Callable[[str], str]) -> None:
        self._cursor = cursor
        self._convert = convert
        self.lastrowid = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the affected row count."""
        sql = self._convert(sql)
        log.debug("SQL %s %r", sql, tuple(params))
        self._cursor.execute(sql, tuple(params))
        self.lastrowid = int(self._cursor.lastrowid or 0)
        return self._cursor.rowcount

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self.execute(sql, params)
        row = self._cursor.fetchone()
        return None if row is None else row[0]

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        self.execute(sql, params)
        return list(self._cursor.fetchall())


def describe_driver_error(exc: BaseException) -> str:
    """A one-line reason for a driver error, with a hint when the schema is missing."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "no such table" in text or "doesn't exist" in text:
        text += " (the database has no Niki schema yet: start the server once to create it)"
    elif "unable to open database file" in text:
        text += " (check --db / NIKI_DB: the server creates the database on its first start)"
    return text


def split_sql_script(script: str) -> Iterator[str]:
    """The statements of a schema file: ``;`` at a line end ends one; ``--`` lines are comments."""
    statement: List[str] = []
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        statement.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(statement).strip().rstrip(";").strip()
            if text:
                yield text
            statement = []
    text = "\n".join(statement).strip()
    if text:
        yield text
