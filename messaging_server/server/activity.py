"""What the servers are doing, for people: the status page and one INFO line a minute.

A thread samples, every SAMPLE_INTERVAL_S, the database's message flow (the newest
message id and the pending count: two index reads) and this process's own deliveries
(its metrics counter), and keeps the last HISTORY samples in memory.  From them:

* ``/v1/status`` (the status page's data): the servers and their connected clients,
  the pending messages, and per sample the messages queued per second (by every server
  and enqueuer: ids handed out, duplicates recorded as ignored included) and delivered
  per second by this server process;
* one INFO line a minute with the same counts, so that the log shows the message flow,
  not only connections.

Nothing here is on a message's path: a sample that fails (the database away) is
skipped and said once in the log.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

from messaging_server.errors import StorageError
from messaging_server.server.metrics import REGISTRY
from messaging_server.storage import Storage

log = logging.getLogger("messaging_server")

SAMPLE_INTERVAL_S = 10.0
HISTORY = 60  # samples kept: the last 10 minutes
LOG_EVERY = 6  # samples between two INFO lines: one a minute


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    newest_message_id: int
    id_step: int
    pending: int
    delivered_here: float  # this process's deliveries so far (its metrics counter)


def delivered_so_far() -> float:
    """This process's delivered messages, as /metrics counts them."""
    return REGISTRY.get_sample_value("niki_messages_delivered_total") or 0.0


class ActivityMonitor:
    """Samples the flow in a daemon thread; ``status()`` is the status page's data."""

    def __init__(self, storage: Storage, server_id: Callable[[], Optional[int]],
                 connected_here: Callable[[], int], interval: float = SAMPLE_INTERVAL_S) -> None:
        self._storage = storage
        self._server_id = server_id
        self._connected_here = connected_here
        self._interval = interval
        self._samples: Deque[Sample] = collections.deque(maxlen=HISTORY)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="activity", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        taken = 0
        while True:
            self.sample()
            taken += 1
            if taken % LOG_EVERY == 0:
                self._log_minute()
            if self._stop.wait(self._interval):
                return

    def sample(self) -> Optional[Sample]:
        """Take one sample now (also for a status request that finds none yet)."""
        try:
            flow = self._storage.activity()
        except StorageError as exc:
            if not self._failing:
                log.warning("activity: cannot read the message counts: %s", exc)
            self._failing = True
            return None
        self._failing = False
        sample = Sample(time.time(), flow.newest_message_id, flow.id_step, flow.pending,
                        delivered_so_far())
        with self._lock:
            self._samples.append(sample)
        return sample

    def _samples_now(self) -> List[Sample]:
        with self._lock:
            return list(self._samples)

    def _log_minute(self) -> None:
        samples = self._samples_now()
        if len(samples) <= LOG_EVERY:
            return
        first, last = samples[-LOG_EVERY - 1], samples[-1]
        log.info("activity, last minute: %d messages queued (all servers), %d delivered by this "
                 "process; %d pending; %d clients connected here",
                 _queued(first, last), last.delivered_here - first.delivered_here,
                 last.pending, self._connected_here())

    def status(self) -> Dict[str, Any]:
        """The status page's data: servers and counts as of now, and the rates between the
        samples (StorageError when the database cannot be read)."""
        samples = self._samples_now()
        now = self._storage.activity()
        servers = self._storage.list_servers()
        rates = [{"at": round(b.at, 3),
                  "queued_per_s": round(_queued(a, b) / max(b.at - a.at, 1e-3), 2),
                  "delivered_per_s": round((b.delivered_here - a.delivered_here)
                                           / max(b.at - a.at, 1e-3), 2)}
                 for a, b in zip(samples, samples[1:])]
        return {
            "server_id": self._server_id(),
            "servers": [{"id": s.server_id, "host": s.host, "port": s.port, "alive": s.alive,
                         "clients": s.clients, "started_at": s.started_at,
                         "heartbeat_at": s.heartbeat_at} for s in servers],
            "clients_connected": sum(s.clients for s in servers if s.alive),
            "clients_connected_here": self._connected_here(),
            "pending": now.pending,
            "sample_interval_s": self._interval,
            "rates": rates,
        }


def _queued(a: Sample, b: Sample) -> int:
    """Messages queued between two samples: the ids handed out meanwhile."""
    return max(0, (b.newest_message_id - a.newest_message_id) // max(1, b.id_step))
