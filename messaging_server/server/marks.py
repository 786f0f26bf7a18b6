"""The mark writer: "delivered" and "acknowledged" marks of every connection, committed together.

Marking a message delivered is a write; one transaction per written batch (and
per ACK) was most of the database work of delivering a message.  Connections
hand their marks to this thread instead and go on writing: it gathers them for
at most MARK_GATHER_S and commits everything waiting in one transaction, by
message id, holding no client's row (see Storage.mark_groups).

Nothing is sent twice meanwhile: a connection never reads again what it wrote
(it reads after ``last_sent_id``), and the client's delivery lease stays with
the connection until its marks are committed.  When a connection ends,
:meth:`MarkWriter.withdraw` takes back whatever of its marks is not committed
yet (waiting out a commit in progress), and the end is recorded with them in
one transaction (Storage.release_client), as before.  A commit that fails
(the database went away) keeps its marks waiting and is tried again after
RETRY_S; nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Sequence

from messaging_server.errors import StorageError
from messaging_server.server import metrics
from messaging_server.storage import Storage

log = logging.getLogger(__name__)

# How long the first mark waits for others to share its commit.  Delivery does
# not wait for it: only the mark (and the lease kept until then) does.
MARK_GATHER_S = 0.005
# After a failed commit: the pause before the marks are tried again.
RETRY_S = 1.0
# A failed commit is logged per client for this many clients, then in one line.
LOGGED_CLIENTS = 10


@dataclass
class Marks:
    """Ids of one connection's messages to mark: written (legacy) and acknowledged (ACK mode)."""

    client_id: int = 0  # whose messages (for the log)
    written: List[int] = field(default_factory=list)
    acknowledged: List[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.written or self.acknowledged)

    def extend(self, other: Marks) -> None:
        self.written.extend(other.written)
        self.acknowledged.extend(other.acknowledged)


class MarkWriter(threading.Thread):
    """Commits the marks that connections ``add``, many connections' in one transaction."""

    def __init__(self, storage: Storage, gather_s: float = MARK_GATHER_S,
                 retry_s: float = RETRY_S) -> None:
        super().__init__(name="marks", daemon=True)
        self._storage = storage
        self._gather_s = gather_s
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._waiting: Dict[Hashable, Marks] = {}
        self._committing: Dict[Hashable, Marks] = {}
        self._stopping = False

    def add(self, owner: Hashable, client_id: int, written: Sequence[int] = (),
            acknowledged: Sequence[int] = ()) -> None:
        """Have ``owner``'s (a connection's) messages of ``client_id`` marked; returns at once."""
        if not written and not acknowledged:
            return
        with self._cond:
            marks = self._waiting.setdefault(owner, Marks(client_id))
            marks.written.extend(written)
            marks.acknowledged.extend(acknowledged)
            self._cond.notify_all()

    def withdraw(self, owner: Hashable) -> Marks:
        """Take back ``owner``'s marks not committed yet (waiting while a commit holds some)."""
        with self._cond:
            while owner in self._committing:
                self._cond.wait()
            return self._waiting.pop(owner, Marks())

    def stop(self) -> None:
        """Commit what is waiting (one last try) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.join(timeout=10)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return  # stopping, and nothing left
                if not self._stopping:
                    self._cond.wait(self._gather_s)  # others may join this commit
                self._committing, self._waiting = self._waiting, {}
                stopping = self._stopping
            ok = self._commit(self._committing)
            with self._cond:
                if not ok:  # back in front of anything added meanwhile, in order
                    for owner, marks in self._waiting.items():
                        self._committing.setdefault(owner, Marks(marks.client_id)).extend(marks)
                    self._waiting = self._committing
                self._committing = {}
                self._cond.notify_all()
                if not ok:
                    if stopping:
                        return  # the ends of the connections record what is left
                    self._cond.wait(self._retry_s)

    def _commit(self, group: Dict[Hashable, Marks]) -> bool:
        written = [i for marks in group.values() for i in marks.written]
        acknowledged = [i for marks in group.values() for i in marks.acknowledged]
        try:
            self._storage.mark_groups(written, acknowledged)
        except StorageError as exc:
            metrics.DELIVERIES_POSTPONED.inc()
            groups = list(group.values())
            for marks in groups[:LOGGED_CLIENTS]:
                log.warning("client %s: %d delivered message(s) not yet marked (tried again in "
                            "%g s): %s", marks.client_id, len(marks.written) + len(marks.acknowledged),
                            self._retry_s, exc)
            if len(groups) > LOGGED_CLIENTS:
                log.warning("... and %d more clients' delivered messages not yet marked",
                            len(groups) - LOGGED_CLIENTS)
            return False
        except Exception:  # a bug: keep the marks (the connections' ends record them)
            log.exception("marking delivered messages failed")
            return False
        metrics.count_marked(len(written), False)
        metrics.count_marked(len(acknowledged), True)
        return True
