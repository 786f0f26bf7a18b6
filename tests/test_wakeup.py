"""Wake-up datagrams: the pure codec, peer parsing, and sender/listener over real UDP."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List, Set

import pytest

from messaging_server.config.addresses import parse_peers
from messaging_server.errors import ConfigurationError
from messaging_server.protocol.lines import MAX_CLIENT_ID
from messaging_server.protocol.wakeups import (
    CARRY_MAGIC,
    MAGIC,
    MAX_DATAGRAM,
    Carried,
    decode,
    decode_carried,
    encode,
    encode_carried,
)
from messaging_server.wakeup import MAX_DATAGRAMS_PER_RECEIVE, WakeupListener, WakeupSender
from tests.helpers import DatagramCounter

# --- codec -------------------------------------------------------------------------------------

KEY = bytes(range(32))
CARRIED = Carried(client_id=42, session=7, message_id=1001, previous=999, queued_at=1700000000.123,
                  body="héllo wörld 🎉")


def test_carried_round_trip():
    datagram = encode_carried(KEY, CARRIED)
    assert datagram is not None and datagram.startswith(CARRY_MAGIC)
    assert decode_carried(KEY, datagram) == CARRIED
    empty = Carried(1, 1, 2, 0, 0.0, "")
    assert decode_carried(KEY, encode_carried(KEY, empty)) == empty


def test_a_carried_message_that_does_not_fit_is_not_carried():
    big = Carried(1, 1, 2, 0, 0.0, "x" * MAX_DATAGRAM)
    assert encode_carried(KEY, big) is None
    fits = Carried(1, 1, 2, 0, 0.0, "x" * 1000)
    assert len(encode_carried(KEY, fits)) <= MAX_DATAGRAM


@pytest.mark.parametrize("forge", [
    lambda d: d[:-1] + b"X",  # the body changed
    lambda d: d.replace(b" 42 ", b" 43 ", 1),  # another client
    lambda d: d.replace(b" 999 ", b" 998 ", 1),  # another predecessor
    lambda d: d[:6] + b"0" * 32 + d[38:],  # a made-up signature
    lambda d: d[:6] + d[7:],  # a truncated signature
    lambda d: encode_carried(b"another key" * 3, CARRIED),
])
def test_a_forged_carried_message_is_refused(forge):
    """Only who knows the database's key can make a server write a message."""
    with pytest.raises(ValueError):
        decode_carried(KEY, forge(encode_carried(KEY, CARRIED)))


def test_a_server_without_the_key_refuses_carried_messages():
    with pytest.raises(ValueError):
        decode_carried(None, encode_carried(KEY, CARRIED))


@pytest.mark.parametrize("head", [b"1 2 3", b"1 2 3 4 5 6", b"a 2 3 4 5", b"1 2 3 4 -5",
                                  b"1 2 3 4 " + b"9" * 30])
def test_malformed_but_signed_carried_messages_are_refused(head):
    import hashlib
    import hmac
    payload = head + b"\nbody"
    tag = hmac.new(KEY, payload, hashlib.sha256).hexdigest()[:32].encode()
    with pytest.raises(ValueError):
        decode_carried(KEY, CARRY_MAGIC + tag + b" " + payload)


def test_the_listener_yields_carried_messages_in_arrival_order():
    """Signed ones in the order sent, beside the ids of plain wake-ups; forged ones counted
    as invalid and dropped."""
    lst = WakeupListener("127.0.0.1", 0, key=KEY)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            messages = [Carried(5, 1, n, n - 1, 0.0, f"m{n}") for n in (3, 1, 2)]
            for message in messages:
                udp.sendto(encode_carried(KEY, message), ("127.0.0.1", lst.port))
            udp.sendto(encode_carried(b"k" * 32, messages[0]), ("127.0.0.1", lst.port))
            udp.sendto(encode([8])[0], ("127.0.0.1", lst.port))
            got = lst.receive(5.0)
            deadline = time.monotonic() + 5
            while lst.received < 5 and time.monotonic() < deadline:
                more = lst.receive(0.5)
                got.ids |= more.ids
                got.carried += more.carried
        assert got.carried == messages and got.ids == {8} and got.clients() == {5, 8}
        assert lst.invalid == 1
    finally:
        lst.close()


def test_encode_format():
    assert encode([5]) == [b"NIKI1 5"]
    assert encode([1, 22, 333]) == [b"NIKI1 1,22,333"]
    assert encode(["7"]) == [b"NIKI1 7"]
    assert encode([]) == []


@pytest.mark.parametrize("ids", [[1], [1, 2, 3], [MAX_CLIENT_ID], [3000, 3000, 12], list(range(1, 200))])
def test_round_trip(ids):
    [datagram] = encode(ids)
    assert decode(datagram) == ids


@pytest.mark.parametrize("count", [5000, 20000])
def test_split_into_datagrams(count):
    ids = [10**12 + i for i in range(count)]
    datagrams = encode(ids)
    assert len(datagrams) > 1
    assert all(d.startswith(MAGIC) and len(d) <= MAX_DATAGRAM for d in datagrams)
    # Reasonably full: at most one datagram is not near the limit.
    assert sum(len(d) < MAX_DATAGRAM - 20 for d in datagrams) <= 1
    decoded = [i for d in datagrams for i in decode(d)]
    assert decoded == ids


def test_split_with_maximal_ids():
    ids = [MAX_CLIENT_ID - i for i in range(3000)]
    datagrams = encode(ids)
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert [i for d in datagrams for i in decode(d)] == ids


def test_split_exactly_at_limit():
    # 118 nine-digit ids and one 14-digit id: 6 + 118 * 10 + 14 = 1200 bytes exactly.
    ids = [100000000 + i for i in range(118)] + [10**13]
    [datagram] = encode(ids)
    assert len(datagram) == MAX_DATAGRAM
    assert decode(datagram) == ids
    datagrams = encode([*ids, 7])
    assert datagrams == [datagram, b"NIKI1 7"]


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"hello",
        b"NIKI1",
        b"NIKI1 ",
        b"NIKI2 5",
        b"niki1 5",
        b"NIKI1  5",
        b" NIKI1 5",
        b"NIKI15",
        b"NIKI1 5,",
        b"NIKI1 ,5",
        b"NIKI1 5,,6",
        b"NIKI1 5 ,6",
        b"NIKI1 5, 6",
        b"NIKI1 abc",
        b"NIKI1 5,x",
        b"NIKI1 -5",
        b"NIKI1 +5",
        b"NIKI1 0",
        b"NIKI1 5.1",
        b"NIKI1 5\n",
        b"NIKI1 \xff\xfe",
        "NIKI1 \u0663".encode(),
        b"NIKI1 " + str(MAX_CLIENT_ID + 1).encode(),
        b"\x00" * 64,
    ],
)
def test_decode_rejects_garbage(datagram):
    with pytest.raises(ValueError):
        decode(datagram)


def test_decode_rejects_oversize():
    ids = ",".join(str(100000 + i) for i in range(400)).encode()
    datagram = MAGIC + ids
    assert len(datagram) > MAX_DATAGRAM
    with pytest.raises(ValueError):
        decode(datagram)
    # Trimmed to exactly the limit (at an id boundary) it is accepted.
    cut = datagram[:MAX_DATAGRAM]
    cut = cut[: cut.rfind(b",")]
    assert len(decode(cut)) > 100


# --- peers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "peers"),
    [
        ("127.0.0.1:8001", [("127.0.0.1", 8001)]),
        ("a.example:1,b.example:65535", [("a.example", 1), ("b.example", 65535)]),
        (" host:9 , other:10 ", [("host", 9), ("other", 10)]),
        ("host:9,,", [("host", 9)]),
        ("[::1]:8001", [("::1", 8001)]),
        ("::1:8001", [("::1", 8001)]),
        ("", []),
        (" , ", []),
    ],
)
def test_parse_peers(text, peers):
    assert parse_peers(text) == peers


@pytest.mark.parametrize(
    "text",
    [
        "host",
        "8001",
        ":8001",
        "host:",
        "host:abc",
        "host:0",
        "host:65536",
        "host:-1",
        "host:+80",
        "host: 80",
        "host:80x",
        "good:1,bad",
        "host:\u00b2",  # SUPERSCRIPT TWO: str.isdigit() is True, int() refuses it
    ],
)
def test_parse_peers_rejects(text):
    with pytest.raises(ConfigurationError):
        parse_peers(text)


# --- over real UDP -----------------------------------------------------------------------------


@pytest.fixture
def raw_sender() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield sock
    sock.close()


def receive_until(listener: WakeupListener, expected: Set[int], timeout: float = 5.0) -> Set[int]:
    """Union of receive() results until ``expected`` is covered or the deadline passes."""
    got: Set[int] = set()
    deadline = time.monotonic() + timeout
    while not expected <= got:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        got |= listener.receive(remaining).ids
    return got


def test_listener_port_is_bound(listener):
    assert listener.port > 0


def test_ids_arrive(listener):
    with WakeupSender([("127.0.0.1", listener.port)]) as sender:
        sender.broadcast([5, 3000])
        assert listener.receive(5.0).ids == {5, 3000}


def test_thousands_of_ids_arrive(listener):
    ids = list(range(1, 3001))
    assert len(encode(ids)) > 1
    with WakeupSender([("127.0.0.1", listener.port)]) as sender:
        sender.broadcast(ids)
    assert receive_until(listener, set(ids)) == set(ids)


def test_datagrams_are_coalesced_by_one_receive(listener, raw_sender):
    address = ("127.0.0.1", listener.port)
    for client_id in (1, 2, 3, 2, 1):
        raw_sender.sendto(encode([client_id])[0], address)
    raw_sender.sendto(b"NIKI1 40,50", address)
    # Loopback UDP is queued at the receiver by the time sendto() returns, so a
    # single receive() must drain every waiting datagram.
    assert listener.receive(5.0).ids == {1, 2, 3, 40, 50}
    assert not listener.receive(0.05)


def test_one_receive_takes_a_bounded_number_of_datagrams(raw_sender):
    """A flood cannot keep receive() from returning: past the bound, the rest waits."""
    assert 16 <= MAX_DATAGRAMS_PER_RECEIVE <= 1024  # the server's bound: a burst, not a flood
    bounded = WakeupListener("127.0.0.1", 0, max_per_receive=10)
    try:
        for client_id in range(1, 16):
            raw_sender.sendto(encode([client_id])[0], ("127.0.0.1", bounded.port))
        assert bounded.receive(5.0).ids == set(range(1, 11))
        assert bounded.receive(5.0).ids == set(range(11, 16))
    finally:
        bounded.close()


def test_garbage_ignored_valid_in_same_burst_counts(listener, raw_sender):
    address = ("127.0.0.1", listener.port)
    raw_sender.sendto(b"garbage", address)
    raw_sender.sendto(b"NIKI1 7", address)
    raw_sender.sendto(b"NIKI1 8,oops", address)  # one bad id spoils the whole datagram
    raw_sender.sendto(b"X" * 2000, address)
    raw_sender.sendto(b"NIKI1 9", address)
    raw_sender.sendto(MAGIC + b"1," * 700 + b"1", address)  # oversize
    assert listener.receive(5.0).ids == {7, 9}


def test_garbage_only_gives_nothing(listener, raw_sender):
    raw_sender.sendto(b"NIKI2 5", ("127.0.0.1", listener.port))
    assert not listener.receive(5.0)
    # The listener keeps working afterwards.
    raw_sender.sendto(b"NIKI1 5", ("127.0.0.1", listener.port))
    assert listener.receive(5.0).ids == {5}


def test_receive_times_out_empty(listener):
    start = time.monotonic()
    assert not listener.receive(0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 2.0


def test_receive_after_drain_waits_again(listener, raw_sender):
    raw_sender.sendto(b"NIKI1 1", ("127.0.0.1", listener.port))
    assert listener.receive(5.0).ids == {1}
    # After a drain (which made the socket non-blocking) a timeout is honoured again.
    start = time.monotonic()
    assert not listener.receive(0.2)
    assert time.monotonic() - start >= 0.15


def test_sender_reaches_every_peer():
    listeners = [WakeupListener("127.0.0.1", 0) for _ in range(3)]
    try:
        with WakeupSender([("127.0.0.1", lst.port) for lst in listeners]) as sender:
            sender.broadcast([11])
        for lst in listeners:
            assert lst.receive(5.0).ids == {11}
    finally:
        for lst in listeners:
            lst.close()


def test_sender_survives_unreachable_peer(listener):
    # Nothing listens on the first peer; the send is best effort and the second peer still gets it.
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    with WakeupSender([("127.0.0.1", dead_port), ("127.0.0.1", listener.port)]) as sender:
        sender.broadcast([1])
        sender.broadcast([2])  # a previous ICMP "port unreachable" must not break later sends
    assert receive_until(listener, {1, 2}) == {1, 2}


def test_sender_with_no_peers_is_a_no_op():
    with WakeupSender([]) as sender:
        assert sender.broadcast([1, 2, 3]) == 0
    with WakeupSender() as sender:
        assert sender.peers == []
        assert sender.broadcast([1]) == 0


@pytest.fixture
def counters() -> Iterator[List[DatagramCounter]]:
    made = [DatagramCounter() for _ in range(3)]
    yield made
    for c in made:
        c.sock.close()


def test_broadcast_returns_the_datagrams_sent(counters):
    ids = list(range(1, 3001))
    per_peer = encode(ids)
    assert len(per_peer) > 1
    with WakeupSender([c.address for c in counters]) as sender:
        assert sender.broadcast([7]) == 3
        assert sender.broadcast(ids) == 3 * len(per_peer)
        assert sender.broadcast([]) == 0
    for c in counters:
        assert c.drain() == [[7]] + [decode(d) for d in per_peer]


def test_send_wakes_one_address_only(counters):
    target, peer, _ = counters
    with WakeupSender([peer.address]) as sender:
        assert sender.send(target.address, [42]) == 1
        assert sender.send(target.address, [42, 43]) == 1
        assert sender.send(target.address, []) == 0
    assert target.drain() == [[42], [42, 43]]
    assert peer.drain() == []  # the broadcast list plays no part in send()


def test_send_splits_many_ids(counters):
    ids = [10**12 + i for i in range(3000)]
    with WakeupSender() as sender:
        sent = sender.send(counters[0].address, ids)
    datagrams = counters[0].drain()
    assert sent == len(datagrams) == len(encode(ids)) > 1
    assert [i for d in datagrams for i in d] == ids


def test_send_to_several_addresses_from_one_sender(counters):
    with WakeupSender() as sender:
        for n, c in enumerate(counters):
            assert sender.send(c.address, [n + 1]) == 1
        assert sender.send(counters[0].address, [9]) == 1  # the same address again (cached)
    assert [c.drain() for c in counters] == [[[1], [9]], [[2]], [[3]]]


def test_send_to_an_unresolvable_host_counts_nothing(listener):
    with WakeupSender() as sender:
        assert sender.send(("no-such-host.invalid", listener.port), [1]) == 0
        assert sender.send(("127.0.0.1", listener.port), [2]) == 1  # the sender still works
    assert listener.receive(5.0).ids == {2}


def test_failed_lookup_is_remembered(listener, monkeypatch):
    lookups = []
    real_getaddrinfo = socket.getaddrinfo

    def counting_getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting_getaddrinfo)
    with WakeupSender() as sender:
        for _ in range(3):
            assert sender.send(("no-such-host.invalid", listener.port), [1]) == 0
            assert sender.send(("127.0.0.1", listener.port), [2]) == 1
    assert lookups.count("no-such-host.invalid") == 1
    assert lookups.count("127.0.0.1") == 1
    assert receive_until(listener, {2}) == {2}


def test_sender_is_thread_safe(counters):
    target = counters[0]
    threads, per_thread = 6, 25  # 150 small datagrams: well within the socket's receive buffer
    with WakeupSender() as sender:
        results: List[int] = []

        def work(n: int) -> None:
            results.append(sum(sender.send(target.address, [n]) for _ in range(per_thread)))

        workers = [threading.Thread(target=work, args=(n + 1,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
    assert results == [per_thread] * threads
    got = target.drain()
    assert len(got) == threads * per_thread
    assert sorted(i for d in got for i in d) == sorted(n + 1 for n in range(threads)
                                                       for _ in range(per_thread))


def test_ipv6_listener():
    try:
        lst = WakeupListener("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        with WakeupSender(parse_peers(f"[::1]:{lst.port}")) as sender:
            sender.broadcast([6])
        assert lst.receive(5.0).ids == {6}
    finally:
        lst.close()


def test_listener_on_all_interfaces_takes_ipv4_and_ipv6():
    lst = WakeupListener("", 0)
    try:
        with WakeupSender([("127.0.0.1", lst.port)]) as sender:
            sender.broadcast([4])
        assert lst.receive(5.0).ids == {4}
        if socket.has_dualstack_ipv6():
            with WakeupSender([("::1", lst.port)]) as sender:
                sender.broadcast([6])
            assert lst.receive(5.0).ids == {6}
    finally:
        lst.close()
