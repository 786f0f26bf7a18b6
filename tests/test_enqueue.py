"""The application-side API: client_id_of, check_body, enqueue() and Enqueuer, on both databases."""

from __future__ import annotations

import importlib
import sqlite3
import threading
from typing import Iterator, List, Optional, Tuple

import pytest

import messaging_server
from messaging_server import Enqueuer, enqueue
from messaging_server.config import settings
from messaging_server.config.settings import MAX_BODY_BYTES
from messaging_server.errors import (
    BodyRejected,
    ConfigurationError,
    NikiError,
    QueueFull,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.producer.enqueuer import check_body, client_id_of
from messaging_server.protocol.lines import MAX_CLIENT_ID
from messaging_server.storage import Storage, open_storage
from messaging_server.wakeup import WakeupListener
from tests.helpers import DatagramCounter, query

# The module itself (`messaging_server.enqueue` is the function).
enqueue_module = importlib.import_module("messaging_server.producer.enqueuer")




def short(value: object) -> str:
    """A readable test id for a long parameter."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...{len(text)}chars"


def rows_of(db_url: str, client_id: int) -> List[Tuple[object, ...]]:
    return query(db_url, "SELECT body, status FROM messages WHERE client_id = %s ORDER BY id", (client_id,))


@pytest.fixture(autouse=True)
def close_shared_enqueuers() -> Iterator[None]:
    """enqueue() keeps one Enqueuer per (db, peers); close them so no pool outlives its test."""
    yield
    enqueue_module._close_shared()


@pytest.fixture
def peers(listener: WakeupListener) -> List[Tuple[str, int]]:
    return [("127.0.0.1", listener.port)]


@pytest.fixture
def counter() -> Iterator[DatagramCounter]:
    c = DatagramCounter()
    yield c
    c.sock.close()


# --- client_id_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [(5, 5), ("5", 5), (" 5 ", 5), ("5\n", 5), ("0005", 5), (3000, 3000),
     (MAX_CLIENT_ID, MAX_CLIENT_ID), (str(MAX_CLIENT_ID), MAX_CLIENT_ID),
     # The credential SET_CLIENT_ID: handed out: only its id counts on the trusted side.
     ("5.AbCdEfGhIjKlMnOpQrStUvWx", 5), (" 5.AbCdEfGhIjKlMnOpQrStUvWx\n", 5), ("5.phone", 5)],
)
def test_client_id_of(given, expected):
    assert client_id_of(given) == expected


@pytest.mark.parametrize(
    "given",
    [0, -1, True, False, None, 5.0, b"5", [5], "", " ", "abc", "0", "-5", "+5", "5 6", "5x", ".5",
     "5.", "5.a b", "5.a.b", ".abc", "5." + "a" * 200, "0.abc", "x.abc",
     "\u0665", pytest.param(str(MAX_CLIENT_ID + 1), id="str-2**63"),
     pytest.param(MAX_CLIENT_ID + 1, id="int-2**63")],
)
def test_client_id_of_rejects(given):
    with pytest.raises(UnknownClient):
        client_id_of(given)


# --- check_body ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["x", "hello world", " padded ", "tab\there", "a" * MAX_BODY_BYTES, "\u00e9" * (MAX_BODY_BYTES // 2),
     "\U0001f600" * (MAX_BODY_BYTES // 4), "\u20ac" * 1365 + "a", "nul\x00inside", "\u2028"],
    ids=short,
)
def test_check_body_accepts(body):
    assert check_body(body) == body


@pytest.mark.parametrize(
    "body",
    ["", "\n", "\r", "a\nb", "a\rb", "line\r\n", "a" * (MAX_BODY_BYTES + 1),
     "\u00e9" * (MAX_BODY_BYTES // 2) + "a",  # 4097 bytes in 2049 characters
     "\U0001f600" * (MAX_BODY_BYTES // 4) + "a",  # 4097 bytes in 1025 characters
     "\u20ac" * 1366,  # 4098 bytes
     "lone \ud800 surrogate", "\udfff"],
    ids=short,
)
def test_check_body_rejects(body):
    with pytest.raises(BodyRejected):
        check_body(body)


def test_check_body_counts_bytes_not_characters():
    assert len("\u00e9" * 2049) < MAX_BODY_BYTES
    with pytest.raises(BodyRejected, match="4098 bytes"):
        check_body("\u00e9" * 2049)


def test_check_body_bytes():
    assert check_body(b"hello") == "hello"
    assert check_body("h\u00e9 \U0001f600".encode()) == "h\u00e9 \U0001f600"
    with pytest.raises(BodyRejected):
        check_body(b"\xff\xfe")
    with pytest.raises(BodyRejected):
        check_body(b"\xed\xa0\x80")  # an encoded surrogate is not valid UTF-8
    with pytest.raises(BodyRejected):
        check_body(b"")
    with pytest.raises(BodyRejected):
        check_body(b"a\nb")
    with pytest.raises(BodyRejected):
        check_body(b"a" * (MAX_BODY_BYTES + 1))


@pytest.mark.parametrize("body", [None, 5, 5.5, ["x"], bytearray(b"x"), memoryview(b"x")])
def test_check_body_non_text(body):
    with pytest.raises(BodyRejected):
        check_body(body)


def test_check_body_custom_limit():
    assert check_body("abcd", max_bytes=4) == "abcd"
    with pytest.raises(BodyRejected):
        check_body("abcde", max_bytes=4)


def test_body_rejected_is_a_value_error_and_niki_error():
    with pytest.raises(ValueError):
        check_body("")
    with pytest.raises(NikiError):
        check_body("")


# --- enqueue() against both databases ---------------------------------------------------------------


def test_queued_then_duplicate(storage: Storage, db_url, listener, peers):
    cid = storage.new_client().client_id
    assert enqueue(cid, "hello", db=db_url, peers=peers) is True
    assert listener.receive(5.0).clients() == {cid}
    assert enqueue(cid, "hello", db=db_url, peers=peers) is False
    assert not listener.receive(0.05)
    assert rows_of(db_url, cid) == [("hello", "pending"), ("hello", "ignored")]
    assert storage.pending_count(cid) == 1


def test_exactly_one_datagram_per_queued_message(storage: Storage, db_url, counter):
    cid = storage.new_client().client_id
    assert enqueue(cid, "one", db=db_url, peers=counter.peers) is True
    assert counter.drain() == [[cid]]
    assert enqueue(cid, "one", db=db_url, peers=counter.peers) is False
    assert counter.drain() == []
    assert enqueue(cid, "two", db=db_url, peers=counter.peers) is True
    assert counter.drain() == [[cid]]


def test_different_bodies_and_clients_are_not_duplicates(storage: Storage, db_url, listener, peers):
    a = storage.new_client().client_id
    b = storage.new_client().client_id
    assert enqueue(a, "x", db=db_url, peers=peers)
    assert enqueue(a, "y", db=db_url, peers=peers)
    assert enqueue(b, "x", db=db_url, peers=peers)
    assert enqueue(b, "y", db=db_url, peers=peers)
    assert enqueue(a, "x", db=db_url, peers=peers) is False
    assert enqueue(b, "y", db=db_url, peers=peers) is False
    assert listener.receive(5.0).clients() == {a, b}
    assert rows_of(db_url, a) == [("x", "pending"), ("y", "pending"), ("x", "ignored")]
    assert rows_of(db_url, b) == [("x", "pending"), ("y", "pending"), ("y", "ignored")]


def test_near_identical_bodies_are_not_duplicates(storage: Storage, db_url, peers):
    cid = storage.new_client().client_id
    bodies = ["hello", "Hello", "HELLO", "hello ", " hello", "hello\t", "hello\x00",
              "h\u00e9llo", "he\u0301llo", "\U0001f600", "\U0001f601"]
    for body in bodies:
        assert enqueue(cid, body, db=db_url, peers=peers) is True, body
    assert rows_of(db_url, cid) == [(body, "pending") for body in bodies]


def test_string_ids_as_handed_out(storage: Storage, db_url, listener, peers):
    cid = storage.new_client().client_id
    assert enqueue(str(cid), "via string", db=db_url, peers=peers) is True
    assert listener.receive(5.0).clients() == {cid}
    # The same client, however its id is spelt, shares one duplicate window.
    assert enqueue(cid, "via string", db=db_url, peers=peers) is False
    assert enqueue(f" {cid}\n", "via string", db=db_url, peers=peers) is False
    assert rows_of(db_url, cid) == [("via string", "pending"), ("via string", "ignored"),
                                    ("via string", "ignored")]


def test_bytes_body(storage: Storage, db_url, peers):
    cid = storage.new_client().client_id
    assert enqueue(cid, "caf\u00e9 \U0001f600".encode(), db=db_url, peers=peers) is True
    assert rows_of(db_url, cid) == [("caf\u00e9 \U0001f600", "pending")]


@pytest.mark.parametrize("bad_id", ["unknown", "abc", 0, -3, "", "5x", None])
def test_unknown_or_malformed_client(storage: Storage, db_url, listener, peers, bad_id):
    cid = storage.new_client().client_id
    target = cid + 1000 if bad_id == "unknown" else bad_id
    with pytest.raises(UnknownClient):
        enqueue(target, "hello", db=db_url, peers=peers)
    assert not listener.receive(0.05)
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]


def test_id_beyond_64_bits_is_unknown_client(storage: Storage, db_url, peers):
    storage.new_client()
    with pytest.raises(UnknownClient):
        enqueue(MAX_CLIENT_ID + 1, "hello", db=db_url, peers=peers)


@pytest.mark.parametrize("body", ["", "a\nb", "x" * (MAX_BODY_BYTES + 1), b"\xff"], ids=short)
def test_rejected_body_stores_nothing(storage: Storage, db_url, listener, peers, body):
    cid = storage.new_client().client_id
    with pytest.raises(BodyRejected):
        enqueue(cid, body, db=db_url, peers=peers)
    assert not listener.receive(0.05)
    assert rows_of(db_url, cid) == []


def test_env_defaults(storage: Storage, db_url, listener, monkeypatch):
    cid = storage.new_client().client_id
    monkeypatch.setenv("NIKI_DB", db_url)
    monkeypatch.setenv("NIKI_PEERS", f"127.0.0.1:{listener.port}")
    assert enqueue(cid, "from env") is True
    assert listener.receive(5.0).clients() == {cid}
    assert rows_of(db_url, cid) == [("from env", "pending")]


def test_enqueuer_class(storage: Storage, db_url, listener):
    cid = storage.new_client().client_id
    with Enqueuer(db_url, f"127.0.0.1:{listener.port}", max_body_bytes=10) as enqueuer:
        assert enqueuer.mode == "broadcast"
        assert enqueuer.peers == [("127.0.0.1", listener.port)]
        assert enqueuer.enqueue(cid, "0123456789") is True
        with pytest.raises(BodyRejected):
            enqueuer.enqueue(cid, "0123456789a")
        assert enqueuer.enqueue(str(cid), "0123456789") is False
        assert enqueuer.datagrams_sent == 1
    assert listener.receive(5.0).clients() == {cid}
    assert rows_of(db_url, cid) == [("0123456789", "pending"), ("0123456789", "ignored")]


def test_enqueuer_is_thread_safe(storage: Storage, db_url, listener):
    clients = [storage.new_client().client_id for _ in range(3)]
    errors: List[BaseException] = []
    results: List[bool] = []
    lock = threading.Lock()
    with Enqueuer(db_url, [("127.0.0.1", listener.port)]) as enqueuer:
        def work(n: int) -> None:
            try:
                for i in range(15):
                    ok = enqueuer.enqueue(clients[i % 3], f"t{n}-{i}")
                    with lock:
                        results.append(ok)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert results == [True] * 90
    got: set = set()
    while len(got) < 3:
        more = listener.receive(5.0)
        assert more, "wake-ups missing"
        got |= more.clients()
    assert got == set(clients)
    assert query(db_url, "SELECT COUNT(*) FROM messages WHERE status = 'pending'") == [(90,)]


# --- unreachable databases ------------------------------------------------------------------------


def assert_one_clear_line(exc: BaseException) -> None:
    text = str(exc)
    assert text.strip(), "empty message"
    assert "\n" not in text and "\r" not in text, repr(text)
    assert "Traceback" not in text


def test_unavailable_mysql(counter):
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db="mysql://root@127.0.0.1:1/niki_nowhere", peers=counter.peers)
    assert isinstance(info.value, NikiError)
    assert_one_clear_line(info.value)
    assert counter.drain() == []


def test_unavailable_mysql_database_missing(mysql_url, counter):
    # The server is there but the database was never created.
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db=mysql_url, peers=counter.peers)
    assert_one_clear_line(info.value)
    assert counter.drain() == []


def test_unavailable_sqlite_missing_directory(tmp_path, counter):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'niki.sqlite3'}"
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db=url, peers=counter.peers)
    assert isinstance(info.value, NikiError)
    assert_one_clear_line(info.value)
    assert counter.drain() == []
    assert not (tmp_path / "no").exists()


def test_unavailable_sqlite_missing_file_is_not_created(tmp_path, counter):
    path = tmp_path / "typo.sqlite3"
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db=f"sqlite:///{path}", peers=counter.peers)
    assert_one_clear_line(info.value)
    assert not path.exists()


def test_unavailable_sqlite_without_schema(tmp_path, counter):
    path = tmp_path / "empty.sqlite3"
    sqlite3.connect(str(path)).close()
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db=f"sqlite:///{path}", peers=counter.peers)
    assert_one_clear_line(info.value)
    assert "schema" in str(info.value)


def test_unavailable_message_names_database_but_not_password(counter):
    with pytest.raises(StorageUnavailable) as info:
        enqueue(5, "hello", db="mysql://root:s3cretpw@127.0.0.1:1/niki_nowhere", peers=counter.peers)
    text = str(info.value)
    assert_one_clear_line(info.value)
    assert "niki_nowhere" in text and "127.0.0.1:1" in text
    assert "s3cretpw" not in text


# --- broadcast or routed: NIKI_PEERS ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("   ", None), ("h:1", [("h", 1)]),
     ("a:1, b:2", [("a", 1), ("b", 2)]), ("[::1]:8001", [("::1", 8001)])],
)
def test_configured_peers(value, expected):
    environ = {} if value is None else {"NIKI_PEERS": value}
    assert settings.configured_peers(environ) == expected


@pytest.mark.parametrize("value", ["no-port-here", "host:99999", "host:0", "host:abc", ":8001"])
def test_configured_peers_malformed(value):
    with pytest.raises(ConfigurationError):
        settings.configured_peers({"NIKI_PEERS": value})


def test_niki_peers_set_means_broadcast(storage: Storage, db_url, counter, monkeypatch):
    other = DatagramCounter()
    try:
        cid = storage.new_client().client_id  # offline: broadcast wakes the peers all the same
        monkeypatch.setenv("NIKI_PEERS", f"{counter.peers},{other.peers}")
        with Enqueuer(db_url) as enqueuer:
            assert enqueuer.mode == "broadcast"
            assert enqueuer.peers == [("127.0.0.1", int(c.peers.rsplit(":", 1)[1])) for c in (counter, other)]
            assert enqueuer.enqueue(cid, "first") is True
            assert enqueuer.datagrams_sent == 2
        assert enqueue(cid, "second", db=db_url) is True
        for c in (counter, other):
            assert c.drain() == [[cid], [cid]]
    finally:
        other.sock.close()


@pytest.mark.parametrize("variable", ["NIKI_EVENT_PORT", "NIKI_PORT", None])
def test_niki_peers_unset_means_routed(storage: Storage, db_url, counter, monkeypatch, variable):
    # Before routing, a missing NIKI_PEERS meant 127.0.0.1:NIKI_EVENT_PORT (or NIKI_PORT + 1):
    # ``counter`` sits where that default would have pointed, and must stay silent.
    monkeypatch.delenv("NIKI_PEERS", raising=False)
    monkeypatch.delenv("NIKI_EVENT_PORT", raising=False)
    monkeypatch.delenv("NIKI_PORT", raising=False)
    port = int(counter.peers.rsplit(":", 1)[1])
    if variable is not None:
        monkeypatch.setenv(variable, str(port if variable == "NIKI_EVENT_PORT" else port - 1))
    owner = DatagramCounter()
    try:
        server = storage.register_server("box", 8000, "127.0.0.1", owner.sock.getsockname()[1], 1)
        online = storage.new_client(server).client_id
        offline = storage.new_client().client_id
        with Enqueuer(db_url) as enqueuer:
            assert enqueuer.mode == "routed"
            assert enqueuer.peers is None
            assert enqueuer.enqueue(offline, "nobody to wake") is True
            assert enqueuer.enqueue(online, "wake the owner") is True
            assert enqueuer.datagrams_sent == 1
        assert enqueue(offline, "via enqueue(), offline", db=db_url) is True
        assert enqueue(online, "via enqueue()", db=db_url) is True
        assert owner.drain() == [[online], [online]]
        assert counter.drain() == []
        assert storage.pending_count(offline) == 2
    finally:
        owner.sock.close()


def test_blank_niki_peers_means_routed(storage: Storage, db_url, monkeypatch):
    monkeypatch.setenv("NIKI_PEERS", "   ")
    with Enqueuer(db_url) as enqueuer:
        assert enqueuer.mode == "routed"


@pytest.mark.parametrize("value", ["no-port-here", "host:99999", "127.0.0.1:8001,oops"])
def test_malformed_niki_peers_is_configuration_error(tmp_path, counter, monkeypatch, value):
    # Refused before the database is touched (this one does not even exist).
    url = f"sqlite:///{tmp_path / 'niki.sqlite3'}"
    monkeypatch.setenv("NIKI_PEERS", value)
    with pytest.raises(ConfigurationError):
        Enqueuer(url)
    with pytest.raises(ConfigurationError):
        enqueue(5, "hello", db=url)
    assert list(tmp_path.iterdir()) == []
    assert counter.drain() == []


def test_explicit_peers_win_over_niki_peers(storage: Storage, db_url, counter, monkeypatch):
    other = DatagramCounter()
    try:
        cid = storage.new_client().client_id
        monkeypatch.setenv("NIKI_PEERS", other.peers)
        assert enqueue(cid, "hello", db=db_url, peers=counter.peers) is True
        assert counter.drain() == [[cid]]
        assert other.drain() == []
    finally:
        other.sock.close()


def test_empty_peers_given_to_enqueuer_means_routed(storage: Storage, db_url, counter, monkeypatch):
    monkeypatch.setenv("NIKI_PEERS", counter.peers)
    for empty in ("", []):
        with Enqueuer(db_url, empty) as enqueuer:
            assert enqueuer.mode == "routed"


@pytest.mark.parametrize("empty", ["", []], ids=["str", "list"])
def test_empty_peers_given_to_enqueue_means_routed(storage: Storage, db_url, counter, monkeypatch,
                                                   empty):
    cid = storage.new_client().client_id  # offline: routed mode sends nothing
    monkeypatch.setenv("NIKI_PEERS", counter.peers)
    assert enqueue(cid, "hello", db=db_url, peers=empty) is True
    assert counter.drain() == []


def test_niki_peers_of_separators_only_does_not_silence_wakeups(storage: Storage, db_url, counter,
                                                                monkeypatch):
    port = int(counter.peers.rsplit(":", 1)[1])
    server = storage.register_server("box", 8000, "127.0.0.1", port, 1)
    cid = storage.new_client(server).client_id
    monkeypatch.setenv("NIKI_PEERS", " , ")
    try:
        enqueuer = Enqueuer(db_url)
    except ConfigurationError:
        return  # refusing it is as good as routing
    with enqueuer:
        assert enqueuer.enqueue(cid, "hello") is True
    assert counter.drain() == [[cid]]


def test_datagrams_sent_is_exact_under_concurrency(storage: Storage, db_url, counter, monkeypatch):
    """Threads enqueueing at once for an online client: one datagram each, all counted."""
    monkeypatch.delenv("NIKI_PEERS", raising=False)
    server = storage.register_server("test", 1, "127.0.0.1", counter.port, 1)
    cid = storage.new_client(server).client_id
    threads, per_thread = 4, 50
    with Enqueuer(db_url) as enqueuer:
        assert enqueuer.mode == "routed"

        def work(n: int) -> None:
            for i in range(per_thread):
                assert enqueuer.enqueue(cid, f"{n}-{i}") is True

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert enqueuer.datagrams_sent == threads * per_thread
    assert len(counter.drain()) == threads * per_thread


# --- ttl -----------------------------------------------------------------------------------------------


def ttl_of(db_url: str, client_id: int) -> List[Optional[float]]:
    """expires_at - created_at in seconds (None: never expires) of each message of ``client_id``."""
    if db_url.startswith("sqlite:"):
        span = "(julianday(expires_at) - julianday(created_at)) * 86400"
    else:
        span = "TIMESTAMPDIFF(MICROSECOND, created_at, expires_at) / 1000000"
    rows = query(db_url, f"SELECT {span} FROM messages WHERE client_id = %s ORDER BY id", (client_id,))
    return [None if row[0] is None else round(float(row[0]), 2) for row in rows]


def test_enqueue_with_ttl(storage: Storage, db_url, counter, monkeypatch):
    monkeypatch.delenv("NIKI_MAX_PENDING", raising=False)
    cid = storage.new_client().client_id
    assert enqueue(cid, "one minute", db=db_url, peers=counter.peers, ttl=60) is True
    assert enqueue(cid, "forever", db=db_url, peers=counter.peers) is True
    with Enqueuer(db_url, counter.peers) as enqueuer:
        assert enqueuer.enqueue(cid, "ten seconds", ttl=10) is True
        assert enqueuer.enqueue(cid, "a quarter second", ttl=0.25) is True
    assert ttl_of(db_url, cid) == [60.0, None, 10.0, 0.25]
    assert counter.drain() == [[cid]] * 4


@pytest.mark.parametrize("ttl", [0, -0.5, float("nan"), float("-inf")])
def test_bad_ttl_is_rejected_and_stores_nothing(storage: Storage, db_url, counter, ttl):
    cid = storage.new_client().client_id
    with pytest.raises(BodyRejected, match="ttl"):
        enqueue(cid, "hello", db=db_url, peers=counter.peers, ttl=ttl)
    with Enqueuer(db_url, counter.peers) as enqueuer, pytest.raises(BodyRejected):
        enqueuer.enqueue(cid, "hello", ttl=ttl)
    assert rows_of(db_url, cid) == []
    assert counter.drain() == []


@pytest.mark.parametrize("ttl", [float("inf"), 1e12, 1e14], ids=["inf", "1e12", "1e14"])
def test_huge_ttl_is_queued_or_rejected_never_a_crash(storage: Storage, db_url, counter, ttl):
    # math.inf is the natural way to say "never expires"; a TTL past year 9999 cannot be stored.
    # Either answer is fine: queued (never expiring) or BodyRejected, with the database untouched.
    # Not an OverflowError, and not StorageUnavailable: the database is up.
    cid = storage.new_client().client_id
    with Enqueuer(db_url, counter.peers) as enqueuer:
        try:
            queued = enqueuer.enqueue(cid, "for a long time", ttl=ttl)
        except BodyRejected:
            assert rows_of(db_url, cid) == []
            assert counter.drain() == []
        else:
            assert queued is True
            assert rows_of(db_url, cid) == [("for a long time", "pending")]
            # And it is not expired: it would be delivered.
            assert storage.pending_count(cid) == 1


# --- max_pending / QueueFull -------------------------------------------------------------------------------


def test_queue_full(storage: Storage, db_url, counter):
    cid = storage.new_client().client_id
    other = storage.new_client().client_id
    with Enqueuer(db_url, counter.peers, max_pending=2) as enqueuer:
        assert enqueuer.max_pending == 2
        assert enqueuer.enqueue(cid, "a") is True
        assert enqueuer.enqueue(cid, "a") is False  # ignored: takes no room
        assert enqueuer.enqueue(cid, "b") is True
        assert counter.drain() == [[cid], [cid]]
        with pytest.raises(QueueFull) as caught:
            enqueuer.enqueue(cid, "c", ttl=60)
        # Nothing stored, nobody woken.
        assert rows_of(db_url, cid) == [("a", "pending"), ("a", "ignored"), ("b", "pending")]
        assert counter.drain() == []
        assert enqueuer.datagrams_sent == 2
        assert enqueuer.enqueue(other, "c") is True  # per client
        # Room again once one is delivered.
        query(db_url, "UPDATE messages SET status = 'delivered' WHERE client_id = %s AND body = 'a' "
              "AND status = 'pending'", (cid,))
        assert enqueuer.enqueue(cid, "c") is True
    exc = caught.value
    assert isinstance(exc, NikiError)
    assert QueueFull is messaging_server.QueueFull
    assert "QueueFull" in messaging_server.__all__
    assert str(exc).strip() and "\n" not in str(exc)


def test_max_pending_from_environment(storage: Storage, db_url, counter, monkeypatch):
    monkeypatch.setenv("NIKI_MAX_PENDING", "2")
    cid = storage.new_client().client_id
    assert enqueue(cid, "a", db=db_url, peers=counter.peers) is True
    assert enqueue(cid, "b", db=db_url, peers=counter.peers) is True
    with pytest.raises(QueueFull):
        enqueue(cid, "c", db=db_url, peers=counter.peers)
    assert rows_of(db_url, cid) == [("a", "pending"), ("b", "pending")]
    with Enqueuer(db_url, counter.peers) as enqueuer:
        assert enqueuer.max_pending == 2
    # An explicit max_pending wins over the environment.
    with Enqueuer(db_url, counter.peers, max_pending=3) as enqueuer:
        assert enqueuer.enqueue(cid, "c") is True
        with pytest.raises(QueueFull):
            enqueuer.enqueue(cid, "d")


def test_max_pending_default(sqlite_url, monkeypatch):
    # Read when the Enqueuer is made: "" (unset) and blank mean the default.
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
    for value in (None, "", "  "):
        if value is None:
            monkeypatch.delenv("NIKI_MAX_PENDING", raising=False)
        else:
            monkeypatch.setenv("NIKI_MAX_PENDING", value)
        with Enqueuer(sqlite_url, "") as enqueuer:
            assert enqueuer.max_pending == settings.MAX_PENDING == 10_000


def test_bad_niki_max_pending_is_configuration_error(storage: Storage, db_url, counter, monkeypatch):
    cid = storage.new_client().client_id
    for value in ("abc", "0", "-1", "1.5", "1e3", "10 000", "\u0665"):
        monkeypatch.setenv("NIKI_MAX_PENDING", value)
        with pytest.raises(ConfigurationError, match="NIKI_MAX_PENDING"):
            Enqueuer(db_url, counter.peers)
        with pytest.raises(ConfigurationError, match="NIKI_MAX_PENDING"):
            enqueue(cid, "hello", db=db_url, peers=counter.peers)
    assert rows_of(db_url, cid) == []
    assert counter.drain() == []


@pytest.mark.parametrize("value", [-1, 2.5], ids=["negative", "fraction"])
def test_bad_max_pending_argument_is_refused_up_front(storage: Storage, db_url, value):
    # NIKI_MAX_PENDING must be a positive whole number (ConfigurationError otherwise); the same
    # value passed to the constructor must not reach the SQL, where MariaDB reports the syntax
    # error as StorageUnavailable ("the database could not be reached") on every enqueue.
    with pytest.raises(ValueError):
        Enqueuer(db_url, "", max_pending=value).close()
