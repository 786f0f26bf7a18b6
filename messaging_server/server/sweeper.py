"""The sweeper and heartbeat threads: lost wake-ups, missed takeovers, liveness.

Wake-up datagrams are an optimisation, never the only path: UDP may drop or
reorder them, an enqueue may race a connect, and the datagram telling this
server that another one took a client over may never come.  So every
``sweep_interval`` the sweeper asks the database, in one query, which clients
this server owns and which of them have pending messages.  A connection whose
client is no longer ours (or has a newer session) is closed; a client with
pending messages gets a delivery pass.  The heartbeat thread beats this
server's heartbeat every HEARTBEAT_INTERVAL_S, by which enqueuers and other
servers tell a live owner from a dead one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Tuple

from messaging_server.errors import StorageUnavailable
from messaging_server.server import metrics
from messaging_server.server.connection import ClientConnection
from messaging_server.storage import Storage
from messaging_server.storage.interface import HEARTBEAT_INTERVAL_S

log = logging.getLogger(__name__)


class _Periodic(threading.Thread):
    """Runs ``tick()`` every ``interval`` seconds (from the start of one to the next)."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        next_run = time.monotonic() + self.interval
        while not self._stopping.wait(max(0.0, next_run - time.monotonic())):
            next_run += self.interval
            try:
                self.tick()
            except StorageUnavailable as exc:
                metrics.BACKGROUND_ERRORS.labels(task=self.name).inc()
                log.warning("%s skipped: database unavailable: %s", self.name, exc)
            except Exception:  # keep going: these threads are the safety net
                metrics.BACKGROUND_ERRORS.labels(task=self.name).inc()
                log.exception("%s failed", self.name)
            next_run = max(next_run, time.monotonic())  # after a long tick, no catch-up burst

    def tick(self) -> None:
        raise NotImplementedError


class Heartbeat(_Periodic):
    """Beats this server's heartbeat every HEARTBEAT_INTERVAL_S, on its own thread
    so that no slow delivery can make a live server look dead."""

    def __init__(self, storage: Storage, server_id: Callable[[], int],
                 on_unregistered: Callable[[], None]) -> None:
        super().__init__("heartbeat", HEARTBEAT_INTERVAL_S)
        self._storage = storage
        self._server_id = server_id
        self._on_unregistered = on_unregistered

    def tick(self) -> None:
        if not self._storage.heartbeat(self._server_id()):
            self._on_unregistered()


class Sweeper(_Periodic):
    def __init__(self, storage: Storage, server_id: Callable[[], int],
                 connections: Callable[[], List[ClientConnection]], interval: float,
                 before: Callable[[], None] = lambda: None) -> None:
        super().__init__("sweeper", interval)
        self._storage = storage
        self._server_id = server_id
        self._connections = connections
        self._before = before  # work to do first on each sweep (kept marks)
        self.sweeps = 0  # completed sweeps, for tests and metrics

    def tick(self) -> None:
        with metrics.SWEEP_DURATION.time():
            self._before()
            self.sweep_once()

    def sweep_once(self) -> int:
        """One sweep; return the number of clients asked for a delivery pass."""
        local = self._connections()  # before the query: see storage.Storage.sweep
        result = self._storage.sweep(self._server_id())
        if not result.registered:
            return 0  # the heartbeat thread re-registers
        asked = 0
        for conn in local:
            if conn.closed or conn.client_id is None or not conn.ready.is_set():
                continue
            owned = result.owned.get(conn.client_id)
            if owned is None or owned[0] != conn.session:
                log.info("client %s: closing %s, taken over elsewhere (seen by sweep)",
                         conn.client_id, conn.peer)
                conn.close("taken over by a newer connection")
            elif owned[1]:
                conn.request_delivery()
                asked += 1
        log.debug("sweep: %d client(s) with pending messages", asked)
        self.sweeps += 1
        return asked


class Purger(_Periodic):
    """Expires pending messages past their TTL and deletes finished messages past
    the retention period, a batch per transaction so that delivery never waits long."""

    def __init__(self, storage: Storage, interval: float, retention: float, batch: int,
                 max_batches: int = 20) -> None:
        super().__init__("purger", interval)
        self._storage = storage
        self._retention = retention
        self._batch = batch
        self._max_batches = max_batches

    def tick(self) -> None:
        with metrics.PURGE_DURATION.time():
            self.purge_once()

    def purge_once(self) -> Tuple[int, int]:
        """Up to ``max_batches`` batches; return (expired, deleted)."""
        expired, deleted = self._storage.purge(self._retention, self._batch, self._max_batches)
        metrics.MESSAGES_EXPIRED.inc(expired)
        if expired or deleted:
            log.info("expired %d message(s), purged %d", expired, deleted)
        return expired, deleted
