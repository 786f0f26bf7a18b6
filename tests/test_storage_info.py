"""What the storage layer tells operators and the HTTP API: clients, message receipts, servers."""

from __future__ import annotations

import datetime
import re
from typing import List

from messaging_server.storage import Storage, StoredMessage
from tests.helpers import query

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
WINDOW = 5.0


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S")


def near_now(text: str) -> bool:
    """Stored times are UTC: within a minute of this machine's UTC clock."""
    assert ISO_UTC.fullmatch(text), text
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return abs((utc(text) - now).total_seconds()) < 60


def write_all(messages: List[StoredMessage]) -> int:
    return len(messages)


def test_unknown_client_and_message(storage: Storage):
    assert storage.client_info(424242) is None
    assert storage.message_info(424242) is None


def test_client_info_counts_pending_and_shows_its_live_server(storage: Storage):
    server_id = storage.register_server("box-a", 8000, "127.0.0.1", 9001, 4321)
    claim = storage.new_client(server_id, b"s" * 32)
    for body in ("a", "b", "c"):
        storage.enqueue(claim.client_id, body, WINDOW)
    storage.enqueue(claim.client_id, "gone", WINDOW, ttl=0.000001)  # expired at once: not pending
    info = storage.client_info(claim.client_id)
    assert info is not None and info.pending == 3 and info.has_secret and info.connected
    assert info.server is not None
    assert (info.server.server_id, info.server.host, info.server.port, info.server.pid) == (
        server_id, "box-a", 8000, 4321)
    assert info.server.alive and info.server.clients == 1
    assert near_now(info.created_at)

    storage.release_client(claim.client_id, claim.session, server_id)
    offline = storage.client_info(claim.client_id)
    assert offline is not None and not offline.connected and offline.server is None
    assert offline.last_seen_at is not None and near_now(offline.last_seen_at)


def test_client_of_a_dead_server_is_offline(storage: Storage, db_url):
    server_id = storage.register_server("box-b", 8000, "127.0.0.1", 9002, 1)
    claim = storage.new_client(server_id)
    query(db_url, "UPDATE servers SET heartbeat_at = '2000-01-01 00:00:00' WHERE id = %s",
          (server_id,))
    info = storage.client_info(claim.client_id)
    assert info is not None and not info.connected and not info.has_secret
    (server,) = storage.list_servers()
    assert server.server_id == server_id and not server.alive


def test_message_receipts_through_their_life(storage: Storage, db_url):
    claim = storage.new_client(None)
    first = storage.enqueue(claim.client_id, "first", WINDOW).message_id
    second = storage.enqueue(claim.client_id, "second", WINDOW).message_id
    storage.enqueue(claim.client_id, "first", WINDOW)  # a duplicate: stored as ignored
    assert first is not None and second is not None
    pending = storage.message_info(first)
    assert pending is not None and pending.status == "pending" and pending.client_id == claim.client_id
    assert near_now(pending.created_at) and pending.delivered_at is None and pending.expires_at is None

    storage.deliver_pending(claim.client_id, claim.session, write_all, batch=1)  # legacy: marked
    delivered = storage.message_info(first)
    assert delivered is not None and delivered.status == "delivered"
    assert delivered.delivered_at is not None and near_now(delivered.delivered_at)
    assert delivered.acknowledged_at is None

    assert storage.mark_delivered(claim.client_id, [second], acknowledged=True) == 1
    acked = storage.message_info(second)
    assert acked is not None and acked.status == "acknowledged"
    assert acked.acknowledged_at is not None and acked.delivered_at is not None

    ((duplicate,),) = query(db_url, "SELECT id FROM messages WHERE status = 'ignored'")
    ignored = storage.message_info(int(duplicate))
    assert ignored is not None and ignored.status == "ignored" and ignored.delivered_at is None


def test_a_message_past_its_ttl_reads_expired_before_any_sweep(storage: Storage):
    claim = storage.new_client(None)
    queued = storage.enqueue(claim.client_id, "brief", WINDOW, ttl=0.000001)
    assert queued.message_id is not None
    info = storage.message_info(queued.message_id)
    assert info is not None and info.status == "expired" and info.expires_at is not None
    storage.expire_and_purge(retention=3600, batch=100)
    swept = storage.message_info(queued.message_id)
    assert swept is not None and swept.status == "expired"


def test_list_servers(storage: Storage):
    assert storage.list_servers() == []
    first = storage.register_server("a", 8000, "127.0.0.1", 9101, 11)
    second = storage.register_server("b", 8010, "127.0.0.1", 9102, 12)
    storage.new_client(second)
    storage.new_client(second)
    servers = storage.list_servers()
    assert [(s.server_id, s.host, s.clients, s.alive) for s in servers] == [
        (first, "a", 0, True), (second, "b", 2, True)]
    assert all(near_now(s.heartbeat_at) and near_now(s.started_at) for s in servers)


def test_enqueue_for_a_connected_client_returns_the_stored_id(storage: Storage, db_url):
    """Looking up the live owner after the INSERT must not lose the new message's id."""
    server_id = storage.register_server("box-c", 8000, "127.0.0.1", 9201, 7)
    claim = storage.new_client(server_id)
    queued = storage.enqueue(claim.client_id, "for a connected client", WINDOW)
    assert queued.owner is not None and queued.owner.server_id == server_id
    ((stored,),) = query(db_url, "SELECT id FROM messages WHERE client_id = %s", (claim.client_id,))
    assert queued.message_id == int(stored) and queued.message_id > 0
