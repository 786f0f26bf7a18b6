"""Client ownership on SQLite and MariaDB: owners, takeovers, release, heartbeats, sweeps, routed wake-ups.

Every test runs on both databases (the ``storage`` / ``db_url`` fixtures).  Staleness is
made with a direct UPDATE of ``servers.heartbeat_at``, never by waiting.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Optional, Sequence

import pytest

from messaging_server import Enqueuer
from messaging_server.storage import Storage, StoredMessage
from messaging_server.storage.interface import HEARTBEAT_STALE_S
from messaging_server.storage.records import Claim, Queued, ServerAddress, SweepResult
from messaging_server.wakeup import WakeupListener
from tests.helpers import DatagramCounter, query, seconds_ago_sql

WINDOW = 5.0
UNKNOWN_SERVER = 987654


# --- helpers ---------------------------------------------------------------------------------------




def age_heartbeat(db_url: str, server_id: int, seconds: float) -> None:
    """Pretend ``server_id`` last beat ``seconds`` ago."""
    query(db_url, f"UPDATE servers SET heartbeat_at = {seconds_ago_sql(db_url, seconds)} WHERE id = %s",
          (server_id,))


def heartbeat_is_fresh(db_url: str, server_id: int, within: float = 5.0) -> bool:
    """The server's heartbeat_at is less than ``within`` seconds old."""
    rows = query(db_url, f"SELECT heartbeat_at > {seconds_ago_sql(db_url, within)} FROM servers "
                 "WHERE id = %s", (server_id,))
    assert len(rows) == 1, f"server {server_id} has no row"
    return bool(rows[0][0])


def owner_of(db_url: str, client_id: int) -> Optional[int]:
    rows = query(db_url, "SELECT owner_server_id FROM clients WHERE id = %s", (client_id,))
    assert len(rows) == 1, f"client {client_id} has no row"
    return None if rows[0][0] is None else int(rows[0][0])


def server_ids(db_url: str) -> List[int]:
    return [int(row[0]) for row in query(db_url, "SELECT id FROM servers ORDER BY id")]


_event_ports = itertools.count(20001)


def register(storage: Storage, host: str = "box-a", port: int = 8000, event_host: str = "10.0.0.1",
             event_port: Optional[int] = None) -> int:
    """A server row; each gets its own wake-up address unless one is given (the address
    identifies a server: registering one already recorded forgets the earlier server)."""
    return storage.register_server(host, port, event_host, event_port or next(_event_ports), 4242)


def write_all(messages: Sequence[StoredMessage]) -> int:
    return len(messages)


@pytest.fixture
def counters() -> Iterator[List[DatagramCounter]]:
    made = [DatagramCounter() for _ in range(3)]
    yield made
    for c in made:
        c.close()


@pytest.fixture
def routed(db_url: str, monkeypatch) -> Iterator[Enqueuer]:
    """An Enqueuer in routed mode: no peers given and NIKI_PEERS unset."""
    monkeypatch.delenv("NIKI_PEERS", raising=False)
    with Enqueuer(db_url) as enqueuer:
        assert enqueuer.mode == "routed"
        assert enqueuer.peers is None
        yield enqueuer


# --- new_client and claim_client record the owner ----------------------------------------------------------


def test_new_client_records_its_owner(storage: Storage, db_url):
    a = register(storage)
    claim = storage.new_client(a)
    assert claim == Claim(claim.client_id, 1, None, holds_lease=True)
    assert owner_of(db_url, claim.client_id) == a
    nobody = storage.new_client()
    assert nobody.previous_owner is None
    assert owner_of(db_url, nobody.client_id) is None


def test_claim_client_records_the_new_owner(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    cid = storage.new_client().client_id
    assert storage.claim_client(cid, a) == Claim(cid, 2, None)
    assert owner_of(db_url, cid) == a
    claim = storage.claim_client(cid, b)
    assert (claim.client_id, claim.session) == (cid, 3)
    assert owner_of(db_url, cid) == b
    assert query(db_url, "SELECT session FROM clients WHERE id = %s", (cid,)) == [(3,)]


def test_claim_unknown_client_changes_nothing(storage: Storage, db_url):
    a = register(storage)
    cid = storage.new_client(a).client_id
    assert storage.claim_client(cid + 1000, a) is None
    assert query(db_url, "SELECT COUNT(*) FROM clients") == [(1,)]
    assert owner_of(db_url, cid) == a


def test_claim_by_another_live_server_names_the_previous_owner(storage: Storage, db_url):
    a = register(storage, "box-a", 8000, "10.0.0.1", 8101)
    b = register(storage, "box-b", 8000, "box-b.example", 8102)
    cid = storage.new_client(a).client_id
    assert storage.claim_client(cid, b) == Claim(cid, 2, ServerAddress(a, "10.0.0.1", 8101))
    # And back: the address named is always the one that owned it until now.
    assert storage.claim_client(cid, a) == Claim(cid, 3, ServerAddress(b, "box-b.example", 8102))
    assert owner_of(db_url, cid) == a


def test_claim_from_a_stale_owner_names_nobody(storage: Storage, db_url):
    a = register(storage, "box-a", 8000, "10.0.0.1", 8101)
    b = register(storage, "box-b", 8000, "10.0.0.2", 8102)
    cid = storage.new_client(a).client_id
    # A few missed beats are not death yet ...
    age_heartbeat(db_url, a, HEARTBEAT_STALE_S - 5)
    assert storage.claim_client(cid, b).previous_owner == ServerAddress(a, "10.0.0.1", 8101)
    # ... a minute is.
    storage.claim_client(cid, a)
    age_heartbeat(db_url, a, 60)
    assert storage.claim_client(cid, b) == Claim(cid, 4, None)
    assert owner_of(db_url, cid) == b
    # A beat brings it back to life.
    storage.claim_client(cid, a)
    age_heartbeat(db_url, a, 60)
    assert storage.heartbeat(a) is True
    assert storage.claim_client(cid, b).previous_owner == ServerAddress(a, "10.0.0.1", 8101)


def test_reclaim_by_the_same_server_names_nobody(storage: Storage, db_url):
    a = register(storage)
    cid = storage.new_client(a).client_id
    assert storage.claim_client(cid, a) == Claim(cid, 2, None)
    assert storage.claim_client(cid, a) == Claim(cid, 3, None)
    assert owner_of(db_url, cid) == a


def test_claim_of_an_offline_client_names_nobody(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    claim = storage.new_client(a)
    storage.release_client(claim.client_id, claim.session, a)
    assert storage.claim_client(claim.client_id, b) == Claim(claim.client_id, 2, None)


def test_claim_after_the_owner_unregistered_names_nobody(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    cid = storage.new_client(a).client_id
    storage.unregister_server(a)
    assert storage.claim_client(cid, b) == Claim(cid, 2, None)


# --- release_client ------------------------------------------------------------------------------


def test_release_clears_the_owner_of_the_current_session(storage: Storage, db_url):
    a = register(storage)
    claim = storage.new_client(a)
    other = storage.new_client(a)
    storage.release_client(claim.client_id, claim.session, a)
    assert owner_of(db_url, claim.client_id) is None
    assert owner_of(db_url, other.client_id) == a  # only that client
    # The session is not bumped: a later claim continues from it.
    assert query(db_url, "SELECT session FROM clients WHERE id = %s", (claim.client_id,)) == [(1,)]


def test_release_from_a_session_taken_over_by_another_server(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    old = storage.new_client(a)
    cid = old.client_id
    new = storage.claim_client(cid, b)
    storage.release_client(cid, old.session, a)  # the old connection on a ends late
    assert owner_of(db_url, cid) == b
    storage.release_client(cid, new.session, a)  # right session, wrong server
    assert owner_of(db_url, cid) == b
    storage.release_client(cid, old.session, b)  # right server, old session
    assert owner_of(db_url, cid) == b
    storage.release_client(cid, new.session, b)
    assert owner_of(db_url, cid) is None


def test_release_from_a_session_replaced_on_the_same_server(storage: Storage, db_url):
    a = register(storage)
    old = storage.new_client(a)
    storage.claim_client(old.client_id, a)  # the client reconnected to the same server
    storage.release_client(old.client_id, old.session, a)  # then the old connection ended
    assert owner_of(db_url, old.client_id) == a


def test_release_of_an_unknown_client_is_harmless(storage: Storage, db_url):
    a = register(storage)
    cid = storage.new_client(a).client_id
    storage.release_client(cid + 1000, 1, a)
    assert owner_of(db_url, cid) == a


# --- register_server and unregister_server ----------------------------------------------------------------


def test_register_at_the_same_wake_up_address_forgets_the_old_server(storage: Storage, db_url):
    old = register(storage, "box-a", 8000, "10.0.0.1", 8001)
    other_event_port = register(storage, "box-a", 9000, "10.0.0.1", 8002)
    other_event_host = register(storage, "box-b", 8000, "10.0.0.2", 8001)
    mine = [storage.new_client(old).client_id for _ in range(3)]
    kept_port = storage.new_client(other_event_port).client_id
    kept_host = storage.new_client(other_event_host).client_id
    offline = storage.new_client().client_id
    storage.enqueue(mine[0], "for the dead server's client", WINDOW)

    new = register(storage, "box-a", 8000, "10.0.0.1", 8001)  # the old one crashed; restarted

    assert new not in (old, other_event_port, other_event_host)
    assert server_ids(db_url) == sorted([other_event_port, other_event_host, new])
    assert [owner_of(db_url, cid) for cid in mine] == [None, None, None]
    assert owner_of(db_url, kept_port) == other_event_port
    assert owner_of(db_url, kept_host) == other_event_host
    assert owner_of(db_url, offline) is None
    rows = query(db_url, "SELECT host, port, event_host, event_port FROM servers WHERE id = %s", (new,))
    assert rows == [("box-a", 8000, "10.0.0.1", 8001)]
    # Messages are kept; the old id is dead for heartbeats and sweeps.
    assert storage.pending_count(mine[0]) == 1
    assert storage.enqueue(mine[0], "after the restart", WINDOW).owner is None
    assert storage.heartbeat(old) is False
    assert storage.sweep(old) == SweepResult(False, {})
    assert storage.sweep(new) == SweepResult(True, {})


def test_register_forgets_by_wake_up_address_not_by_client_port(storage: Storage, db_url):
    # Same host name and client port, another wake-up address: a different server.
    first = register(storage, "box-a", 8000, "10.0.0.1", 8001)
    cid = storage.new_client(first).client_id
    second = register(storage, "box-a", 8000, "10.0.0.1", 8003)
    assert server_ids(db_url) == [first, second]
    assert owner_of(db_url, cid) == first
    # Another machine's server that advertises the same wake-up address replaces it.
    third = register(storage, "box-z", 7000, "10.0.0.1", 8001)
    assert server_ids(db_url) == [second, third]
    assert owner_of(db_url, cid) is None


def test_unregister_clears_only_its_clients(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    of_a = [storage.new_client(a).client_id for _ in range(2)]
    of_b = storage.new_client(b).client_id
    storage.unregister_server(a)
    assert server_ids(db_url) == [b]
    assert [owner_of(db_url, cid) for cid in of_a] == [None, None]
    assert owner_of(db_url, of_b) == b
    assert storage.heartbeat(a) is False
    storage.unregister_server(a)  # twice: harmless
    assert owner_of(db_url, of_b) == b


# --- heartbeat and sweep ---------------------------------------------------------------------------------


def test_heartbeat(storage: Storage, db_url):
    a = register(storage)
    assert heartbeat_is_fresh(db_url, a)
    age_heartbeat(db_url, a, 60)
    assert not heartbeat_is_fresh(db_url, a)
    assert storage.heartbeat(a) is True
    assert heartbeat_is_fresh(db_url, a)
    assert storage.heartbeat(a) is True  # twice in a row (the row unchanged or nearly): still found
    assert storage.heartbeat(UNKNOWN_SERVER) is False
    query(db_url, "DELETE FROM servers WHERE id = %s", (a,))
    assert storage.heartbeat(a) is False
    assert server_ids(db_url) == []  # a beat never creates a row


def test_sweep_lists_exactly_the_servers_clients(storage: Storage, db_url):
    a = register(storage, "box-a")
    b = register(storage, "box-b")
    c1 = storage.new_client(a).client_id  # session 1
    c2 = storage.new_client(a).client_id
    storage.claim_client(c2, a)  # session 2, still a's
    c3 = storage.new_client(b).client_id
    c4 = storage.new_client().client_id  # offline
    c5 = storage.new_client(a).client_id
    storage.claim_client(c5, b)  # taken over: b's, session 2
    c6 = storage.new_client(a)
    storage.release_client(c6.client_id, c6.session, a)  # disconnected
    for cid in (c1, c3, c4, c5, c6.client_id):
        assert storage.enqueue(cid, f"for {cid}", WINDOW).message_id is not None

    assert storage.sweep(a) == SweepResult(True, {c1: (1, True), c2: (2, False)})
    assert storage.sweep(b) == SweepResult(True, {c3: (1, True), c5: (2, True)})


def test_sweep_pending_flag_follows_delivery(storage: Storage, db_url):
    a = register(storage)
    claim = storage.new_client(a)
    cid, session = claim.client_id, claim.session
    assert storage.sweep(a).owned == {cid: (session, False)}
    storage.enqueue(cid, "one", WINDOW)
    storage.enqueue(cid, "two", WINDOW)
    assert storage.sweep(a).owned == {cid: (session, True)}
    storage.deliver_pending(cid, session, lambda messages: 1, 10)  # only the first was written
    assert storage.sweep(a).owned == {cid: (session, True)}
    storage.deliver_pending(cid, session, write_all, 10)
    assert storage.pending_count(cid) == 0
    assert storage.sweep(a).owned == {cid: (session, False)}
    # An ignored duplicate is not pending.
    assert storage.enqueue(cid, "two", WINDOW).message_id is None
    assert storage.sweep(a).owned == {cid: (session, False)}


def test_sweep_of_an_unknown_server(storage: Storage, db_url):
    a = register(storage)
    storage.new_client(a)
    assert storage.sweep(UNKNOWN_SERVER) == SweepResult(False, {})
    assert server_ids(db_url) == [a]  # no row made for it


def test_sweep_beats_the_heartbeat(storage: Storage, db_url):
    a = register(storage, event_host="10.0.0.1", event_port=8001)
    b = register(storage, "box-b")
    cid = storage.new_client(a).client_id
    age_heartbeat(db_url, a, 60)
    age_heartbeat(db_url, b, 60)
    assert storage.enqueue(cid, "while a looked dead", WINDOW).owner is None
    assert storage.sweep(a).registered
    assert heartbeat_is_fresh(db_url, a)
    assert not heartbeat_is_fresh(db_url, b)  # only its own
    assert storage.enqueue(cid, "a is back", WINDOW).owner == ServerAddress(a, "10.0.0.1", 8001)


# --- enqueue reports the live owner -------------------------------------------------------------------


def test_enqueue_reports_the_live_owner(storage: Storage, db_url):
    a = register(storage, event_host="10.0.0.1", event_port=8001)
    online = storage.new_client(a).client_id
    offline = storage.new_client().client_id
    queued = storage.enqueue(online, "hi", WINDOW)
    assert queued.message_id is not None
    assert queued == Queued(queued.message_id, ServerAddress(a, "10.0.0.1", 8001), session=1, previous=0)
    assert storage.enqueue(online, "hi", WINDOW) == Queued(None, None)  # duplicate
    queued = storage.enqueue(offline, "hi", WINDOW)
    assert queued.message_id is not None and queued.owner is None
    age_heartbeat(db_url, a, 60)
    queued = storage.enqueue(online, "later", WINDOW)
    assert queued.message_id is not None and queued.owner is None


# --- Enqueuer, routed mode ------------------------------------------------------------------------------


def test_routed_wakes_the_owner_once(storage: Storage, db_url, listener: WakeupListener, routed):
    a = register(storage, event_host="127.0.0.1", event_port=listener.port)
    cid = storage.new_client(a).client_id
    assert routed.enqueue(cid, "hello") is True
    assert listener.receive(5.0).clients() == {cid}
    assert routed.datagrams_sent == 1
    assert not listener.receive(0.3)


def test_routed_offline_client_costs_no_datagram(storage: Storage, db_url, listener: WakeupListener,
                                                 routed):
    a = register(storage, event_host="127.0.0.1", event_port=listener.port)
    online = storage.new_client(a).client_id
    offline = storage.new_client().client_id
    assert routed.enqueue(online, "positive control") is True
    assert listener.receive(5.0).clients() == {online}
    assert routed.enqueue(offline, "nobody to wake") is True
    assert not listener.receive(0.3)
    assert routed.datagrams_sent == 1
    assert storage.pending_count(offline) == 1  # stored all the same


def test_routed_released_client_costs_no_datagram(storage: Storage, db_url, listener: WakeupListener,
                                                  routed):
    a = register(storage, event_host="127.0.0.1", event_port=listener.port)
    claim = storage.new_client(a)
    assert routed.enqueue(claim.client_id, "connected") is True
    assert listener.receive(5.0).clients() == {claim.client_id}
    storage.release_client(claim.client_id, claim.session, a)
    assert routed.enqueue(claim.client_id, "disconnected") is True
    assert not listener.receive(0.3)
    assert routed.datagrams_sent == 1


def test_routed_stale_owner_costs_no_datagram(storage: Storage, db_url, listener: WakeupListener,
                                              routed):
    a = register(storage, event_host="127.0.0.1", event_port=listener.port)
    cid = storage.new_client(a).client_id
    assert routed.enqueue(cid, "owner alive") is True
    assert listener.receive(5.0).clients() == {cid}
    age_heartbeat(db_url, a, 60)
    assert routed.enqueue(cid, "owner dead") is True
    assert not listener.receive(0.3)
    assert routed.datagrams_sent == 1
    assert storage.heartbeat(a)
    assert routed.enqueue(cid, "owner back") is True
    assert listener.receive(5.0).clients() == {cid}
    assert routed.datagrams_sent == 2


def test_routed_duplicate_costs_no_datagram(storage: Storage, db_url, listener: WakeupListener, routed):
    a = register(storage, event_host="127.0.0.1", event_port=listener.port)
    cid = storage.new_client(a).client_id
    assert routed.enqueue(cid, "once") is True
    assert listener.receive(5.0).clients() == {cid}
    assert routed.enqueue(cid, "once") is False
    assert not listener.receive(0.3)
    assert routed.datagrams_sent == 1


def test_routed_follows_a_takeover(storage: Storage, db_url, counters: List[DatagramCounter], routed):
    first, second, _ = counters
    a = register(storage, "box-a", event_host="127.0.0.1", event_port=first.port)
    b = register(storage, "box-b", event_host="127.0.0.1", event_port=second.port)
    cid = storage.new_client(a).client_id
    assert routed.enqueue(cid, "to a") is True
    storage.claim_client(cid, b)
    assert routed.enqueue(cid, "to b") is True
    assert first.drain() == [[cid]]
    assert second.drain() == [[cid]]
    assert routed.datagrams_sent == 2


def test_routed_hundred_messages_hundred_datagrams(storage: Storage, db_url, counters: List[DatagramCounter],
                                                   routed):
    owner_port, bystander, _ = counters
    a = register(storage, "box-a", event_host="127.0.0.1", event_port=owner_port.port)
    register(storage, "box-b", event_host="127.0.0.1", event_port=bystander.port)
    cid = storage.new_client(a).client_id
    for i in range(100):
        assert routed.enqueue(cid, f"message {i}") is True
        # Drained per message: exactly one each time (and no receive buffer to overflow).
        assert owner_port.drain() == [[cid]], f"message {i}"
    assert bystander.drain() == []
    assert routed.datagrams_sent == 100


# --- Enqueuer, broadcast mode -----------------------------------------------------------------------------


def test_broadcast_wakes_every_peer_for_every_message(storage: Storage, db_url,
                                                       counters: List[DatagramCounter]):
    peer1, peer2, elsewhere = counters
    # One owner listens on a peer's port (it must not get a second datagram), one elsewhere
    # (broadcast mode does not look at owners), one is stale, one client is offline.
    on_peer = register(storage, "box-a", event_host="127.0.0.1", event_port=peer1.port)
    off_peers = register(storage, "box-b", event_host="127.0.0.1", event_port=elsewhere.port)
    stale = register(storage, "box-c", event_host="127.0.0.1", event_port=peer2.port)
    age_heartbeat(db_url, stale, 60)
    clients = [storage.new_client(on_peer).client_id, storage.new_client(off_peers).client_id,
               storage.new_client(stale).client_id, storage.new_client().client_id]
    peers = f"127.0.0.1:{peer1.port},127.0.0.1:{peer2.port}"
    with Enqueuer(db_url, peers) as enqueuer:
        assert enqueuer.mode == "broadcast"
        for cid in clients:
            assert enqueuer.enqueue(cid, "hello") is True
        assert enqueuer.enqueue(clients[0], "hello") is False  # duplicate: nobody woken
        assert enqueuer.datagrams_sent == 2 * len(clients)
    expected = [[cid] for cid in clients]
    assert peer1.drain() == expected
    assert peer2.drain() == expected
    assert elsewhere.drain() == []
