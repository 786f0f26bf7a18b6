"""MySQL / MariaDB backend: what several servers on several boxes share.

Connections come from one bounded pool per process (``pool.py``): the number of
database connections never grows with the number of clients, and a borrower waits
for one at most POOL_WAIT_S.  Facts this relies on (see docs/STORAGE.md):

* PyMySQL connections are not thread-safe, so each borrower gets a connection of its
  own for one transaction.
* Every transaction starts with ``begin()`` and ends in commit or rollback, and the
  session runs at READ COMMITTED, so no connection keeps an old snapshot and row
  locks take no gap locks.  Nothing re-runs a failed statement behind our back.
* An idle connection is pinged as it leaves the pool and replaced if the server
  closed it (``wait_timeout``, a restart); when no new one can be opened, the error
  says why (refused, timed out), not just that the old one is closed.
* Opening a connection, the server's greeting included, and the ping take at most
  CONNECT_TIMEOUT_S: a server that accepts TCP but never answers costs a caller
  seconds, not READ_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import re
from importlib import resources
from typing import Any, Dict, Iterator, List, Optional

import pymysql
import pymysql.constants

from ..errors import StorageUnavailable
from .base import SqlStorage, Tx, split_sql_script
from .pool import ConnectionPool

# Opening a connection (TCP, the server's greeting, authentication) and the ping of
# an idle one: a healthy server answers in milliseconds.
CONNECT_TIMEOUT_S = 5
# Longer than innodb_lock_wait_timeout (50 s by default), so a lock wait ends
# with the server's own error rather than a client-side timeout.
READ_TIMEOUT_S = 60
WRITE_TIMEOUT_S = 60
# Run on every new connection: every statement sees the latest committed data and
# FOR UPDATE takes no gap locks; stored times are UTC, whatever the server's time
# zone, as SQLite's are (the HTTP API and niki-admin show them as such).
SESSION_SETUP = ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", "SET time_zone = '+00:00'")
# PyMySQL's "Lost connection to MySQL server during query", also for a greeting that never came.
CR_SERVER_LOST = 2013
# Error codes create_schema tells apart: a privilege is missing.
ACCESS_DENIED = frozenset({1044, 1142})  # on the database; on a table


# MySQL error code: "Duplicate column name".
DUPLICATE_COLUMN = 1060
# "Table doesn't exist": the database has no schema yet (the server's start creates it).
NO_SUCH_TABLE = 1146
# Client-side errors (CR_*: cannot connect, server gone away, lost connection) are
# numbered from here; every one of them means the server cannot be used now.
FIRST_CLIENT_ERROR = 2000
# Server errors that say the server cannot serve us now, or not us, rather than that a
# statement is wrong: retrying later (or another node, or an operator's fix) may work.
UNAVAILABLE_ERRNOS = frozenset({
    1021,  # disk full
    1030,  # the storage engine failed (an I/O error)
    1040,  # too many connections
    1044, 1045,  # access denied to the database / for the user
    1047,  # a Galera node not ready for queries (WSREP)
    1049,  # unknown database
    1053,  # server shutdown in progress
    1114,  # table full
    1129, 1130,  # host blocked, host not allowed
    1142, 1143,  # a privilege missing on a table or column
    1152, 1153, 1158, 1159, 1160, 1161,  # aborted connection, network errors
    1180, 1181,  # the storage engine failed a COMMIT / ROLLBACK
    1205, 1213,  # lock wait timeout; deadlock (a Galera certification conflict too)
    1290, 1836,  # read-only server
    1317,  # query interrupted
    1927,  # connection killed
    1969,  # max_statement_time exceeded
    4031,  # disconnected by the server for inactivity
})


class MysqlStorage(SqlStorage):
    now_sql = "NOW(6)"
    micros_ago_sql = "(NOW(6) - INTERVAL %s MICROSECOND)"
    micros_ahead_sql = "(NOW(6) + INTERVAL %s MICROSECOND)"
    epoch_micros_sql = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column})"
    lock_rows_sql = "FOR UPDATE"
    driver_errors = (pymysql.err.MySQLError,)
    added_columns = (("clients", "secret_hash", "BINARY(32) NULL AFTER owner_server_id"),
                     ("clients", "delivery_session", "BIGINT NULL AFTER owner_server_id"),
                     ("clients", "delivery_server_id", "BIGINT NULL AFTER delivery_session"),
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
        self._pool: ConnectionPool[Any] = ConnectionPool(
            self._connect, _close, pool_size, self.location, ready=self._ready)

    def _connect(self, database: Optional[str] = None) -> Any:
        """A new connection; its handshake bounded by CONNECT_TIMEOUT_S, its queries by
        READ_TIMEOUT_S."""
        connection = _open({**self._params, "database": database or self.database})
        try:
            with connection.cursor() as cursor:
                for statement in SESSION_SETUP:
                    cursor.execute(statement)
        except BaseException:
            _close(connection)
            raise
        return connection

    def _ready(self, connection: Any) -> Any:
        """An idle connection as it leaves the pool: pinged (within CONNECT_TIMEOUT_S), or
        replaced by a new one when the server closed it."""
        try:
            _set_read_timeout(connection, CONNECT_TIMEOUT_S)
            connection.ping(reconnect=False)
            _set_read_timeout(connection, READ_TIMEOUT_S)
            return connection
        except pymysql.err.MySQLError:
            _close(connection)
        return self._connect()  # its error says why the server cannot be reached

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[Any]:
        with self._pool.borrow() as connection:
            yield connection

    def connections_in_use(self) -> int:
        return self._pool.in_use

    def _begin(self, connection: Any, durable: bool = True) -> None:
        connection.begin()  # every commit is flushed (innodb_flush_log_at_trx_commit)

    def create_schema(self) -> None:
        """Create what is missing, and only that: a user with data privileges alone
        (SELECT, INSERT, UPDATE, DELETE) runs on a database an administrator prepared
        from schema.sql.  A missing piece the user may not create is one line saying
        which, and which privilege it takes."""
        self._create_database()
        script = resources.files(__package__).joinpath("schema_mysql.sql").read_text("utf-8")
        with self.transaction() as tx:
            present = set(self._table_names(tx))
            for statement in split_sql_script(script):
                table = _created_table(statement)
                if table is None or table not in present:
                    with self._privilege_needed(f"table {table or '?'} is missing", "CREATE"):
                        tx.execute(statement)
            self._add_missing_columns(tx)
            self._ensure_wakeup_key(tx)

    def _create_database(self) -> None:
        try:
            server = _open(self._params)
        except pymysql.err.MySQLError as exc:
            raise self.storage_error(exc) from exc
        try:
            with server.cursor() as cursor:
                cursor.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                               (self.database,))
                if cursor.fetchone() is not None:
                    return
                quoted = self.database.replace("`", "``")
                with self._privilege_needed("the database does not exist (or this user has no "
                                            "privilege on it)", "CREATE"):
                    cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{quoted}` "
                                   "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        except pymysql.err.MySQLError as exc:
            raise self.storage_error(exc) from exc
        finally:
            _close(server)

    @contextlib.contextmanager
    def _privilege_needed(self, missing: str, privilege: str) -> Iterator[None]:
        """Turn "access denied" while creating ``missing`` into one line that says so."""
        try:
            yield
        except pymysql.err.MySQLError as exc:
            if not exc.args or exc.args[0] not in ACCESS_DENIED:
                raise
            raise StorageUnavailable(
                f"{self.location}: {missing} and user {self._params['user']!r} may not create it "
                f"(it needs the {privilege} privilege on the database): grant it, or have an "
                "administrator apply schema.sql") from exc

    def _table_names(self, tx: Tx) -> List[str]:
        rows = tx.fetchall("SELECT table_name FROM information_schema.tables "
                           "WHERE table_schema = DATABASE()")
        return [str(row[0]) for row in rows]

    def _add_column(self, tx: Tx, table: str, column: str, sql_type: str) -> None:
        # ALTER commits on its own, so the check before it is no lock: a server
        # starting at the same moment may have added the column already.
        try:
            with self._privilege_needed(f"column {table}.{column} is missing (a schema older "
                                        "than this version)", "ALTER"):
                super()._add_column(tx, table, column, sql_type)
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != DUPLICATE_COLUMN:
                raise

    def _is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, pymysql.err.InterfaceError):  # the connection is closed
            return True
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if errno is None:  # PyMySQL's own words: a handshake that went wrong
            return isinstance(exc, pymysql.err.OperationalError)
        return errno in UNAVAILABLE_ERRNOS or errno >= FIRST_CLIENT_ERROR or errno == NO_SUCH_TABLE

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

    def describe_error(self, exc: BaseException) -> str:
        if isinstance(exc, pymysql.err.InterfaceError) and not any(exc.args[1:]):
            # PyMySQL's (0, '') for a connection that is already closed.
            return "lost the connection to the server (it closed the connection or went away)"
        return super().describe_error(exc)

    def close(self) -> None:
        self._pool.close()


def _created_table(statement: str) -> Optional[str]:
    """The table a ``CREATE TABLE`` statement creates; None for any other statement."""
    match = re.match(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?", statement, re.IGNORECASE)
    return match.group(1) if match else None


def _open(params: Dict[str, Any]) -> Any:
    """A new connection, its handshake bounded by CONNECT_TIMEOUT_S and its queries by
    READ_TIMEOUT_S.  PyMySQL reads the server's greeting with the read timeout."""
    try:
        connection = pymysql.connect(**{**params, "read_timeout": CONNECT_TIMEOUT_S})
    except pymysql.err.OperationalError as exc:
        if exc.args[:1] == (CR_SERVER_LOST,) and "timed out" in str(exc):
            raise pymysql.err.OperationalError(
                CR_SERVER_LOST, f"the server accepted the connection but did not answer within "
                f"{CONNECT_TIMEOUT_S} s (timed out)") from exc
        raise
    _set_read_timeout(connection, READ_TIMEOUT_S)
    return connection


def _set_read_timeout(connection: Any, seconds: float) -> None:
    """PyMySQL has no public setter; it applies ``_read_timeout`` before each packet it reads."""
    connection._read_timeout = seconds


def _close(connection: Any) -> None:
    """Close a connection, whatever state it is in (a dead one cannot say goodbye)."""
    try:
        connection.close()
    except Exception:
        with contextlib.suppress(Exception):
            connection._force_close()
