"""The Niki server: a ``socketserver.ThreadingTCPServer`` and its helper threads.

Threads and who owns what:

* The main thread runs :meth:`NikiServer.serve_forever`, accepting connections.
* One handler thread per connection (:class:`ClientHandler`, a daemon thread)
  does the handshake, registers the client, delivers its pending messages,
  then waits until the connection ends.  It owns the socket.
* One command-listener thread (:class:`~messaging_server.server.commands.CommandListener`)
  reads the commands of every identified client.
* One delivery thread (:class:`~messaging_server.server.delivery.DeliveryThread`)
  listens for UDP wake-ups and delivers to the clients they name.
* One sweeper thread (:class:`~messaging_server.server.sweeper.Sweeper`), every
  sweep interval, delivers what no wake-up announced and closes connections
  taken over by another server; one heartbeat thread keeps the server's
  ``servers`` row fresh.

The server owns the storage, the registry of connected clients and both
helper threads; :meth:`NikiServer.stop` shuts them down in order.  No thread
holds a database connection while it waits for a client to speak; a delivery
holds one (and its row locks) only while it writes a batch to the socket,
which the write timeout bounds.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from messaging_server.config.settings import PURGE_BATCH, ServerSettings
from messaging_server.errors import StorageUnavailable, port_error
from messaging_server.protocol.credentials import Credential, accepts, hash_secret, new_secret, redact
from messaging_server.protocol.lines import (
    ConnectionClosed,
    Identify,
    LineTooLong,
    ServerEvent,
    ServerProtocol,
)
from messaging_server.server import metrics
from messaging_server.server.activity import ActivityMonitor
from messaging_server.server.admission import Admission, connection_cap
from messaging_server.server.commands import CommandListener, handle_events
from messaging_server.server.connection import ClientConnection, WorkItem
from messaging_server.server.delivery import (
    DeliveryThread,
    acknowledge,
    check_acks,
    deliver,
    give_back_lease,
    write_carried,
)
from messaging_server.server.marks import MarkWriter
from messaging_server.server.sweeper import Heartbeat, Purger, Sweeper
from messaging_server.server.throttle import IdentifyThrottle, Throttled
from messaging_server.server.tls import server_context
from messaging_server.storage import Storage
from messaging_server.wakeup import WakeupListener, WakeupSender

log = logging.getLogger("messaging_server")

# Connections waiting to be accepted.  A reconnect storm after a network blip
# arrives all at once; the kernel caps this at net.core.somaxconn anyway.
LISTEN_BACKLOG = 1024
# Stack reserved per thread.  Handler threads run shallow Python code (the
# interpreter keeps Python frames on the heap); C code under them (sqlite3,
# OpenSSL, the socket module) needs far less than this.
THREAD_STACK_BYTES = 512 * 1024
# How long an idle connection's thread sleeps before looking at it again unasked.
IDLE_WAIT_S = 60.0
# A flood of refused connections logs one line per this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class EndedSession:
    """A connection that ended before its end could be recorded (the database was away).

    Its session keeps the client's delivery lease until it is, so that what it
    wrote (legacy) or had acknowledged (ACK) and could not mark is never sent
    again by the client's next connection.
    """

    client_id: int
    session: int
    written: Tuple[int, ...] = ()
    acknowledged: Tuple[int, ...] = ()


class UnrecordedEnds:
    """Ended sessions whose release did not commit; the sweeper retries them."""

    def __init__(self) -> None:
        self._ended: List[EndedSession] = []
        self._lock = threading.Lock()

    def keep(self, ended: EndedSession) -> None:
        with self._lock:
            self._ended.append(ended)

    def retry(self, record: Callable[[EndedSession], None]) -> None:
        """Record each kept end once (``record`` raises StorageUnavailable while the
        database is away); keep what still fails, in order."""
        with self._lock:
            ended, self._ended = self._ended, []
        for index, item in enumerate(ended):
            try:
                record(item)
            except StorageUnavailable:
                with self._lock:
                    self._ended[:0] = ended[index:]
                return


class ConnectionRegistry:
    """The identified clients connected to this server, by client id."""

    def __init__(self) -> None:
        self._by_client: Dict[int, ClientConnection] = {}
        self._lock = threading.Lock()

    def register(self, conn: ClientConnection) -> Optional[ClientConnection]:
        """Make ``conn`` its client's connection; return the one it replaces."""
        assert conn.client_id is not None
        with self._lock:
            previous = self._by_client.get(conn.client_id)
            self._by_client[conn.client_id] = conn
        return previous

    def unregister(self, conn: ClientConnection) -> None:
        """Forget ``conn``, unless a newer connection of its client replaced it."""
        with self._lock:
            if conn.client_id is not None and self._by_client.get(conn.client_id) is conn:
                del self._by_client[conn.client_id]

    def get(self, client_id: int) -> Optional[ClientConnection]:
        with self._lock:
            return self._by_client.get(client_id)

    def all(self) -> List[ClientConnection]:
        with self._lock:
            return list(self._by_client.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_client)


class ClientHandler(socketserver.BaseRequestHandler):
    """One client connection, from greeting to close."""

    server: NikiServer
    throttled = False  # refused by the identify throttle, which logs (within budget) for it

    def finish(self) -> None:
        self.server.admission.leave(self.client_address[0])

    def handle(self) -> None:
        started = time.monotonic()
        peer = _format_peer(self.client_address)
        settings = self.server.settings
        try:
            sock = self.server.secure(self.request)
        except OSError as exc:
            log.info("connection from %s closed before TLS began: %s", peer, exc)
            metrics.HANDSHAKE_FAILED.inc()
            return
        conn = ClientConnection(sock, peer, settings.write_timeout, settings.max_inflight)
        self.server.track(conn)
        try:
            self._serve(conn)
        finally:
            conn.close("connection ended")
            self.server.registry.unregister(conn)
            self.server.untrack(conn)
            self.server.release(conn)
            sock.close()  # a TLS socket took the descriptor over from self.request
            # The connection's one INFO line, at its end (at thousands of handshakes a
            # second every line costs measurably); its beginning is a DEBUG line.
            who = ("unidentified client" if conn.client_id is None else
                   f"new client {conn.client_id}" if conn.new_client else f"client {conn.client_id}")
            if not self.throttled:
                log.info("%s disconnected from %s (%s) after %.1f s", who, peer, conn.close_reason,
                         time.monotonic() - started)

    def _serve(self, conn: ClientConnection) -> None:
        settings = self.server.settings
        log.debug("connection from %s", conn.peer)
        if conn.sock.family != socket.AF_UNIX:  # a WebSocket's socket pair has no TCP options
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_keepalive(conn.sock, settings.keepalive_idle, settings.keepalive_interval,
                          settings.keepalive_count)
        # One deadline for the TLS handshake and the client's id together.
        deadline = time.monotonic() + settings.handshake_timeout
        if conn.tls:
            failure = conn.tls_handshake(settings.handshake_timeout)
            if failure:
                log.info("%s: %s", conn.peer, failure)
                conn.close(failure)
                metrics.HANDSHAKE_FAILED.inc()
                return
        if not conn.send(conn.protocol.greeting()):
            metrics.HANDSHAKE_FAILED.inc()
            return
        events = self._read_identify(conn, deadline, settings.handshake_timeout)
        if not events:
            metrics.HANDSHAKE_FAILED.inc()
            return
        identify, rest = events[0], events[1:]
        assert isinstance(identify, Identify)
        try:
            self._identify(conn, identify)
        except StorageUnavailable as exc:
            log.error("cannot identify %s: database unavailable: %s", conn.peer, exc)
            conn.send(conn.protocol.error("database unavailable, try again later"))
            conn.close("database unavailable")
            metrics.HANDSHAKE_REFUSED.inc()
            return
        except Throttled as exc:  # no client row made; the throttle logged within its budget
            self.throttled = True
            conn.send(conn.protocol.error(str(exc)))
            conn.close("throttled")
            metrics.HANDSHAKE_THROTTLED.inc()
            return
        (metrics.HANDSHAKE_NEW if conn.new_client else metrics.HANDSHAKE_IDENTIFIED).inc()
        previous = self.server.registry.register(conn)
        if previous is not None and previous is not conn:
            log.info("client %s: closing %s, taken over by %s", conn.client_id,
                     previous.peer, conn.peer)
            previous.close("taken over by a newer connection")
        # Hand the socket to the command listener at once, so that a DISCONNECT
        # (or a close) is seen before anything is delivered to a client that left.
        # Replies to commands are only posted; they are written in the work loop,
        # after SET_CLIENT_ID and the backlog, so the order on the wire holds.
        handle_events(conn, rest)  # commands that came in the same packet as the id
        listened = not conn.closed
        if listened:
            self.server.commands.add(conn)
        try:
            if conn.send(conn.protocol.set_client_id(conn.credential)):
                conn.ready.set()
                if not conn.new_client:  # a client created just now has no backlog
                    deliver(self.server.storage, conn, settings.delivery_batch, self.server.server_id,
                            self.server.marks)
                self._work_loop(conn)
        finally:
            if listened:
                conn.close("connection ended")
                conn.released.wait()  # until the command listener has let go of the socket
                self._take_last_acks(conn)  # those posted after the work loop's last look

    def _work_loop(self, conn: ClientConnection) -> None:
        """Do what the other threads posted, until the connection ends.

        Every write to this client happens here, so a client that does not
        read holds up only this thread (for at most the write timeout).
        """
        settings = self.server.settings
        storage, batch = self.server.storage, settings.delivery_batch
        marks = self.server.marks
        while not conn.closed:
            # Posting work and close() both notify, so an idle connection's thread
            # sleeps until there is something to do: thousands of idle clients
            # cost no wake-ups.  The timeout is only a safety net, or the moment
            # an idle connection gives its client's delivery lease back.
            keeping = conn.holds_lease and not conn.protocol.awaiting_acks
            work = conn.take_work(timeout=settings.lease_idle if keeping else IDLE_WAIT_S)
            if keeping and not work and not conn.closed:
                give_back_lease(storage, conn, marks)
                continue
            _answer(marks, conn, work.items)
            need_pass = work.deliver
            if work.carried and not conn.closed and not conn.leaving:
                need_pass = not write_carried(conn, work.carried, marks) or need_pass
            if need_pass and not conn.closed:
                deliver(storage, conn, batch, self.server.server_id, marks)

    def _take_last_acks(self, conn: ClientConnection) -> None:
        """ACKs the client sent just before it went (``ACK n`` then DISCONNECT or EOF, or
        a takeover): recorded when the connection's end is (NikiServer.release)."""
        last = conn.take_work(timeout=0)
        self.server.marks.add(conn, conn.client_id or 0,
                              acknowledged=check_acks(conn, [i for i in last.items if isinstance(i, int)]))

    def _read_identify(self, conn: ClientConnection, deadline: float,
                       timeout: float) -> List[ServerEvent]:
        """Read until the client's id line; [] when it closed, timed out or sent junk."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                conn.send(conn.protocol.error(f"no client id within {timeout:g} s"))
                conn.close("handshake timed out")
                return []
            data = conn.receive(remaining)
            if data is None:
                continue
            events = conn.protocol.receive_data(data)
            if not events:
                continue
            first = events[0]
            if isinstance(first, Identify):
                return events
            if isinstance(first, LineTooLong):
                conn.send(conn.protocol.error(f"line too long (limit {first.limit} bytes)"))
                conn.close("client id line too long")
            elif isinstance(first, ConnectionClosed):
                conn.close("closed during handshake")
            return []

    def _identify(self, conn: ClientConnection, identify: Identify) -> None:
        """Claim the presented client if its credential is right; else make a new one.

        A wrong secret is answered exactly like an unknown id: the stranger gets
        a new client, and the real one keeps its messages and its connection.
        Raises Throttled, before any client row is made, when the peer's address
        has had too many failed identifications or new clients lately.
        """
        storage, server_id = self.server.storage, self.server.server_id
        throttle, address = self.server.throttle, self.client_address[0]
        legacy_ids = self.server.settings.legacy_ids
        if identify.client_id is not None:
            claim = storage.claim_client(
                identify.client_id, server_id,
                accept=lambda stored: accepts(identify.secret, stored, legacy_ids))
            if claim is None:
                metrics.CREDENTIALS_REJECTED.inc()
                throttle.failed(address, conn.peer, f"client id {identify.client_id} with "
                                f"{'no secret' if identify.secret is None else 'a secret'}")
            else:
                conn.client_id, conn.session = claim.client_id, claim.session
                # Hand back only a secret that was checked: a --legacy-ids client
                # without one keeps its bare id, whatever it appended.
                secret = identify.secret if claim.has_secret else None
                conn.credential = str(Credential(claim.client_id, secret))
                log.debug("client %s identified from %s", conn.client_id, conn.peer)
                if claim.previous_owner is not None:
                    # Tell the server holding the older connection to close it
                    # now; its sweep would notice within one interval anyway.
                    owner = claim.previous_owner
                    log.info("client %s taken over from server %s (%s:%s)", conn.client_id,
                             owner.server_id, owner.host, owner.port)
                    self.server.wakeup_sender.send((owner.host, owner.port), [conn.client_id])
                return
        elif identify.malformed:
            throttle.failed(address, conn.peer, f"malformed client id {redact(identify.raw[:80])!r}")
        else:
            throttle.new_client(address, conn.peer)
        secret = None if legacy_ids else new_secret()
        claim = storage.new_client(server_id, None if secret is None else hash_secret(secret))
        conn.client_id, conn.session = claim.client_id, claim.session
        conn.holds_lease = claim.holds_lease
        conn.credential = str(Credential(claim.client_id, secret))
        # Nobody can have queued for it yet: its id reaches the application only
        # through the client, after SET_CLIENT_ID.  (A wake-up or the sweep would
        # deliver anything that came earlier anyway.)
        conn.new_client = True
        log.debug("new client %s from %s", conn.client_id, conn.peer)


class NikiServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a handler lives as long as its client: never join them
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, settings: ServerSettings, storage: Storage, reuse_port: bool = False) -> None:
        # One of several worker processes on one client port (workers.py): the
        # kernel spreads the port's connections over their listening sockets.
        self.allow_reuse_port = reuse_port
        self.settings = settings
        self.storage = storage
        self.registry = ConnectionRegistry()
        self.unrecorded = UnrecordedEnds()
        self.tls_context = server_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
        cap = connection_cap(settings.max_connections)
        if cap < settings.max_connections:
            log.warning("at most %d client connections: the open-file limit allows no more "
                        "(--max-connections %d)", cap, settings.max_connections)
        self.admission = Admission(cap, settings.max_connections_per_address)
        self._last_refusal_log = 0.0
        self.throttle = IdentifyThrottle(settings.failed_identifications_per_minute,
                                         settings.new_clients_per_minute, settings.throttle_exempt)
        self._connections: set = set()
        self._connections_lock = threading.Lock()
        host = settings.host
        if not host and socket.has_dualstack_ipv6():
            self.address_family = socket.AF_INET6
            host = "::"
        elif ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, settings.port), ClientHandler)
        self.wakeups = WakeupListener(settings.host, settings.resolved_event_port)
        self.wakeup_sender = WakeupSender()
        self.commands = CommandListener()
        self.delivery = DeliveryThread(self.wakeups, self.registry.get, storage)
        self.marks = MarkWriter(storage)
        self.sweeper = Sweeper(storage, lambda: self.server_id, self.registry.all,
                               settings.sweep_interval,
                               before=lambda: self.unrecorded.retry(self._record_end))
        self.purger = Purger(storage, settings.purge_interval,
                             settings.retention_days * 86400, PURGE_BATCH)
        self.heartbeat = Heartbeat(storage, lambda: self.server_id, self._reregister)
        self.server_id = 0
        metrics.watch(self._metric_probes())

    def _metric_probes(self) -> metrics.ServerProbes:
        """What a scrape of /metrics reads from this server, when it scrapes."""
        delivery, wakeups = self.delivery, self.wakeups
        return metrics.ServerProbes(
            clients_connected=self.registry.__len__,
            connections_open=lambda: self.admission.active,
            connections_refused=lambda: self.admission.refused,
            db_connections_in_use=self.storage.connections_in_use,
            db_pool_size=lambda: self.settings.pool_size,
            wakeups_received=lambda: wakeups.received,
            wakeups_invalid=lambda: wakeups.invalid,
            wakeups_coalesced=lambda: wakeups.merged + delivery.coalesced,
            wakeups_not_connected=lambda: delivery.not_connected,
            wakeups_nothing_new=lambda: delivery.nothing_new,
        )

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            super().server_bind()
        except OSError as exc:
            raise port_error(exc, "client port (TCP)", self.settings.host, self.settings.port) from exc

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request: socket.socket, client_address: Tuple) -> bool:  # type: ignore[override]
        """Admit the connection, or answer ``ERROR: server busy`` and close it at once.

        Runs on the accepting thread, before any thread exists for the connection;
        it never blocks there (the line goes into an empty send buffer).  On a TLS
        port there is no session yet to carry the line: the connection is just closed.
        """
        refusal = self.admission.enter(client_address[0])
        if not refusal:
            return True
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:  # a flood logs a line, not a flood
            self._last_refusal_log = now
            log.warning("refused %s: %s (%d connections; %d refused since start)",
                        _format_peer(client_address), refusal, self.admission.active,
                        self.admission.refused)
        if self.tls_context is None:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(ServerProtocol().error(refusal))
        return False

    def process_request(self, request: socket.socket, client_address: Tuple) -> None:  # type: ignore[override]
        """Start the connection's handler thread: a bare ``_thread`` thread.

        ``threading.Thread.start()`` builds a Thread, an Event and a Condition per
        connection, then blocks the accepting thread until the new thread has run
        (the GIL handed over and back).  A yappi profile of 3,000 handshakes put that
        at 0.42 s of CPU.  A handler needs no Thread object: socketserver's
        process_request_thread handles every error of the connection itself, and
        logging does not look the thread up (logs.py turns logging.logThreads off;
        otherwise each handler would leave a "dummy" Thread behind in threading).
        """
        try:
            _thread.start_new_thread(self.process_request_thread, (request, client_address))
        except BaseException:  # no thread for it (thread limit): it never ran, so never left
            self.admission.leave(client_address[0])
            raise

    def adopt(self, sock: socket.socket, client_address: Tuple[str, int]) -> bool:
        """Serve ``sock`` (one end of a socket pair: a WebSocket's, websocket.py) as a
        connection from ``client_address``, under the same caps and limits; False when
        they refuse it.  It is not wrapped in TLS: the WebSocket's transport is the
        HTTP port's."""
        if self.verify_request(sock, client_address):
            try:
                self.process_request(sock, client_address)
                return True
            except BaseException:
                pass
        sock.close()
        return False

    def secure(self, sock: socket.socket) -> socket.socket:
        """The connection's socket, wrapped in TLS if the port has it (handshake not yet done).
        A WebSocket's socket pair (AF_UNIX, see adopt) has its transport's TLS already."""
        if self.tls_context is None or sock.family == socket.AF_UNIX:
            return sock
        return self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def track(self, conn: ClientConnection) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: ClientConnection) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def start(self) -> None:
        """Record this server in the database and start the helper threads."""
        self._register()
        self.wakeups.key = self.storage.wakeup_key()  # create_schema made it
        self.commands.start()
        self.delivery.start()
        self.marks.start()
        self.sweeper.start()
        self.heartbeat.start()
        self.purger.start()

    def _register(self) -> None:
        host = self._wakeup_host()
        self.server_id = self.storage.register_server(
            socket.gethostname(), self.port, host, self.wakeups.port, os.getpid())
        log.info("registered as server %s; wake-ups reach it at %s:%s",
                 self.server_id, host, self.wakeups.port)

    def _wakeup_host(self) -> str:
        """The advertised wake-up address; the host name only if it resolves."""
        host = self.settings.wakeup_host
        if self.settings.advertise_host:
            return host
        try:
            socket.getaddrinfo(host, self.wakeups.port, type=socket.SOCK_DGRAM)
        except OSError:
            log.warning("host name %r does not resolve: advertising 127.0.0.1 for wake-ups; "
                        "set --advertise-host for servers on several machines", host)
            return "127.0.0.1"
        return host

    def _reregister(self) -> None:
        """Our servers row is gone (deleted by hand, or by a server that wrongly
        advertises our wake-up address): start afresh.

        The clients we held were released with the row; their connections are
        closed so that they reconnect and are claimed again.
        """
        log.warning("this server's registration (id %s) disappeared: registering again "
                    "and closing its connections", self.server_id)
        self._register()
        for conn in self.registry.all():
            conn.close("server re-registered")

    def release(self, conn: ClientConnection) -> None:
        """The connection ended: record it (its unrecorded marks, the lease, the owner).

        If the database is away, the end is kept and the sweeper records it once
        the database is back; until then the client's next connection waits for
        the lease rather than send again what this one sent.
        """
        if conn.client_id is None:
            return
        marks = self.marks.withdraw(conn)  # what the mark writer has not committed yet
        if not self.server_id and not marks:
            return  # shutting down: our row is gone, and with it our owners and leases
        ended = EndedSession(conn.client_id, conn.session, tuple(marks.written),
                             tuple(marks.acknowledged))
        try:
            self._record_end(ended)
        except StorageUnavailable as exc:
            log.warning("client %s: could not record the disconnect (retried by the sweep): %s",
                        conn.client_id, exc)
            self.unrecorded.keep(ended)

    def _record_end(self, ended: EndedSession) -> None:
        """Commit an ended session's marks and release; wake a newer connection that waits."""
        waiting = self.storage.release_client(ended.client_id, ended.session, self.server_id or None,
                                              ended.written, ended.acknowledged)
        metrics.count_marked(len(ended.written), False)
        metrics.count_marked(len(ended.acknowledged), True)
        if waiting is None:
            return
        if waiting.server_id == self.server_id:
            conn = self.registry.get(ended.client_id)
            if conn is not None:
                conn.request_delivery()
        else:
            self.wakeup_sender.send((waiting.host, waiting.port), [ended.client_id])

    def stop(self) -> None:
        """Close every connection, stop the threads, forget this server."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close("server shutting down")
        self.heartbeat.stop()
        self.purger.stop()
        self.sweeper.stop()
        self.commands.stop()
        self.delivery.stop()
        self.marks.stop()  # commits what is waiting
        self.wakeups.close()
        self.wakeup_sender.close()
        if self.server_id:
            server_id, self.server_id = self.server_id, 0  # handlers ending now skip release()
            try:
                self.storage.unregister_server(server_id)
            except StorageUnavailable as exc:
                log.warning("could not unregister this server: %s", exc)
        self.server_close()


def _answer(marks: MarkWriter, conn: ClientConnection, items: List[WorkItem]) -> None:
    """Act on the client's commands in their order: replies, and ACKs checked against what
    is in flight (an unknown one is answered with an error in its place).  The known ACKs
    are recorded first, then the replies written in as few sends as possible, and the
    connection closed where a reply asks for it (DISCONNECT, a line too long)."""
    out: List[bytes] = []
    known: List[int] = []
    close_reason = ""
    for item in items:
        if isinstance(item, int):
            if check_acks(conn, [item]):
                known.append(item)
            else:
                out.append(conn.protocol.error(f"unknown message id {item}"))
            continue
        line, close_reason = item
        out.append(line)
        if close_reason:
            break  # nothing after DISCONNECT counts
    # Before the writes: what the client confirmed counts even if the write fails.
    acknowledge(marks, conn, known)
    if (out and conn.send(b"".join(out)) and close_reason) or close_reason:
        conn.close(close_reason)


def set_keepalive(sock: socket.socket, idle: float, interval: float, count: int) -> None:
    """TCP keepalive: a peer silent for ``idle`` s is probed every ``interval`` s and
    declared dead after ``count`` failed probes (idle + interval x count in all)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        option = getattr(socket, name, None)
        if option is not None:  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(value)))


def _format_peer(address: Tuple) -> str:
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(settings: ServerSettings, storage: Storage, reuse_port: bool = False,
        on_ready: Optional[Callable[[NikiServer], None]] = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully.

    ``reuse_port`` and ``on_ready`` are for a worker process (workers.py): it
    shares the client port with the other workers, and tells its supervisor
    when it is registered and listening.

    Unless ``--http-port 0``, the HTTP API runs beside the client port
    (see :mod:`messaging_server.server.http.api`); it is bound before anything is
    started or registered, and stopped first, before the connections close.
    (An API reachable from other machines without a token is refused with
    the other settings: see config/settings.py.)
    """
    from messaging_server.server.http.api import in_process_wake, open_http_api

    # Every thread started from here on, one per client among them, reserves
    # this much address space for its stack instead of the default 8 MiB.
    threading.stack_size(THREAD_STACK_BYTES)
    server = NikiServer(settings, storage, reuse_port)
    serving = threading.Event()
    activity = ActivityMonitor(storage, lambda: server.server_id, lambda: len(server.registry))
    http = None
    if settings.resolved_http_port is not None:
        try:
            http = open_http_api(
                settings, storage, in_process_wake(server.registry.get, lambda: server.server_id),
                listening=lambda: serving.is_set() and server.socket.fileno() >= 0,
                status=activity.status, adopt=server.adopt)
        except BaseException:
            server.server_close()
            raise
    server.start()
    activity.start()
    if http is not None:
        http.start()
        log.info("HTTP API on %s%s", http.url,
                 "" if settings.api_token else " (no API token: loopback only)")

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, and serve_forever()
        # runs on this (the main) thread: ask from another thread.
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("listening on %s port %d (clients, TCP) and port %d (wake-ups, UDP)",
             settings.host or "all interfaces", server.port, server.wakeups.port)
    log.info("clients: %s, %s ids, at most %d connections%s",
             "TLS" if server.tls_context else "plain TCP (no TLS)",
             "bare numeric (--legacy-ids)" if settings.legacy_ids else "secret-bearing",
             server.admission.max_total,
             f", {settings.max_connections_per_address} per address"
             if settings.max_connections_per_address else "")
    try:
        serving.set()
        if on_ready is not None:
            on_ready(server)
        server.serve_forever(poll_interval=0.2)
    finally:
        serving.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        activity.stop()
        if http is not None:
            http.stop()
        server.stop()
        log.info("stopped")
