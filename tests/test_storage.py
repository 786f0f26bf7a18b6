"""The storage layer on SQLite and MariaDB: schema, clients, queueing, delivery, concurrency."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from messaging_server.errors import (
    ConfigurationError,
    QueueFull,
    StorageFault,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.storage import Delivery, Storage, StoredMessage, describe_url, open_storage
from messaging_server.storage.records import Claim, Queued
from tests.conftest import mysql_connect
from tests.helpers import (
    REFUSED_BODY,
    insert_message,
    query,
    refuse_body,
    run_threads,
    seconds_ago_sql,
    wait_until,
)

WINDOW = 5.0








class Collector:
    """A delivery writer: records what it was given and reports ``accept`` of them written."""

    def __init__(self, accept: Optional[Callable[[int], int]] = None) -> None:
        self.calls: List[List[StoredMessage]] = []
        self.accept = accept or (lambda n: n)

    def __call__(self, messages: Sequence[StoredMessage]) -> int:
        self.calls.append(list(messages))
        return self.accept(len(messages))

    @property
    def bodies(self) -> List[str]:
        return [m.body for call in self.calls for m in call]


def deliver_all(storage: Storage, client_id: int, session: int, batch: int = 1000) -> List[StoredMessage]:
    out: List[StoredMessage] = []
    while True:
        collector = Collector()
        result = storage.deliver_pending(client_id, session, collector, batch)
        out.extend(m for call in collector.calls for m in call)
        if not result.more:
            return out




# --- schema ---------------------------------------------------------------------------------------


def test_create_schema_twice_keeps_data(storage: Storage):
    cid = storage.new_client().client_id
    storage.enqueue(cid, "kept", WINDOW)
    storage.create_schema()
    storage.create_schema()
    assert storage.pending_count(cid) == 1
    assert storage.new_client().client_id > cid


def create_schema_race(url: str) -> None:
    """Two storage objects create the schema of ``url`` at the same moment; both must succeed."""
    stores = [open_storage(url, create=True) for _ in range(2)]
    barrier = threading.Barrier(2)
    try:
        def create(store: Storage) -> Callable[[], None]:
            def run() -> None:
                barrier.wait(10)
                store.create_schema()
            return run

        run_threads([create(s) for s in stores])
        a = stores[0].new_client().client_id
        b = stores[1].new_client().client_id
        assert a != b
        assert stores[1].enqueue(a, "x", WINDOW).message_id is not None
        assert stores[0].pending_count(a) == 1
    finally:
        for s in stores:
            s.close()


def test_create_schema_from_two_objects_at_once(db_url, tmp_path):
    if db_url.startswith("sqlite:"):
        # A race is won or lost in microseconds: run it on several fresh files.
        for n in range(40):
            create_schema_race(f"sqlite:///{tmp_path / f'race{n}.sqlite3'}")
    else:
        create_schema_race(db_url)


def test_create_schema_from_two_processes_at_once(db_url):
    code = ("import sys\nfrom messaging_server.storage import open_storage\n"
            "s = open_storage(sys.argv[1], create=True)\ns.create_schema()\ns.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    with open_storage(db_url) as store:
        assert store.new_client() == Claim(1, 1, holds_lease=True)


# --- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["postgres://h/db", "sqlite://", "sqlite:///", "mysql://root@h/",
                                 "mysql:///db", "niki.sqlite3"])
def test_bad_urls(url):
    with pytest.raises(ConfigurationError):
        open_storage(url)


def test_describe_url_masks_password():
    assert describe_url("mysql://u:s3cret@h:3306/db") == "mysql://u:***@h:3306/db"
    assert describe_url("sqlite:///x.db") == "sqlite:///x.db"


# --- clients ---------------------------------------------------------------------------------------


def test_new_client_ids_unique_and_increasing(storage: Storage):
    made = [storage.new_client() for _ in range(20)]
    ids = [claim.client_id for claim in made]
    assert all(isinstance(claim, Claim) for claim in made)
    assert all(claim.session == 1 and claim.previous_owner is None for claim in made)
    assert all(isinstance(cid, int) and cid > 0 for cid in ids)
    assert ids == sorted(set(ids))


def test_new_client_concurrently_unique(storage: Storage):
    ids: List[int] = []
    lock = threading.Lock()

    def make() -> None:
        for _ in range(10):
            cid = storage.new_client().client_id
            with lock:
                ids.append(cid)

    run_threads([make] * 4)
    assert len(ids) == len(set(ids)) == 40


def test_claim_client(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    other = storage.new_client().client_id
    assert session == 1
    assert storage.claim_client(cid) == Claim(cid, 2)
    assert storage.claim_client(cid) == Claim(cid, 3)
    assert storage.claim_client(other) == Claim(other, 2)
    assert storage.claim_client(other + 1000) is None
    assert storage.claim_client(0) is None
    assert storage.claim_client(-1) is None
    assert query(db_url, "SELECT session FROM clients WHERE id = %s", (cid,)) == [(3,)]


# --- enqueue ---------------------------------------------------------------------------------------


def test_enqueue_ids_increase_and_rows_are_pending(storage: Storage, db_url):
    cid = storage.new_client().client_id
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(5)]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(set(ids))
    rows = query(db_url, "SELECT id, body, status FROM messages ORDER BY id")
    assert rows == [(i, f"m{n}", "pending") for n, i in enumerate(ids)]
    assert storage.pending_count(cid) == 5


def test_enqueue_unknown_client(storage: Storage, db_url):
    cid = storage.new_client().client_id
    with pytest.raises(UnknownClient):
        storage.enqueue(cid + 1, "x", WINDOW)
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]


# --- delivery ----------------------------------------------------------------------------------------


def test_deliver_oldest_first(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(5)]
    collector = Collector()
    assert storage.deliver_pending(cid, session, collector, 100) == Delivery(5, last_id=ids[-1])
    assert collector.calls == [[StoredMessage(i, f"m{n}") for n, i in enumerate(ids)]]
    assert storage.pending_count(cid) == 0
    assert storage.deliver_pending(cid, session, Collector(), 100) == Delivery(0)
    statuses = query(db_url, "SELECT status, delivered_at IS NOT NULL FROM messages")
    assert statuses == [("delivered", 1)] * 5


def test_deliver_only_own_messages(storage: Storage):
    claim = storage.new_client()
    a, sa = claim.client_id, claim.session
    b = storage.new_client().client_id
    storage.enqueue(a, "for a", WINDOW)
    storage.enqueue(b, "for b", WINDOW)
    collector = Collector()
    storage.deliver_pending(a, sa, collector, 100)
    assert collector.bodies == ["for a"]
    assert storage.pending_count(b) == 1


def test_deliver_in_batches(storage: Storage):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(7)]
    seen: List[str] = []
    results = []
    for _ in range(4):
        collector = Collector()
        results.append(storage.deliver_pending(cid, session, collector, 3))
        assert all(len(call) <= 3 for call in collector.calls)
        seen += collector.bodies
    assert results == [Delivery(3, more=True, last_id=ids[2]), Delivery(3, more=True, last_id=ids[5]),
                       Delivery(1, last_id=ids[6]), Delivery(0)]
    assert seen == [f"m{i}" for i in range(7)]


def test_deliver_batch_exact_multiple(storage: Storage):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(4)]
    assert storage.deliver_pending(cid, session, Collector(), 2) == Delivery(2, more=True, last_id=ids[1])
    assert storage.deliver_pending(cid, session, Collector(), 2) == Delivery(2, more=True, last_id=ids[3])
    assert storage.deliver_pending(cid, session, Collector(), 2) == Delivery(0)


def test_partial_write_marks_only_written(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(5)]
    first = Collector(accept=lambda n: 2)
    # last_id is the last message written, not the last one read.
    assert storage.deliver_pending(cid, session, first, 100) == Delivery(2, write_failed=True,
                                                                          last_id=ids[1])
    assert first.bodies == [f"m{i}" for i in range(5)]
    assert storage.pending_count(cid) == 3
    rows = query(db_url, "SELECT body, status FROM messages ORDER BY id")
    assert rows == [("m0", "delivered"), ("m1", "delivered"), ("m2", "pending"), ("m3", "pending"),
                    ("m4", "pending")]
    # What was not written comes first next time.
    m5 = storage.enqueue(cid, "m5", WINDOW).message_id
    second = Collector()
    assert storage.deliver_pending(cid, session, second, 100) == Delivery(4, last_id=m5)
    assert second.bodies == ["m2", "m3", "m4", "m5"]


def test_write_of_nothing_marks_nothing(storage: Storage):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    storage.enqueue(cid, "a", WINDOW)
    assert storage.deliver_pending(cid, session, Collector(accept=lambda n: 0), 10) == Delivery(
        0, write_failed=True)
    assert storage.pending_count(cid) == 1


def test_writer_exception_marks_nothing(storage: Storage):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    storage.enqueue(cid, "a", WINDOW)
    storage.enqueue(cid, "b", WINDOW)

    def explode(messages: Sequence[StoredMessage]) -> int:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        storage.deliver_pending(cid, session, explode, 10)
    assert storage.pending_count(cid) == 2
    assert [m.body for m in deliver_all(storage, cid, session)] == ["a", "b"]


def test_stale_session_is_taken_over(storage: Storage):
    claim = storage.new_client()
    cid, old = claim.client_id, claim.session
    a = storage.enqueue(cid, "a", WINDOW).message_id
    new = storage.claim_client(cid).session
    assert new == old + 1
    collector = Collector()
    assert storage.deliver_pending(cid, old, collector, 10) == Delivery(0, taken_over=True)
    assert collector.calls == []
    assert storage.pending_count(cid) == 1
    assert storage.deliver_pending(cid, new, collector, 10) == Delivery(1, last_id=a)
    # Taken over even with nothing pending; unknown clients too.
    assert storage.deliver_pending(cid, old, Collector(), 10) == Delivery(0, taken_over=True)
    assert storage.deliver_pending(cid + 99, 1, Collector(), 10) == Delivery(0, taken_over=True)


FOUR_BYTE_BODIES = [
    "\U0001f600",
    "emoji \U0001f389\U0001f44d\U0001f3fd and music \U0001d11e",
    "mixed \u00e9\u20ac\U0001f600 \u4e2d\u6587",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a ZWJ family
    "\U0001f600" * 1024,  # 4096 bytes: the largest body
]


def test_four_byte_utf8_round_trip(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    for body in FOUR_BYTE_BODIES:
        assert storage.enqueue(cid, body, WINDOW).message_id is not None
    delivered = [m.body for m in deliver_all(storage, cid, session)]
    assert delivered == FOUR_BYTE_BODIES
    stored = [row[0] for row in query(db_url, "SELECT body FROM messages ORDER BY id")]
    assert stored == FOUR_BYTE_BODIES


def test_four_byte_bodies_differing_only_in_emoji_are_distinct(storage: Storage):
    # A utf8mb3 column or a collation folding emoji would make these equal.
    cid = storage.new_client().client_id
    assert storage.enqueue(cid, "x \U0001f600", WINDOW).message_id is not None
    assert storage.enqueue(cid, "x \U0001f601", WINDOW).message_id is not None
    assert storage.enqueue(cid, "x \U0001f600", WINDOW).message_id is None


# --- errors: unavailable or refused -------------------------------------------------------------------


def test_a_statement_the_database_refuses_is_a_fault_not_unavailable(storage: Storage, db_url: str):
    """Only "cannot use the database now" is StorageUnavailable (retried); a statement the
    database refuses is StorageFault, a bug that no retry can fix."""
    client = storage.new_client().client_id
    refuse_body(db_url)
    for attempt in (lambda: storage.enqueue(client, REFUSED_BODY, WINDOW),
                    lambda: storage.enqueue_many([(client, "fine"), (client, REFUSED_BODY)], WINDOW)):
        with pytest.raises(StorageFault, match="this body is refused") as caught:
            attempt()
        assert not isinstance(caught.value, StorageUnavailable)
    assert storage.enqueue(client, "fine", WINDOW).message_id  # the rest of the database works
    assert query(db_url, "SELECT body FROM messages") == [("fine",)]  # the batch stored nothing


def test_a_schema_that_lacks_a_column_is_a_fault(storage: Storage, db_url: str):
    message_id = storage.enqueue(storage.new_client().client_id, "hello", WINDOW).message_id
    query(db_url, "ALTER TABLE messages DROP COLUMN acknowledged_at")
    with pytest.raises(StorageFault, match="older than this version"):
        storage.message_info(message_id)


def test_a_missing_schema_is_unavailable(storage: Storage, db_url: str):
    # Not a bug: the database was not set up yet (the server's start creates the schema).
    query(db_url, "DROP TABLE messages")
    with pytest.raises(StorageUnavailable, match="no Niki schema yet"):
        storage.pending_count(1)


# --- duplicate window ---------------------------------------------------------------------------


def test_duplicate_within_window_is_ignored(storage: Storage, db_url):
    cid = storage.new_client().client_id
    first = storage.enqueue(cid, "same", WINDOW).message_id
    assert first is not None
    assert storage.enqueue(cid, "same", WINDOW).message_id is None
    assert storage.enqueue(cid, "Same", WINDOW).message_id is not None
    rows = query(db_url, "SELECT body, status FROM messages ORDER BY id")
    assert rows == [("same", "pending"), ("same", "ignored"), ("Same", "pending")]
    assert storage.pending_count(cid) == 2


def test_window_zero_is_never_a_duplicate(storage: Storage):
    cid = storage.new_client().client_id
    results = [storage.enqueue(cid, "same", 0).message_id for _ in range(10)]
    assert None not in results, results


def test_delivered_message_still_counts_for_the_window(storage: Storage):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    storage.enqueue(cid, "once", WINDOW)
    assert len(deliver_all(storage, cid, session)) == 1
    assert storage.enqueue(cid, "once", WINDOW).message_id is None


def test_window_measured_from_stored_time(storage: Storage, db_url):
    url = db_url
    cid = storage.new_client().client_id
    insert_message(url, cid, "old", "pending", 10)
    insert_message(url, cid, "recent", "pending", 3)
    insert_message(url, cid, "recent-delivered", "delivered", 3)
    assert storage.enqueue(cid, "old", WINDOW).message_id is not None
    assert storage.enqueue(cid, "recent", WINDOW).message_id is None
    assert storage.enqueue(cid, "recent-delivered", WINDOW).message_id is None
    assert storage.enqueue(cid, "recent", 2.5).message_id is not None  # a shorter window no longer covers it


def test_ignored_rows_do_not_extend_the_window(storage: Storage, db_url):
    url = db_url
    cid = storage.new_client().client_id
    # Queued 10 s ago, then repeated (and ignored) 1 s ago: the window started 10 s ago.
    insert_message(url, cid, "A", "pending", 10)
    insert_message(url, cid, "A", "ignored", 1)
    assert storage.enqueue(cid, "A", WINDOW).message_id is not None
    # Only ignored rows, all recent: not a duplicate either.
    insert_message(url, cid, "B", "ignored", 0.5)
    assert storage.enqueue(cid, "B", WINDOW).message_id is not None


def test_window_expires_in_real_time(storage: Storage):
    cid = storage.new_client().client_id
    window = 0.4
    start = time.monotonic()
    assert storage.enqueue(cid, "tick", window).message_id is not None
    second = storage.enqueue(cid, "tick", window).message_id
    if time.monotonic() - start < window / 2:  # only meaningful if the machine kept up
        assert second is None
    time.sleep(window + 0.15)  # waiting out the window is the point of this test
    assert storage.enqueue(cid, "tick", window).message_id is not None


def test_duplicates_are_per_client(storage: Storage):
    a = storage.new_client().client_id
    b = storage.new_client().client_id
    assert storage.enqueue(a, "hi", WINDOW).message_id is not None
    assert storage.enqueue(b, "hi", WINDOW).message_id is not None


# --- pending_count and servers -------------------------------------------------------------------


def test_pending_count(storage: Storage):
    claim = storage.new_client()
    a, sa = claim.client_id, claim.session
    b = storage.new_client().client_id
    assert storage.pending_count(a) == 0
    assert storage.pending_count(a + 1000) == 0
    for i in range(3):
        storage.enqueue(a, f"a{i}", WINDOW)
    storage.enqueue(a, "a0", WINDOW)  # ignored: not pending
    storage.enqueue(b, "b0", WINDOW)
    assert storage.pending_count(a) == 3
    assert storage.pending_count(b) == 1
    storage.deliver_pending(a, sa, Collector(accept=lambda n: 1), 10)
    assert storage.pending_count(a) == 2



# --- Queued.previous: the client's newest pending message before this one ----------------------


def test_enqueue_reports_the_previous_pending_message(storage: Storage, db_url):
    claim = storage.new_client()
    a, session = claim.client_id, claim.session
    b = storage.new_client().client_id
    first = storage.enqueue(a, "a0", WINDOW)
    assert first.previous == 0  # nothing pending before it
    second = storage.enqueue(a, "a1", WINDOW)
    assert second.previous == first.message_id
    assert first.session == second.session == session
    assert storage.enqueue(b, "b0", WINDOW).previous == 0  # per client
    duplicate = storage.enqueue(a, "a1", WINDOW)  # ignored: not in the chain
    assert duplicate.message_id is None and duplicate.previous == 0
    third = storage.enqueue(a, "a2", WINDOW, ttl=60)
    assert third.previous == second.message_id
    # Delivered messages are not pending: the chain restarts from what is still pending.
    storage.deliver_pending(a, session, Collector(), 10)
    fourth = storage.enqueue(a, "a3", WINDOW)
    assert fourth.previous == 0
    assert storage.enqueue(a, "a4", WINDOW, max_pending=10).previous == fourth.message_id


def test_enqueue_many_chains_previous_per_client(storage: Storage, db_url):
    a = storage.new_client().client_id
    b = storage.new_client().client_id
    before = storage.enqueue(a, "old", WINDOW).message_id
    missing = b + 1000
    results = storage.enqueue_many(
        [(a, "x"), (b, "y"), (a, "old"), (missing, "z"), (a, "x"), (a, "w"), (b, "v")], WINDOW)
    ax, by, a_dup, unknown, a_dup2, aw, bv = results
    assert isinstance(unknown, UnknownClient)
    assert a_dup.message_id is None and a_dup2.message_id is None  # duplicates: no chain
    assert ax.previous == before  # the newest pending before the batch
    assert aw.previous == ax.message_id  # then the client's previous pending item of the batch
    assert by.previous == 0 and bv.previous == by.message_id
    assert ax.session == aw.session == by.session == 1  # read under the same lock
    # The cap: an item refused as QueueFull does not enter the chain either.
    capped = storage.enqueue_many([(b, "c1"), (b, "c2"), (b, "c3")], WINDOW, max_pending=3)
    assert capped[0].previous == bv.message_id
    assert isinstance(capped[1], QueueFull) and isinstance(capped[2], QueueFull)
    assert storage.enqueue(b, "after", WINDOW).previous == capped[0].message_id

def test_register_and_unregister_server(storage: Storage, db_url):
    url = db_url
    s1 = storage.register_server("host-a", 8000, "10.0.0.1", 8001, 1234)
    s2 = storage.register_server("host-b", 9000, "host-b.example", 9001, 5678)
    assert isinstance(s1, int) and isinstance(s2, int) and s1 != s2
    rows = query(url, "SELECT id, host, port, event_host, event_port, pid FROM servers ORDER BY id")
    assert rows == [(s1, "host-a", 8000, "10.0.0.1", 8001, 1234),
                    (s2, "host-b", 9000, "host-b.example", 9001, 5678)]
    storage.unregister_server(s1)
    assert query(url, "SELECT id FROM servers") == [(s2,)]
    storage.unregister_server(s1)  # already gone: no error
    storage.unregister_server(s2)
    assert query(url, "SELECT COUNT(*) FROM servers") == [(0,)]


# --- concurrency -------------------------------------------------------------------------------------


def test_concurrent_enqueues_for_one_client(storage: Storage):
    threads, per_thread = 8, 50
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    barrier = threading.Barrier(threads)
    returned: Dict[str, int] = {}
    lock = threading.Lock()

    def producer(n: int) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(10)
            for i in range(per_thread):
                body = f"t{n}-{i}"
                message_id = storage.enqueue(cid, body, WINDOW).message_id
                assert message_id is not None, body
                with lock:
                    returned[body] = message_id
        return run

    run_threads([producer(n) for n in range(threads)])
    delivered = deliver_all(storage, cid, session, batch=1000)
    bodies = [m.body for m in delivered]
    ids = [m.id for m in delivered]
    # Every message exactly once.
    assert len(bodies) == threads * per_thread
    assert set(bodies) == {f"t{n}-{i}" for n in range(threads) for i in range(per_thread)}
    # Delivered in id order, and the ids are the ones enqueue returned.
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert {m.body: m.id for m in delivered} == returned
    # Each producer's messages in the order it queued them.
    for n in range(threads):
        mine = [b for b in bodies if b.startswith(f"t{n}-")]
        assert mine == [f"t{n}-{i}" for i in range(per_thread)]
    assert storage.pending_count(cid) == 0


def test_concurrent_deliveries_never_duplicate_or_reorder(storage: Storage):
    """Connections of one client that keep taking each other over, each delivering as
    soon as it is current: the delivery lease keeps their writes from overlapping, and
    nothing is written twice or out of order, although no lock is held while writing."""
    total, deliverers = 300, 4
    server = storage.register_server("box", 1, "127.0.0.1", 2, 3)
    claim = storage.new_client(server)
    cid = claim.client_id
    storage.release_client(cid, claim.session, server)  # its first connection has ended
    written: List[str] = []
    lock = threading.Lock()
    active = [0]
    overlaps = [0]
    done_enqueueing = threading.Event()
    stop = threading.Event()

    def write(messages: Sequence[StoredMessage]) -> int:
        with lock:
            active[0] += 1
            if active[0] > 1:
                overlaps[0] += 1
        try:
            with lock:
                written.extend(m.body for m in messages)
            return len(messages)
        finally:
            with lock:
                active[0] -= 1

    def enqueuer() -> None:
        try:
            for i in range(total):
                assert storage.enqueue(cid, f"m{i:03d}", WINDOW).message_id is not None
        finally:
            done_enqueueing.set()

    storage_errors: List[str] = []

    def deliverer() -> None:
        while not stop.is_set():
            try:
                session = storage.claim_client(cid, server).session  # a takeover
                result = storage.deliver_pending(cid, session, write, 7, server_id=server)
            except StorageUnavailable as exc:
                # What the server does: log, leave the rest for the next pass.
                with lock:
                    storage_errors.append(str(exc))
                continue
            if not result.delivered and done_enqueueing.is_set():
                time.sleep(0.001)  # back off while the main thread checks for completion

    errors: List[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                done_enqueueing.set()
        return run

    threads = [threading.Thread(target=guarded(fn), daemon=True)
               for fn in [enqueuer] + [deliverer] * deliverers]
    for t in threads:
        t.start()
    try:
        assert done_enqueueing.wait(30)
        wait_until(lambda: errors or len(set(written)) >= total, 15, "all messages to be written")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    assert overlaps[0] == 0, "two writes for one client ran at the same time"
    twice = sorted({body for body in written if written.count(body) > 1})
    assert not twice, (f"written more than once: {twice}; deliveries that failed after writing "
                       f"(and were rolled back): {storage_errors}")
    assert not storage_errors, f"deliveries failed with the database up: {storage_errors}"
    assert written == [f"m{i:03d}" for i in range(total)]
    assert storage.pending_count(cid) == 0


def test_concurrent_duplicates_store_exactly_one(storage: Storage, db_url):
    threads, rounds = 6, 8
    cid = storage.new_client().client_id
    barrier = threading.Barrier(threads)
    results: Dict[int, List[Optional[int]]] = {r: [] for r in range(rounds)}
    lock = threading.Lock()

    def racer() -> None:
        for r in range(rounds):
            barrier.wait(10)
            message_id = storage.enqueue(cid, f"race {r}", WINDOW).message_id
            with lock:
                results[r].append(message_id)

    run_threads([racer] * threads)
    for r in range(rounds):
        queued = [i for i in results[r] if i is not None]
        assert len(queued) == 1, f"round {r}: {results[r]}"
    assert storage.pending_count(cid) == rounds
    ignored = query(db_url, "SELECT COUNT(*) FROM messages WHERE status = 'ignored'")
    assert ignored == [(rounds * (threads - 1),)]


# --- TTL and expiry ----------------------------------------------------------------------------------


def statuses(db_url: str, client_id: Optional[int] = None) -> Dict[str, str]:
    """body -> status of every message (of ``client_id``)."""
    where = "" if client_id is None else f" WHERE client_id = {int(client_id)}"
    rows = query(db_url, f"SELECT body, status FROM messages{where}")
    return {str(body): str(status) for body, status in rows}


def set_ago(db_url: str, column: str, message_ids: Sequence[int], seconds: float) -> None:
    """Set ``column`` of the given messages to ``seconds`` ago."""
    marks = ", ".join(["%s"] * len(message_ids))
    query(db_url, f"UPDATE messages SET {column} = {seconds_ago_sql(db_url, seconds)} WHERE id IN ({marks})",
          message_ids)


def set_expires_ago(db_url: str, message_ids: Sequence[int], seconds: float) -> None:
    set_ago(db_url, "expires_at", message_ids, seconds)


def set_created_ago(db_url: str, message_ids: Sequence[int], seconds: float) -> None:
    set_ago(db_url, "created_at", message_ids, seconds)


def peek(storage: Storage, client_id: int, session: int, batch: int = 100, after_id: int = 0) -> List[str]:
    """The bodies a delivery would write now, marking nothing."""
    collector = Collector()
    storage.deliver_pending(client_id, session, collector, batch, after_id=after_id, mark=False)
    return collector.bodies


DAY = 86400.0


def test_ttl_sets_expires_at(storage: Storage, db_url):
    cid = storage.new_client().client_id
    never = storage.enqueue(cid, "never", WINDOW).message_id
    minute = storage.enqueue(cid, "minute", WINDOW, ttl=60).message_id
    if db_url.startswith("sqlite:"):
        span = "(julianday(expires_at) - julianday(created_at)) * 86400"
    else:
        span = "TIMESTAMPDIFF(MICROSECOND, created_at, expires_at) / 1000000"
    rows = dict(query(db_url, f"SELECT id, {span} FROM messages"))
    assert rows[never] is None
    assert abs(float(rows[minute]) - 60) < 0.01


def test_a_delivered_message_stays_a_duplicates_original_after_its_ttl(storage: Storage, db_url):
    """A message delivered before its ttl passed was accepted: the same body within the
    window is a duplicate, whether the ttl has passed since or not (one that expired
    unsent is not: see the next test).  Single and batch alike."""
    cid = storage.new_client().client_id
    first = storage.enqueue(cid, "pay 10 EUR", WINDOW, ttl=0.3).message_id
    other = storage.enqueue(cid, "pay 20 EUR", WINDOW, ttl=0.3).message_id
    assert first is not None and other is not None
    assert storage.mark_delivered(cid, [first, other]) == 2
    passed = "expires_at < " + ("NOW(6)" if db_url.startswith("mysql") else
                                "strftime('%Y-%m-%d %H:%M:%f', 'now')")
    wait_until(lambda: query(db_url, f"SELECT COUNT(*) FROM messages WHERE {passed}") == [(2,)],
               10, "the ttls to pass")
    assert storage.enqueue(cid, "pay 10 EUR", WINDOW).message_id is None
    [again] = storage.enqueue_many([(cid, "pay 20 EUR")], WINDOW)
    assert isinstance(again, Queued) and again.message_id is None


def test_short_ttl_is_not_delivered_once_it_passes(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    storage.enqueue(cid, "long", WINDOW, ttl=3600)
    start = time.monotonic()
    storage.enqueue(cid, "short", WINDOW, ttl=0.5)
    storage.enqueue(cid, "forever", WINDOW)
    early = peek(storage, cid, session)
    if time.monotonic() - start < 0.25:  # only meaningful if the machine kept up
        assert early == ["long", "short", "forever"]
    # Real time must pass for a TTL to: wait for it, with a deadline.
    wait_until(lambda: peek(storage, cid, session) == ["long", "forever"], 10, "the short TTL to pass")
    assert time.monotonic() - start >= 0.4  # not before its time (the clocks are the database's)
    # Still 'pending' until the purger marks it.
    assert statuses(db_url, cid)["short"] == "pending"
    assert storage.expire_and_purge(7 * DAY, 100) == (1, 0)
    assert statuses(db_url, cid) == {"long": "pending", "short": "expired", "forever": "pending"}
    assert storage.pending_count(cid) == 2
    # A real delivery sends the others and leaves the expired one alone.
    collector = Collector()
    assert storage.deliver_pending(cid, session, collector, 100).delivered == 2
    assert collector.bodies == ["long", "forever"]
    assert statuses(db_url, cid) == {"long": "delivered", "short": "expired", "forever": "delivered"}
    assert storage.expire_and_purge(7 * DAY, 100) == (0, 0)


def test_expired_message_is_skipped_in_order(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW, ttl=3600).message_id for i in range(4)]
    set_expires_ago(db_url, [ids[1]], 1)
    collector = Collector()
    result = storage.deliver_pending(cid, session, collector, 100)
    assert result == Delivery(3, last_id=ids[3])
    assert collector.bodies == ["m0", "m2", "m3"]
    assert statuses(db_url, cid) == {"m0": "delivered", "m1": "pending", "m2": "delivered", "m3": "delivered"}
    # A batch of the limit's size is full only of deliverable messages.
    m4, m5 = (storage.enqueue(cid, body, WINDOW).message_id for body in ("m4", "m5"))
    set_expires_ago(db_url, [m4], 1)
    assert storage.deliver_pending(cid, session, Collector(), 1) == Delivery(1, more=True, last_id=m5)


def test_expire_and_purge_marks_only_pending_past_expiry(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    past = storage.enqueue(cid, "past", WINDOW, ttl=3600).message_id
    storage.enqueue(cid, "future", WINDOW, ttl=3600)
    storage.enqueue(cid, "no ttl", WINDOW)
    delivered = storage.enqueue(cid, "delivered", WINDOW, ttl=3600).message_id
    assert storage.mark_delivered(cid, [delivered]) == 1
    set_expires_ago(db_url, [past, delivered], 1)
    assert storage.expire_and_purge(7 * DAY, 100) == (1, 0)
    assert statuses(db_url, cid) == {"past": "expired", "future": "pending", "no ttl": "pending",
                                     "delivered": "delivered"}
    assert storage.expire_and_purge(7 * DAY, 100) == (0, 0)
    assert peek(storage, cid, session) == ["future", "no ttl"]
    # docs/STORAGE.md: an ACK for an expired message that was already written still marks it delivered.
    assert storage.mark_delivered(cid, [past]) == 1
    assert statuses(db_url, cid)["past"] == "delivered"

    # At most `batch` are marked per call.
    other = storage.new_client().client_id
    ids = [storage.enqueue(other, f"m{i}", WINDOW, ttl=3600).message_id for i in range(5)]
    set_expires_ago(db_url, ids, 1)
    assert [storage.expire_and_purge(7 * DAY, 2)[0] for _ in range(4)] == [2, 2, 1, 0]
    assert set(statuses(db_url, other).values()) == {"expired"}


# --- max_pending ---------------------------------------------------------------------------------------


def message_count(db_url: str) -> int:
    return int(query(db_url, "SELECT COUNT(*) FROM messages")[0][0])


def test_queue_full_at_the_cap(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    other = storage.new_client().client_id
    for i in range(3):
        assert storage.enqueue(cid, f"m{i}", WINDOW, max_pending=3).message_id is not None
    # Written without a mark (ACK mode, waiting for their ACK) they are still pending.
    assert peek(storage, cid, session) == ["m0", "m1", "m2"]
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "one too many", WINDOW, ttl=60, max_pending=3)
    # Nothing was inserted, not even an ignored row.
    assert message_count(db_url) == 3
    assert storage.pending_count(cid) == 3
    # The cap is per client, and only applies when asked for.
    assert storage.enqueue(other, "x", WINDOW, max_pending=3).message_id is not None
    assert storage.enqueue(cid, "uncapped", WINDOW).message_id is not None
    assert storage.enqueue(cid, "bigger cap", WINDOW, max_pending=5).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "again", WINDOW, max_pending=5)
    assert message_count(db_url) == 6


def test_queue_full_counts_only_pending(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    cap = 2
    assert storage.enqueue(cid, "a", WINDOW, max_pending=cap).message_id is not None
    # A duplicate is stored as ignored and does not take room.
    assert storage.enqueue(cid, "a", WINDOW, max_pending=cap).message_id is None
    assert storage.enqueue(cid, "b", WINDOW, max_pending=cap).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "c", WINDOW, max_pending=cap)
    # A delivered message frees room.
    assert storage.deliver_pending(cid, session, Collector(accept=lambda n: 1), 10).delivered == 1
    assert storage.enqueue(cid, "c", WINDOW, max_pending=cap).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "d", WINDOW, max_pending=cap)
    # So does one acknowledged (mark_delivered), and one marked expired.
    b_id, c_id = (int(row[0]) for row in query(
        db_url, "SELECT id FROM messages WHERE body IN ('b', 'c') ORDER BY id"))
    assert storage.mark_delivered(cid, [b_id]) == 1
    assert storage.enqueue(cid, "d", WINDOW, max_pending=cap).message_id is not None
    set_expires_ago(db_url, [c_id], 1)
    assert storage.expire_and_purge(7 * DAY, 100) == (1, 0)
    assert storage.enqueue(cid, "e", WINDOW, max_pending=cap).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "f", WINDOW, max_pending=cap)
    rows = query(db_url, "SELECT body, status FROM messages ORDER BY id")
    assert rows == [("a", "delivered"), ("a", "ignored"), ("b", "delivered"), ("c", "expired"),
                    ("d", "pending"), ("e", "pending")]


def test_queue_cap_ignores_lapsed_messages_not_yet_swept(storage: Storage, db_url):
    """A message past its TTL never goes out: it takes no room even before the sweep marks it,
    for enqueue and for enqueue_many alike."""
    cid = storage.new_client().client_id
    cap = 3
    for body in ("a", "b", "c"):
        assert storage.enqueue(cid, body, WINDOW, max_pending=cap).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "full", WINDOW, max_pending=cap)
    (a_id,) = (int(row[0]) for row in query(db_url, "SELECT id FROM messages WHERE body = 'a'"))
    set_expires_ago(db_url, [a_id], 1)  # lapsed; still 'pending' in its row
    assert storage.enqueue(cid, "d", WINDOW, max_pending=cap).message_id is not None
    with pytest.raises(QueueFull):
        storage.enqueue(cid, "e", WINDOW, max_pending=cap)
    (b_id,) = (int(row[0]) for row in query(db_url, "SELECT id FROM messages WHERE body = 'b'"))
    set_expires_ago(db_url, [b_id], 1)
    results = storage.enqueue_many([(cid, "f"), (cid, "g")], WINDOW, max_pending=cap)
    assert results[0].message_id is not None and isinstance(results[1], QueueFull)


def test_queue_full_under_concurrency(storage: Storage):
    threads, cap = 8, 5
    cid = storage.new_client().client_id
    barrier = threading.Barrier(threads)
    outcomes: List[str] = []
    lock = threading.Lock()

    def racer(n: int) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(10)
            try:
                storage.enqueue(cid, f"t{n}", WINDOW, max_pending=cap)
                outcome = "queued"
            except QueueFull:
                outcome = "full"
            with lock:
                outcomes.append(outcome)
        return run

    run_threads([racer(n) for n in range(threads)])
    assert sorted(outcomes) == ["full"] * (threads - cap) + ["queued"] * cap
    assert storage.pending_count(cid) == cap


# --- deliver_pending after_id / mark=False, and mark_delivered ------------------------------------------


def test_deliver_without_marking(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(5)]
    first = Collector()
    result = storage.deliver_pending(cid, session, first, 2, mark=False)
    assert result == Delivery(2, more=True, last_id=ids[1])
    assert first.bodies == ["m0", "m1"]
    # Nothing was marked: the same messages come again without after_id.
    assert storage.pending_count(cid) == 5
    assert set(statuses(db_url, cid).values()) == {"pending"}
    assert query(db_url, "SELECT COUNT(*) FROM messages WHERE delivered_at IS NOT NULL") == [(0,)]
    assert peek(storage, cid, session, batch=2) == ["m0", "m1"]
    # after_id continues where the connection left off.
    second = Collector()
    assert storage.deliver_pending(cid, session, second, 10, after_id=ids[1], mark=False) == Delivery(
        3, last_id=ids[4])
    assert second.bodies == ["m2", "m3", "m4"]
    assert storage.deliver_pending(cid, session, Collector(), 10, after_id=ids[4], mark=False) == Delivery(0)
    # A partial write reports the last id written; a stale session is still refused.
    partial = storage.deliver_pending(cid, session, Collector(accept=lambda n: 1), 10, mark=False)
    assert partial == Delivery(1, write_failed=True, last_id=ids[0])
    stale = storage.deliver_pending(cid, session - 1, Collector(), 10, mark=False)
    assert stale == Delivery(0, taken_over=True)
    assert storage.pending_count(cid) == 5


def test_deliver_after_id_with_marking(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(4)]
    collector = Collector()
    result = storage.deliver_pending(cid, session, collector, 10, after_id=ids[1])
    assert result == Delivery(2, last_id=ids[3])
    assert collector.bodies == ["m2", "m3"]
    assert statuses(db_url, cid) == {"m0": "pending", "m1": "pending", "m2": "delivered", "m3": "delivered"}
    # after_id below every id reads from the start; above every id reads nothing.
    assert peek(storage, cid, session, after_id=ids[0] - 1) == ["m0", "m1"]
    assert peek(storage, cid, session, after_id=ids[3] + 100) == []


def test_mark_delivered(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    other = storage.new_client().client_id
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(4)]
    theirs = storage.enqueue(other, "theirs", WINDOW).message_id
    storage.enqueue(cid, "m0", WINDOW)  # an ignored duplicate
    ignored = int(query(db_url, "SELECT id FROM messages WHERE status = 'ignored'")[0][0])
    assert storage.deliver_pending(cid, session, Collector(), 10, mark=False).delivered == 4

    assert storage.mark_delivered(cid, []) == 0
    assert storage.mark_delivered(cid, ids[:2]) == 2
    assert storage.pending_count(cid) == 2
    # Already delivered ones, another client's, ignored ones and unknown ids are not counted or changed.
    assert storage.mark_delivered(cid, ids[:2]) == 0
    assert storage.mark_delivered(cid, [theirs]) == 0
    assert storage.mark_delivered(cid, [ignored, ids[3] + 1000]) == 0
    assert storage.mark_delivered(cid, [ids[1], theirs, ids[2], ignored, ids[2]]) == 1
    assert storage.pending_count(other) == 1
    assert statuses(db_url, other) == {"theirs": "pending"}
    rows = query(db_url, "SELECT id, status, delivered_at IS NOT NULL FROM messages WHERE client_id = %s "
                 "ORDER BY id", (cid,))
    assert rows == [(ids[0], "delivered", 1), (ids[1], "delivered", 1), (ids[2], "delivered", 1),
                    (ids[3], "pending", 0), (ignored, "ignored", 0)]
    # What is left is what a new connection gets.
    assert peek(storage, cid, session) == ["m3"]


# --- retention purge -----------------------------------------------------------------------------------


def test_purge_deletes_only_finished_rows_older_than_retention(storage: Storage, db_url):
    claim = storage.new_client()
    cid, session = claim.client_id, claim.session
    retention = 7 * DAY
    made: Dict[str, int] = {}
    for body in ("old delivered", "old ignored", "old expired", "old pending", "old pending ttl",
                 "new delivered", "new ignored", "new expired", "new pending"):
        ttl = 10 * DAY if body == "old pending ttl" else None
        made[body] = storage.enqueue(cid, body, WINDOW, ttl=ttl).message_id
    assert storage.mark_delivered(cid, [made["old delivered"], made["new delivered"]]) == 2
    query(db_url, "UPDATE messages SET status = 'ignored' WHERE body LIKE '%% ignored'")
    query(db_url, "UPDATE messages SET status = 'expired' WHERE body LIKE '%% expired'")
    set_created_ago(db_url, [i for b, i in made.items() if b.startswith("old")], retention + 3600)
    set_created_ago(db_url, [i for b, i in made.items() if b.startswith("new")], retention - 3600)
    assert storage.expire_and_purge(retention, 100) == (0, 3)
    assert statuses(db_url, cid) == {"old pending": "pending", "old pending ttl": "pending",
                                     "new delivered": "delivered", "new ignored": "ignored",
                                     "new expired": "expired", "new pending": "pending"}
    assert storage.expire_and_purge(retention, 100) == (0, 0)
    # Pending messages are never purged, however old; they are still delivered.
    set_created_ago(db_url, [made["old pending"]], 1000 * DAY)
    assert storage.expire_and_purge(retention, 100) == (0, 0)
    assert peek(storage, cid, session) == ["old pending", "old pending ttl", "new pending"]


def test_purge_in_batches(storage: Storage, db_url):
    cid = storage.new_client().client_id
    ids = [storage.enqueue(cid, f"m{i}", WINDOW).message_id for i in range(5)]
    keep = storage.enqueue(cid, "pending", WINDOW).message_id
    assert storage.mark_delivered(cid, ids) == 5
    set_created_ago(db_url, [*ids, keep], 2 * DAY)
    assert storage.expire_and_purge(DAY, 2) == (0, 2)
    assert message_count(db_url) == 4
    assert [storage.expire_and_purge(DAY, 2) for _ in range(3)] == [(0, 2), (0, 1), (0, 0)]
    assert query(db_url, "SELECT id, status FROM messages") == [(keep, "pending")]
    # A pending message long past both its expiry and the retention is expired, then purged.
    stale = storage.enqueue(cid, "stale", WINDOW, ttl=DAY).message_id
    set_created_ago(db_url, [stale], 9 * DAY)
    set_expires_ago(db_url, [stale], 8 * DAY)
    expired = deleted = 0
    for _ in range(2):
        e, d = storage.expire_and_purge(7 * DAY, 100)
        expired, deleted = expired + e, deleted + d
    assert (expired, deleted) == (1, 1)
    assert query(db_url, "SELECT id FROM messages") == [(keep,)]


def test_sqlite_flushes_every_durable_commit_after_a_transient_one(sqlite_url: str) -> None:
    """Only the delivery lease may skip SQLite's flush: after a ``durable=False``
    transaction the same pooled connection is back at FULL for the next one."""
    storage = open_storage(sqlite_url, pool_size=1, create=True)
    try:
        storage.create_schema()
        with storage.transaction() as tx:  # type: ignore[attr-defined]
            assert tx.scalar("PRAGMA synchronous") == 2  # FULL
        with storage.transaction(durable=False) as tx:  # type: ignore[attr-defined]
            assert tx.scalar("PRAGMA synchronous") == 1  # NORMAL
        with storage.transaction() as tx:  # type: ignore[attr-defined]
            assert tx.scalar("PRAGMA synchronous") == 2
        # And the real users of each: enqueue durable, a delivery's lease transient.
        client = storage.new_client().client_id
        storage.enqueue(client, "hello", 5.0)
        delivery = storage.deliver_pending(client, 1, lambda messages: len(messages), 10)
        assert delivery.delivered == 1
        with storage.transaction() as tx:  # type: ignore[attr-defined]
            assert tx.scalar("PRAGMA synchronous") == 2
    finally:
        storage.close()


# --- MariaDB: connections the server closed ---------------------------------------------------


@pytest.mark.mysql
def test_pooled_connections_the_server_killed_are_reopened(mysql_url):
    """A pooled connection the database closed (a restart, wait_timeout; here KILL) is
    replaced before it is used again, so no caller sees an error and nothing is lost or
    stored twice."""
    storage = open_storage(mysql_url, create=True, pool_size=4)
    try:
        storage.create_schema()
        cid = storage.new_client().client_id
        threads = [threading.Thread(target=storage.enqueue, args=(cid, f"warm-{n}", WINDOW))
                   for n in range(4)]
        for thread in threads:  # open several pooled connections
            thread.start()
        for thread in threads:
            thread.join(10)
        database = mysql_url.rsplit("/", 1)[1]
        admin = mysql_connect()  # the server at NIKI_TEST_MYSQL_URL, wherever it is
        try:
            with admin.cursor() as cursor:
                cursor.execute("SELECT id FROM information_schema.processlist WHERE db = %s", (database,))
                victims = [row[0] for row in cursor.fetchall()]
                assert victims, "the pool holds open connections"
                for victim in victims:
                    cursor.execute(f"KILL {int(victim)}")
        finally:
            admin.close()
        for n in range(8):  # more than the pool: every killed connection is borrowed again
            assert storage.enqueue(cid, f"after-{n}", WINDOW).message_id is not None
        bodies = [row[0] for row in query(mysql_url, "SELECT body FROM messages ORDER BY id")]
        assert sorted(bodies[:4]) == [f"warm-{n}" for n in range(4)]
        assert bodies[4:] == [f"after-{n}" for n in range(8)]
    finally:
        storage.close()
