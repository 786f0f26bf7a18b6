"""The sweeper thread: heartbeat, lost wake-ups and missed takeovers.

Wake-up datagrams are an optimisation, never the only path: UDP may drop or
reorder them, an enqueue may race a connect, and the datagram telling this
server that another one took a client over may never come.  So every
``sweep_interval`` the sweeper asks the database, in one query, which clients
this server owns and which of them have pending messages.  A connection whose
client is no longer ours (or has a newer session) is closed; a client with
pending messages gets a delivery pass.  Every HEARTBEAT_INTERVAL_S it also
beats this server's heartbeat, by which enqueuers and other servers tell a
live owner from a dead one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List

from .connection import ClientConnection
from .delivery import deliver
from .errors import StorageUnavailable
from .storage import Storage
from .storage.base import HEARTBEAT_INTERVAL_S

log = logging.getLogger(__name__)


class Sweeper(threading.Thread):
    def __init__(self, storage: Storage, server_id: Callable[[], int],
                 connections: Callable[[], List[ClientConnection]],
                 on_unregistered: Callable[[], None],
                 interval: float, batch: int) -> None:
        super().__init__(name="sweeper", daemon=True)
        self._storage = storage
        self._server_id = server_id
        self._connections = connections
        self._on_unregistered = on_unregistered
        self.interval = interval
        self._batch = batch
        self._stopping = threading.Event()
        self.sweeps = 0  # completed sweeps, for tests and metrics

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        tick = min(self.interval, HEARTBEAT_INTERVAL_S)
        next_sweep = time.monotonic() + self.interval
        while not self._stopping.wait(tick):
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.interval
                    self.sweep_once()
                else:
                    self._heartbeat()
            except StorageUnavailable as exc:
                log.warning("sweep skipped: database unavailable: %s", exc)
            except Exception:  # keep sweeping: this thread is the safety net
                log.exception("sweep failed")

    def _heartbeat(self) -> None:
        if not self._storage.heartbeat(self._server_id()):
            self._on_unregistered()

    def sweep_once(self) -> int:
        """One sweep; return the number of messages it delivered."""
        local = self._connections()  # before the query: see storage.Storage.sweep
        result = self._storage.sweep(self._server_id())
        if not result.registered:
            self._on_unregistered()
            return 0
        delivered = 0
        for conn in local:
            if conn.closed or conn.client_id is None or not conn.ready.is_set():
                continue
            owned = result.owned.get(conn.client_id)
            if owned is None or owned[0] != conn.session:
                log.info("client %s: closing %s, taken over elsewhere (seen by sweep)",
                         conn.client_id, conn.peer)
                conn.close("taken over by a newer connection")
            elif owned[1]:
                delivered += deliver(self._storage, conn, self._batch)
        if delivered:
            log.info("sweep delivered %d message(s) that no wake-up announced", delivered)
        self.sweeps += 1
        return delivered
