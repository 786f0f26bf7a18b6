"""A bounded pool of database connections, with a time limit on borrowing one.

Both backends keep their connections here.  At most ``size`` are borrowed at once;
a borrower waits at most ``wait_s`` for a free one and then gets StorageUnavailable,
so a database that stops answering, or a burst that outlasts the pool, never hangs a
caller without end.  Idle connections are reused most recently returned first.
Opening and checking a connection happens outside the pool's lock: one slow connect
delays its own borrower only, not every thread that wants a connection.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Generic, Iterator, List, TypeVar

from messaging_server.errors import StorageUnavailable

C = TypeVar("C")

# How long a borrower waits for a free connection.  Longer than any healthy
# transaction of ours holds one (they are a few statements, and a delivery's socket
# write is bounded by the write timeout), short enough that a caller behind a stalled
# pool hears about it instead of hanging.
POOL_WAIT_S = 10.0


class ConnectionPool(Generic[C]):
    """``size`` connections at most, opened by ``open`` on demand; ``ready`` is given an
    idle connection as it leaves the pool and returns it, or a fresh one in its place
    (it may raise the driver's error when no connection can be had).  ``reusable`` is
    asked as a connection comes back: one that failed is closed, never pooled again."""

    def __init__(self, open: Callable[[], C], close: Callable[[C], None], size: int,
                 location: str, wait_s: float = POOL_WAIT_S,
                 ready: Callable[[C], C] = lambda connection: connection,
                 reusable: Callable[[C], bool] = lambda connection: True) -> None:
        self._open = open
        self._close = close
        self._ready = ready
        self._reusable = reusable
        self.size = size
        self.location = location
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: List[C] = []
        self._closed = False
        self.in_use = 0  # borrowed now (the pool gauge)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[C]:
        """A connection, back in the pool on exit; StorageUnavailable after ``wait_s``."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise StorageUnavailable(
                f"{self.location}: no database connection free within {self.wait_s:g} s; "
                f"all {self.size} of the pool are busy")
        with self._lock:
            if self._closed:
                self._slots.release()
                raise StorageUnavailable(f"{self.location}: closed (the process is stopping)")
            self.in_use += 1
            connection = self._idle.pop() if self._idle else None
        try:
            connection = self._open() if connection is None else self._ready(connection)
            try:
                yield connection
            finally:
                self._give_back(connection)
        finally:
            with self._lock:
                self.in_use -= 1
            self._slots.release()

    def _give_back(self, connection: C) -> None:
        if self._reusable(connection):
            with self._lock:
                if not self._closed:
                    self._idle.append(connection)
                    return
        with contextlib.suppress(Exception):
            self._close(connection)  # broken, or the pool was closed meanwhile

    def close(self) -> None:
        """Close the idle connections; borrowed ones are closed as they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                self._close(connection)
