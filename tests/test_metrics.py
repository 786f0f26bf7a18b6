"""The metrics module, and the counts the server's parts keep for it.

What is proved here, without a server process (tests/test_metrics_e2e.py
scrapes a real one):

* ``render()`` gives the Prometheus text format from Niki's own registry: the
  process metrics are in it, metrics of the global default registry are not,
  and every labelled counter shows its label values at 0 from the start.
* The helpers count what they say (latency buckets, marks), and the gauges of
  a watched server are read at scrape time.
* The storage reports each message's enqueue time with it, and counts the
  pooled connections borrowed by transactions, on SQLite and MariaDB.
* Wake-ups: datagrams received, invalid, and coalesced (named twice in one
  batch, or finding a delivery pass already due); the sweep and purge durations.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import messaging_server
from messaging_server.server import metrics
from messaging_server.server.connection import ClientConnection
from messaging_server.server.delivery import DeliveryThread
from messaging_server.server.sweeper import Purger, Sweeper
from messaging_server.storage import Storage, StoredMessage
from messaging_server.wakeup import WakeupListener
from tests.helpers import wait_until

WINDOW = 5.0  # the duplicate window passed to storage.enqueue


def scrape() -> Dict[str, float]:
    """Every sample of ``render()``, keyed ``name{label="value",...}`` (labels sorted)."""
    body, _ = metrics.render()
    samples: Dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
def unwatched() -> Iterator[None]:
    """No server is watched during the test, nor after it."""
    metrics.watch(None)
    yield
    metrics.watch(None)


# --- render() ------------------------------------------------------------------------------------


def test_render_is_prometheus_text_with_process_metrics():
    body, content_type = metrics.render()
    assert isinstance(body, bytes)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = scrape()
    assert samples["process_resident_memory_bytes"] > 0
    assert samples["process_open_fds"] > 0
    assert samples[f'niki_info{{version="{messaging_server.__version__}"}}'] == 1
    for name in ("niki_messages_queued_total", "niki_messages_delivered_total",
                 "niki_messages_acknowledged_total", "niki_messages_expired_total",
                 "niki_delivery_latency_seconds_count", "niki_sweep_duration_seconds_count"):
        assert name in samples, name
    # Every metric of Niki's is documented (HELP) and prefixed.
    text = body.decode("utf-8")
    families = [f for f in text_string_to_metric_families(text) if not f.name.startswith("process_")]
    assert families and all(f.name.startswith("niki_") and f.documentation for f in families)


def test_labelled_counters_start_at_zero_for_every_value():
    samples = scrape()
    for reason in ("unknown_client", "queue_full", "body_too_large", "bad_request"):
        assert f'niki_messages_rejected_total{{reason="{reason}"}}' in samples
    for result in ("new", "identified", "refused", "failed", "throttled"):
        assert f'niki_handshakes_total{{result="{result}"}}' in samples
    for command in ("ack", "ping", "disconnect", "invalid"):
        assert f'niki_commands_total{{command="{command}"}}' in samples
    for task in ("sweeper", "purger", "heartbeat"):
        assert f'niki_background_errors_total{{task="{task}"}}' in samples


def test_own_registry_not_the_default_one():
    other = prometheus_client.Counter("unrelated_things", "Registered on the default registry.")
    try:
        assert "unrelated_things_total" not in scrape()
        assert prometheus_client.REGISTRY.get_sample_value("niki_messages_queued_total") is None
    finally:
        prometheus_client.REGISTRY.unregister(other)


def test_counters_show_in_render():
    before = scrape()
    metrics.MESSAGES_QUEUED.inc()
    metrics.MESSAGES_REJECTED.labels(reason="queue_full").inc(2)
    after = scrape()
    assert after["niki_messages_queued_total"] == before["niki_messages_queued_total"] + 1
    key = 'niki_messages_rejected_total{reason="queue_full"}'
    assert after[key] == before[key] + 2


# --- helpers --------------------------------------------------------------------------------------


def bucket(samples: Dict[str, float], le: str) -> float:
    return samples[f'niki_delivery_latency_seconds_bucket{{le="{le}"}}']


def test_observe_latency_buckets():
    before = scrape()
    now = 1_000_000.0
    # 3 ms, 0.7 s, unknown (skipped), and 2 s in the future (clocks apart: counts as 0).
    metrics.observe_latency([now - 0.003, now - 0.7, 0.0, now + 2], now=now)
    after = scrape()
    assert after["niki_delivery_latency_seconds_count"] == before["niki_delivery_latency_seconds_count"] + 3
    assert bucket(after, "0.001") == bucket(before, "0.001") + 1  # the one from the future
    assert bucket(after, "0.0025") == bucket(before, "0.0025") + 1
    assert bucket(after, "0.005") == bucket(before, "0.005") + 2
    assert bucket(after, "0.5") == bucket(before, "0.5") + 2
    assert bucket(after, "1.0") == bucket(before, "1.0") + 3
    assert after["niki_delivery_latency_seconds_sum"] == pytest.approx(
        before["niki_delivery_latency_seconds_sum"] + 0.703)


def test_count_marked_splits_acknowledged_from_written():
    before = scrape()
    metrics.count_marked(3, acknowledged=False)
    metrics.count_marked(2, acknowledged=True)
    after = scrape()
    assert after["niki_messages_delivered_total"] == before["niki_messages_delivered_total"] + 3
    assert after["niki_messages_acknowledged_total"] == before["niki_messages_acknowledged_total"] + 2


def probes(**values: int) -> metrics.ServerProbes:
    fields = ("clients_connected", "connections_open", "connections_refused", "db_connections_in_use",
              "db_pool_size", "wakeups_received", "wakeups_invalid", "wakeups_coalesced",
              "wakeups_not_connected", "wakeups_nothing_new")
    return metrics.ServerProbes(**{f: constant(values.get(f, 0)) for f in fields})


def constant(value: int) -> Callable[[], int]:
    return lambda: value


def test_watched_server_is_read_at_scrape(unwatched):
    assert "niki_clients_connected" not in scrape()  # no server: no server gauges
    held = [1, 2, 3]
    metrics.watch(metrics.ServerProbes(
        clients_connected=held.__len__, connections_open=lambda: 4, connections_refused=lambda: 5,
        db_connections_in_use=lambda: 1, db_pool_size=lambda: 8, wakeups_received=lambda: 9,
        wakeups_invalid=lambda: 2, wakeups_coalesced=lambda: 3, wakeups_not_connected=lambda: 6,
        wakeups_nothing_new=lambda: 10))
    samples = scrape()
    assert samples["niki_clients_connected"] == 3
    assert samples["niki_connections_open"] == 4
    assert samples["niki_connections_refused_total"] == 5
    assert samples["niki_db_connections_in_use"] == 1
    assert samples["niki_db_pool_size"] == 8
    assert samples["niki_wakeups_received_total"] == 9
    assert samples["niki_wakeups_invalid_total"] == 2
    assert samples["niki_wakeups_coalesced_total"] == 3
    assert samples["niki_wakeups_not_connected_total"] == 6
    assert samples["niki_wakeups_nothing_new_total"] == 10
    held.append(4)
    assert scrape()["niki_clients_connected"] == 4  # read now, not when watched
    metrics.watch(probes(clients_connected=7))  # a later server replaces the earlier one
    assert scrape()["niki_clients_connected"] == 7
    metrics.watch(None)
    assert "niki_clients_connected" not in scrape()


# --- storage: created_at and the pool gauge --------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.messages: List[StoredMessage] = []

    def __call__(self, messages: Sequence[StoredMessage]) -> int:
        self.messages.extend(messages)
        return len(messages)


def test_delivered_messages_carry_their_enqueue_time(storage: Storage):
    claim = storage.new_client()
    before = time.time()
    storage.enqueue(claim.client_id, "first", WINDOW)
    storage.enqueue(claim.client_id, "second", WINDOW)
    after = time.time()
    collector = Collector()
    storage.deliver_pending(claim.client_id, claim.session, collector, 10)
    assert [m.body for m in collector.messages] == ["first", "second"]
    # The database's clock (same machine): microseconds on MariaDB, milliseconds on SQLite.
    for message in collector.messages:
        assert before - 0.01 <= message.created_at <= after + 0.01, (before, message, after)
    assert collector.messages[0].created_at <= collector.messages[1].created_at


def test_connections_in_use_counts_open_transactions(storage: Storage):
    assert storage.connections_in_use() == 0
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with storage.transaction():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(10)
        assert storage.connections_in_use() == 1
    finally:
        release.set()
        thread.join(10)
    assert storage.connections_in_use() == 0
    with pytest.raises(ZeroDivisionError), storage.transaction():
        assert storage.connections_in_use() == 1
        raise ZeroDivisionError  # a failed transaction gives its count back too
    assert storage.connections_in_use() == 0


# --- wake-ups ------------------------------------------------------------------------------------


def test_listener_counts_received_invalid_and_merged(listener: WakeupListener):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (b"NIKI1 7,7", b"hello", b"NIKI1 7,8"):
            sock.sendto(datagram, ("127.0.0.1", listener.port))
    # Loopback datagrams are queued before sendto() returns: one receive() takes all three.
    assert listener.receive(timeout=5).ids == {7, 8}
    assert (listener.received, listener.invalid, listener.merged) == (3, 1, 2)


def test_request_delivery_reports_a_pass_already_due():
    ours, theirs = socket.socketpair()
    try:
        conn = ClientConnection(ours, "test")
        assert conn.request_delivery() is True
        assert conn.request_delivery() is False  # coalesced into the one already due
        assert conn.take_work(timeout=0).deliver
        assert conn.request_delivery() is True  # the pass began: a new request is a new pass
    finally:
        ours.close()
        theirs.close()


def test_delivery_thread_counts_coalesced_and_not_connected(listener: WakeupListener):
    ours, theirs = socket.socketpair()
    conn = ClientConnection(ours, "test")
    conn.request_delivery()  # a pass is due already: the wake-up adds nothing
    lookup: Dict[int, Optional[ClientConnection]] = {1: conn}
    thread = DeliveryThread(listener, lookup.get)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"NIKI1 1,2", ("127.0.0.1", listener.port))
    thread.start()
    try:
        wait_until(lambda: thread.not_connected == 1 and thread.coalesced == 1, message="wake-up counts")
        assert conn.take_work(timeout=0).deliver
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"NIKI1 1", ("127.0.0.1", listener.port))
        wait_until(lambda: conn.take_work(timeout=0.05).deliver, message="a new pass asked for")
        assert thread.coalesced == 1  # no pass was due then: not coalesced
    finally:
        thread.stop()
        ours.close()
        theirs.close()


# --- sweeper and purger ----------------------------------------------------------------------------


def test_sweep_and_purge_are_timed_and_expiry_counted(storage: Storage):
    server_id = storage.register_server("test", 1, "127.0.0.1", 9, 1)
    claim = storage.new_client()
    message_id = storage.enqueue(claim.client_id, "short-lived", WINDOW, ttl=0.01).message_id
    before = scrape()
    Sweeper(storage, lambda: server_id, list, interval=60).tick()
    purger = Purger(storage, interval=60, retention=86400, batch=100)
    wait_until(lambda: storage.message_info(message_id).status == "expired", message="the ttl to pass")
    purger.tick()
    after = scrape()
    for name in ("niki_sweep_duration_seconds_count", "niki_purge_duration_seconds_count",
                 "niki_messages_expired_total"):
        assert after[name] == before[name] + 1, name
    assert after["niki_sweep_duration_seconds_sum"] > before["niki_sweep_duration_seconds_sum"]
