"""Whether this process's database writes work, from the writes it makes anyway.

``/healthz`` asks this instead of the database.  A query on the probe's path
would prove little and cost much: a read still succeeds on a full disk, a
read-only file or a read-only MariaDB, and on SQLite every transaction takes
the one write lock, so a probe would queue behind the writers.  A server writes
all the time (its heartbeat every HEARTBEAT_INTERVAL_S, handshakes, enqueues,
deliveries), so :class:`~messaging_server.storage.sql.SqlStorage` records here
when a transaction that changed rows commits, and when any operation fails with
a database error; the latest outcome, and its age, tell the truth about writes.

Recording is two float assignments, atomic in CPython: no lock on the path of
every transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class WriteState:
    ok: bool
    problem: str  # "" when ok; otherwise why not, fit for an unauthenticated caller


class WriteHealth:
    """The time of the last committed write and of the last database error."""

    def __init__(self, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after = stale_after
        self._clock = clock
        self._last_success: Optional[float] = None
        self._last_failure: Optional[float] = None

    def succeeded(self) -> None:
        """A transaction that changed rows committed."""
        self._last_success = self._clock()

    def failed(self) -> None:
        """An operation failed with a database error."""
        self._last_failure = self._clock()

    def state(self) -> WriteState:
        success, failure = self._last_success, self._last_failure
        if failure is not None and (success is None or failure >= success):
            return WriteState(False, "the last database write failed")
        if success is None or self._clock() - success > self._stale_after:
            return WriteState(False, f"no database write succeeded in the last "
                                     f"{self._stale_after:g} s")
        return WriteState(True, "")
