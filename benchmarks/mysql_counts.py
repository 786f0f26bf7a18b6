"""MariaDB side of the suite: a fresh database, and database round trips counted from outside.

Two ways of counting, because the MariaDB server is shared:

* ``SHOW GLOBAL STATUS`` (Questions, Com_*) before and after a scenario: what the
  brief asks for, but it counts every client of the MariaDB server, including
  other people's tests; :func:`other_sessions` says whether any were connected.
* :class:`CountingProxy`: a TCP relay between one process and MariaDB that counts
  the commands that process sends (MySQL protocol packets with sequence number 0
  are commands).  Exact and attributable, but one more hop, so it is used only in
  its own untimed run, never while a rate is measured.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import pymysql

STATUS_NAMES = ("Questions", "Com_select", "Com_insert", "Com_update", "Com_delete",
                "Com_begin", "Com_commit", "Com_rollback", "Com_set_option", "Com_admin_commands")


@contextlib.contextmanager
def bench_database(kind: str, directory: str) -> Iterator[str]:
    """The URL of a fresh database of ``kind`` ("sqlite": a file in ``directory``;
    "mysql": a scratch database on the local MariaDB, dropped on exit)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory}/bench.sqlite3"
        return
    server = MysqlServer()
    with server.scratch_database("niki_bench") as name:
        yield server.url(name)


@dataclass
class MysqlServer:
    """Where the MariaDB server is, from a URL such as ``mysql://root@127.0.0.1:3306/``."""

    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""

    @classmethod
    def from_url(cls, url: str) -> MysqlServer:
        parts = urllib.parse.urlsplit(url)
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                   user=urllib.parse.unquote(parts.username or "root"),
                   password=urllib.parse.unquote(parts.password or ""))

    def url(self, database: str, port: Optional[int] = None) -> str:
        auth = urllib.parse.quote(self.user, safe="")
        if self.password:
            auth += ":" + urllib.parse.quote(self.password, safe="")
        return f"mysql://{auth}@{self.host}:{port or self.port}/{database}"

    def connect(self) -> pymysql.connections.Connection:
        return pymysql.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password, autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> None:
        """A fresh database: CREATE without IF NOT EXISTS, so an old one is never reused."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")

    @contextlib.contextmanager
    def scratch_database(self, prefix: str) -> Iterator[str]:
        """A fresh database named ``prefix_<random>``, dropped on exit."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.create_database(name)
        try:
            yield name
        finally:
            self.drop_database(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def global_status(self) -> Dict[str, int]:
        """The global statement counters; the SHOW itself adds 1 to Questions."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN %s", (STATUS_NAMES,))
            return {name: int(value) for name, value in cur.fetchall()}

    def uptime(self) -> Optional[int]:
        """Seconds since MariaDB started; None while it is unreachable (a restart shows as a drop)."""
        try:
            with self.connect() as conn, conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
                row = cur.fetchone()
                return int(row[1]) if row else None
        except pymysql.err.MySQLError:
            return None

    def other_sessions(self, own_database: str) -> List[str]:
        """Databases (or "(none)") of other clients' sessions: they pollute global counters."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT COALESCE(DB, '(none)') FROM information_schema.PROCESSLIST "
                        "WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon' "
                        "AND USER <> 'system user' AND COALESCE(DB, '') <> %s", (own_database,))
            return sorted({row[0] for row in cur.fetchall()})


def status_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """after - before, with the one SHOW of ``after`` taken out of Questions."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in STATUS_NAMES}
    delta["Questions"] -= 1
    return delta


def classify(packet: bytes) -> str:
    """The kind of one client command packet: the SQL verb of a COM_QUERY, or the command."""
    command = packet[0]
    if command == 0x03:  # COM_QUERY
        text = packet[1:64].decode("utf-8", "replace").lstrip(" \t\r\n(")
        verb = text.split(None, 1)[0].upper() if text.split() else ""
        return verb or "QUERY"
    return {0x01: "QUIT", 0x02: "INIT_DB", 0x0E: "PING", 0x11: "CHANGE_USER",
            0x16: "STMT_PREPARE", 0x17: "STMT_EXECUTE", 0x19: "STMT_CLOSE",
            0x1F: "RESET_CONNECTION"}.get(command, f"CMD_{command:#04x}")


class CountingProxy:
    """Relays TCP connections to MariaDB and counts the commands clients send.

    A command is a client packet with sequence number 0; the handshake's
    packets (sequence 1, 3, ...) are not commands.  One thread per direction
    per connection: a Niki pool holds at most a handful of connections.
    """

    def __init__(self, upstream: Tuple[str, int]) -> None:
        self.upstream = upstream
        # Tests: the next command of this kind (e.g. "CALL", "COMMIT") reaches the server,
        # but its answer never comes back: the proxy closes that connection and stops
        # listening, as a database host that dies right after a commit.
        self.cut_once_after: Optional[str] = None
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._socks: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            doomed = threading.Event()  # set: drop the server's next answer, then close
            threading.Thread(target=self._client_to_server, args=(client, server, doomed),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, doomed), daemon=True).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket,
                          doomed: threading.Event) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                buf += chunk
                kinds = []
                while len(buf) >= 4:
                    length = buf[0] | buf[1] << 8 | buf[2] << 16
                    if len(buf) < 4 + length:
                        break
                    if buf[3] == 0 and length:
                        kinds.append(classify(bytes(buf[4:4 + min(length, 64)])))
                    del buf[:4 + length]
                if kinds:
                    with self._lock:
                        self.counts.update(kinds)
                        if self.cut_once_after in kinds:
                            self.cut_once_after = None
                            doomed.set()
                            self._stop_listening()  # the host is gone: no new connections
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(client, server)

    def _pipe(self, source: socket.socket, target: socket.socket,
              doomed: Optional[threading.Event] = None) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk or (doomed is not None and doomed.is_set()):
                    break
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(source, target)

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _stop_listening(self) -> None:
        # shutdown() first: close() alone leaves the socket listening while the accept
        # thread is blocked in accept().
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def close(self) -> None:
        self._closed = True
        self._stop_listening()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


def count_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}
