"""The delivery lease (storage): one session delivers at a time, and it belongs to the session.

Run on SQLite and MariaDB.  The lease replaced row locks held across socket
writes: these tests pin down who may deliver when, and that claims, releases
and a departing server's clean-up cannot deadlock one another on MariaDB.
"""

from __future__ import annotations

import random
import threading
import time
from typing import List

from messaging_server.errors import StorageUnavailable
from messaging_server.storage import Storage
from messaging_server.storage.interface import LEASE_HANDOVER_S
from messaging_server.storage.records import ServerAddress
from tests.helpers import query, run_threads

WINDOW = 5.0


def client_that_left(storage: Storage, server_id: int) -> int:
    """A client made by a connection to ``server_id`` that has ended (a new client's
    connection holds the lease from the start, and gives it back as it ends)."""
    cid = storage.new_client(server_id).client_id
    storage.release_client(cid, 1, server_id)
    return cid


def queue(storage: Storage, client_id: int, count: int) -> List[int]:
    return [storage.enqueue(client_id, f"m{i}", WINDOW).message_id for i in range(count)]


def test_the_lease_belongs_to_its_session(storage: Storage) -> None:
    """The holder never finds its own lease busy (even after a mark failed and the lease
    stayed taken); a newer session waits for it; the holder's marks count before it goes."""
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    cid = client_that_left(storage, a)
    ids = queue(storage, cid, 3)
    old = storage.claim_client(cid, a).session
    first = storage.acquire_delivery(cid, old, a, 10)
    assert [m.id for m in first.messages] == ids and not first.busy
    # Its mark did not commit (say the database went away): the lease stays taken,
    # and the same session goes on delivering with it.
    again = storage.acquire_delivery(cid, old, a, 10, after_id=ids[1])
    assert [m.id for m in again.messages] == ids[2:] and not again.busy
    new = storage.claim_client(cid, a).session  # a takeover
    waiting = storage.acquire_delivery(cid, new, a, 10)
    assert waiting.busy and not waiting.messages and not waiting.taken_over
    assert storage.read_batch(cid, old, 10) is None  # the old session is taken over
    assert storage.acquire_delivery(cid, old, a, 10).taken_over
    # The old connection ends: its unmarked writes are marked as the lease goes.
    assert storage.release_client(cid, old, a, written=ids[:2]) == ServerAddress(a, "10.0.0.1", 8101)
    got = storage.acquire_delivery(cid, new, a, 10)
    assert [m.id for m in got.messages] == ids[2:] and not got.busy


def test_a_lease_is_given_back_with_the_last_mark(storage: Storage) -> None:
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    cid = client_that_left(storage, a)
    ids = queue(storage, cid, 2)
    old = storage.claim_client(cid, a).session
    assert len(storage.acquire_delivery(cid, old, a, 10).messages) == 2
    new = storage.claim_client(cid, a).session
    assert storage.acquire_delivery(cid, new, a, 10).busy
    assert storage.mark_delivered(cid, ids, release_session=old) == 2
    got = storage.acquire_delivery(cid, new, a, 10)
    assert not got.busy and got.messages == []


def test_the_lease_of_a_dead_server_is_free(storage: Storage, db_url: str) -> None:
    """A server that crashed while holding a lease (its heartbeat stale, or its row gone
    because it restarted at the same address) does not block the client's new session."""
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    b = storage.register_server("b", 1, "10.0.0.2", 8102, 2)
    cid = client_that_left(storage, a)
    queue(storage, cid, 2)
    old = storage.claim_client(cid, a).session
    assert storage.acquire_delivery(cid, old, a, 10).messages
    new = storage.claim_client(cid, b).session
    assert storage.acquire_delivery(cid, new, b, 10).busy
    stale = "(NOW(6) - INTERVAL 60 SECOND)" if db_url.startswith("mysql") else \
        "strftime('%Y-%m-%d %H:%M:%f', 'now', '-60 seconds')"
    query(db_url, f"UPDATE servers SET heartbeat_at = {stale} WHERE id = %s", (a,))
    assert len(storage.acquire_delivery(cid, new, b, 10).messages) == 2
    # And after a restart at the same wake-up address (the old row is forgotten).
    newer = storage.claim_client(cid, a).session
    storage.register_server("b again", 1, "10.0.0.2", 8102, 3)
    assert len(storage.acquire_delivery(cid, newer, a, 10).messages) == 2


def test_release_of_a_session_without_the_lease_changes_no_lease(storage: Storage) -> None:
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    cid = client_that_left(storage, a)
    queue(storage, cid, 1)
    holder = storage.claim_client(cid, a).session
    assert storage.acquire_delivery(cid, holder, a, 10).messages
    newer = storage.claim_client(cid, a).session
    storage.release_client(cid, newer, a)  # the newer connection ends first
    assert storage.acquire_delivery(cid, holder, a, 10).taken_over
    newest = storage.claim_client(cid, a).session
    assert storage.acquire_delivery(cid, newest, a, 10).busy  # still the holder's


def test_claims_releases_and_server_cleanups_never_deadlock(storage: Storage) -> None:
    """Claims and releases of many clients on two servers from several threads, while
    a server restarts at its address (its clients' ownership forgotten) now and then:
    none may fail with a deadlock (MariaDB 1213), and every lock order is the same."""
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    b = storage.register_server("b", 1, "10.0.0.2", 8102, 2)
    servers = [a, b]
    clients = [client_that_left(storage, a) for _ in range(30)]
    errors: List[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            cid = rng.choice(clients)
            server = rng.choice(servers)
            try:
                claim = storage.claim_client(cid, server)
                if claim is not None:
                    storage.acquire_delivery(cid, claim.session, server, 5)
                    storage.release_client(cid, claim.session, server)
            except StorageUnavailable as exc:
                with lock:
                    errors.append(str(exc))

    def restart() -> None:
        while not stop.is_set():
            try:
                new_id = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
                with lock:
                    servers[0] = new_id
            except StorageUnavailable as exc:
                with lock:
                    errors.append(str(exc))
            stop.wait(0.05)

    deadline = time.monotonic() + 3.0

    def timer() -> None:
        stop.wait(max(0.0, deadline - time.monotonic()))
        stop.set()

    run_threads([timer, restart] + [lambda s=s: churn(s) for s in range(4)], timeout=60)
    assert not errors, f"{len(errors)} failure(s), first: {errors[0]}"


def test_a_new_client_holds_its_lease_from_the_start(storage: Storage) -> None:
    """Nobody else can have sent a client made just now anything: its first session has
    the lease without asking (a message carried by a wake-up can be written at once), a
    second session waits for it, and gets it when the first ends."""
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    claim = storage.new_client(a)
    assert claim.holds_lease
    ids = queue(storage, claim.client_id, 2)
    assert [m.id for m in storage.acquire_delivery(claim.client_id, 1, a, 10).messages] == ids
    new = storage.claim_client(claim.client_id, a).session
    assert storage.acquire_delivery(claim.client_id, new, a, 10).busy
    storage.release_client(claim.client_id, 1, a, written=ids[:1])
    assert [m.id for m in storage.acquire_delivery(claim.client_id, new, a, 10).messages] == ids[1:]


def test_reconnecting_again_and_again_does_not_restart_the_handover_wait(storage: Storage) -> None:
    """The lease's holder hangs (its server is alive but never gives it back); the client
    reconnects every second.  The wait counts from the first newer identification, not
    from the latest: the lease is free LEASE_HANDOVER_S after that one, not never (until
    the holder's heartbeat goes stale)."""
    a = storage.register_server("a", 1, "10.0.0.1", 8101, 1)
    cid = client_that_left(storage, a)
    queue(storage, cid, 2)
    old = storage.claim_client(cid, a).session
    assert storage.acquire_delivery(cid, old, a, 10).messages  # and then it hangs
    first = time.monotonic()
    pace = threading.Event()
    taken_after = None
    while time.monotonic() - first < LEASE_HANDOVER_S + 3:
        session = storage.claim_client(cid, a).session  # the client connects again
        if not storage.acquire_delivery(cid, session, a, 10).busy:
            taken_after = time.monotonic() - first
            break
        pace.wait(1.0)  # the client's reconnect interval
    assert taken_after is not None, "the lease stayed held while the client kept reconnecting"
    assert LEASE_HANDOVER_S - 0.5 < taken_after < LEASE_HANDOVER_S + 1.5
