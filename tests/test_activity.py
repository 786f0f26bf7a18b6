"""The activity monitor (activity.py) on a real database: its samples, the rates the
status page draws, and the per-minute log line."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest

from messaging_server.server import activity, metrics
from messaging_server.server.activity import ActivityMonitor
from messaging_server.storage import Storage
from tests.helpers import wait_until


@pytest.fixture
def monitor(storage: Storage) -> Iterator[ActivityMonitor]:
    watcher = ActivityMonitor(storage, lambda: None, lambda: 3, interval=0.05)
    watcher.start()
    yield watcher
    watcher.stop()


def test_rates_follow_what_is_queued(storage: Storage, monitor: ActivityMonitor) -> None:
    client = storage.new_client().client_id
    wait_until(lambda: len(monitor.status()["rates"]) >= 2, 10, "two samples")
    for n in range(20):
        storage.enqueue(client, f"message {n}", 5.0)
    wait_until(lambda: sum(r["queued_per_s"] for r in monitor.status()["rates"]) > 0, 10,
               "the queued messages in the rates")
    status = monitor.status()
    assert status["pending"] == 20 and status["clients_connected_here"] == 3
    metrics.MESSAGES_DELIVERED.inc(7)  # what this process's deliveries count
    wait_until(lambda: sum(r["delivered_per_s"] for r in monitor.status()["rates"]) > 0, 10,
               "the delivered messages in the rates")
    assert status["servers"] == [] and status["clients_connected"] == 0


def test_one_info_line_a_minute(storage: Storage, monitor: ActivityMonitor,
                                caplog: pytest.LogCaptureFixture) -> None:
    client = storage.new_client().client_id
    with caplog.at_level(logging.INFO, logger="messaging_server"):
        storage.enqueue(client, "counted", 5.0)
        wait_until(lambda: any("activity, last minute" in r.getMessage() for r in caplog.records),
                   10, "the activity line")
    line = next(r.getMessage() for r in caplog.records if "activity, last minute" in r.getMessage())
    assert "messages queued (all servers)" in line and "3 clients connected here" in line
    assert activity.LOG_EVERY * 10.0 == 60.0  # at the default interval: once a minute
