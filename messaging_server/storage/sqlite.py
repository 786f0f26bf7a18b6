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
import queue
import sqlite3
import threading
import time
from importlib import resources
from typing import Dict, Iterator, List
from urllib.request import pathname2url

from .base import SqlStorage, Tx, split_sql_script
from .group_commit import GroupCommit

# How long a writer waits for another process's write lock before giving up.
# Longer than the server's socket write timeout, which bounds how long a
# delivery can hold the lock.
BUSY_TIMEOUT_S = 30.0


class SqliteStorage(SqlStorage):
    now_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    micros_ago_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (%s / 1000000.0) || ' seconds')"
    micros_ahead_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || (%s / 1000000.0) || ' seconds')"
    epoch_micros_sql = "CAST((julianday({column}) - 2440587.5) * 86400000000.0 AS INTEGER)"
    lock_rows_sql = ""  # BEGIN IMMEDIATE already holds the write lock
    lock_while_writing = False  # the write lock is the whole database's
    unavailable_errors = (sqlite3.Error,)
    lastrowid_is_first = False
    added_columns = (("clients", "secret_hash", "BLOB"), ("messages", "acknowledged_at", "TEXT"))

    def __init__(self, path: str, pool_size: int = 8, create: bool = True) -> None:
        super().__init__()
        self.path = path
        self.location = f"SQLite database {path}"
        # Only the server creates the file; a typo in an enqueuer's URL must
        # not leave an empty database behind.
        self._uri = f"file:{pathname2url(os.path.abspath(path))}?mode={'rwc' if create else 'rw'}"
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._all: list = []
        self._lock = threading.Lock()
        # Every transaction here takes the database's write lock (BEGIN IMMEDIATE),
        # so they run one at a time anyway.  Threads of this process queue on this
        # lock, which wakes the next one at once, rather than in SQLite's busy
        # handler, which polls with sleeps of up to 100 ms.
        self._serial = threading.Lock()
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
        _set_wal(connection)
        connection.execute("PRAGMA synchronous=FULL")  # "queued" means on disk
        with self._lock:
            self._all.append(connection)
            self._sync_modes[id(connection)] = "FULL"
        return connection

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[sqlite3.Connection]:
        with self._slots, self._serial:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                connection = self._connect()
            try:
                yield connection
            finally:
                self._idle.put(connection)

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

    def _column_names(self, tx: Tx, table: str) -> List[str]:
        return [str(row[1]) for row in tx.fetchall(f"PRAGMA table_info({table})")]

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for connection in connections:
            with contextlib.suppress(sqlite3.Error):
                connection.close()


def _set_wal(connection: sqlite3.Connection, timeout: float = BUSY_TIMEOUT_S) -> None:
    """Switch the file to WAL (persistent; a no-op once done).

    Changing the journal mode needs an exclusive lock and does not wait on the
    busy timeout, so two servers starting on a new file at once could fail:
    retry with a short back-off until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # back-off while another connection holds the lock
            delay = min(delay * 2, 0.25)
            continue
        if str(mode).lower() == "wal":
            return
        raise sqlite3.OperationalError(f"cannot switch {connection} to WAL mode (got {mode})")
