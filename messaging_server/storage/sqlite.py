"""SQLite backend: the embedded default, zero set-up.

WAL mode lets readers run beside the one writer and lets several server
processes on one box share a database file; ``busy_timeout`` makes a writer
wait for the lock instead of failing.  SQLite has no row locks, so every
transaction here is ``BEGIN IMMEDIATE``: it takes the database's write lock at
once, which serialises enqueues and deliveries exactly as the row locks do on
MySQL.  Transactions are short (a handful of statements and, for delivery, one
batch written to a socket that has a write timeout).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from importlib import resources
from typing import Dict, Iterator, List
from urllib.request import pathname2url

from messaging_server.errors import StorageUnavailable
from messaging_server.storage.group_commit import GroupCommit
from messaging_server.storage.pool import ConnectionPool
from messaging_server.storage.sql import SqlStorage, Tx, split_sql_script

# How long a writer waits for another process's write lock before giving up.
# Longer than the server's socket write timeout, which bounds how long a
# delivery can hold the lock.
BUSY_TIMEOUT_S = 30.0

# SQLite's primary result codes that mean the file cannot be used now, whatever the
# statement: busy or locked by another process, out of memory, read-only, an I/O
# error, a damaged file, a full disk, a file that cannot be opened, not a database.
# Any other code (SQLITE_ERROR: no such column, a syntax error; SQLITE_CONSTRAINT;
# SQLITE_TOOBIG; SQLITE_MISMATCH) is a statement the database refuses.
# (Numbers: the sqlite3 module names them only from Python 3.11 on.)
SQLITE_BUSY, SQLITE_LOCKED = 5, 6
UNAVAILABLE_CODES = frozenset({
    5, 6, 7, 8,  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM, SQLITE_READONLY
    10, 11, 13, 14,  # SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN
    15, 26,  # SQLITE_PROTOCOL, SQLITE_NOTADB
})
# The same, from the message, where Python (before 3.11) gives no code.
UNAVAILABLE_TEXTS = ("locked", "readonly", "read-only", "disk i/o error", "malformed", "disk is full",
                     "unable to open", "not a database", "out of memory")


class SqliteStorage(SqlStorage):
    now_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    insert_ignore_sql = "INSERT OR IGNORE"
    micros_ago_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (%s / 1000000.0) || ' seconds')"
    micros_ahead_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || (%s / 1000000.0) || ' seconds')"
    epoch_micros_sql = "CAST((julianday({column}) - 2440587.5) * 86400000000.0 AS INTEGER)"
    lock_rows_sql = ""  # BEGIN IMMEDIATE already holds the write lock
    driver_errors = (sqlite3.Error,)
    lastrowid_is_first = False
    added_columns = (("clients", "secret_hash", "BLOB"), ("clients", "delivery_session", "INTEGER"),
                     ("clients", "delivery_server_id", "INTEGER"), ("clients", "lease_wanted_at", "TEXT"),
                     ("clients", "queued_count", "INTEGER NOT NULL DEFAULT 0"),
                     ("messages", "acknowledged_at", "TEXT"))

    def __init__(self, path: str, pool_size: int = 8, create: bool = True) -> None:
        super().__init__()
        self.path = path
        self.location = f"SQLite database {path}"
        # Only the server creates the file; a typo in an enqueuer's URL must
        # not leave an empty database behind.
        self._create = create
        self._uri = f"file:{pathname2url(os.path.abspath(path))}?mode={'rwc' if create else 'rw'}"
        self._pool: ConnectionPool[sqlite3.Connection] = ConnectionPool(
            self._connect, _close, pool_size, self.location)
        # Every transaction here takes the database's write lock (BEGIN IMMEDIATE),
        # so they run one at a time anyway.  Threads of this process queue on this
        # lock, which wakes the next one at once, rather than in SQLite's busy
        # handler, which polls with sleeps of up to 100 ms.
        self._serial = threading.Lock()
        # Readers (see read()) have connections of their own, as many as the pool.
        self._readers: ConnectionPool[sqlite3.Connection] = ConnectionPool(
            self._connect, _close, pool_size, self.location)
        self._sync_modes: Dict[int, str] = {}  # id(connection) -> its PRAGMA synchronous
        # Those transactions, and their flushes, come one at a time: handshakes,
        # connection ends and delivery marks of many threads share them instead.
        self._group = GroupCommit(self.transaction)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._uri,
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # we issue BEGIN ourselves
            check_same_thread=False,  # pooled: used by one thread at a time
        )
        try:
            _set_wal(connection)
            connection.execute("PRAGMA synchronous=FULL")  # "queued" means on disk
        except BaseException:
            connection.close()
            raise
        self._sync_modes[id(connection)] = "FULL"
        return connection

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[sqlite3.Connection]:
        # The same time limit as the pool's: a thread of this process that holds the
        # database too long (waiting on another process's lock) fails the others in time.
        if not self._serial.acquire(timeout=self._pool.wait_s):
            raise StorageUnavailable(
                f"{self.location}: no transaction could start within {self._pool.wait_s:g} s; "
                "another one of this process held the database all that time")
        try:
            with self._pool.borrow() as connection:
                yield connection
        finally:
            self._serial.release()

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction on a connection of its own, outside the writers'
        queue: WAL lets it run beside the one writer, so a read never waits for writes."""
        try:
            with self._readers.borrow() as connection:
                connection.execute("BEGIN")
                cursor = connection.cursor()
                try:
                    yield Tx(cursor, self._convert)
                finally:
                    with contextlib.suppress(sqlite3.Error):
                        cursor.close()
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")  # nothing to keep; ends the snapshot
        except self.driver_errors as exc:
            raise self.storage_error(exc) from exc

    def connections_in_use(self) -> int:
        # A connection is borrowed only under the serialising lock: at most one.
        return int(self._serial.locked())

    def _begin(self, connection: sqlite3.Connection, durable: bool = True) -> None:
        # FULL flushes the WAL at each commit ("queued" means on disk); NORMAL
        # leaves it to the next FULL commit or checkpoint.  Set per transaction,
        # only when it changes.
        mode = "FULL" if durable else "NORMAL"
        if self._sync_modes.get(id(connection)) != mode:
            connection.execute(f"PRAGMA synchronous={mode}")
            self._sync_modes[id(connection)] = mode
        connection.execute("BEGIN IMMEDIATE")

    @staticmethod
    def _convert(sql: str) -> str:
        return sql.replace("%s", "?")

    def create_schema(self) -> None:
        script = resources.files(__package__).joinpath("schema_sqlite.sql").read_text("utf-8")
        with self.transaction() as tx:
            for statement in split_sql_script(script):
                tx.execute(statement)
            self._add_missing_columns(tx)
            self._ensure_wakeup_key(tx)

    def _column_names(self, tx: Tx, table: str) -> List[str]:
        return [str(row[1]) for row in tx.fetchall(f"PRAGMA table_info({table})")]

    def describe_error(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        directory = os.path.dirname(os.path.abspath(self.path))
        if "unable to open" in text and not self._create and not os.path.exists(self.path):
            return (f"{text}: there is no database at {self.path} (a server creates it on its "
                    f"first start: python -m messaging_server --db sqlite:///{self.path})")
        if "unable to open" in text and not os.path.isdir(directory):
            return f"{text}: the directory {directory} does not exist"
        if ("unable to open" in text or "readonly" in text) and os.path.exists(self.path) \
                and not _writable(self.path):
            return (f"{text} (the file or its directory is read-only: the server writes the file "
                    "and creates its -wal and -shm files beside it, and niki-enqueue writes the file)")
        return super().describe_error(exc)

    def _is_unavailable(self, exc: BaseException) -> bool:
        text = str(exc).lower()
        if "no such table" in text or "closed database" in text:
            return True  # no schema yet; or this storage was closed (the server stopping)
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if code is not None:
            return code & 0xFF in UNAVAILABLE_CODES  # the primary code of an extended one
        return isinstance(exc, sqlite3.OperationalError) and any(t in text for t in UNAVAILABLE_TEXTS)

    def close(self) -> None:
        self._pool.close()
        self._readers.close()


def _close(connection: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        connection.close()


def _writable(path: str) -> bool:
    """Whether this process may write ``path`` and create files beside it (False on a
    read-only mount, even for root)."""
    return os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)


def _set_wal(connection: sqlite3.Connection, timeout: float = BUSY_TIMEOUT_S) -> None:
    """Switch the file to WAL (persistent; a no-op once done).

    Changing the journal mode needs an exclusive lock and does not wait on the
    busy timeout, so two servers starting on a new file at once could fail:
    retry with a short back-off until ``timeout``, but only while the file is locked
    (a read-only or unopenable file fails at once).
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # back-off while another connection holds the lock
            delay = min(delay * 2, 0.25)
            continue
        if str(mode).lower() == "wal":
            return
        raise sqlite3.OperationalError(f"cannot switch {connection} to WAL mode (got {mode})")


def _is_locked(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock, which it will let go."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    return "locked" in str(exc)
