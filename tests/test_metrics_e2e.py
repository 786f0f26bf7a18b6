"""``GET /metrics`` of a real server counts exactly what its clients and enqueuers did.

A ``python -m messaging_server -p 0`` process (its HTTP API on by default) on SQLite and on MariaDB;
clients over real loopback sockets (legacy and ACK mode, a reconnect, a wrong
secret, one that hangs up during the handshake), messages queued with an
Enqueuer (routed wake-ups) and over the HTTP API (one queued, three refused),
one acknowledged, one left to expire, hand-made wake-up datagrams; then
``/metrics`` is scraped until every counter equals what the test did, or the
deadline fails the test.

The sweep interval is long, so that no sweep asks for a delivery pass while
the test runs: every pass is then caused by something the test did, and the
count of coalesced wake-ups is exact.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import urllib.error
import urllib.request
from typing import Dict, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from messaging_server import Enqueuer
from tests.helpers import CREDENTIAL, RawClient, ServerProcess, numeric_id, query, wait_until

pytestmark = pytest.mark.usefixtures("no_niki_environment")  # routed mode, no API token

HTTP_LINE = re.compile(r"HTTP API on http://(?:\[[^\]]*\]|[^\s:/]+):(\d+)")
ACK_MESSAGE = re.compile(r"MESSAGE ([1-9][0-9]*): (.*)")
PURGE_INTERVAL = 0.3
SCRAPE_TIMEOUT_S = 5.0
DEADLINE_S = 15.0  # for the counters to settle; a loaded 2-core box included


def http_port(server: ServerProcess) -> int:
    """The HTTP API's port (a free one with -p 0), as the server reported it."""
    port = getattr(server, "http_port", 0)
    if port:
        return int(port)
    match = wait_until(lambda: HTTP_LINE.search(server.log), message="the HTTP API to listen")
    return int(match.group(1))


def scrape(url: str) -> Dict[str, float]:
    """Every sample at ``url``, keyed ``name{label="value",...}`` (labels sorted)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for_counts(url: str, expected: Dict[str, float]) -> Dict[str, float]:
    """Scrape until every expected sample has its value; fail naming those that differ."""
    seen: Dict[str, float] = {}
    differing: Dict[str, Optional[float]] = {}

    def matches() -> bool:
        seen.clear()
        seen.update(scrape(url))
        differing.clear()
        differing.update({k: seen.get(k) for k, v in expected.items() if seen.get(k) != v})
        return not differing

    try:
        wait_until(matches, DEADLINE_S, "the metrics to count what the test did")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; scraped (expected) values that differ: "
                             + ", ".join(f"{k}={v} ({expected[k]})" for k, v in differing.items())) from None
    return seen


def post(base: str, path: str, data: bytes) -> int:
    """POST ``data`` as JSON; the response status."""
    request = urllib.request.Request(base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def ack_handshake(client: RawClient) -> str:
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line("NONE ACK")
    line = client.read_line()
    match = re.fullmatch(rf"SET_CLIENT_ID: ({CREDENTIAL})", line or "")
    assert match, line
    return match.group(1)


def say_goodbye(client: RawClient) -> None:
    client.send_line("DISCONNECT")
    assert client.wait_closed() == []


def test_metrics_count_what_the_test_did(db_url: str, stack: contextlib.ExitStack):
    server = stack.enter_context(ServerProcess(
        db_url, "--advertise-host", "127.0.0.1",
        "--sweep-interval", "60", "--purge-interval", str(PURGE_INTERVAL)))
    base = f"http://127.0.0.1:{http_port(server)}"
    url = f"{base}/metrics"

    # Handshakes: three new clients, one reconnect, one wrong secret, one hang-up.
    legacy = stack.enter_context(server.connect())
    legacy_id = numeric_id(legacy.handshake())
    acker = stack.enter_context(server.connect())
    acker_id = numeric_id(ack_handshake(acker))
    with server.connect() as away:
        away_credential = away.handshake()
        say_goodbye(away)
    with server.connect() as again:
        assert again.handshake(away_credential) == away_credential
        say_goodbye(again)
    with server.connect() as stranger:
        stranger_credential = stranger.handshake(f"{legacy_id}.{'x' * 24}")
        assert numeric_id(stranger_credential) != legacy_id  # a new client, not the real one
        say_goodbye(stranger)
    with server.connect() as quitter:
        assert quitter.read_line() == "GET_CLIENT_ID"  # and hangs up
    away_id = numeric_id(away_credential)
    # Offline for the enqueuer (no owner): its message must wake nobody.
    wait_until(lambda: query(db_url, "SELECT owner_server_id FROM clients WHERE id = %s",
                             (away_id,)) == [(None,)], message="the client to be offline")

    # Messages, one at a time, each read before the next is queued: every wake-up
    # finds no delivery pass already due, so none is coalesced.
    acked_ids = []
    with Enqueuer(db_url) as enqueuer:
        for n in range(3):
            assert enqueuer.enqueue(legacy_id, f"legacy {n}") is True
            assert legacy.read_line() == f"MESSAGE: legacy {n}"
        for n in range(2):
            assert enqueuer.enqueue(acker_id, f"acked {n}") is True
            match = ACK_MESSAGE.fullmatch(acker.read_line() or "")
            assert match and match.group(2) == f"acked {n}"
            acked_ids.append(int(match.group(1)))
        assert enqueuer.enqueue(away_id, "too late", ttl=0.2) is True
    acker.send_line(f"ACK {acked_ids[0]}")  # the second stays unacknowledged

    # Over HTTP: one queued (a client connected here is woken in-process, with no
    # datagram), then an unknown client, a body too large, and a body not JSON.
    assert post(base, f"/v1/clients/{legacy_id}/messages", b'{"body": "over http"}') == 201
    assert legacy.read_line() == "MESSAGE: over http"
    assert post(base, "/v1/clients/999999/messages", b'{"body": "nobody"}') == 404
    too_large = json.dumps({"body": "x" * 5000}).encode("ascii")
    assert post(base, f"/v1/clients/{legacy_id}/messages", too_large) == 413
    assert post(base, f"/v1/clients/{legacy_id}/messages", b"{not json") == 422

    legacy.send_line("PING")
    assert legacy.read_line() == "PONG"
    legacy.send_line("HELLO")
    assert legacy.read_line() == "Invalid command: HELLO"

    # Wake-ups by hand: one naming a client twice (coalesced in the listener), one
    # for a client not connected here, and one that is no wake-up at all.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (f"NIKI1 {legacy_id},{legacy_id}", "NIKI1 999999", "not a wake-up"):
            sock.sendto(datagram.encode("ascii"), ("127.0.0.1", server.event_port))

    samples = wait_for_counts(url, {
        'niki_handshakes_total{result="new"}': 4,  # legacy, acker, away, stranger
        'niki_handshakes_total{result="identified"}': 1,  # again
        'niki_handshakes_total{result="failed"}': 1,  # quitter
        'niki_handshakes_total{result="refused"}': 0,
        "niki_credentials_rejected_total": 1,
        "niki_messages_delivered_total": 6,  # 4 legacy (marked), 2 ACK mode (written)
        "niki_messages_acknowledged_total": 1,
        "niki_messages_expired_total": 1,
        "niki_delivery_latency_seconds_count": 6,
        'niki_delivery_latency_seconds_bucket{le="10.0"}': 6,
        'niki_commands_total{command="ack"}': 1,
        'niki_commands_total{command="ping"}': 1,
        'niki_commands_total{command="disconnect"}': 3,
        'niki_commands_total{command="invalid"}': 1,
        "niki_clients_connected": 2,
        "niki_connections_open": 2,
        "niki_connections_refused_total": 0,
        "niki_wakeups_received_total": 8,  # 5 from the enqueuer, 3 by hand
        "niki_wakeups_invalid_total": 1,
        "niki_wakeups_coalesced_total": 1,
        "niki_wakeups_not_connected_total": 1,
        "niki_messages_queued_total": 1,
        'niki_messages_rejected_total{reason="unknown_client"}': 1,
        'niki_messages_rejected_total{reason="body_too_large"}': 1,
        'niki_messages_rejected_total{reason="bad_request"}': 1,
        'niki_messages_rejected_total{reason="queue_full"}': 0,
        'niki_write_failures_total{cause="timeout"}': 0,
        'niki_write_failures_total{cause="error"}': 0,
        "niki_deliveries_postponed_total": 0,
        "niki_db_pool_size": 8,
    })
    assert samples["niki_delivery_latency_seconds_sum"] > 0
    assert samples["niki_purge_duration_seconds_count"] >= 1
    assert 0 <= samples["niki_db_connections_in_use"] <= 8
    assert samples["process_resident_memory_bytes"] > 0
    assert query(db_url, "SELECT status FROM messages WHERE client_id = %s", (away_id,)) == [("expired",)]
