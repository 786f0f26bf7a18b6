"""A MariaDB outage while messages are being queued and delivered.

The server and the enqueuer must ride it out: enqueues during the outage fail
with StorageUnavailable (the caller knows they were not queued, except one whose
COMMIT was cut off: it may have been stored, and then arrives once, in its place);
every accepted message reaches its client exactly once, in order, once the
database is back; the server keeps running throughout.

The database is a private ``mariadbd`` started for the test (tests/private_mariadb.py),
stopped gracefully or killed with SIGKILL, then started again on the same port and
data; the machine's MariaDB is never touched.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Set, Tuple

import pytest

from messaging_server import Enqueuer, StorageUnavailable
from messaging_server.client.sdk import Client
from tests.helpers import ServerProcess, query, wait_until
from tests.private_mariadb import PrivateMariaDB

pytestmark = pytest.mark.mariadbd

# Enough refused enqueues to show the outage was seen by the caller, few enough to come
# within a fraction of a second (each refusal is a refused TCP connection).
REFUSED_DURING_OUTAGE = 5
# Accepted before the outage, and again after the restart before the producer stops
# (the database is really back).
ACCEPTED_EACH_SIDE = 40
# PyMySQL's "Lost connection to MySQL server during query": the reply never came.
CR_SERVER_LOST = 2013
# Pace of the producer: a steady stream across the outage, not a flood.
PRODUCER_PAUSE_S = 0.005


class Receiver(threading.Thread):
    """A client that reads (and, in ACK mode, acknowledges) everything, reconnecting if cut."""

    def __init__(self, port: int, client_id: str, ack: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.client_id, self.ack = port, client_id, ack
        self.bodies: List[str] = []
        self.connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with Client("127.0.0.1", self.port, client_id=self.client_id, ack=self.ack,
                            timeout=5) as client:
                    self.connections += 1
                    while not self.stop.is_set():
                        try:
                            body = client.receive(timeout=0.2)
                        except TimeoutError:
                            continue
                        if body is None:
                            break
                        self.bodies.append(body)
            except Exception:  # the server refused us during the outage: try again
                time.sleep(0.2)


class Producer(threading.Thread):
    """Enqueues numbered messages for each client until told to stop, recording which
    were accepted and which were refused with StorageUnavailable."""

    def __init__(self, db_url: str, ids: Dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.db_url, self.ids = db_url, ids
        self.accepted: Dict[str, List[str]] = {mode: [] for mode in ids}
        self.refused: List[Tuple[str, str]] = []
        self.reasons: List[str] = []  # why each was refused, for a failure's message
        # Refused because the connection broke mid-statement: if that statement was the
        # COMMIT, the server may have committed before it went down.
        self.in_doubt: Dict[str, Set[str]] = {mode: set() for mode in ids}
        self.errors: List[BaseException] = []
        self.stop = threading.Event()

    def accepted_count(self) -> int:
        return sum(len(v) for v in self.accepted.values())

    def run(self) -> None:
        try:
            with Enqueuer(self.db_url) as enq:
                n = 0
                while not self.stop.is_set():
                    for mode, cid in self.ids.items():
                        body = f"{mode} #{n:04d}"
                        try:
                            if enq.enqueue(cid, body):
                                self.accepted[mode].append(body)
                        except StorageUnavailable as exc:
                            self.refused.append((mode, body))
                            self.reasons.append(f"{body}: {exc}")
                            if getattr(exc.__cause__, "args", (None,))[0] == CR_SERVER_LOST:
                                self.in_doubt[mode].add(body)
                    n += 1
                    time.sleep(PRODUCER_PAUSE_S)
        except BaseException as exc:  # anything but StorageUnavailable fails the test
            self.errors.append(exc)


@pytest.mark.parametrize("outage", ["graceful stop", "kill -9"])
def test_mariadb_outage_loses_and_duplicates_nothing(private_mariadb: PrivateMariaDB, outage: str,
                                                    monkeypatch) -> None:
    db = private_mariadb
    take_down: Callable[[], None] = db.stop if outage == "graceful stop" else db.kill
    monkeypatch.delenv("NIKI_PEERS", raising=False)  # routed wake-ups, for the server too
    with ServerProcess(db.url, "--advertise-host", "127.0.0.1", "--sweep-interval", "0.5") as server:
        ids = {}
        for mode in ("legacy", "ack"):
            with Client("127.0.0.1", server.port, ack=(mode == "ack")) as first:
                ids[mode] = first.client_id
        receivers = {mode: Receiver(server.port, ids[mode], ack=(mode == "ack")) for mode in ids}
        for r in receivers.values():
            r.start()
        wait_until(lambda: all(r.connections for r in receivers.values()), message="receivers")

        producer = Producer(db.url, ids)
        producer.start()
        try:
            wait_until(lambda: producer.accepted_count() >= ACCEPTED_EACH_SIDE or producer.errors,
                       message="messages accepted before the outage")
            down_at = time.monotonic()
            take_down()
            wait_until(lambda: len(producer.refused) >= REFUSED_DURING_OUTAGE or producer.errors,
                       message="enqueues refused during the outage")
            db.start()
            down_for = time.monotonic() - down_at
            back_from = producer.accepted_count()
            wait_until(lambda: producer.accepted_count() >= back_from + ACCEPTED_EACH_SIDE
                       or producer.errors, timeout=30, message="enqueues accepted after the restart")
        finally:
            producer.stop.set()
            producer.join(30)
        assert not producer.is_alive()
        assert not producer.errors, f"the enqueuer raised {producer.errors[0]!r}"
        accepted = producer.accepted

        def all_arrived() -> bool:
            return all(len(receivers[m].bodies) >= len(accepted[m]) for m in ids)

        try:
            wait_until(all_arrived, timeout=30, message="every accepted message")
        finally:
            for r in receivers.values():
                r.stop.set()
        in_doubt = 0
        for mode in ids:
            got = receivers[mode].bodies
            assert len(got) == len(set(got)), f"{mode}: a message arrived twice"
            assert got == sorted(got), f"{mode}: out of order"
            # An enqueue refused while its COMMIT was on the wire may have been stored:
            # it may arrive (once, in its place); everything accepted must, and nothing else.
            settled = [body for body in got if body not in producer.in_doubt[mode]]
            assert settled == accepted[mode], (f"{mode} ({outage}): lost or not accepted; refused:\n"
                                               + "\n".join(producer.reasons))
            in_doubt += len(got) - len(settled)
        assert server.proc.poll() is None, "the server kept running"
        delivered = query(db.url, "SELECT COUNT(*) FROM messages WHERE status = 'delivered'")[0][0]
        assert delivered == producer.accepted_count() + in_doubt
        print(f"\nMariaDB {outage}: down {down_for:.1f} s; accepted {producer.accepted_count()}, "
              f"refused during the outage {len(producer.refused)} (of which stored after all "
              f"{in_doubt}), received each once and in order; "
              f"connections {({m: r.connections for m, r in receivers.items()})}")
