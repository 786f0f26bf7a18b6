"""Group commit: short writes from many threads share one transaction and one flush.

On SQLite every write transaction takes the database's one write lock and a
durable commit waits for a flush to disk, so a burst of handshakes (each a new
client or a claim), connection ends and delivery marks would otherwise queue for
one flush each.  Here the first thread to arrive becomes the *leader*: it opens
one transaction, runs every operation waiting at that moment (its own first),
commits once and hands each thread its result.  Threads that arrive meanwhile
wait, and the next of them leads the next group.

What each caller is promised is unchanged: its operation's result is returned
only after the commit that made it durable, and an operation that raises is
rolled back alone (a savepoint), leaving the others of its group to commit.
If the transaction itself fails, every operation of the group gets that error
and none of them took effect.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, ContextManager, Generic, List, Optional, TypeVar

from messaging_server.storage.sql import Tx

T = TypeVar("T")

# The most operations one transaction runs: bounds how long a group holds the
# write lock, so that other writers (enqueues) get their turn.
MAX_GROUP = 256


class _Request(Generic[T]):
    """One caller's operation, and what became of it."""

    __slots__ = ("error", "lead", "operation", "ready", "value")

    def __init__(self, operation: Callable[[Tx], T]) -> None:
        self.operation = operation
        self.ready = threading.Event()
        self.lead = False  # set with ``ready``: lead the next group instead of a result
        self.value: Optional[T] = None
        self.error: Optional[BaseException] = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class GroupCommit:
    """Runs operations ``Tx -> result`` in shared transactions made by ``transaction()``."""

    def __init__(self, transaction: Callable[[], ContextManager[Tx]],
                 max_group: int = MAX_GROUP) -> None:
        self._transaction = transaction
        self._max_group = max_group
        self._mutex = threading.Lock()
        self._waiting: List[_Request[Any]] = []
        self._leading = False  # a leader is running a group (or about to)
        self.groups = 0  # transactions committed or failed, for tests and figures
        self.operations = 0

    def waiting(self) -> int:
        """Operations queued for the next group."""
        with self._mutex:
            return len(self._waiting)

    def run(self, operation: Callable[[Tx], T]) -> T:
        """Run ``operation`` in a transaction, possibly shared; its result once committed."""
        request: _Request[T] = _Request(operation)
        with self._mutex:
            self._waiting.append(request)
            lead = not self._leading
            self._leading = True
        if not lead:
            request.ready.wait()
            if not request.lead:
                return request.outcome()
        self._lead()
        return request.outcome()

    def _lead(self) -> None:
        """Run one group (the leader's request is first in line), then pass the lead on."""
        with self._mutex:
            group = self._waiting[:self._max_group]
            del self._waiting[:len(group)]
        try:
            self._commit(group)
        finally:
            with self._mutex:
                self.groups += 1
                self.operations += len(group)
                if self._waiting:
                    successor = self._waiting[0]
                    successor.lead = True
                    successor.ready.set()
                else:
                    self._leading = False
            for request in group:
                request.ready.set()

    def _commit(self, group: List[_Request[Any]]) -> None:
        try:
            with self._transaction() as tx:
                if len(group) == 1:  # alone: its error rolls the transaction back
                    group[0].value = group[0].operation(tx)
                    return
                for request in group:
                    _run_in_savepoint(tx, request)
        except Exception as exc:  # the transaction failed: nothing of the group took effect
            for request in group:
                request.value, request.error = None, exc


def _run_in_savepoint(tx: Tx, request: _Request[Any]) -> None:
    """Run one operation of a group so that its failure undoes only its own writes."""
    tx.execute("SAVEPOINT niki_operation")
    try:
        request.value = request.operation(tx)
    except Exception as exc:
        request.error = exc
        tx.execute("ROLLBACK TO SAVEPOINT niki_operation")
    tx.execute("RELEASE SAVEPOINT niki_operation")
