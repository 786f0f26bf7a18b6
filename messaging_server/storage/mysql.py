"""MySQL / MariaDB backend: what several servers on several boxes share.

Connections come from one DBUtils ``PooledDB`` per process, of bounded size:
the number of database connections never grows with the number of clients.
Facts this relies on (see docs/STORAGE.md):

* PyMySQL connections are not thread-safe, so the pool hands each borrower a
  dedicated connection; ``blocking=True`` makes a burst wait for one.
* Every transaction starts with ``begin()``: DBUtils then never silently
  re-runs a failed write on a fresh connection (which could store it twice).
* Every transaction ends in commit or rollback (``reset=False``: DBUtils rolls
  back on return only a transaction an error left open), and the session runs at
  READ COMMITTED, so no connection keeps an old snapshot and row locks take no
  gap locks.
* ``ping=1`` checks a connection as it leaves the pool, replacing ones the
  server closed (``wait_timeout``, a restart).
"""

from __future__ import annotations

import contextlib
import threading
from importlib import resources
from typing import Any, Dict, Iterator, List, Optional

import pymysql
import pymysql.constants
from dbutils.pooled_db import PooledDB

from .base import SqlStorage, Tx, split_sql_script

CONNECT_TIMEOUT_S = 5
# Longer than innodb_lock_wait_timeout (50 s by default), so a lock wait ends
# with the server's own error rather than a client-side timeout.
READ_TIMEOUT_S = 60
WRITE_TIMEOUT_S = 60


# MySQL error code: "Duplicate column name".
DUPLICATE_COLUMN = 1060


class MysqlStorage(SqlStorage):
    now_sql = "NOW(6)"
    micros_ago_sql = "(NOW(6) - INTERVAL %s MICROSECOND)"
    micros_ahead_sql = "(NOW(6) + INTERVAL %s MICROSECOND)"
    epoch_micros_sql = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column})"
    lock_rows_sql = "FOR UPDATE"
    unavailable_errors = (pymysql.err.MySQLError,)
    added_columns = (("clients", "secret_hash", "BINARY(32) NULL AFTER delivery_lease_until"),
                     ("messages", "acknowledged_at", "DATETIME(6) NULL AFTER delivered_at"))

    def __init__(self, host: str, port: int, user: str, password: str, database: str,
                 pool_size: int = 8) -> None:
        super().__init__()
        self.database = database
        self.location = f"MySQL database {database!r} at {host}:{port}"
        self._params: Dict[str, Any] = dict(
            host=host, port=port, user=user, password=password, charset="utf8mb4",
            autocommit=False, connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S,
            # rowcount = rows matched, not rows changed, as SQLite counts them.
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS,
        )
        self._auto_increment_step: Optional[int] = None  # see _id_step
        self._in_use = 0  # connections borrowed now (the pool gauge)
        self._in_use_lock = threading.Lock()
        self._pool = PooledDB(
            creator=pymysql,
            mincached=0,
            maxcached=pool_size,
            maxconnections=pool_size,
            blocking=True,
            ping=1,
            # Every transaction runs inside begin() and ends in commit() or
            # rollback(); DBUtils then rolls back on return only a transaction
            # left open (by an error), saving a round trip per transaction.
            reset=False,
            # Stored times are UTC, whatever the database server's time zone,
            # as SQLite's are: the HTTP API and niki-admin show them as such.
            setsession=["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                        "SET time_zone = '+00:00'"],
            database=database,
            **self._params,
        )

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[Any]:
        connection = self._pool.connection()
        with self._in_use_lock:
            self._in_use += 1
        try:
            yield connection
        finally:
            connection.close()  # back to the pool
            with self._in_use_lock:
                self._in_use -= 1

    def connections_in_use(self) -> int:
        return self._in_use

    def _begin(self, connection: Any, durable: bool = True) -> None:
        connection.begin()  # every commit is flushed (innodb_flush_log_at_trx_commit)

    def create_schema(self) -> None:
        try:
            server = pymysql.connect(**self._params)
        except pymysql.err.MySQLError as exc:
            raise self.unavailable(exc) from exc
        try:
            with server.cursor() as cursor:
                quoted = self.database.replace("`", "``")
                cursor.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{quoted}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
        finally:
            server.close()
        script = resources.files(__package__).joinpath("schema_mysql.sql").read_text("utf-8")
        with self.transaction() as tx:
            for statement in split_sql_script(script):
                tx.execute(statement)
            self._add_missing_columns(tx)

    def _add_column(self, tx: Tx, table: str, column: str, sql_type: str) -> None:
        # ALTER commits on its own, so the check before it is no lock: a server
        # starting at the same moment may have added the column already.
        try:
            super()._add_column(tx, table, column, sql_type)
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != DUPLICATE_COLUMN:
                raise

    def _id_step(self, tx: Tx) -> int:
        # A server setting (a Galera node sets it to the cluster's size): read once.
        if self._auto_increment_step is None:
            self._auto_increment_step = int(tx.scalar("SELECT @@SESSION.auto_increment_increment"))
        return self._auto_increment_step

    def _column_names(self, tx: Tx, table: str) -> List[str]:
        rows = tx.fetchall(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        self._pool.close()
