"""MySQL / MariaDB backend: what several servers on several boxes share.

Connections come from one bounded pool per process (``pool.py``): the number of
database connections never grows with the number of clients, and a borrower waits
for one at most POOL_WAIT_S.  Facts this relies on (see docs/STORAGE.md):

* PyMySQL connections are not thread-safe, so each borrower gets a connection of its
  own for one transaction.
* Every transaction starts with ``begin()`` and ends in commit or rollback, and the
  session runs at READ COMMITTED, so no connection keeps an old snapshot and row
  locks take no gap locks.  Nothing re-runs a failed statement behind our back.
* No round trip is spent on bookkeeping.  There is no BEGIN: autocommit is off, so
  the first statement opens the transaction.  There is no PING: an idle connection
  leaves the pool after a look at its socket (no I/O): the server never sends
  anything unasked, so a readable idle socket means it closed the connection
  (``wait_timeout``, KILL, a restart) or said why before closing; such a connection
  is replaced.  One that died unseen fails its transaction's first statement; that
  statement alone is sent again, once, on a fresh connection, when it provably did
  not commit (see :class:`_Link`).  When no new connection can be opened, the error
  says why (refused, timed out), not just that the old one is closed.
* A connection that failed is closed, never pooled again.
* ``enqueue`` is one round trip: a CALL of a stored procedure that commits before it
  answers (``enqueue_mysql.sql``).  Without it (no CREATE ROUTINE privilege), the
  same statements run one by one.
* Opening a connection, the server's greeting included, takes at most
  CONNECT_TIMEOUT_S: a server that accepts TCP but never answers costs a caller
  seconds, not READ_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import threading
import time
from importlib import resources
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pymysql
import pymysql.constants

from messaging_server.errors import QueueFull, StorageError, StorageUnavailable, UnknownClient
from messaging_server.storage.hosts import Address, HostList, format_address
from messaging_server.storage.interface import HEARTBEAT_STALE_S, body_hash
from messaging_server.storage.pool import ConnectionPool
from messaging_server.storage.records import Queued, ServerAddress
from messaging_server.storage.sql import SqlStorage, Tx, split_sql_script

log = logging.getLogger(__name__)

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
# PyMySQL's "MySQL server has gone away": raised only when sending a command failed
# (sendall could not hand all of it to the kernel), so the server never had it whole.
CR_SERVER_GONE = 2006
# Errors after which the connection is dead: the two above, a lost connection (system
# error), and the server's last words before it closes one (connection killed;
# disconnected for inactivity).
CONNECTION_LOST = frozenset({CR_SERVER_GONE, CR_SERVER_LOST, 2055, 1927, 4031})
# Statements that never commit by themselves (autocommit is off): when the connection
# dies under one, the server rolls back what it did.  Anything else (CALL of the
# enqueue procedure, which commits; DDL) may have committed.
NON_COMMITTING_VERBS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE"})
# The enqueue procedure (enqueue_mysql.sql): its name carries its version.
ENQUEUE_PROCEDURE = "niki_enqueue_v3"
# "PROCEDURE … already exists": another server created it a moment ago.
PROCEDURE_EXISTS = 1304
# CALL of a procedure that does not exist; EXECUTE privilege missing.  Both are refused
# before anything runs, so enqueue can fall back to the statements at once.
PROCEDURE_UNUSABLE = frozenset({1305, 1370})
# After a CALL found the procedure missing, how long to use the statements before trying
# the CALL again (a server with the privilege may have created it meanwhile).
PROCEDURE_RECHECK_S = 60.0
# Error codes create_schema tells apart: a privilege is missing.
ACCESS_DENIED = frozenset({1044, 1142})  # on the database; on a table


# "WSREP has not yet prepared node for application use": a Galera node outside the
# cluster's primary component (also raised by _connect_to for wsrep_ready OFF).
WSREP_NOT_READY = 1047
# Server errors after which another host of a multi-host URL should be tried: the node
# is out of its cluster, shutting down, or killed the connection.
HOST_FAILED_ERRNOS = frozenset({WSREP_NOT_READY, 1053, 1927, 4031})
# "Can't connect to MySQL server": no host of a multi-host URL could be used.
CR_CONN_HOST_ERROR = 2003
# Between two runs of a transaction whose host failed (see SqlStorage._retry_conflicts).
FAILOVER_PAUSE_S = 0.2

# MySQL error code: "Duplicate column name".
DUPLICATE_COLUMN = 1060
# "Deadlock found when trying to get lock; try restarting transaction": the transaction
# lost a conflict (on a Galera cluster, certification too) and was rolled back whole.
DEADLOCK = 1213
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
                     ("clients", "lease_wanted_at", "DATETIME(6) NULL AFTER delivery_server_id"),
                     ("clients", "queued_count", "BIGINT NOT NULL DEFAULT 0 AFTER lease_wanted_at"),
                     ("messages", "acknowledged_at", "DATETIME(6) NULL AFTER delivered_at"))

    def __init__(self, hosts: Sequence[Address], user: str, password: str, database: str,
                 pool_size: int = 8) -> None:
        super().__init__()
        self.database = database
        self.hosts = HostList(hosts, database)
        self.location = f"MySQL database {database!r} at {self.hosts.describe()}"
        self._params: Dict[str, Any] = dict(
            user=user, password=password, charset="utf8mb4",
            autocommit=False, connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S,
            # rowcount = rows matched, not rows changed, as SQLite counts them.
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS,
        )
        self._auto_increment_step: Optional[int] = None  # see _id_step
        self._pool: ConnectionPool[_Link] = ConnectionPool(
            lambda: _Link(self._connect(), self._connect), _Link.close, pool_size, self.location,
            ready=self._ready, reusable=_Link.reusable)
        # Whether enqueue CALLs the procedure: None (not known yet: try it), True, or
        # False until _procedure_recheck_at (it is missing, or may not be run).
        self._procedure: Optional[bool] = None
        self._procedure_recheck_at = 0.0
        self._procedure_warned = False
        self._procedure_lock = threading.Lock()

    def _connect(self, database: Optional[str] = None) -> Any:
        """A new connection to the host in use; with several hosts, to the next one that
        works when that one cannot be reached or is out of its cluster (hosts.py).
        ``database``: None for the storage's, "" for none."""
        failures: List[str] = []
        first_error: Optional[pymysql.err.MySQLError] = None
        for address in self.hosts.in_order():
            try:
                connection = self._connect_to(address, database)
            except pymysql.err.MySQLError as exc:
                if not self.hosts.several or not _host_failed(exc):
                    raise
                first_error = first_error or exc
                failures.append(f"{format_address(address)}: {self.describe_error(exc)}")
                continue
            if failures:
                self.hosts.use(address, failures[0])
            return connection
        assert first_error is not None
        raise _NoHostUsable(CR_CONN_HOST_ERROR, f"no host could be used ({'; '.join(failures)})") \
            from first_error

    def _connect_to(self, address: Address, database: Optional[str]) -> Any:
        """A new connection to ``address``; its handshake bounded by CONNECT_TIMEOUT_S,
        its queries by READ_TIMEOUT_S.  On a Galera node, refused (1047) unless the node
        is ready (in the primary component, synced enough to serve), and set to read
        causally (wsrep_sync_wait): a read sees every commit of the cluster that came
        before it, whichever node made it, so a server woken for a message another node
        committed finds it."""
        host, port = address
        connection = _open({**self._params, "host": host, "port": port,
                            "database": self.database if database is None else (database or None)})
        try:
            with connection.cursor() as cursor:
                for statement in SESSION_SETUP:
                    cursor.execute(statement)
                # MariaDB has the wsrep variables with or without Galera; MySQL has none.
                cursor.execute("SHOW VARIABLES LIKE 'wsrep_on'")
                galera = cursor.fetchone()
                if galera is not None and str(galera[1]).upper() == "ON":
                    cursor.execute("SHOW STATUS LIKE 'wsrep_ready'")
                    ready = cursor.fetchone()
                    if ready is None or str(ready[1]).upper() != "ON":
                        raise pymysql.err.OperationalError(
                            WSREP_NOT_READY, "the Galera node is not ready (wsrep_ready OFF: not in "
                            "the cluster's primary component, or still joining)")
                    cursor.execute("SET SESSION wsrep_sync_wait = 1")
        except BaseException:
            _close(connection)
            raise
        return connection

    def _ready(self, link: _Link) -> _Link:
        """An idle connection as it leaves the pool: kept if its socket has nothing to say
        and its host is still the one in use, else replaced by a new one (the server
        closed it; or the pool is draining a host it moved away from)."""
        if link.idle_and_open() and link.address() == self.hosts.current:
            link.reused = True
        else:
            link.replace()  # its error says why the server cannot be reached
        return link

    def _failover_pause(self, exc: BaseException) -> Optional[float]:
        """With several hosts, a transaction whose host failed runs again (on the next
        host, once _connect moves there).  Safe on a Galera cluster even when the failure
        may have come after the commit (a lost reply): a write set reaches every node or
        none, and every enqueue writes its client's row (STORAGE.md, rule 7), so of the
        first run and the second at most one commits; the other fails certification, is
        run again and finds the first (the duplicate rule)."""
        if self.hosts.several and _host_failed(exc) and not isinstance(exc, _NoHostUsable):
            return FAILOVER_PAUSE_S
        return None

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[_Link]:
        with self._pool.borrow() as link:
            yield link

    def connections_in_use(self) -> int:
        return self._pool.in_use

    def _begin(self, connection: Any, durable: bool = True) -> None:
        """Nothing to send: autocommit is off (set at connect, checked by PyMySQL), so the
        transaction's first statement opens it, and every commit is flushed
        (innodb_flush_log_at_trx_commit).  A BEGIN would cost a round trip."""

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
        self._create_procedure()

    def _create_procedure(self) -> None:
        """The enqueue procedure, if it is missing.  A procedure that exists is never
        replaced (a caller of a running version could find it gone for a moment): a new
        version has a new name.  Without the CREATE ROUTINE privilege enqueue runs the
        statements one by one; one warning says so."""
        with self.transaction() as tx:
            present = tx.scalar("SELECT COUNT(*) FROM information_schema.routines WHERE "
                                "routine_schema = DATABASE() AND routine_name = %s",
                                (ENQUEUE_PROCEDURE,))
        if present:
            self._set_procedure(True)
            return
        script = resources.files(__package__).joinpath("enqueue_mysql.sql").read_text("utf-8")
        try:
            with self.transaction() as tx:
                tx.execute(script)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, pymysql.err.MySQLError) and cause.args[:1] == (PROCEDURE_EXISTS,):
                self._set_procedure(True)  # another server created it meanwhile
                return
            if not (isinstance(cause, pymysql.err.MySQLError) and cause.args[:1]
                    and cause.args[0] in ACCESS_DENIED):
                raise
            self._set_procedure(False)
            self._procedure_warned = True
            log.warning("%s: cannot create the stored procedure %s (user %r needs the CREATE "
                        "ROUTINE privilege on the database: %s); enqueue runs its statements one "
                        "by one, 4 round trips instead of 1", self.location, ENQUEUE_PROCEDURE,
                        self._params["user"], self.describe_error(cause))
            return
        self._set_procedure(True)

    def _set_procedure(self, usable: bool) -> None:
        with self._procedure_lock:
            self._procedure = usable
            self._procedure_recheck_at = time.monotonic() + PROCEDURE_RECHECK_S

    def _procedure_usable(self) -> bool:
        with self._procedure_lock:
            return self._procedure is not False or time.monotonic() >= self._procedure_recheck_at

    def enqueue(self, client_id: int, body: str, duplicate_window: float,
                ttl: Optional[float] = None, max_pending: Optional[int] = None,
                find_owner: bool = True) -> Queued:
        """One round trip: CALL the procedure, which locks the client row, checks, inserts
        and commits, and answers only after its COMMIT (so a result is a committed,
        flushed message).  Without the procedure: the statements (SqlStorage.enqueue)."""
        if not self._procedure_usable():
            return super().enqueue(client_id, body, duplicate_window, ttl, max_pending, find_owner)
        params = (client_id, body, body_hash(body), int(duplicate_window * 1_000_000),
                  None if ttl is None else int(ttl * 1_000_000), max_pending,
                  int(HEARTBEAT_STALE_S * 1_000_000))

        def call() -> Optional[Queued]:
            # A conflict reaches us through the procedure's handler, which rolled the
            # whole call back first (ROLLBACK; RESIGNAL): running it again is safe.  So is
            # a run on the next host after this one's failed (_failover_pause).
            try:
                with self._borrow() as link:
                    row = link.call(f"CALL {ENQUEUE_PROCEDURE}(%s, %s, %s, %s, %s, %s, %s)", params)
            except pymysql.err.MySQLError as exc:
                if exc.args[:1] and exc.args[0] in PROCEDURE_UNUSABLE:
                    self._procedure_missing(exc)
                    return None  # the statements, below
                raise self.storage_error(exc) from exc
            return self._queued(row, client_id, max_pending, find_owner)

        def own_copy(queued: Optional[Queued]) -> Optional[Queued]:
            return None if queued is None else self._own_copy(client_id, body, queued)

        queued = self._retry_conflicts(call, after_failover=own_copy)
        if queued is None:
            return super().enqueue(client_id, body, duplicate_window, ttl, max_pending, find_owner)
        return queued

    def _queued(self, row: Tuple[Any, ...], client_id: int, max_pending: Optional[int],
                find_owner: bool) -> Queued:
        """What the procedure's one row says (see enqueue_mysql.sql)."""
        if self._procedure is not True:
            self._set_procedure(True)
        result, owner_id, host, port, session, previous = row
        if result == -1:
            raise UnknownClient(f"no client with id {client_id}")
        if result == -2:
            raise QueueFull(f"client {client_id} already has {max_pending} pending messages")
        self.write_health.succeeded()
        if result == 0:
            return Queued(None)
        owner = None if host is None or not find_owner else ServerAddress(int(owner_id), str(host), int(port))
        return Queued(int(result), owner, int(session), int(previous))

    def _procedure_missing(self, exc: pymysql.err.MySQLError) -> None:
        """The CALL was refused before it ran: use the statements for a while (one warning)."""
        self._set_procedure(False)
        if not self._procedure_warned:
            self._procedure_warned = True
            log.warning("%s: cannot call the stored procedure %s (%s); enqueue runs its "
                        "statements one by one, 4 round trips instead of 1, until it can (a "
                        "server whose user has the CREATE ROUTINE privilege creates it at start; "
                        "calling it takes EXECUTE)", self.location, ENQUEUE_PROCEDURE,
                        self.describe_error(exc))

    def _create_database(self) -> None:
        try:
            server = self._connect(database="")  # none: it may not exist yet
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

    def _is_conflict(self, exc: BaseException) -> bool:
        return bool(exc.args) and exc.args[0] == DEADLOCK

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


class _Link:
    """One pooled connection, which can be replaced in place by a fresh one.

    Its cursor sends a transaction's first statement again, once, on a fresh connection
    when the connection turns out dead, and only when that statement provably did not
    commit: the connection came idle from the pool (so nothing earlier in this
    transaction was sent on it), and either the command never reached the server whole
    (the socket was closed already, or sending failed: CR_SERVER_GONE), or it is a
    statement that does not commit by itself and no COMMIT was sent, so the server
    rolled back whatever it did when the connection ended.  A statement that may have
    committed (the enqueue CALL, whose reply was lost: CR_SERVER_LOST), a later
    statement of the transaction, or the COMMIT itself is never sent again: the error
    is raised (StorageUnavailable), as the caller cannot know whether it took effect.
    """

    def __init__(self, connection: Any, reopen: Callable[[], Any]) -> None:
        self.connection = connection
        self._reopen = reopen  # opens a fresh connection (the storage's _connect)
        self.reused = False  # came idle from the pool: it may have died unseen meanwhile
        self.sent = False  # a statement of the current transaction was sent
        self.broken = False  # a connection error happened: never pool it again

    def address(self) -> Address:
        return (self.connection.host, self.connection.port)

    def idle_and_open(self) -> bool:
        """Whether the server has said nothing on this idle connection.  The protocol has
        it speak only when asked, so anything to read (an end of file, an error packet
        such as "connection killed") means it is closing or closed.  No round trip: a
        poll of the socket (no limit on descriptor numbers, unlike select)."""
        sock = getattr(self.connection, "_sock", None)
        if sock is None or self.broken:
            return False
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)

    def replace(self) -> None:
        """Close this connection and open a fresh one in its place (raises the driver's
        error, and stays broken, when none can be opened)."""
        self.broken = True
        _close(self.connection)
        self.connection = self._reopen()
        self.broken = self.reused = self.sent = False

    def reusable(self) -> bool:
        return not self.broken and bool(self.connection.open)

    def close(self) -> None:
        _close(self.connection)

    def cursor(self) -> _Cursor:
        return _Cursor(self)

    def commit(self) -> None:
        try:
            self.connection.commit()
        except pymysql.err.MySQLError as exc:
            self.note(exc)
            raise
        finally:
            self.sent = False

    def rollback(self) -> None:
        try:
            if self.connection.open:  # a closed one has nothing open: the server rolled back
                self.connection.rollback()
        except pymysql.err.MySQLError as exc:
            self.note(exc)
            raise
        finally:
            self.sent = False

    def note(self, exc: BaseException) -> None:
        """Remember a connection error: the connection is not pooled again."""
        if _connection_lost(exc):
            self.broken = True

    def call(self, sql: str, params: Sequence[Any]) -> Tuple[Any, ...]:
        """CALL a procedure that commits by itself; its one result row.  Every result of
        the CALL is read, its final status included, so that an error at its end is
        raised here and the connection is left with nothing unread."""
        cursor = self.cursor()
        try:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            while cursor.nextset():
                pass
        except BaseException:
            with contextlib.suppress(Exception):
                self.rollback()  # the procedure rolled back already; nothing may stay open
            raise
        finally:
            self.sent = False
            with contextlib.suppress(Exception):
                cursor.close()
        return tuple(rows[0])

    def retriable(self, exc: BaseException, sql: str) -> bool:
        """Whether the failed first statement ``sql`` provably did not commit (see above)."""
        if not self.reused:
            return False  # a fresh connection failing: the server is the problem, not staleness
        if isinstance(exc, pymysql.err.InterfaceError):
            return True  # the socket was closed before anything was sent
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if errno == CR_SERVER_GONE:
            return True  # sending failed: the server never had the whole command, never ran it
        verb = sql.lstrip(" \t\r\n(").split(None, 1)[0].upper() if sql.strip() else ""
        return errno in CONNECTION_LOST and verb in NON_COMMITTING_VERBS


class _Cursor:
    """A PyMySQL cursor of a :class:`_Link`, with the first statement's one retry."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._cursor = link.connection.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        link = self._link
        first, link.sent = not link.sent, True
        try:
            return int(self._cursor.execute(sql, params))
        except pymysql.err.MySQLError as exc:
            link.note(exc)
            if not (first and link.retriable(exc, sql)):
                raise
        # The first statement, on a connection that died idle: once more on a fresh one.
        link.replace()
        link.sent = True
        self._cursor = link.connection.cursor()
        try:
            return int(self._cursor.execute(sql, params))
        except pymysql.err.MySQLError as exc:
            link.note(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def _connection_lost(exc: BaseException) -> bool:
    """Whether a driver error means the connection is dead."""
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    return bool(exc.args) and exc.args[0] in CONNECTION_LOST


class _NoHostUsable(pymysql.err.OperationalError):
    """Every host of a multi-host URL failed: no other one is left to take over."""


def _host_failed(exc: BaseException) -> bool:
    """Whether a driver error says the host cannot serve (cannot connect, connection
    lost, shutting down, a Galera node out of its cluster), so another host may."""
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    return errno is not None and (errno >= FIRST_CLIENT_ERROR or errno in HOST_FAILED_ERRNOS)


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
