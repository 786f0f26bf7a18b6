"""enqueue_many on SQLite and MariaDB: one result per item, one transaction, one wake-up per server.

Storage level (results and the rows behind them), atomicity (a failing INSERT,
an unreachable database), wake-ups counted datagram by datagram, validation,
concurrency, and end to end over TCP against a real server process.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

from messaging_server import Enqueuer, enqueue_many
from messaging_server.config.settings import DUPLICATE_WINDOW_S, MAX_BODY_BYTES
from messaging_server.errors import (
    BodyRejected,
    NikiError,
    QueueFull,
    StorageFault,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.producer.enqueuer import MAX_BATCH, MAX_TTL_S, MIN_TTL_S
from messaging_server.protocol.wakeups import MAX_DATAGRAM, encode
from messaging_server.storage import Storage
from messaging_server.storage.interface import body_hash
from messaging_server.storage.records import Queued
from tests.helpers import (
    DatagramCounter,
    RawClient,
    ServerProcess,
    insert_message,
    numeric_id,
    query,
    run_threads,
    seconds_ago_sql,
    wait_until,
)

# `messaging_server.producer.enqueuer` the attribute is the function; this is the module.
enqueue_module = importlib.import_module("messaging_server.producer.enqueuer")

WINDOW = DUPLICATE_WINDOW_S
# 1-, 2-, 3- and 4-byte UTF-8 in one body: a driver or collation that mangles any of them shows.
WIDE = "wide \u00e9 \u4e2d \U0001f600"

Row = Tuple[int, int, str, str]  # id, client_id, body, status


# --- helpers -----------------------------------------------------------------------------------------


def rows(db_url: str) -> List[Row]:
    """Every message row, in id order."""
    return [(int(i), int(c), str(b), str(s)) for i, c, b, s in
            query(db_url, "SELECT id, client_id, body, status FROM messages ORDER BY id")]


def rows_of(db_url: str, client_id: int) -> List[Tuple[str, str]]:
    """(body, status) of one client's messages, in id order: the order they will be delivered in."""
    return [(b, s) for _, c, b, s in rows(db_url) if c == client_id]






def ttl_of(db_url: str) -> List[Optional[float]]:
    """expires_at - created_at in seconds (None: never expires) of every message, in id order."""
    if db_url.startswith("sqlite:"):
        span = "(julianday(expires_at) - julianday(created_at)) * 86400"
    else:
        span = "TIMESTAMPDIFF(MICROSECOND, created_at, expires_at) / 1000000"
    found = query(db_url, f"SELECT {span} FROM messages ORDER BY id")
    return [None if row[0] is None else round(float(row[0]), 2) for row in found]


def kinds(results: Sequence[object]) -> List[object]:
    """Results made comparable: a Queued becomes "id" or "dup", an error its class,
    True / False stay."""
    out: List[object] = []
    for r in results:
        if isinstance(r, Queued):
            out.append("dup" if r.message_id is None else "id")
        elif isinstance(r, BaseException):
            out.append(type(r))
        else:
            out.append(r)
    return out


def add_poison_trigger(db_url: str) -> None:
    """Make the database itself refuse any row whose body is 'poison' (a real INSERT failure)."""
    if db_url.startswith("sqlite:"):
        query(db_url, "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.body = 'poison' "
              "BEGIN SELECT RAISE(ABORT, 'poisoned body'); END")
    else:
        query(db_url, "CREATE TRIGGER poison BEFORE INSERT ON messages FOR EACH ROW "
              "IF NEW.body = 'poison' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned body'; "
              "END IF")




@pytest.fixture
def counters() -> Iterator[Callable[[], DatagramCounter]]:
    """``counters()``: a new raw UDP socket that keeps every datagram apart; closed afterwards."""
    made: List[DatagramCounter] = []

    def make() -> DatagramCounter:
        made.append(DatagramCounter())
        return made[-1]

    yield make
    for c in made:
        c.close()


def fake_server(storage: Storage, counter: DatagramCounter) -> int:
    """A server row whose wake-up address is ``counter``: routed wake-ups for its clients land there."""
    return storage.register_server("fake", 1, "127.0.0.1", counter.port, 1)


def online_client(storage: Storage, server_id: int) -> int:
    """A client identified on ``server_id`` (new, then claimed, as a server's handshake does)."""
    cid = storage.new_client().client_id
    claim = storage.claim_client(cid, server_id)
    assert claim is not None
    return cid


def woken_once(counter: DatagramCounter, client_ids: Sequence[int]) -> None:
    """``counter`` got exactly one datagram, naming exactly ``client_ids``, each once."""
    got = counter.drain()
    assert len(got) == 1, got
    assert sorted(got[0]) == sorted(set(client_ids)), got


# --- storage level -----------------------------------------------------------------------------------


def test_mixed_batch_results_and_rows(storage: Storage, db_url: str) -> None:
    """Each item gets what a single enqueue would have given it, and the rows say the same."""
    a, b, c = (storage.new_client().client_id for _ in range(3))
    unknown = c + 1000
    assert storage.enqueue(a, "recent", WINDOW).message_id is not None
    insert_message(db_url, a, "old", "delivered", seconds_ago=WINDOW + 5)  # outside the window
    insert_message(db_url, a, "expired", "expired", seconds_ago=0.5)  # never sent: no duplicate
    for body in ("c0", "c0b", "c0c"):  # c starts with 3 pending of at most 5
        assert storage.enqueue(c, body, WINDOW).message_id is not None
    before = rows(db_url)

    items = [(a, "recent"), (a, WIDE), (unknown, "x"), (b, "same"), (c, "c1"), (b, "same"),
             (a, "same"), (a, "old"), (a, "expired"), (c, "c2"), (c, "c3"), (b, "after"), (c, "c4")]
    results = storage.enqueue_many(items, WINDOW, max_pending=5)

    assert kinds(results) == ["dup", "id", UnknownClient, "id", "id", "dup",
                              "id", "id", "id", "id", QueueFull, "id", QueueFull]
    assert all(r.owner is None for r in results if isinstance(r, Queued))  # nobody online
    new = rows(db_url)[len(before):]
    assert rows(db_url)[:len(before)] == before  # history untouched
    by_client = {cid: [(body, status) for _, cc, body, status in new if cc == cid] for cid in (a, b, c)}
    assert by_client == {
        a: [("recent", "ignored"), (WIDE, "pending"), ("same", "pending"), ("old", "pending"),
            ("expired", "pending")],
        b: [("same", "pending"), ("same", "ignored"), ("after", "pending")],
        c: [("c1", "pending"), ("c2", "pending")],
    }
    assert not [r for r in new if r[1] not in (a, b, c)]  # nothing for the unknown client
    # The ids handed back are the rows' ids, item by item.
    by_id = {r[0]: r for r in new}
    for (cid, body), result in zip(items, results):
        if isinstance(result, Queued) and result.message_id is not None:
            assert by_id[result.message_id] == (result.message_id, cid, body, "pending")
    assert sorted(r.message_id for r in results if isinstance(r, Queued) and r.message_id) == \
        [r[0] for r in new if r[3] == "pending"]
    # Byte-exact: the stored hash is of the UTF-8 the caller gave.
    hashes = query(db_url, "SELECT body, body_hash FROM messages WHERE client_id = %s", (a,))
    assert all(bytes(h) == body_hash(str(body)) for body, h in hashes)
    assert storage.pending_count(a) == storage.pending_count(c) == 5
    # The errors are values, each naming its client; none was raised.
    assert str(unknown) in str(results[2]) and str(c) in str(results[10])


def test_ttl_applies_to_every_row(storage: Storage, db_url: str) -> None:
    """One ttl for the whole call, on queued and ignored rows alike; none without it."""
    a, b = (storage.new_client().client_id for _ in range(2))
    first = storage.enqueue_many([(a, "x"), (b, "y"), (a, "x"), (b, WIDE)], WINDOW, ttl=60)
    assert kinds(first) == ["id", "id", "dup", "id"]
    second = storage.enqueue_many([(a, "z"), (b, "w")], WINDOW)
    assert kinds(second) == ["id", "id"]
    assert ttl_of(db_url) == [60.0, 60.0, 60.0, 60.0, None, None]


def test_an_item_may_carry_its_own_ttl(storage: Storage, db_url: str) -> None:
    """(client, body, ttl) items: each row gets its own expiry in the one INSERT; an item's
    None, or no third element, takes the call's ttl."""
    a, b = (storage.new_client().client_id for _ in range(2))
    results = storage.enqueue_many([(a, "p", 30), (b, "q"), (a, "r", None), (b, "s", 90.5)],
                                   WINDOW, ttl=60)
    assert kinds(results) == ["id", "id", "id", "id"]
    assert ttl_of(db_url) == [30.0, 60.0, 60.0, 90.5]
    untimed = storage.enqueue_many([(a, "t", None), (b, "u", 15)], WINDOW)
    assert kinds(untimed) == ["id", "id"]
    assert ttl_of(db_url)[4:] == [None, 15.0]


def test_storage_reports_live_owner_only_when_asked(storage: Storage, db_url: str,
                                                   counters: Callable[[], DatagramCounter]) -> None:
    """Routed mode needs each queued item's live owner; broadcast mode skips the lookup."""
    server = fake_server(storage, counters())
    online = online_client(storage, server)
    offline = storage.new_client().client_id
    found = storage.enqueue_many([(online, "1"), (offline, "1"), (online, "1")], WINDOW)
    assert [r.owner.server_id if isinstance(r, Queued) and r.owner else None for r in found] == \
        [server, None, None]  # the duplicate wakes nobody
    skipped = storage.enqueue_many([(online, "2")], WINDOW, find_owner=False)
    assert kinds(skipped) == ["id"] and isinstance(skipped[0], Queued) and skipped[0].owner is None


def test_empty_batch_is_a_no_op(storage: Storage, db_url: str,
                                counters: Callable[[], DatagramCounter]) -> None:
    """No items: no rows, no datagram, an empty result (also from an empty generator)."""
    counter = counters()
    assert storage.enqueue_many([], WINDOW) == []
    with Enqueuer(db_url, counter.peers) as enqueuer:
        assert enqueuer.enqueue_many([]) == []
        assert enqueuer.enqueue_many(iter(())) == []
        assert enqueuer.datagrams_sent == 0
    assert rows(db_url) == []
    assert counter.drain() == []


# --- atomicity -------------------------------------------------------------------------------------------


def test_failed_insert_stores_nothing_and_wakes_nobody(storage: Storage, db_url: str,
                                                        counters: Callable[[], DatagramCounter]) -> None:
    """The database refuses the last row of a batch: the earlier rows, already written by
    the same statement, are rolled back, nobody is woken, and the pool still works."""
    owner = counters()
    a = online_client(storage, fake_server(storage, owner))
    b = storage.new_client().client_id
    assert storage.enqueue(a, "before", WINDOW).message_id is not None
    add_poison_trigger(db_url)
    before = rows(db_url)
    batch = [(a, "x1"), (b, "y1"), (a, "x2")]
    with Enqueuer(db_url, "") as enqueuer:
        # A statement the database refuses is a fault (a bug), not "unavailable".
        with pytest.raises(StorageFault, match="poisoned body"):
            enqueuer.enqueue_many([*batch, (b, "poison")])
        with pytest.raises(StorageFault):
            storage.enqueue_many([(a, "poison"), *batch], WINDOW)
        assert rows(db_url) == before
        assert owner.drain() == []
        assert enqueuer.datagrams_sent == 0
        # Not duplicates now: none of them was committed before.  Same pools, so no
        # connection was left inside the failed transaction.
        assert enqueuer.enqueue_many(batch) == [True, True, True]
        assert enqueuer.datagrams_sent == 1
    woken_once(owner, [a])
    assert rows_of(db_url, a) == [("before", "pending"), ("x1", "pending"), ("x2", "pending")]
    assert rows_of(db_url, b) == [("y1", "pending")]


@pytest.mark.parametrize("where", ["mysql-port-1", "sqlite-missing-dir"])
def test_unreachable_database_raises_and_wakes_nobody(tmp_path, counters: Callable[[], DatagramCounter],
                                                      where: str) -> None:
    """StorageUnavailable for the whole call, even for broadcast peers, and no file made."""
    counter = counters()
    url = ("mysql://root@127.0.0.1:1/niki_nowhere" if where == "mysql-port-1"
           else f"sqlite:///{tmp_path / 'no' / 'such' / 'niki.sqlite3'}")
    with Enqueuer(url, counter.peers) as enqueuer:
        with pytest.raises(StorageUnavailable):
            enqueuer.enqueue_many([(1, "a"), (2, "b")])
        assert enqueuer.datagrams_sent == 0
    assert counter.drain() == []
    assert not (tmp_path / "no").exists()


# --- wake-ups ------------------------------------------------------------------------------------------


def test_routed_one_datagram_per_server_per_call(storage: Storage, db_url: str,
                                                 counters: Callable[[], DatagramCounter]) -> None:
    """Each live owner gets one datagram naming all its clients that got a message; offline
    clients, clients of a dead server and duplicates wake nobody."""
    one, two, dead = counters(), counters(), counters()
    s1, s2, s3 = (fake_server(storage, c) for c in (one, two, dead))
    a1, a2 = online_client(storage, s1), online_client(storage, s1)
    b1 = online_client(storage, s2)
    z = online_client(storage, s3)
    query(db_url, f"UPDATE servers SET heartbeat_at = {seconds_ago_sql(db_url, 120)} WHERE id = %s", (s3,))
    off = storage.new_client().client_id
    with Enqueuer(db_url, "") as enqueuer:
        assert enqueuer.mode == "routed"
        items = [(a2, "1"), (off, "1"), (a1, "1"), (b1, "1"), (a2, "2"), (z, "1"), (a1, "2"), (b1, "2")]
        assert enqueuer.enqueue_many(items) == [True] * len(items)
        woken_once(one, [a1, a2])
        woken_once(two, [b1])
        assert dead.drain() == []
        assert enqueuer.datagrams_sent == 2
        # Only b1 gets something new: one is not woken for a1's duplicates.
        assert enqueuer.enqueue_many([(a1, "1"), (b1, "3"), (a1, "2"), (off, "2")]) == \
            [False, True, False, True]
        assert one.drain() == []
        woken_once(two, [b1])
        assert enqueuer.datagrams_sent == 3
        # Offline only: no datagram at all.
        assert enqueuer.enqueue_many([(off, "3"), (z, "2")]) == [True, True]
        assert enqueuer.datagrams_sent == 3
    assert one.drain() == two.drain() == dead.drain() == []
    assert storage.pending_count(off) == 3 and storage.pending_count(z) == 2


def test_routed_many_clients_fill_several_datagrams(storage: Storage, db_url: str,
                                                    counters: Callable[[], DatagramCounter]) -> None:
    """More ids than one datagram holds: several datagrams, none oversized, each id once, all
    counted.  (Bodies too long to travel in a wake-up, so that the clients are named.)"""
    owner = counters()
    server = fake_server(storage, owner)
    now = seconds_ago_sql(db_url, 0)
    query(db_url, "INSERT INTO clients (session, owner_server_id, created_at) VALUES "
          + ", ".join([f"(1, %s, {now})"] * 400), [server] * 400)
    clients = [int(r[0]) for r in query(db_url, "SELECT id FROM clients ORDER BY id")]
    assert len(encode(clients)) >= 2  # the point of the test
    with Enqueuer(db_url, "") as enqueuer:
        assert enqueuer.enqueue_many([(cid, "w" * MAX_DATAGRAM) for cid in reversed(clients)]) == [True] * 400
        got = owner.drain()
        assert enqueuer.datagrams_sent == len(got) == len(encode(clients))
    assert all(len(datagram) <= MAX_DATAGRAM for datagram in encode(clients))
    flat = [cid for datagram in got for cid in datagram]
    assert sorted(flat) == clients  # each exactly once


def test_routed_batch_carries_each_clients_only_message(storage: Storage, db_url: str,
                                                       counters: Callable[[], DatagramCounter]) -> None:
    """Routed mode: a client's only message of a batch travels in its own wake-up (so the
    owner need not read the database); a client with two is named, once."""
    owner = counters()
    server = fake_server(storage, owner)
    one, other, two = (storage.new_client(server).client_id for _ in range(3))
    with Enqueuer(db_url, "") as enqueuer:
        assert enqueuer.enqueue_many([(one, "a"), (two, "b"), (other, "c"), (two, "d")]) == [True] * 4
        raw = owner.raw()
        assert enqueuer.datagrams_sent == len(raw) == 3
    carried = sorted(d.split(b" ", 3)[2] for d in raw if d.startswith(b"NIKI2 "))
    assert carried == sorted(str(c).encode() for c in (one, other))
    assert [d for d in raw if d.startswith(b"NIKI1 ")] == [f"NIKI1 {two}".encode()]


def test_broadcast_wakes_every_peer_once_per_call(storage: Storage, db_url: str,
                                                  counters: Callable[[], DatagramCounter]) -> None:
    """Peers given: each peer gets one datagram naming every client that got a message,
    online or not; refused and duplicate items name nobody."""
    first, second = counters(), counters()
    a, b, refused, duplicate = (storage.new_client().client_id for _ in range(4))
    assert storage.enqueue(duplicate, "again", WINDOW).message_id is not None
    with Enqueuer(db_url, f"{first.peers},{second.peers}") as enqueuer:
        assert enqueuer.mode == "broadcast"
        results = enqueuer.enqueue_many([(b, "1"), (refused, "a\nb"), (a, "1"), (duplicate, "again"),
                                         (b, "2")])
        assert kinds(results) == [True, BodyRejected, True, False, True]
        woken_once(first, [a, b])
        woken_once(second, [a, b])
        assert enqueuer.datagrams_sent == 2
        # Nothing queued: nobody woken.
        assert kinds(enqueuer.enqueue_many([(a, "1"), (refused, "")])) == [False, BodyRejected]
        assert first.drain() == second.drain() == []
        assert enqueuer.datagrams_sent == 2


def test_module_level_enqueue_many(storage: Storage, db_url: str,
                                   counters: Callable[[], DatagramCounter]) -> None:
    """The shared-enqueuer function takes db= and peers= like enqueue() does."""
    counter = counters()
    a = storage.new_client().client_id
    try:
        assert enqueue_many([(a, "m1"), (str(a), "m1"), (a, "m2")], db=db_url, peers=counter.peers,
                            ttl=30) == [True, False, True]
    finally:
        enqueue_module._close_shared()
    woken_once(counter, [a])
    assert rows_of(db_url, a) == [("m1", "pending"), ("m1", "ignored"), ("m2", "pending")]
    assert ttl_of(db_url) == [30.0, 30.0, 30.0]


# --- validation ----------------------------------------------------------------------------------------


def test_more_than_max_batch_is_a_value_error(storage: Storage, db_url: str,
                                              counters: Callable[[], DatagramCounter]) -> None:
    """MAX_BATCH + 1 items: a plain ValueError (not a per-item BodyRejected), nothing stored."""
    counter = counters()
    a = storage.new_client().client_id
    items = [(a, f"m{i}") for i in range(MAX_BATCH + 1)]
    with Enqueuer(db_url, counter.peers) as enqueuer:
        for given in (items, iter(items)):
            with pytest.raises(ValueError, match=str(MAX_BATCH)) as info:
                enqueuer.enqueue_many(given)
            assert not isinstance(info.value, NikiError)
        assert enqueuer.datagrams_sent == 0
    assert rows(db_url) == []
    assert counter.drain() == []


def test_full_batch_of_largest_bodies(storage: Storage, db_url: str) -> None:
    """Exactly MAX_BATCH items of MAX_BODY_BYTES of 4-byte UTF-8 each: one statement of
    over 4 MB, stored byte-exact and in order."""
    clients = [storage.new_client().client_id for _ in range(10)]
    emoji = "\U0001f600" * ((MAX_BODY_BYTES - 4) // 4)
    items = [(clients[i % 10], f"{i:04d}{emoji}") for i in range(MAX_BATCH)]
    assert all(len(body.encode("utf-8")) == MAX_BODY_BYTES for _, body in items)
    with Enqueuer(db_url, "") as enqueuer:
        assert enqueuer.enqueue_many(items) == [True] * MAX_BATCH
    stored = rows(db_url)
    for cid in clients:
        assert [body for _, c, body, _ in stored if c == cid] == [body for c, body in items if c == cid]
    assert {status for *_, status in stored} == {"pending"}


def test_bad_ttl_refuses_the_whole_call(storage: Storage, db_url: str,
                                        counters: Callable[[], DatagramCounter]) -> None:
    """A ttl is for the whole call: a bad one refuses all items, valid ones included."""
    counter = counters()
    a = storage.new_client().client_id
    with Enqueuer(db_url, counter.peers) as enqueuer:
        for ttl in (0, -1, 1e-300, MIN_TTL_S / 2, float("nan"), float("inf"), True, "60", MAX_TTL_S + 1):
            with pytest.raises(BodyRejected, match="ttl"):
                enqueuer.enqueue_many([(a, "fine"), (a, "also fine")], ttl=ttl)  # type: ignore[arg-type]
        assert enqueuer.datagrams_sent == 0
    assert rows(db_url) == []
    assert counter.drain() == []


def test_bad_items_are_refused_alone(storage: Storage, db_url: str) -> None:
    """A bad body or id is that item's result; the rest of the call is stored."""
    a = storage.new_client().client_id
    unknown = a + 1000
    items: List[Tuple[Union[int, str], Union[str, bytes]]] = [
        (a, "ok1"), (a, "x" * (MAX_BODY_BYTES + 1)), (a, "a\nb"), (a, "line\r"), (a, ""), (a, b"\xff"),
        (0, "bad id"), ("nope", "bad id"), (unknown, "nobody"), (f"{a}.AbCdEfGhIjKlMnOpQrStUvWx", "ok2"),
        (str(a), "ok1"), (a, "ok3 \U0001f600".encode()), (a, "y" * MAX_BODY_BYTES),
    ]
    with Enqueuer(db_url, "") as enqueuer:
        results = enqueuer.enqueue_many(items)
    assert kinds(results) == [True, BodyRejected, BodyRejected, BodyRejected, BodyRejected, BodyRejected,
                              UnknownClient, UnknownClient, UnknownClient, True,
                              False, True, True]
    assert rows_of(db_url, a) == [("ok1", "pending"), ("ok2", "pending"), ("ok1", "ignored"),
                                  ("ok3 \U0001f600", "pending"), ("y" * MAX_BODY_BYTES, "pending")]
    assert [r for r in rows(db_url) if r[1] != a] == []


def test_malformed_items_are_refused_alone(storage: Storage, db_url: str) -> None:
    """An item of the wrong shape, or with a bad ttl of its own, is that item's BodyRejected or
    UnknownClient, not an IndexError or TypeError for the whole call."""
    a = storage.new_client().client_id
    items = [(a, "ok1"), (a,), (), a, "ab", None, {"client_id": a, "body": "x"}, (a, "x", 60, "extra"),
             (a, 5), (a, None), (1.5, "float id"), (None, "no id"), (a, "tiny", 1e-300), (a, "neg", -1),
             (a, "str ttl", "60"), [a, "ok2", 60], (a, "ok3", None)]
    with Enqueuer(db_url, "") as enqueuer:
        results = enqueuer.enqueue_many(items)  # type: ignore[arg-type]
    assert kinds(results) == [True] + [BodyRejected] * 9 + [UnknownClient] * 2 + [BodyRejected] * 3 \
        + [True, True]
    assert "(client_id, body)" in str(results[1]) and "ttl" in str(results[12])
    assert rows_of(db_url, a) == [("ok1", "pending"), ("ok2", "pending"), ("ok3", "pending")]


# --- concurrency ---------------------------------------------------------------------------------------


def test_concurrent_batches_and_single_enqueues(storage: Storage, db_url: str) -> None:
    """Two threads queue batches for the same clients in opposite orders while a third queues
    one by one: no deadlock, nothing lost, each thread's order kept per client, and every id
    handed back is its own row's (consecutive ids of a multi-row INSERT, under contention)."""
    clients = [storage.new_client().client_id for _ in range(6)]
    rounds, per_client = 8, 4
    returned: List[Tuple[int, int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(3)

    def batches(name: str, order: List[int]) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(10)
            for r in range(rounds):
                items = [(cid, f"{name} {r:02d} {i}") for cid in order for i in range(per_client)]
                results = storage.enqueue_many(items, WINDOW, max_pending=10_000)
                assert kinds(results) == ["id"] * len(items), results
                with lock:
                    returned.extend((q.message_id, cid, body) for (cid, body), q in zip(items, results)
                                    if isinstance(q, Queued) and q.message_id is not None)
        return run

    def singles() -> None:
        with Enqueuer(db_url, "") as enqueuer:
            barrier.wait(10)
            for r in range(rounds):
                for cid in clients[3:] + clients[:3]:
                    assert enqueuer.enqueue(cid, f"S {r:02d}") is True

    run_threads([batches("A", clients), batches("B", clients[::-1]), singles])

    stored = rows(db_url)
    assert len(stored) == len(clients) * rounds * (2 * per_client + 1)
    assert {status for *_, status in stored} == {"pending"}
    by_id = {mid: (cid, body) for mid, cid, body, _ in stored}
    assert len(returned) == 2 * len(clients) * rounds * per_client
    assert all(by_id[mid] == (cid, body) for mid, cid, body in returned)
    for cid in clients:
        bodies = [body for _, c, body, _ in stored if c == cid]
        for name, expected in (("A", [f"A {r:02d} {i}" for r in range(rounds) for i in range(per_client)]),
                               ("B", [f"B {r:02d} {i}" for r in range(rounds) for i in range(per_client)]),
                               ("S", [f"S {r:02d}" for r in range(rounds)])):
            assert [b for b in bodies if b.startswith(f"{name} ")] == expected, (cid, name)


def test_concurrent_batches_for_one_client_respect_limits(storage: Storage, db_url: str) -> None:
    """Batches for one client are serialised: max_pending and the duplicate rule hold across
    threads exactly as if the calls ran one after another (several rounds, to meet the race)."""
    threads, per_thread, limit, rounds = 4, 30, 100, 4
    for _ in range(rounds):
        cid = storage.new_client().client_id
        results: Dict[int, List[object]] = {}
        barrier = threading.Barrier(threads)

        def work(t: int, cid: int = cid, results: Dict[int, List[object]] = results,
                 barrier: threading.Barrier = barrier) -> Callable[[], None]:
            def run() -> None:
                items = [(cid, "shared")] + [(cid, f"t{t} {i}") for i in range(per_thread - 1)]
                barrier.wait(10)
                results[t] = kinds(storage.enqueue_many(items, WINDOW, max_pending=limit))
            return run

        run_threads([work(t) for t in range(threads)])
        flat = [k for t in range(threads) for k in results[t]]
        # In whatever order: one "shared" stored, the other three duplicates (the queue is
        # never full when a batch starts: 30 + 29 + 29 < 100), then 100 - 30 - 29 - 29 = 12
        # more of the last batch, and the rest of it QueueFull.
        assert flat.count("id") == limit, flat
        assert flat.count("dup") == threads - 1, flat
        assert flat.count(QueueFull) == threads * per_thread - limit - (threads - 1), flat
        assert storage.pending_count(cid) == limit
        assert [s for b, s in rows_of(db_url, cid) if b == "shared"] == ["pending"] + ["ignored"] * 3


# --- end to end ------------------------------------------------------------------------------------------


def identify(client: RawClient) -> str:
    """A new client's handshake; its credential."""
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line("NONE")
    line = client.read_line() or ""
    assert line.startswith("SET_CLIENT_ID: "), line
    return line[len("SET_CLIENT_ID: "):]


def test_end_to_end_two_full_batches(db_url: str) -> None:
    """10 connected clients, 2,000 messages in two calls of 1,000: each client gets its 200
    exactly once and in order, woken by one datagram per call (the sweep, once a minute here,
    cannot be what delivers them), and nothing stays pending."""
    count, per_call = 10, MAX_BATCH
    with ServerProcess(db_url, "--sweep-interval", "60") as server:
        run_end_to_end(server, count, per_call)


def run_end_to_end(server: ServerProcess, count: int, per_call: int) -> None:
    clients = [server.connect() for _ in range(count)]
    try:
        creds = [identify(c) for c in clients]
        # Full credentials for some, bare numeric ids for the others: both name the client.
        targets: List[Union[int, str]] = [cred if n % 2 else numeric_id(cred) for n, cred in enumerate(creds)]

        def body(n: int, k: int) -> str:
            return f"c{n} m{k:03d} \U0001f600"

        with Enqueuer(server.db_url, "") as enqueuer:
            for call in range(2):
                items = [(targets[i % count], body(i % count, i // count))
                         for i in range(call * per_call, (call + 1) * per_call)]
                assert enqueuer.enqueue_many(items) == [True] * per_call
            assert enqueuer.datagrams_sent == 2  # one server, one datagram per call
            deadline = time.monotonic() + 10
            for n, client in enumerate(clients):
                got = [client.read_line(max(0.0, deadline - time.monotonic())) for _ in range(200)]
                assert got == [f"MESSAGE: {body(n, k)}" for k in range(200)], n
            # Nothing more was on its way: a fresh marker is each client's very next line.
            assert enqueuer.enqueue_many([(t, "marker") for t in targets]) == [True] * count
            for client in clients:
                assert client.read_line(max(0.0, deadline - time.monotonic())) == "MESSAGE: marker"
        wait_until(lambda: query(server.db_url, "SELECT status, COUNT(*) FROM messages GROUP BY status")
                   == [("delivered", 2 * per_call + count)], 10, "every message marked delivered")
    finally:
        for c in clients:
            c.close()


def test_duplicate_on_a_full_queue_is_refused_as_by_single_enqueue(storage: Storage) -> None:
    """The batch checks in enqueue()'s order: a full queue wins over the duplicate rule."""
    client = storage.new_client().client_id
    storage.enqueue(client, "x", DUPLICATE_WINDOW_S, max_pending=2)
    storage.enqueue(client, "y", DUPLICATE_WINDOW_S, max_pending=2)
    with pytest.raises(QueueFull):
        storage.enqueue(client, "x", DUPLICATE_WINDOW_S, max_pending=2)
    [result] = storage.enqueue_many([(client, "x")], DUPLICATE_WINDOW_S, max_pending=2)
    assert isinstance(result, QueueFull)
