"""The SQL that both databases share: :class:`SqlStorage` implements the storage
interface (``interface.py``) once; a backend (``sqlite.py``,
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
* Delivery holds no lock while it writes: the session holding the client's
  delivery lease (``clients.delivery_session``) reads a batch, writes it to the
  socket with no transaction open, and has it marked afterwards (the server's
  mark writer commits many connections' marks together, ``mark_groups``, by
  message id).  Only the holder delivers, and it keeps the lease until its
  connection ends and its marks are committed, so a message is never written
  by two sessions, and a failed write leaves it pending.
* Each identification bumps the client's ``session`` and makes the server
  its ``owner_server_id``; a delivery whose session is no longer current
  belongs to a connection that was taken over, possibly by another server,
  and is refused.  A connection that ends clears the owner (if its session is
  still current), so an offline client has none and is not woken.
* Servers beat a heartbeat in ``servers``; an owner whose heartbeat is older
  than HEARTBEAT_STALE_S is treated as dead (its clients as offline).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import random
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from messaging_server.errors import (
    NikiError,
    QueueFull,
    StorageError,
    StorageFault,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.storage.interface import (
    FORGET_BATCH,
    HEARTBEAT_STALE_S,
    LEASE_HANDOVER_S,
    Storage,
    body_hash,
)
from messaging_server.storage.records import (
    ACKNOWLEDGED,
    DELIVERED,
    EXPIRED,
    IGNORED,
    PENDING,
    Acquired,
    Activity,
    BatchItem,
    Claim,
    ClientInfo,
    Delivery,
    MessageInfo,
    Queued,
    Row,
    ServerAddress,
    ServerInfo,
    StoredMessage,
    SweepResult,
    Writer,
    iso_time,
)

if TYPE_CHECKING:
    from messaging_server.storage.group_commit import GroupCommit

log = logging.getLogger(__name__)

T = TypeVar("T")


# A transaction that loses a conflict (a deadlock; on a Galera cluster, certification
# against another node's transaction) is run again, up to this many times in all, after
# a pause drawn between 0 and CONFLICT_PAUSE_S * 2**attempt (at most CONFLICT_PAUSE_MAX_S):
# the loser was rolled back as a whole, so a second run doubles nothing.  Ten attempts
# wait at most about 0.5 s in all: a client's burst from several Galera nodes at once
# meets that many conflicts in a row only under contention no pause would resolve.
CONFLICT_ATTEMPTS = 10
# How long a transaction whose database host failed is run again, on the next host of a
# multi-host URL (a Galera cluster): a killed node's peers take a few seconds to agree
# that it is gone, during which they may hold commits back.
FAILOVER_S = 20.0
CONFLICT_PAUSE_S = 0.002
CONFLICT_PAUSE_MAX_S = 0.1
# Ids per marking UPDATE (a statement's placeholders stay well under every limit).
MARK_CHUNK = 500
# The row of table ``secrets`` holding the key that signs wake-ups carrying messages.
WAKEUP_KEY_NAME = "wakeup"




class SqlStorage(Storage):
    """The SQL both backends run; placeholders are written ``%s``."""

    # Dialect fragments, set by each backend.
    now_sql = ""
    # SQL for "the time `%s` microseconds ago" / "from now", taking one parameter.
    micros_ago_sql = ""
    micros_ahead_sql = ""
    # Appended to a SELECT of a client row to lock it until commit.
    lock_rows_sql = ""
    # SQL for a stored time ``{column}`` as whole microseconds since the epoch: an
    # integer is much cheaper for the driver to hand over than a datetime (it is
    # read once per delivered message, for the latency histogram).
    epoch_micros_sql = ""
    # INSERT that skips a row whose key exists.
    insert_ignore_sql = "INSERT IGNORE"

    # The driver's exceptions, mapped at this boundary (see storage_error).
    driver_errors: Tuple[Type[BaseException], ...] = ()

    def _is_unavailable(self, exc: BaseException) -> bool:
        """Whether a driver error means "the database cannot be used now" (gone away,
        busy, locked, read-only, full: try again later), not "it refuses this statement"
        (a bug, or a schema that does not match: trying again cannot help).

        A missing table counts as unavailable: the database has no schema yet, and
        the server's start creates it.
        """
        return False

    # Columns added to a table after its first release, as (table, column, type):
    # a database created by an older version gets them at the server's start.
    added_columns: Tuple[Tuple[str, str, str], ...] = ()

    @abc.abstractmethod
    def _column_names(self, tx: Tx, table: str) -> List[str]:
        """The columns ``table`` has now."""

    def _add_missing_columns(self, tx: Tx) -> None:
        """The only upgrade step there is: add what an older schema lacks."""
        for table, column, sql_type in self.added_columns:
            if column not in self._column_names(tx, table):
                log.warning("upgrading the schema: adding %s.%s", table, column)
                self._add_column(tx, table, column, sql_type)

    def _add_column(self, tx: Tx, table: str, column: str, sql_type: str) -> None:
        tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")

    @abc.abstractmethod
    def _borrow(self) -> contextlib.AbstractContextManager:
        """A pooled connection, returned to the pool on exit."""

    @abc.abstractmethod
    def _begin(self, connection: Any, durable: bool = True) -> None:
        """Open an explicit transaction (never left to driver defaults).

        ``durable=False``: its commit need not survive a power loss (the
        database's next durable commit makes it durable too); for transient
        state only, where a backend can then skip a flush.
        """

    @staticmethod
    def _convert(sql: str) -> str:
        """Rewrite ``%s`` placeholders into the driver's style."""
        return sql

    def read(self) -> contextlib.AbstractContextManager:
        """A transaction that only reads (a backend may run it beside the writers)."""
        return self.transaction(durable=False)

    @contextlib.contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Tx]:
        """Borrow a connection, begin, and yield a :class:`Tx`.

        Commits on success, rolls back on any exception, always returns the
        connection, and raises StorageUnavailable or StorageFault for driver errors.
        ``durable``: see :meth:`_begin`.
        """
        try:
            with self._borrow() as connection:
                self._begin(connection, durable)
                cursor = connection.cursor()
                try:
                    tx = Tx(cursor, self._convert)
                    yield tx
                    connection.commit()
                    if tx.wrote:
                        self.write_health.succeeded()
                except BaseException:
                    with contextlib.suppress(Exception):
                        connection.rollback()
                    raise
                finally:
                    with contextlib.suppress(Exception):
                        cursor.close()
        except self.driver_errors as exc:
            raise self.storage_error(exc) from exc

    # Set by a backend whose durable commits are serialised (SQLite): short writes
    # of many threads then share one transaction and one flush.
    _group: Optional[GroupCommit] = None

    def _is_conflict(self, exc: BaseException) -> bool:
        """Whether a driver error means the transaction lost a conflict and was rolled back
        as a whole (so running it again is safe)."""
        return False

    def _retry_conflicts(self, attempt: Callable[[], T],
                         after_failover: Optional[Callable[[T], T]] = None) -> T:
        """``attempt()``, run again when it loses a conflict (see CONFLICT_ATTEMPTS), or
        when its database host failed and another may take over (_failover_pause).

        ``attempt`` must be one whole transaction: it began after the last one ended,
        so a conflict rolled back everything it did.  A run on another host may follow
        one that committed before its host failed (its answer was lost): the result of
        a run after a failover goes through ``after_failover``, which can tell that
        apart (an enqueue's "duplicate" may be its own first run)."""
        conflicts = 0
        failover_until: Optional[float] = None
        while True:
            try:
                result = attempt()
                if failover_until is not None and after_failover is not None:
                    result = after_failover(result)
                return result
            except StorageUnavailable as exc:
                cause = exc.__cause__
                if cause is not None and self._is_conflict(cause) and conflicts < CONFLICT_ATTEMPTS - 1:
                    log.debug("%s: a transaction lost a conflict; running it again (%s)",
                              self.location, exc)
                    longest = min(CONFLICT_PAUSE_MAX_S, CONFLICT_PAUSE_S * 2 ** conflicts)
                    time.sleep(random.uniform(0, longest))
                    conflicts += 1
                    continue
                pause = None if cause is None else self._failover_pause(cause)
                if pause is None:
                    raise
                if failover_until is None:
                    failover_until = time.monotonic() + FAILOVER_S
                if time.monotonic() + pause > failover_until:
                    raise
                log.debug("%s: the database host failed; running the transaction again (%s)",
                          self.location, exc)
                time.sleep(pause)

    def _failover_pause(self, exc: BaseException) -> Optional[float]:
        """How long to wait before running a transaction again that failed with the driver
        error ``exc`` because its database host did, when another host may take over;
        None: do not.  Only a backend with several hosts of one cluster says anything."""
        return None

    def _write(self, operation: Callable[[Tx], T]) -> T:
        """Run ``operation`` in a durable transaction, shared with other threads' writes
        where the backend groups commits; its result once committed.  A transaction that
        loses a conflict runs again (``operation`` must have no effect outside it)."""
        if self._group is None:
            def attempt() -> T:
                with self.transaction() as tx:
                    return operation(tx)
            return self._retry_conflicts(attempt)
        try:
            return self._group.run(operation)
        except self.driver_errors as exc:  # raised inside a shared transaction
            raise self.storage_error(exc) from exc

    # Where the data lives, for error messages (no password).
    location = ""

    def storage_error(self, exc: BaseException) -> StorageError:
        """The StorageUnavailable or StorageFault for a driver error, naming the database
        (and noted for /healthz: every driver error the storage raises passes here)."""
        if not self._is_conflict(exc):  # a lost conflict says nothing of the database's health
            self.write_health.failed()
        kind = StorageUnavailable if self._is_unavailable(exc) else StorageFault
        return kind(f"{self.location}: {self.describe_error(exc)}")

    def describe_error(self, exc: BaseException) -> str:
        """A driver error in one line, with a hint where one helps."""
        return describe_driver_error(exc)

    @property
    def _unexpired(self) -> str:
        """SQL: the row has no TTL, or it has not passed."""
        return f"(expires_at IS NULL OR expires_at > {self.now_sql})"

    @property
    def _accepted(self) -> str:
        """SQL: the message was accepted for delivery, so a later one with its body is a
        duplicate: delivered (whether its ttl has passed since or not), or pending and not
        expired (one that expired unsent never reached the client)."""
        return f"(status = '{DELIVERED}' OR (status = '{PENDING}' AND {self._unexpired}))"

    def _ago(self, seconds: float) -> str:
        """SQL for the database time ``seconds`` ago (a literal: no parameter)."""
        return self.micros_ago_sql.replace("%s", str(int(seconds * 1_000_000)))

    @property
    def _alive(self) -> str:
        """SQL: server ``s`` beat its heartbeat recently (else it is taken for dead)."""
        return f"s.heartbeat_at > {self._ago(HEARTBEAT_STALE_S)}"

    @property
    def _live_owner_columns(self) -> str:
        """SQL for a SELECT of client ``c``: its owner's wake-up host and port, NULL unless
        that owner is alive.  Subqueries in a select list lock nothing, so they can ride
        on the statement that locks the client row."""
        owner = f"s.id = c.owner_server_id AND {self._alive}"
        return (f"(SELECT s.event_host FROM servers s WHERE {owner}), "
                f"(SELECT s.event_port FROM servers s WHERE {owner})")

    @property
    def _newest_pending_sql(self) -> str:
        """SQL for a SELECT of client ``c``: the id of its newest pending message, NULL if
        none (the end of the pending index's range for the client: one index read)."""
        return (f"(SELECT MAX(m.id) FROM messages m WHERE m.client_id = c.id "
                f"AND m.status = '{PENDING}')")

    @staticmethod
    def _live_owner(server_id: Any, host: Any, port: Any) -> Optional[ServerAddress]:
        """The address those columns gave, for a row's owner id, host and port."""
        return None if host is None else ServerAddress(int(server_id), str(host), int(port))

    # --- clients ---

    def new_client(self, server_id: Optional[int] = None,
                   secret_hash: Optional[bytes] = None) -> Claim:
        def insert(tx: Tx) -> Claim:
            tx.execute(
                "INSERT INTO clients (session, owner_server_id, delivery_session, delivery_server_id, "
                f"secret_hash, created_at, last_seen_at) VALUES (1, %s, 1, %s, %s, {self.now_sql}, "
                f"{self.now_sql})",
                (server_id, server_id, secret_hash),
            )
            return Claim(tx.lastrowid, 1, has_secret=secret_hash is not None, holds_lease=True)

        return self._write(insert)

    def claim_client(self, client_id: int, server_id: Optional[int] = None,
                     accept: Optional[Callable[[Optional[bytes]], bool]] = None) -> Optional[Claim]:
        return self._write(lambda tx: self._claim(tx, client_id, server_id, accept))

    def _claim(self, tx: Tx, client_id: int, server_id: Optional[int],
               accept: Optional[Callable[[Optional[bytes]], bool]]) -> Optional[Claim]:
        rows = tx.fetchall(
            f"SELECT c.session, c.secret_hash, c.owner_server_id, {self._live_owner_columns} "
            f"FROM clients c WHERE c.id = %s {self.lock_rows_sql}",
            (client_id,),
        )
        if not rows:
            return None
        stored_hash = None if rows[0][1] is None else bytes(rows[0][1])
        if accept is not None and not accept(stored_hash):
            return None
        session, previous = int(rows[0][0]) + 1, rows[0][2]
        # The delivery lease stays where it is: a connection of an older session
        # that is writing, or waiting for ACKs, keeps it until it has recorded what
        # it sent (or ends), so that the new session never sends that again.  The
        # first newer session to find it held starts the handover wait (_lease_free);
        # later ones (a client reconnecting again and again) do not restart it.
        tx.execute(
            f"UPDATE clients SET session = %s, owner_server_id = %s, last_seen_at = {self.now_sql}, "
            "lease_wanted_at = CASE WHEN delivery_session IS NULL THEN NULL "
            f"ELSE COALESCE(lease_wanted_at, {self.now_sql}) END WHERE id = %s",
            (session, server_id, client_id),
        )
        owner = None if previous == server_id else self._live_owner(*rows[0][2:5])
        return Claim(client_id, session, owner, has_secret=stored_hash is not None)

    def _lease_free(self, alias: str) -> str:
        """SQL for a client row ``alias``, to be taken by its current session: its delivery
        lease is held by nobody; or by a server that is no longer alive (it crashed: its row
        is gone or its heartbeat stale); or by an older session that has not given it back
        although a newer one first identified LEASE_HANDOVER_S ago.  A live server gives it
        back within milliseconds of the takeover datagram, or at its next sweep (the
        connection is closed at once, even mid-write); one that has not has crashed."""
        return (f"({alias}.delivery_session IS NULL OR NOT EXISTS (SELECT 1 FROM servers s "
                f"WHERE s.id = {alias}.delivery_server_id AND {self._alive}) "
                f"OR {alias}.lease_wanted_at < {self._ago(LEASE_HANDOVER_S)})")

    def release_client(self, client_id: int, session: int, server_id: Optional[int],
                       written: Sequence[int] = (),
                       acknowledged: Sequence[int] = ()) -> Optional[ServerAddress]:
        def release(tx: Tx) -> Optional[ServerAddress]:
            # The client row first (by its primary key only), as every transaction
            # here locks it: a release and a claim of the same client then queue on
            # that one lock and never hold the owner index's entry in between.
            rows = tx.fetchall(
                f"SELECT c.session, c.owner_server_id, c.delivery_session, {self._live_owner_columns} "
                f"FROM clients c WHERE c.id = %s {self.lock_rows_sql}", (client_id,))
            if not rows:
                return None
            current, owner, lease_session = rows[0][0], rows[0][1], rows[0][2]
            if written:
                self._mark(tx, client_id, written)
            if acknowledged:
                self._mark(tx, client_id, acknowledged, acknowledged=True)
            changes: List[str] = []
            if current == session and owner == server_id:
                changes.append(f"owner_server_id = NULL, last_seen_at = {self.now_sql}")
            holder = lease_session is not None and int(lease_session) == session
            if holder:
                changes.append("delivery_session = NULL, delivery_server_id = NULL, lease_wanted_at = NULL")
            if changes:
                tx.execute(f"UPDATE clients SET {', '.join(changes)} WHERE id = %s", (client_id,))
            if current != session:
                # A newer connection may be waiting for this lease (or for the one this
                # connection gave back while idle, unaware of the takeover): its server
                # wants to know.
                return self._live_owner(*rows[0][1:2], *rows[0][3:5])
            return None

        return self._write(release)

    # --- messages ---

    def enqueue(self, client_id: int, body: str, duplicate_window: float,
                ttl: Optional[float] = None, max_pending: Optional[int] = None,
                find_owner: bool = True) -> Queued:
        return self._retry_conflicts(
            lambda: self._enqueue_once(client_id, body, duplicate_window, ttl, max_pending, find_owner),
            after_failover=lambda queued: self._own_copy(client_id, body, queued))

    def _own_copy(self, client_id: int, body: str, queued: Queued) -> Queued:
        """After a failover, a "duplicate" is most likely this call's own first run, which
        committed before its host failed (or, within the duplicate window, another
        caller's same message): either way the message is queued, once.  Its id; no
        owner (the first run's wake-up was lost with its answer: the owner's sweep
        delivers it)."""
        if queued.message_id is not None:
            return queued
        with self.transaction() as tx:
            found = tx.scalar(f"SELECT MAX(id) FROM messages WHERE client_id = %s AND body_hash = %s "
                              f"AND status <> '{IGNORED}'", (client_id, body_hash(body)))
        return Queued(None if found is None else int(found))

    def _enqueue_once(self, client_id: int, body: str, duplicate_window: float,
                      ttl: Optional[float], max_pending: Optional[int], find_owner: bool) -> Queued:
        # Three statements between BEGIN and COMMIT: each round trip to MariaDB costs
        # 0.1-0.25 ms, as much as the commit itself.
        digest = body_hash(body)
        with self.transaction() as tx:
            # The client row, locked by writing it (see _count_queued; a QueueFull below
            # rolls the write back).  No row: no client.
            if not self._count_queued(tx, [client_id]):
                raise UnknownClient(f"no client with id {client_id}")
            # Under that lock, in one statement: the session, the newest pending message,
            # the owner's wake-up address if the owner is alive, the duplicate rule (only
            # messages that will be or were delivered make a later one a duplicate: not
            # ignored ones, nor ones that expired unsent) and the queue cap's first count.
            columns = [f"c.session, {self._newest_pending_sql}, c.owner_server_id",
                       f"(SELECT id FROM messages WHERE client_id = c.id AND body_hash = %s "
                       f"AND {self._accepted} AND created_at > {self.micros_ago_sql} LIMIT 1)"]
            params: List[Any] = [digest, int(duplicate_window * 1_000_000)]
            if max_pending is not None:
                columns.append(f"({self._capped_count_sql('')})")
                params += [client_id, max_pending]
            if find_owner:
                columns.append(self._live_owner_columns)
            row = tx.fetchall(f"SELECT {', '.join(columns)} FROM clients c WHERE c.id = %s",
                              [*params, client_id])[0]
            recent = row[3]
            if max_pending is not None and int(row[4]) >= max_pending and \
                    self._capped_count(tx, client_id, max_pending, f" AND {self._unexpired}") >= max_pending:
                raise QueueFull(f"client {client_id} already has {max_pending} pending messages")
            status = IGNORED if recent is not None else PENDING
            expires = "NULL" if ttl is None else self.micros_ahead_sql
            params = [client_id, body, digest, status]
            if ttl is not None:
                params.append(int(ttl * 1_000_000))
            tx.execute(
                "INSERT INTO messages (client_id, body, body_hash, status, created_at, expires_at) "
                f"VALUES (%s, %s, %s, %s, {self.now_sql}, {expires})",
                params,
            )
            if recent is not None:
                return Queued(None)
            session, previous = int(row[0]), int(row[1] or 0)
            owner = self._live_owner(row[2], *row[-2:]) if find_owner else None
            return Queued(tx.lastrowid, owner, session, previous)

    def enqueue_many(self, items: Sequence[BatchItem], duplicate_window: float,
                     ttl: Optional[float] = None, max_pending: Optional[int] = None,
                     find_owner: bool = True) -> List[Union[Queued, NikiError]]:
        if not items:
            return []
        def own_copies(results: List[Union[Queued, NikiError]]) -> List[Union[Queued, NikiError]]:
            return [self._own_copy(item[0], item[1], r) if isinstance(r, Queued) else r
                    for item, r in zip(items, results)]

        return self._retry_conflicts(lambda: self._enqueue_many_once(
            items, duplicate_window, ttl, max_pending, find_owner), after_failover=own_copies)

    def _enqueue_many_once(self, items: Sequence[BatchItem], duplicate_window: float,
                           ttl: Optional[float], max_pending: Optional[int],
                           find_owner: bool) -> List[Union[Queued, NikiError]]:
        client_ids = sorted({item[0] for item in items})
        digests = [body_hash(item[1]) for item in items]
        ids_in = ", ".join(["%s"] * len(client_ids))
        with self.transaction() as tx:
            # Client rows first, in id order: the same lock order as every other
            # transaction, so batches and deliveries cannot deadlock.  With each, its
            # newest pending message (a subquery in the select list: evaluated once the
            # row is locked, and it locks nothing).
            owner_sql = f", {self._live_owner_columns}" if find_owner else ""
            locked = tx.fetchall(
                f"SELECT c.id, c.session, {self._newest_pending_sql}, c.owner_server_id{owner_sql} "
                f"FROM clients c WHERE c.id IN ({ids_in}) ORDER BY c.id {self.lock_rows_sql}", client_ids)
            owners = {int(row[0]): self._live_owner(*row[3:]) if find_owner else None for row in locked}
            sessions = {int(row[0]): int(row[1]) for row in locked}
            # Queued.previous: per client, its newest pending message so far, batch included.
            newest = {int(row[0]): int(row[2] or 0) for row in locked}
            pending: Dict[int, int] = {}
            if max_pending is not None:
                pending = self._pending_counts(tx, items, client_ids, max_pending)
            unique_digests = sorted(set(digests))
            recent = {(int(row[0]), bytes(row[1])) for row in tx.fetchall(
                f"SELECT client_id, body_hash FROM messages WHERE client_id IN ({ids_in}) "
                f"AND body_hash IN ({', '.join(['%s'] * len(unique_digests))}) "
                f"AND {self._accepted} "
                f"AND created_at > {self.micros_ago_sql}",
                [*client_ids, *unique_digests, int(duplicate_window * 1_000_000)])}
            results: List[Union[Queued, NikiError, int]] = []  # int: index into rows, for now
            rows: List[Row] = []
            for item, digest in zip(items, digests):
                client_id, body = item[0], item[1]
                item_ttl = item[2] if len(item) > 2 and item[2] is not None else ttl
                key = (client_id, digest)
                # The checks in enqueue()'s order: unknown, queue full, duplicate.
                if client_id not in owners:
                    results.append(UnknownClient(f"no client with id {client_id}"))
                elif max_pending is not None and pending.get(client_id, 0) >= max_pending:
                    results.append(QueueFull(f"client {client_id} already has {max_pending} "
                                             "pending messages"))
                elif key in recent:
                    rows.append((client_id, body, digest, IGNORED, item_ttl))
                    results.append(Queued(None))
                else:
                    pending[client_id] = pending.get(client_id, 0) + 1
                    recent.add(key)  # a later item with the same body duplicates this one
                    results.append(len(rows))
                    rows.append((client_id, body, digest, PENDING, item_ttl))
            if rows:
                self._count_queued(tx, sorted({row[0] for row in rows}))
            ids = self._insert_messages(tx, rows) if rows else []
        done: List[Union[Queued, NikiError]] = []
        for r in results:
            if isinstance(r, int):  # a pending row: it follows the client's newest one so far
                client_id = rows[r][0]
                done.append(Queued(ids[r], owners[client_id], session=sessions[client_id],
                                   previous=newest[client_id]))
                newest[client_id] = ids[r]
            else:
                done.append(r)
        return done

    @staticmethod
    def _count_queued(tx: Tx, client_ids: Sequence[int]) -> int:
        """Write the rows of the clients a message is stored for (their ``queued_count``),
        which locks them; return how many there are.

        The row lock already orders one client's enqueues on one database.  On a
        Galera cluster it is the local node's only: two nodes' enqueues for one
        client would both commit, and their ids (handed out per node) could become
        visible out of order, so a delivery reading after the last id it sent would
        skip one.  A written row is part of what Galera certifies: one of the two
        fails at commit (error 1213), is retried whole (_retry_conflicts) after the
        other's commit has reached its node, and gets a higher id.
        """
        marks = ", ".join(["%s"] * len(client_ids))
        return tx.execute(f"UPDATE clients SET queued_count = queued_count + 1 WHERE id IN ({marks})",
                          list(client_ids))

    # The queue cap counts pending messages that have not expired.  Expiry is not
    # in the pending index, so checking it reads each row: a first count that
    # ignores it reads the index alone, and only a client that reaches the cap
    # by that count is counted again, row by row.

    @staticmethod
    def _capped_count_sql(where: str) -> str:
        """SQL: a client's pending messages (``where`` narrows them), counted up to a cap;
        parameters: client id, cap."""
        return ("SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE client_id = %s "
                f"AND status = '{PENDING}'{where} LIMIT %s) AS capped")

    def _capped_count(self, tx: Tx, client_id: int, cap: int, where: str) -> int:
        return int(tx.scalar(self._capped_count_sql(where), (client_id, cap)))

    def _pending_counts(self, tx: Tx, items: Sequence[BatchItem], client_ids: List[int],
                        cap: int) -> Dict[int, int]:
        """Unexpired pending counts of the batch's clients, exact wherever the cap could matter."""
        def counts(ids: Sequence[int], where: str) -> Dict[int, int]:
            marks = ", ".join(["%s"] * len(ids))
            return {int(row[0]): int(row[1]) for row in tx.fetchall(
                f"SELECT client_id, COUNT(*) FROM messages WHERE client_id IN ({marks}) "
                f"AND status = '{PENDING}'{where} GROUP BY client_id", ids)}
        pending = counts(client_ids, "")
        asked: Dict[int, int] = {}
        for item in items:
            asked[item[0]] = asked.get(item[0], 0) + 1
        near = [c for c in client_ids if pending.get(c, 0) + asked[c] > cap and pending.get(c, 0)]
        if near:
            exact = counts(near, f" AND {self._unexpired}")
            pending.update({c: exact.get(c, 0) for c in near})
        return pending

    # MySQL reports the first id of a multi-row INSERT, SQLite the last; either
    # way the ids follow each other by a fixed step (one writer on SQLite;
    # InnoDB's auto-increment lock modes 0 and 1, MariaDB's default, for an
    # INSERT of known row count).
    lastrowid_is_first = True

    def _insert_messages(self, tx: Tx, rows: Sequence[Row]) -> List[int]:
        """One multi-row INSERT, each row with its own ttl; return the ids given to ``rows``,
        in order."""
        values: List[str] = []
        params: List[Any] = []
        for client_id, body, digest, status, ttl in rows:
            expires = "NULL" if ttl is None else self.micros_ahead_sql
            values.append(f"(%s, %s, %s, %s, {self.now_sql}, {expires})")
            params += [client_id, body, digest, status]
            if ttl is not None:
                params.append(int(ttl * 1_000_000))
        step = self._id_step(tx)  # before the INSERT: any statement resets lastrowid
        tx.execute("INSERT INTO messages (client_id, body, body_hash, status, created_at, expires_at) "
                   f"VALUES {', '.join(values)}", params)
        first = tx.lastrowid if self.lastrowid_is_first else tx.lastrowid - (len(rows) - 1) * step
        return list(range(first, first + len(rows) * step, step))

    def _id_step(self, tx: Tx) -> int:
        """The gap between consecutive auto-increment ids (a MariaDB Galera node: the
        cluster's size)."""
        return 1

    def read_batch(self, client_id: int, session: int, batch: int,
                   after_id: int = 0) -> Optional[List[StoredMessage]]:
        with self.read() as tx:
            if tx.scalar("SELECT session FROM clients WHERE id = %s", (client_id,)) != session:
                return None
            return self._pending_batch(tx, client_id, batch, after_id)

    def acquire_delivery(self, client_id: int, session: int, server_id: Optional[int],
                         batch: int, after_id: int = 0) -> Acquired:
        def acquire(tx: Tx) -> Acquired:
            if not tx.execute(
                    "UPDATE clients SET delivery_session = %s, delivery_server_id = %s, "
                    "lease_wanted_at = NULL WHERE id = %s AND session = %s "
                    f"AND (delivery_session = %s OR {self._lease_free('clients')})",
                    (session, server_id, client_id, session, session)):
                current = tx.scalar("SELECT session FROM clients WHERE id = %s", (client_id,))
                return Acquired(taken_over=current != session, busy=current == session)
            # Read under the lease: whatever an earlier holder marked before it let go
            # is no longer pending here.
            return Acquired(self._pending_batch(tx, client_id, batch, after_id))

        return self._write(acquire)

    def _pending_batch(self, tx: Tx, client_id: int, batch: int, after_id: int) -> List[StoredMessage]:
        rows = tx.fetchall(
            f"SELECT id, body, {self.epoch_micros_sql.format(column='created_at')} FROM messages "
            f"WHERE client_id = %s AND status = '{PENDING}' AND id > %s AND {self._unexpired} "
            "ORDER BY id LIMIT %s",
            (client_id, after_id, batch),
        )
        return [StoredMessage(int(mid), body, int(micros) / 1e6) for mid, body, micros in rows]

    def deliver_pending(self, client_id: int, session: int, write: Writer, batch: int,
                        after_id: int = 0, mark: bool = True,
                        server_id: Optional[int] = None) -> Delivery:
        acquired = self.acquire_delivery(client_id, session, server_id, batch, after_id)
        if acquired.taken_over or acquired.busy:
            return Delivery(0, taken_over=acquired.taken_over, busy=acquired.busy)
        messages = acquired.messages
        written = write(messages) if messages else 0
        if mark:
            self.mark_delivered(client_id, [m.id for m in messages[:written]], release_session=session)
        return self._delivery(messages, written, batch)

    def wakeup_state(self, client_ids: Sequence[int]) -> Dict[int, Tuple[int, int]]:
        if not client_ids:
            return {}
        marks = ", ".join(["%s"] * len(client_ids))
        with self.read() as tx:
            rows = tx.fetchall(
                "SELECT c.id, c.session, (SELECT MAX(m.id) FROM messages m WHERE m.client_id = c.id "
                f"AND m.status = '{PENDING}') FROM clients c WHERE c.id IN ({marks})", list(client_ids))
        return {int(cid): (int(session), int(newest or 0)) for cid, session, newest in rows}

    def _mark(self, tx: Tx, client_id: int, ids: Sequence[int], acknowledged: bool = False) -> int:
        marks = ", ".join(["%s"] * len(ids))
        acked = f", acknowledged_at = {self.now_sql}" if acknowledged else ""
        return tx.execute(
            f"UPDATE messages SET status = '{DELIVERED}', delivered_at = {self.now_sql}{acked} "
            f"WHERE client_id = %s AND status IN ('{PENDING}', '{EXPIRED}') AND id IN ({marks})",
            [client_id, *ids],
        )

    @staticmethod
    def _delivery(messages: List[StoredMessage], written: int, batch: int) -> Delivery:
        return Delivery(
            written,
            write_failed=written < len(messages),
            more=written == len(messages) == batch,
            last_id=messages[written - 1].id if written else 0,
        )

    def mark_delivered(self, client_id: int, message_ids: Sequence[int],
                       acknowledged: bool = False, release_session: Optional[int] = None) -> int:
        if not message_ids and release_session is None:
            return 0

        def mark(tx: Tx) -> int:
            if release_session is not None:
                # The client row's lock first, as everywhere (see release_client).
                tx.execute("UPDATE clients SET delivery_session = NULL, delivery_server_id = NULL, "
                           "lease_wanted_at = NULL WHERE id = %s AND delivery_session = %s",
                           (client_id, release_session))
            return self._mark(tx, client_id, message_ids, acknowledged) if message_ids else 0

        return self._write(mark)

    def mark_groups(self, written: Sequence[int], acknowledged: Sequence[int]) -> None:
        if not written and not acknowledged:
            return

        def mark(tx: Tx) -> None:
            # By primary key, in id order, without any client's row: marks of many
            # connections commit together and never wait on an enqueue or a claim.
            for ids, acked in ((sorted(written), False), (sorted(acknowledged), True)):
                stamp = f", acknowledged_at = {self.now_sql}" if acked else ""
                for start in range(0, len(ids), MARK_CHUNK):
                    chunk = ids[start:start + MARK_CHUNK]
                    tx.execute(
                        f"UPDATE messages SET status = '{DELIVERED}', delivered_at = {self.now_sql}{stamp} "
                        f"WHERE status IN ('{PENDING}', '{EXPIRED}') "
                        f"AND id IN ({', '.join(['%s'] * len(chunk))})", chunk)

        self._write(mark)

    def wakeup_key(self) -> Optional[bytes]:
        with self.read() as tx:
            value = tx.scalar("SELECT value FROM secrets WHERE name = %s", (WAKEUP_KEY_NAME,))
        return None if value is None else bytes(value)

    def _ensure_wakeup_key(self, tx: Tx) -> None:
        """Create the wake-up key once (create_schema's last step)."""
        if tx.scalar("SELECT 1 FROM secrets WHERE name = %s", (WAKEUP_KEY_NAME,)) is None:
            # Two servers starting at once: the first key stays, the second INSERT does nothing.
            tx.execute(f"{self.insert_ignore_sql} INTO secrets (name, value) VALUES (%s, %s)",
                       (WAKEUP_KEY_NAME, os.urandom(32)))

    def expire_and_purge(self, retention: float, batch: int) -> Tuple[int, int]:
        expired = self._in_batch(
            f"status = '{PENDING}' AND expires_at IS NOT NULL AND expires_at <= {self.now_sql}",
            f"UPDATE messages SET status = '{EXPIRED}' WHERE status = '{PENDING}' AND id IN", batch)
        deleted = self._in_batch(
            f"status IN ('{DELIVERED}', '{IGNORED}', '{EXPIRED}') "
            f"AND created_at < {self._ago(retention)}",
            "DELETE FROM messages WHERE id IN", batch)
        return expired, deleted

    def _in_batch(self, where: str, statement: str, batch: int) -> int:
        """Run ``statement (ids)`` on at most ``batch`` messages matching ``where``, in one
        short transaction (a subquery with LIMIT is not allowed there by MariaDB)."""
        with self.transaction() as tx:
            ids = [r[0] for r in tx.fetchall(f"SELECT id FROM messages WHERE {where} LIMIT %s",
                                             (batch,))]
            if ids:
                tx.execute(f"{statement} ({', '.join(['%s'] * len(ids))})", ids)
        return len(ids)

    def pending_count(self, client_id: int) -> int:
        with self.transaction() as tx:
            return self._pending(tx, client_id)

    def _pending(self, tx: Tx, client_id: int) -> int:
        """Messages that will still be sent: pending, and not past their TTL (the same
        count the queue cap and the client's state go by)."""
        return int(tx.scalar(f"SELECT COUNT(*) FROM messages WHERE client_id = %s "
                             f"AND status = '{PENDING}' AND {self._unexpired}", (client_id,)))

    # --- for operators and the HTTP API ---

    def activity(self) -> Activity:
        with self.read() as tx:
            newest, pending = tx.fetchall(
                f"SELECT (SELECT MAX(id) FROM messages), "
                f"(SELECT COUNT(*) FROM messages WHERE status = '{PENDING}')")[0]
            return Activity(int(newest or 0), self._id_step(tx), int(pending))

    def client_info(self, client_id: int) -> Optional[ClientInfo]:
        with self.transaction() as tx:
            rows = tx.fetchall("SELECT created_at, last_seen_at, secret_hash IS NOT NULL, owner_server_id "
                               "FROM clients WHERE id = %s", (client_id,))
            if not rows:
                return None
            created, seen, has_secret, owner = rows[0]
            pending = self._pending(tx, client_id)
            server = None
            if owner is not None:
                servers = self._servers(tx, "WHERE s.id = %s", (owner,))
                server = servers[0] if servers and servers[0].alive else None
        return ClientInfo(client_id, int(pending), server, iso_time(created) or "", iso_time(seen),
                          bool(has_secret))

    def message_info(self, message_id: int) -> Optional[MessageInfo]:
        with self.transaction() as tx:
            rows = tx.fetchall(
                "SELECT client_id, status, created_at, expires_at, delivered_at, acknowledged_at, "
                f"status = '{PENDING}' AND NOT {self._unexpired} FROM messages WHERE id = %s",
                (message_id,))
        if not rows:
            return None
        client_id, status, created, expires, delivered, acknowledged, lapsed = rows[0]
        if lapsed:
            status = EXPIRED  # past its TTL: it will never be sent, whether or not swept yet
        elif status == DELIVERED and acknowledged is not None:
            status = ACKNOWLEDGED
        return MessageInfo(message_id, int(client_id), str(status), iso_time(created) or "",
                           iso_time(expires), iso_time(delivered), iso_time(acknowledged))

    def list_servers(self) -> List[ServerInfo]:
        with self.transaction() as tx:
            return self._servers(tx, "", ())

    def _servers(self, tx: Tx, where: str, params: Sequence[Any]) -> List[ServerInfo]:
        rows = tx.fetchall(
            "SELECT s.id, s.host, s.port, s.event_host, s.event_port, s.pid, s.started_at, "
            f"s.heartbeat_at, {self._alive}, "
            "(SELECT COUNT(*) FROM clients c WHERE c.owner_server_id = s.id) "
            f"FROM servers s {where} ORDER BY s.id", params)
        return [ServerInfo(int(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4]), int(r[5]),
                           iso_time(r[6]) or "", iso_time(r[7]) or "", bool(r[8]), int(r[9]))
                for r in rows]

    # --- servers ---

    def register_server(self, host: str, port: int, event_host: str, event_port: int,
                        pid: int) -> int:
        with self.transaction() as tx:
            # The wake-up address identifies a server across restarts: it must be
            # unique anyway, or routed wake-ups would reach the wrong server.
            for (old_id,) in tx.fetchall(
                    "SELECT id FROM servers WHERE event_host = %s AND event_port = %s",
                    (event_host, event_port)):
                self._forget_server(tx, old_id)
            tx.execute(
                "INSERT INTO servers (host, port, event_host, event_port, pid, started_at, heartbeat_at) "
                f"VALUES (%s, %s, %s, %s, %s, {self.now_sql}, {self.now_sql})",
                (host, port, event_host, event_port, pid),
            )
            return tx.lastrowid

    def unregister_server(self, server_id: int) -> None:
        with self.transaction() as tx:
            self._forget_server(tx, server_id)

    def _forget_server(self, tx: Tx, server_id: int) -> None:
        # Found through the owner index without locking, then locked and changed by
        # primary key in id order, like every other transaction on client rows: a
        # statement that walked the owner index would lock its entries before the
        # rows, the opposite order of a concurrent claim, and could deadlock with it.
        # (Delivery leases need no change: a lease whose server row is gone is free.)
        owned = [int(r[0]) for r in tx.fetchall(
            "SELECT id FROM clients WHERE owner_server_id = %s ORDER BY id", (server_id,))]
        for start in range(0, len(owned), FORGET_BATCH):
            ids = owned[start:start + FORGET_BATCH]
            marks = ", ".join(["%s"] * len(ids))
            tx.fetchall(f"SELECT id FROM clients WHERE id IN ({marks}) ORDER BY id {self.lock_rows_sql}", ids)
            tx.execute(f"UPDATE clients SET owner_server_id = NULL WHERE id IN ({marks}) "
                       "AND owner_server_id = %s", [*ids, server_id])
        tx.execute("DELETE FROM servers WHERE id = %s", (server_id,))

    def heartbeat(self, server_id: int) -> bool:
        with self.transaction() as tx:
            return self._beat(tx, server_id)

    def _beat(self, tx: Tx, server_id: int) -> bool:
        return tx.execute(f"UPDATE servers SET heartbeat_at = {self.now_sql} WHERE id = %s",
                          (server_id,)) > 0

    def sweep(self, server_id: int) -> SweepResult:
        with self.transaction() as tx:
            if not self._beat(tx, server_id):
                return SweepResult(registered=False)
            rows = tx.fetchall(
                "SELECT c.id, c.session, EXISTS (SELECT 1 FROM messages m WHERE m.client_id = c.id "
                f"AND m.status = '{PENDING}') FROM clients c WHERE c.owner_server_id = %s",
                (server_id,),
            )
            return SweepResult(True, {int(cid): (int(session), bool(pending))
                                      for cid, session, pending in rows})


# How the statements that change rows begin (a SELECT's rowcount counts rows read).
WRITE_VERBS = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})


class Tx:
    """The cursor helper a backend's ``transaction()`` yields."""

    def __init__(self, cursor: Any, convert: Callable[[str], str]) -> None:
        self._cursor = cursor
        self._convert = convert
        self.lastrowid = 0
        self.wrote = False  # a statement changed rows: the commit is evidence that writes work

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the affected row count."""
        sql = self._convert(sql)
        log.debug("SQL %s %r", sql, tuple(params))
        self._cursor.execute(sql, tuple(params))
        self.lastrowid = int(self._cursor.lastrowid or 0)
        rowcount = self._cursor.rowcount
        if rowcount > 0 and sql.split(None, 1)[0].upper() in WRITE_VERBS:
            self.wrote = True
        return rowcount

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
    elif "no such column" in text or "Unknown column" in text:
        text += " (the database's schema is older than this version: see docs/STORAGE.md)"
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
