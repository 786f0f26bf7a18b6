"""Every setting in one place: its default, its environment variable, its option.

Options win over environment variables, which win over defaults, so a server
and the ``niki-enqueue`` run beside it can share ``NIKI_DB`` and ``NIKI_PEERS``.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Tuple

from .errors import ConfigurationError
from .wakeup import Address, parse_peers

DEFAULT_PORT = 8000
DEFAULT_DB = "sqlite:///niki.sqlite3"
# The original's duplicate rule: the same body for the same client within this
# many seconds is recorded as ignored and not delivered.
DUPLICATE_WINDOW_S = 5.0
# Largest body, in UTF-8 bytes.  Push payloads are small (APNs allows 4 KiB);
# the bound keeps every MESSAGE line, and what a client must buffer, small.
MAX_BODY_BYTES = 4096
# A client that has not identified by then is dropped, freeing its thread.
HANDSHAKE_TIMEOUT_S = 30.0
# A client that cannot take a write within this long is disconnected; what was
# not written stays pending.  Also bounds how long a delivery holds its locks.
WRITE_TIMEOUT_S = 10.0
# Messages read, written and marked per database transaction when delivering.
DELIVERY_BATCH = 500
# How often a server looks for pending messages of its clients on its own, so
# that a lost wake-up datagram delays a message by at most this long.
SWEEP_INTERVAL_S = 2.0
# ACK clients: messages written and not yet acknowledged, per connection.
MAX_INFLIGHT = 100
# TCP keepalive: a silent peer is probed after IDLE s, every INTERVAL s, and
# dropped after COUNT unanswered probes: 60 + 10 x 6 = 2 minutes.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 60, 10, 6
# Pending messages one client may have; enqueue beyond it raises QueueFull.
MAX_PENDING = 10_000
# Delivered, ignored and expired messages are deleted after this long.
RETENTION_DAYS = 7.0
# How often a server expires and purges, and how many rows per transaction.
PURGE_INTERVAL_S = 60.0
PURGE_BATCH = 1000
# Concurrent client connections one server accepts; each costs a thread and a
# descriptor.  The server lowers it to what its open-file limit allows.
MAX_CONNECTIONS = 10_000


def env_default(name: str, default: str, environ: Optional[Mapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    value = environ.get(name, "")
    return value if value.strip() else default


def configured_peers(environ: Optional[Mapping[str, str]] = None) -> Optional[List[Address]]:
    """NIKI_PEERS (broadcast mode), or None: wake only each client's owner (routed mode)."""
    peers = parse_peers(env_default("NIKI_PEERS", "", environ))
    return peers or None


def default_max_pending(environ: Optional[Mapping[str, str]] = None) -> int:
    """NIKI_MAX_PENDING, else MAX_PENDING."""
    text = env_default("NIKI_MAX_PENDING", str(MAX_PENDING), environ)
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigurationError(f"NIKI_MAX_PENDING={text!r} is not a positive whole number")
    return int(text)


def default_db(environ: Optional[Mapping[str, str]] = None) -> str:
    return env_default("NIKI_DB", DEFAULT_DB, environ)


@dataclass(frozen=True)
class ServerSettings:
    host: str = ""
    port: int = DEFAULT_PORT
    event_port: Optional[int] = None
    db: str = DEFAULT_DB
    verbose: bool = False
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S
    write_timeout: float = WRITE_TIMEOUT_S
    delivery_batch: int = DELIVERY_BATCH
    pool_size: int = 8
    sweep_interval: float = SWEEP_INTERVAL_S
    advertise_host: str = ""
    max_inflight: int = MAX_INFLIGHT
    keepalive_idle: float = KEEPALIVE_IDLE_S
    keepalive_interval: float = KEEPALIVE_INTERVAL_S
    keepalive_count: int = KEEPALIVE_COUNT
    retention_days: float = RETENTION_DAYS
    purge_interval: float = PURGE_INTERVAL_S
    legacy_ids: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_address: int = 0

    @property
    def wakeup_host(self) -> str:
        """The address enqueuers and other servers send this server's wake-ups to."""
        if self.advertise_host:
            return self.advertise_host
        if self.host and self.host not in ("0.0.0.0", "::"):
            return self.host
        return socket.gethostname()

    @property
    def resolved_event_port(self) -> int:
        """The UDP port: as set, else the client port + 1 (0 stays 0: any free port)."""
        if self.event_port is not None:
            return self.event_port
        return self.port + 1 if self.port else 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return convert


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


@dataclass(frozen=True)
class Option:
    """One server option: its flags, environment variable, default, type and help."""

    flags: Tuple[str, ...]
    env: str
    default: object
    convert: Callable[[str], object] = str
    help: str = ""
    default_text: str = "default %(default)s"  # how --help states the default


SERVER_OPTIONS = (
    Option(("-p", "--port"), "NIKI_PORT", DEFAULT_PORT, _port,
           "TCP port for clients; 0 picks a free one"),
    Option(("--host",), "NIKI_HOST", "", str, "address to listen on", "default: all interfaces"),
    Option(("--db",), "NIKI_DB", DEFAULT_DB, str,
           "database URL: sqlite:///FILE or mysql://USER:PASSWORD@HOST:PORT/DB"),
    Option(("--event-port",), "NIKI_EVENT_PORT", None, _port, "UDP port for wake-ups from enqueue",
           "default: port + 1"),
    Option(("--handshake-timeout",), "NIKI_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT_S, _positive_float,
           "seconds a client has to identify"),
    Option(("--write-timeout",), "NIKI_WRITE_TIMEOUT", WRITE_TIMEOUT_S, _positive_float,
           "seconds a write to a client may take before it is disconnected"),
    Option(("--pool-size",), "NIKI_POOL_SIZE", 8, _positive_int,
           "database connections this server may open"),
    Option(("--advertise-host",), "NIKI_ADVERTISE_HOST", "", str,
           "address other boxes reach this server's event port at, recorded in the database "
           "for routed wake-ups", "default: --host if set, else this machine's host name"),
    Option(("--sweep-interval",), "NIKI_SWEEP_INTERVAL", SWEEP_INTERVAL_S, _positive_float,
           "seconds between this server's own checks for pending messages of its clients"),
    Option(("--max-inflight",), "NIKI_MAX_INFLIGHT", MAX_INFLIGHT, _positive_int,
           "ACK clients: unacknowledged messages per connection before delivery pauses"),
    Option(("--keepalive-idle",), "NIKI_KEEPALIVE_IDLE", KEEPALIVE_IDLE_S, _positive_float,
           "seconds of silence before TCP keepalive probes a client"),
    Option(("--keepalive-interval",), "NIKI_KEEPALIVE_INTERVAL", KEEPALIVE_INTERVAL_S,
           _positive_float, "seconds between keepalive probes"),
    Option(("--keepalive-count",), "NIKI_KEEPALIVE_COUNT", KEEPALIVE_COUNT, _positive_int,
           "unanswered probes before a client is dropped"),
    Option(("--retention-days",), "NIKI_RETENTION_DAYS", RETENTION_DAYS, _positive_float,
           "days delivered, ignored and expired messages are kept"),
    Option(("--purge-interval",), "NIKI_PURGE_INTERVAL", PURGE_INTERVAL_S, _positive_float,
           "seconds between expiry and purge runs"),
    Option(("--tls-cert",), "NIKI_TLS_CERT", "", str,
           "PEM certificate (chain) file: clients must then connect with TLS", "default: no TLS"),
    Option(("--tls-key",), "NIKI_TLS_KEY", "", str,
           "PEM private key file for --tls-cert", "default: the key inside --tls-cert"),
    Option(("--max-connections",), "NIKI_MAX_CONNECTIONS", MAX_CONNECTIONS, _positive_int,
           "concurrent client connections; beyond it a new one gets 'ERROR: server busy'",
           "default %(default)s, lowered to fit the open-file limit"),
    Option(("--max-connections-per-address",), "NIKI_MAX_CONNECTIONS_PER_ADDRESS", 0,
           _non_negative_int, "concurrent client connections from one remote address",
           "default: 0, no limit"),
)


def server_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """The server's options; each default comes from its environment variable if set."""
    e = os.environ if environ is None else environ
    p = argparse.ArgumentParser(
        prog="python -m messaging_server",
        description="Niki: a durable push-messaging server. Clients connect over TCP "
        "(telnet works); messages queued with niki-enqueue or messaging_server.enqueue() "
        "reach them at once, or as soon as they reconnect.",
        epilog="Every option can also be set by the environment variable shown in brackets.",
    )
    for option in SERVER_OPTIONS:
        text = env_default(option.env, "", e)
        default = option.convert(text) if text else option.default
        convert = None if option.convert is str else option.convert
        p.add_argument(*option.flags, type=convert, default=default,
                       help=f"{option.help} [{option.env}] ({option.default_text})")
    p.add_argument("-v", "--verbose", action="store_true",
                   default=env_default("NIKI_VERBOSE", "", e).lower() in ("1", "true", "yes"),
                   help="debug logging, including every SQL statement [NIKI_VERBOSE]")
    p.add_argument("--legacy-ids", action="store_true",
                   default=env_default("NIKI_LEGACY_IDS", "", e).lower() in ("1", "true", "yes"),
                   help="hand out and accept bare numeric client ids, as the original server "
                   "did: anyone who guesses an id gets that client's messages. Only for closed "
                   "networks [NIKI_LEGACY_IDS]")
    return p


def server_settings(argv: Optional[List[str]] = None,
                    environ: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """Parse options (exits with a usage message on bad ones, like any CLI)."""
    try:
        parser = server_parser(environ)
    except argparse.ArgumentTypeError as exc:  # a bad environment variable
        raise ConfigurationError(f"bad NIKI_* environment variable: {exc}") from None
    args = parser.parse_args(argv)
    if not args.db.strip():
        raise ConfigurationError("--db must not be empty")
    if args.tls_key and not args.tls_cert:
        raise ConfigurationError("--tls-key needs --tls-cert")
    fields = {option.flags[-1].lstrip("-").replace("-", "_") for option in SERVER_OPTIONS}
    return ServerSettings(verbose=args.verbose, legacy_ids=args.legacy_ids,
                          **{name: getattr(args, name) for name in fields})
