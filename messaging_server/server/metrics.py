"""Prometheus metrics of one server process, rendered for ``GET /metrics``.

Every metric lives on :data:`REGISTRY`, a registry of Niki's own rather than
prometheus_client's global default one, so that a program (or a test) that
imports Niki beside other instrumented code sees no clash of names.  The
process collector (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
``process_open_fds``...) is registered on it too.

Two kinds of metric, chosen by who counts:

* Events counted by many threads (deliveries, handshakes, commands) are
  module-level counters and histograms: the code calls ``inc()`` or
  ``observe()``, which take a short lock and do no I/O; the delivery latency
  takes a whole batch of messages under one lock (:class:`BatchHistogram`).
* Numbers a server already keeps (connections held, pooled database
  connections in use, the delivery thread's wake-up counts) are read only
  when scraped, through the :class:`ServerProbes` a server hands to
  :func:`watch`: they cost nothing between scrapes.

What each metric counts, precisely, is in docs/METRICS.md.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

#: The classic Prometheus text format (what ``generate_latest`` writes), which
#: every Prometheus version and scraper accepts; spelled out because the constant
#: of prometheus_client differs between its versions.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No ``*_created`` series beside every counter: they double the output and no
# dashboard needs them (the process start time is process_start_time_seconds).
# prometheus_client's switch is process-wide, and this process is a Niki server.
disable_created_metrics()

#: Niki's own registry: ``render()`` exposes exactly what is registered here.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

#: Buckets of the enqueue-to-delivery latency, in seconds: 1 ms .. 10 s.  A
#: message woken by a datagram takes milliseconds; one found by the sweep up to
#: a sweep interval (2 s by default); one queued while its client was offline
#: lands in +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Buckets of one sweep's or purge's duration, in seconds: healthy ones take a
#: few queries (milliseconds); seconds mean the database is struggling.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The values of ``niki_messages_rejected_total{reason=...}``.
REJECT_REASONS = ("unknown_client", "queue_full", "body_too_large", "bad_request")

# -- queueing through the HTTP API of this server ------------------------------

MESSAGES_QUEUED = Counter(
    "niki_messages_queued",
    "Messages queued through this server's HTTP API.",
    registry=REGISTRY,
)
MESSAGES_REJECTED = Counter(
    "niki_messages_rejected",
    "Messages this server's HTTP API refused to queue, by reason.",
    ["reason"],
    registry=REGISTRY,
)

# -- handshakes and commands ----------------------------------------------------------

HANDSHAKES = Counter(
    "niki_handshakes",
    "Protocol handshakes, by result: new (a client was created), identified (an existing "
    "client's credential was accepted), refused (database unavailable), failed (the peer "
    "timed out, closed, sent a line too long, or failed TLS), throttled (too many failed "
    "identifications or new clients from its address: no client was created).",
    ["result"],
    registry=REGISTRY,
)
HANDSHAKE_NEW = HANDSHAKES.labels(result="new")
HANDSHAKE_IDENTIFIED = HANDSHAKES.labels(result="identified")
HANDSHAKE_REFUSED = HANDSHAKES.labels(result="refused")
HANDSHAKE_FAILED = HANDSHAKES.labels(result="failed")
HANDSHAKE_THROTTLED = HANDSHAKES.labels(result="throttled")

CREDENTIALS_REJECTED = Counter(
    "niki_credentials_rejected",
    "Handshakes that presented a client id with a wrong or missing secret, or an unknown id "
    "(each then got a new client, counted in niki_handshakes_total{result=\"new\"}).",
    registry=REGISTRY,
)

COMMANDS = Counter(
    "niki_commands",
    "Lines identified clients sent after the handshake, by command: ack, ping, disconnect, "
    "invalid (anything else, ACK without an id, or a line too long).",
    ["command"],
    registry=REGISTRY,
)
COMMAND_ACK = COMMANDS.labels(command="ack")
COMMAND_PING = COMMANDS.labels(command="ping")
COMMAND_DISCONNECT = COMMANDS.labels(command="disconnect")
COMMAND_INVALID = COMMANDS.labels(command="invalid")

# -- delivery -------------------------------------------------------------------------

CARRIED_WRITTEN = Counter(
    "niki_carried_messages_written",
    "Messages written as a wake-up datagram carried them, without reading the database.",
    registry=REGISTRY,
)
MESSAGES_DELIVERED = Counter(
    "niki_messages_delivered",
    "Messages written whole to a client socket (legacy clients: counted when the "
    "delivered mark commits).",
    registry=REGISTRY,
)
MESSAGES_ACKNOWLEDGED = Counter(
    "niki_messages_acknowledged",
    "Messages an ACK-mode client acknowledged, counted when the mark commits.",
    registry=REGISTRY,
)
MESSAGES_EXPIRED = Counter(
    "niki_messages_expired",
    "Pending messages this server's purger marked expired because their ttl had passed.",
    registry=REGISTRY,
)


class BatchHistogram:
    """A histogram fed a batch of values at a time, for the delivery path.

    prometheus_client's ``Histogram.observe`` takes two locks per value; a
    delivery writes up to a batch (500) of messages at once, so here the batch
    is sorted into buckets without a lock and added under one.  Exposed like
    any histogram (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Iterable[float]) -> None:
        counts = [0] * len(self._counts)
        total = 0.0
        bounds = self._bounds
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket with value <= le
            total += value
        with self._lock:
            for index, count in enumerate(counts):
                if count:
                    self._counts[index] += count
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        les = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(les, cumulative)), total)
        yield family


DELIVERY_LATENCY = BatchHistogram(
    "niki_delivery_latency_seconds",
    "Time from a message's enqueue (its stored created_at) to its write to the client socket.",
    LATENCY_BUCKETS,
)
REGISTRY.register(DELIVERY_LATENCY)
DELIVERY_PASSES = Counter(
    "niki_delivery_passes",
    "Delivery passes run for connected clients (each reads the database at least once).",
    registry=REGISTRY,
)
DELIVERIES_POSTPONED = Counter(
    "niki_deliveries_postponed",
    "Delivery passes cut short because the database was unavailable.",
    registry=REGISTRY,
)
WRITE_FAILURES = Counter(
    "niki_write_failures",
    "Writes to a client socket that failed, by cause: timeout (the client did not read "
    "within the write timeout) or error (reset, broken pipe); the connection is closed.",
    ["cause"],
    registry=REGISTRY,
)
WRITE_TIMEOUTS = WRITE_FAILURES.labels(cause="timeout")
WRITE_ERRORS = WRITE_FAILURES.labels(cause="error")

# -- background work ------------------------------------------------------------------

SWEEP_DURATION = Histogram(
    "niki_sweep_duration_seconds",
    "Duration of one sweep: committing kept marks, the query for this server's clients, "
    "and asking those with pending messages for a delivery pass.",
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
PURGE_DURATION = Histogram(
    "niki_purge_duration_seconds",
    "Duration of one purge: expiring messages past their ttl, deleting old finished ones.",
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
BACKGROUND_ERRORS = Counter(
    "niki_background_errors",
    "Runs of a background task (sweeper, purger, heartbeat) that failed, most often "
    "because the database was unavailable.",
    ["task"],
    registry=REGISTRY,
)

# Label values appear (at 0) before their first event, so that rate() has a
# series from the first scrape on.
for _reason in REJECT_REASONS:
    MESSAGES_REJECTED.labels(reason=_reason)
for _task in ("sweeper", "purger", "heartbeat"):
    BACKGROUND_ERRORS.labels(task=_task)


def observe_latency(created_at: Iterable[float], now: Optional[float] = None) -> None:
    """Record the enqueue-to-write latency of messages written at ``now`` (default: now).

    ``created_at`` are epoch seconds by the database's clock; 0.0 (unknown) is
    skipped, and a negative difference (clocks apart) counts as 0.
    """
    now = time.time() if now is None else now
    DELIVERY_LATENCY.observe_many(max(0.0, now - queued) for queued in created_at if queued)


def count_marked(count: int, acknowledged: bool) -> None:
    """A "delivered" mark of ``count`` messages committed after their write:
    acknowledged ones (ACK mode) or written ones of a legacy client."""
    (MESSAGES_ACKNOWLEDGED if acknowledged else MESSAGES_DELIVERED).inc(count)


# -- numbers read when scraped ----------------------------------------------------------


@dataclass(frozen=True)
class ServerProbes:
    """What a server lets the scrape read: each callable returns the value now.

    They run on the scraping thread and must be quick and thread-safe (a short
    lock, or an int that only one thread writes).
    """

    clients_connected: Callable[[], int]  # identified clients held
    connections_open: Callable[[], int]  # client TCP connections admitted, identified or not
    connections_refused: Callable[[], int]  # refused by the connection caps, since start
    db_connections_in_use: Callable[[], int]
    db_pool_size: Callable[[], int]
    wakeups_received: Callable[[], int]  # datagrams
    wakeups_invalid: Callable[[], int]  # datagrams that were not wake-ups
    wakeups_coalesced: Callable[[], int]  # client wake-ups that caused no pass of their own
    wakeups_not_connected: Callable[[], int]  # client wake-ups naming a client not held here
    wakeups_nothing_new: Callable[[], int]  # client wake-ups that found nothing new: no pass


# (metric name, help, ServerProbes field) of the gauges, then of the counters, read at scrape.
_PROBED_GAUGES = (
    ("niki_clients_connected", "Identified clients connected to this server.", "clients_connected"),
    ("niki_connections_open", "Client connections this server holds, identified or still in "
     "their handshake.", "connections_open"),
    ("niki_db_connections_in_use", "Database connections borrowed from the server's pool for a "
     "transaction right now.", "db_connections_in_use"),
    ("niki_db_pool_size", "Size of the server's database connection pool (--pool-size).",
     "db_pool_size"),
)
_PROBED_COUNTERS = (
    ("niki_connections_refused", "Client connections refused with 'ERROR: server busy' by the "
     "connection caps.", "connections_refused"),
    ("niki_wakeups_received", "Datagrams received on the wake-up (event) port.", "wakeups_received"),
    ("niki_wakeups_invalid", "Datagrams received on the wake-up port that were not well-formed "
     "wake-ups (ignored).", "wakeups_invalid"),
    ("niki_wakeups_coalesced", "Client wake-ups (a client id in a datagram) that caused no "
     "delivery pass of their own, because one was already due for that client.",
     "wakeups_coalesced"),
    ("niki_wakeups_not_connected", "Client wake-ups naming a client not connected to this "
     "server (ignored).", "wakeups_not_connected"),
    ("niki_wakeups_nothing_new", "Client wake-ups for a connected client that the database "
     "showed had nothing new (no delivery pass).", "wakeups_nothing_new"),
)
_INFO = ("niki_info", "Always 1; the version of this Niki server in its label.")


class _ServerCollector:
    """Reads the watched server's probes at each scrape."""

    def __init__(self) -> None:
        self._probes: Optional[ServerProbes] = None
        self._lock = threading.Lock()

    def watch(self, probes: Optional[ServerProbes]) -> None:
        with self._lock:
            self._probes = probes

    def describe(self) -> Iterator[Metric]:
        """The names this collector may report (the registry checks them for clashes)."""
        yield GaugeMetricFamily(*_INFO, labels=["version"])
        for name, text, _ in _PROBED_GAUGES:
            yield GaugeMetricFamily(name, text)
        for name, text, _ in _PROBED_COUNTERS:
            yield CounterMetricFamily(name, text)

    def collect(self) -> Iterator[Metric]:
        from messaging_server.version import __version__

        info = GaugeMetricFamily(*_INFO, labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        with self._lock:
            probes = self._probes
        if probes is None:  # no server in this process: nothing to report
            return
        for name, text, field in _PROBED_GAUGES:
            yield GaugeMetricFamily(name, text, value=getattr(probes, field)())
        for name, text, field in _PROBED_COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(probes, field)())


_SERVER = _ServerCollector()
REGISTRY.register(_SERVER)


def watch(probes: Optional[ServerProbes]) -> None:
    """Report the server behind ``probes`` from now on (None: stop).

    One server per process is the rule; should there be several (tests),
    the last one watched is reported.
    """
    _SERVER.watch(probes)


def render() -> Tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE


__all__ = [
    "BACKGROUND_ERRORS",
    "CARRIED_WRITTEN",
    "COMMANDS",
    "COMMAND_ACK",
    "COMMAND_DISCONNECT",
    "COMMAND_INVALID",
    "COMMAND_PING",
    "CONTENT_TYPE",
    "CREDENTIALS_REJECTED",
    "DELIVERIES_POSTPONED",
    "DELIVERY_LATENCY",
    "DELIVERY_PASSES",
    "DURATION_BUCKETS",
    "HANDSHAKES",
    "HANDSHAKE_FAILED",
    "HANDSHAKE_IDENTIFIED",
    "HANDSHAKE_NEW",
    "HANDSHAKE_REFUSED",
    "HANDSHAKE_THROTTLED",
    "LATENCY_BUCKETS",
    "MESSAGES_ACKNOWLEDGED",
    "MESSAGES_DELIVERED",
    "MESSAGES_EXPIRED",
    "MESSAGES_QUEUED",
    "MESSAGES_REJECTED",
    "PURGE_DURATION",
    "REGISTRY",
    "REJECT_REASONS",
    "SWEEP_DURATION",
    "WRITE_ERRORS",
    "WRITE_FAILURES",
    "WRITE_TIMEOUTS",
    "BatchHistogram",
    "ServerProbes",
    "count_marked",
    "observe_latency",
    "render",
    "watch",
]
