"""Every setting in one place: its default, its environment variable, its option.

Command-line options win over environment variables, which win over the
config file (``--config FILE`` or ``NIKI_CONFIG``, see docs/CONFIG.md), which
wins over the defaults; so a server and the ``niki-enqueue`` run beside it can
share ``NIKI_DB`` and ``NIKI_PEERS``, or one file.  The other command-line
tools read the file through :func:`config_environ`, which turns it into
``NIKI_*`` variables beneath the real ones.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from messaging_server.config.addresses import (
    DEFAULT_EXEMPT,
    FAILED_IDENTIFICATIONS_PER_MINUTE,
    NEW_CLIENTS_PER_MINUTE,
    Address,
    check_exposure,
    parse_exempt,
    parse_peers,
)
from messaging_server.config.file import read_config, render
from messaging_server.errors import ConfigurationError
from messaging_server.version import __version__

DEFAULT_PORT = 8000


def default_data_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """The per-user data directory (XDG Base Directory): ``$XDG_DATA_HOME/niki`` when it
    is set to an absolute path, else ``~/.local/share/niki``."""
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_DATA_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "niki")


# The server and every tool use the same database whatever their working directory
# (a relative default once sent niki-enqueue to a file no server read).
DEFAULT_DB_PATH = os.path.join(default_data_dir(), "niki.sqlite3")
DEFAULT_DB = f"sqlite:///{DEFAULT_DB_PATH}"
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
# A connection with nothing in flight that has had nothing to do for this long gives
# its client's delivery lease back (with its last marks).  A busy connection keeps it,
# so that messages wake-ups carry are written without reading the database; an idle
# one lets go, so that if its server dies, the client's next connection elsewhere
# need not wait for it (storage.interface.LEASE_HANDOVER_S).  Measured with B2 (1,000
# clients, each sent a message about once a second): at 1 s the lease was given back
# and taken again around every message (9.9 database round trips per message).
LEASE_IDLE_S = 10.0
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
# The HTTP API listens on loopback unless told otherwise: it can queue messages
# for any client, so reaching it from elsewhere must be a deliberate choice.
DEFAULT_HTTP_HOST = "127.0.0.1"
LOG_FORMATS = ("plain", "json")
ENV_PREFIX = "NIKI_"
# The config file: --config FILE, else this environment variable.
CONFIG_ENV = "NIKI_CONFIG"
# Yes/no values: the environment's historical rule, and the stricter file rule.
ENV_TRUE = ("1", "true", "yes")
FILE_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False,
                 "on": True, "off": False, "1": True, "0": False}
MASK = "***"


def default_workers(db: str) -> int:
    """--workers when not set: one process per core the server may run on.

    The same for both databases: on SQLite the processes take the file's write lock in
    turn (each one's group commit merges only its own commits), yet two workers were
    not slower than one in B1-B4 (docs/PERFORMANCE.md).  ``db`` is taken so that a
    database that needs another rule can have one.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))  # the cores this process may use (containers)
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
    try:
        return positive_int(text)  # the rule the option table (and a config file) applies
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"NIKI_MAX_PENDING={text!r}: {exc}") from None


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
    lease_idle: float = LEASE_IDLE_S
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
    failed_identifications_per_minute: int = FAILED_IDENTIFICATIONS_PER_MINUTE
    new_clients_per_minute: int = NEW_CLIENTS_PER_MINUTE
    throttle_exempt: str = DEFAULT_EXEMPT
    http_port: Optional[int] = None  # the HTTP API: None: the client port + 2; 0: off
    http_host: str = DEFAULT_HTTP_HOST
    api_token: str = ""
    ws_origins: str = ""  # web pages of other origins that may open WebSockets; "*": any
    log_format: str = "plain"
    workers: Optional[int] = None  # None: default_workers(db)

    @property
    def wakeup_host(self) -> str:
        """The address enqueuers and other servers send this server's wake-ups to."""
        if self.advertise_host:
            return self.advertise_host
        if self.host and self.host not in ("0.0.0.0", "::"):
            return self.host
        return socket.gethostname()

    @property
    def resolved_http_port(self) -> Optional[int]:
        """The HTTP API's TCP port: as set (0: no API), else the client port + 2 (a client
        port of 0, any free one: a free one too); None: no API."""
        if self.http_port is not None:
            return self.http_port or None
        return self.port + 2 if self.port else 0

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


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(LOG_FORMATS)}")
    return text


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number, 0 or more."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""
    def convert(text: str) -> int:
        # ASCII digits, with a sign: int() would also take "1_000", " 5" and other scripts' digits.
        digits = text[1:] if text[:1] in ("-", "+") else text
        if not (digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return convert


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def _flag(text: str) -> bool:
    """A yes/no value in the config file: strict, so that a typo is an error, not "off"."""
    value = FILE_BOOLEANS.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value "
                                         f"({', '.join(FILE_BOOLEANS)})")
    return value


def _env_flag(text: str) -> bool:
    """A yes/no environment variable: true when 1, true or yes, as it always was."""
    return text.strip().lower() in ENV_TRUE


def _exempt(text: str) -> str:
    try:
        parse_exempt(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _peers(text: str) -> str:
    parse_peers(text)  # raises ConfigurationError, a ValueError, naming the bad entry
    return text


@dataclass(frozen=True)
class Option:
    """One setting: its flags, environment variable, default, type and help.

    Its config-file key is the environment variable without ``NIKI_``, in
    lower case (``NIKI_EVENT_PORT`` -> ``event_port``), which is also the
    option's long name with underscores and its ServerSettings field.
    """

    flags: Tuple[str, ...]
    env: str
    default: object
    convert: Callable[[str], object] = str
    help: str = ""
    default_text: str = "default %(default)s"  # how --help states the default

    @property
    def key(self) -> str:
        return self.env[len(ENV_PREFIX):].lower()


SERVER_OPTIONS = (
    Option(("-p", "--port"), "NIKI_PORT", DEFAULT_PORT, _port,
           "TCP port for clients; 0 picks a free one"),
    Option(("--host",), "NIKI_HOST", "", str, "address to listen on", "default: all interfaces"),
    Option(("--db",), "NIKI_DB", DEFAULT_DB, str,
           "database URL: sqlite:///FILE or mysql://USER:PASSWORD@HOST:PORT/DB"),
    Option(("--event-port",), "NIKI_EVENT_PORT", None, _port, "UDP port for wake-ups from enqueue",
           "default: port + 1"),
    Option(("--handshake-timeout",), "NIKI_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT_S, positive_float,
           "seconds a client has to identify"),
    Option(("--write-timeout",), "NIKI_WRITE_TIMEOUT", WRITE_TIMEOUT_S, positive_float,
           "seconds a write to a client may take before it is disconnected"),
    Option(("--pool-size",), "NIKI_POOL_SIZE", 8, positive_int,
           "database connections this server may open"),
    Option(("--advertise-host",), "NIKI_ADVERTISE_HOST", "", str,
           "address other boxes reach this server's event port at, recorded in the database "
           "for routed wake-ups", "default: --host if set, else this machine's host name"),
    Option(("--sweep-interval",), "NIKI_SWEEP_INTERVAL", SWEEP_INTERVAL_S, positive_float,
           "seconds between this server's own checks for pending messages of its clients"),
    Option(("--lease-idle",), "NIKI_LEASE_IDLE", LEASE_IDLE_S, positive_float,
           "seconds without work after which a connection gives its client's delivery lease "
           "back (shorter: a faster failover for the client; longer: fewer database writes "
           "for a client sent messages at intervals)"),
    Option(("--max-inflight",), "NIKI_MAX_INFLIGHT", MAX_INFLIGHT, positive_int,
           "ACK clients: unacknowledged messages per connection before delivery pauses"),
    Option(("--keepalive-idle",), "NIKI_KEEPALIVE_IDLE", KEEPALIVE_IDLE_S, positive_float,
           "seconds of silence before TCP keepalive probes a client"),
    Option(("--keepalive-interval",), "NIKI_KEEPALIVE_INTERVAL", KEEPALIVE_INTERVAL_S,
           positive_float, "seconds between keepalive probes"),
    Option(("--keepalive-count",), "NIKI_KEEPALIVE_COUNT", KEEPALIVE_COUNT, positive_int,
           "unanswered probes before a client is dropped"),
    Option(("--retention-days",), "NIKI_RETENTION_DAYS", RETENTION_DAYS, positive_float,
           "days delivered, ignored and expired messages are kept"),
    Option(("--purge-interval",), "NIKI_PURGE_INTERVAL", PURGE_INTERVAL_S, positive_float,
           "seconds between expiry and purge runs"),
    Option(("--tls-cert",), "NIKI_TLS_CERT", "", str,
           "PEM certificate (chain) file: clients must then connect with TLS", "default: no TLS"),
    Option(("--tls-key",), "NIKI_TLS_KEY", "", str,
           "PEM private key file for --tls-cert", "default: the key inside --tls-cert"),
    Option(("--max-connections",), "NIKI_MAX_CONNECTIONS", MAX_CONNECTIONS, positive_int,
           "concurrent client connections; beyond it a new one gets 'ERROR: server busy'",
           "default %(default)s, lowered to fit the open-file limit"),
    Option(("--max-connections-per-address",), "NIKI_MAX_CONNECTIONS_PER_ADDRESS", 0,
           non_negative_int, "concurrent client connections from one remote address",
           "default: 0, no limit"),
    Option(("--failed-identifications-per-minute",), "NIKI_FAILED_IDENTIFICATIONS_PER_MINUTE",
           FAILED_IDENTIFICATIONS_PER_MINUTE, non_negative_int,
           "per remote address (IPv6: /64): handshakes with a wrong secret, unknown or malformed "
           "id, this many at once and again per minute; beyond, 'ERROR: too many failed "
           "identifications from your address' and no new client", "default %(default)s; 0: no limit"),
    Option(("--new-clients-per-minute",), "NIKI_NEW_CLIENTS_PER_MINUTE", NEW_CLIENTS_PER_MINUTE,
           non_negative_int, "per remote address (IPv6: /64): new clients (NONE and failed "
           "identifications), this many at once and again per minute; valid credentials never "
           "count", "default %(default)s; 0: no limit"),
    Option(("--throttle-exempt",), "NIKI_THROTTLE_EXEMPT", DEFAULT_EXEMPT, _exempt,
           "addresses or networks the two limits above never apply to, comma-separated, or "
           "'none': a local proxy, a load balancer that hides client addresses"),
    Option(("--http-port",), "NIKI_HTTP_PORT", None, _port,
           "TCP port of the HTTP API (queue messages, receipts, /healthz, /metrics); 0: no HTTP "
           "API", "default: the client port + 2 (8002)"),
    Option(("--http-host",), "NIKI_HTTP_HOST", DEFAULT_HTTP_HOST, str,
           "address the HTTP API listens on; any other than loopback needs --api-token"),
    Option(("--api-token",), "NIKI_API_TOKEN", "", str,
           "bearer token the HTTP API requires on everything but /healthz",
           "default: none, and then the API serves loopback only"),
    Option(("--ws-origins",), "NIKI_WS_ORIGINS", "", str,
           "origins (https://app.example.com, comma-separated; * for any) of web pages that may "
           "open the protocol over WebSocket (GET /v1/ws on the HTTP port)",
           "default: none but the HTTP port's own; programs send no Origin and are not concerned"),
    Option(("--log-format",), "NIKI_LOG_FORMAT", "plain", _log_format,
           "log lines as plain text, or as one JSON object each for log collectors"),
    Option(("--workers",), "NIKI_WORKERS", None, positive_int,
           "server processes sharing the client port (SO_REUSEPORT), each with its own wake-up "
           "port (event port + i) and HTTP API port (http port + i); 1: one process, no supervisor",
           "default: the number of cores"),
)


# The two yes/no options: on the command line they take no value.
FLAG_OPTIONS = (
    Option(("-v", "--verbose"), "NIKI_VERBOSE", False, _flag,
           "debug logging, including every SQL statement", ""),
    Option(("--legacy-ids",), "NIKI_LEGACY_IDS", False, _flag,
           "hand out and accept bare numeric client ids, as the original server did: anyone who "
           "guesses an id gets that client's messages. Only for closed networks", ""),
)

# The enqueue side's settings.  No server option: niki-enqueue and enqueue()
# read them from the environment, and the config file may hold them so that
# one file serves a whole host.
ENQUEUE_OPTIONS = (
    Option((), "NIKI_PEERS", "", _peers,
           "broadcast mode: servers to wake for every message, host:eventport,...",
           "default: none, routed mode"),
    Option((), "NIKI_MAX_PENDING", MAX_PENDING, positive_int,
           "pending messages one client may have; enqueue beyond it is refused"),
)

# Every key the config file accepts, in the order --print-config lists them.
CONFIG_OPTIONS = SERVER_OPTIONS + FLAG_OPTIONS + ENQUEUE_OPTIONS


def server_parser() -> argparse.ArgumentParser:
    """The server's command line.

    No option has a default here (argparse.SUPPRESS): an option that is not on
    the command line is absent from the result, so that effective_settings()
    can look in the environment, then the config file, then the built-in default.
    """
    p = argparse.ArgumentParser(
        prog="python -m messaging_server",
        description="Niki: a durable push-messaging server. Clients connect over TCP "
        "(telnet works); messages queued with niki-enqueue or messaging_server.enqueue() "
        "reach them at once, or as soon as they reconnect.",
        epilog="Every option can also be set by the environment variable shown in brackets, or "
        "in the config file's [niki] section under its name without the dashes (port = 8000). "
        "Command line > environment > config file > default. "
        "'python -m messaging_server admin ...' runs the administration tool.",
    )
    p.add_argument("--version", action="version", version=f"Niki (messaging_server) {__version__}")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help=f"INI file of settings, in a [niki] section [{CONFIG_ENV}] (default: none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as a config file, each with where it came "
                   "from, secrets masked; then exit without starting")
    for option in SERVER_OPTIONS:
        p.add_argument(*option.flags, type=option.convert, default=argparse.SUPPRESS,
                       dest=option.key, help=_help(option))
    for option in FLAG_OPTIONS:
        p.add_argument(*option.flags, action="store_true", default=argparse.SUPPRESS,
                       dest=option.key, help=_help(option))
    return p


def _help(option: Option) -> str:
    default = option.default_text % {"default": option.default}
    text = f"{option.help} [{option.env}]" + (f" ({default})" if default else "")
    return text.replace("%", "%%")  # argparse %-formats help strings


@dataclass(frozen=True)
class EffectiveSettings:
    """What a server runs with, and where each value came from (for --print-config).

    ``values`` and ``sources`` hold every key of CONFIG_OPTIONS; a source is
    ``option --port``, ``environment NIKI_PORT``, ``file PATH, line N`` or ``default``.
    """

    settings: ServerSettings
    values: Mapping[str, object]
    sources: Mapping[str, str]
    config_path: Optional[str] = None
    print_config: bool = False

    def enqueue_environ(self) -> Dict[str, str]:
        """NIKI_PEERS / NIKI_MAX_PENDING as the config file set them, for this process's
        own enqueueing (which reads the environment); empty when they came from elsewhere."""
        return {option.env: str(self.values[option.key]) for option in ENQUEUE_OPTIONS
                if self.sources[option.key].startswith("file ")}


def effective_settings(argv: Optional[List[str]] = None,
                       environ: Optional[Mapping[str, str]] = None) -> EffectiveSettings:
    """Resolve every setting: command line > environment > config file > default.

    A bad option exits with a usage message (status 2), like any command-line
    tool; a bad environment variable or config file raises ConfigurationError.
    """
    environ = os.environ if environ is None else environ
    given = vars(server_parser().parse_args(argv))
    print_config = given.pop("print_config")
    path = given.pop("config") if "config" in given else env_default(CONFIG_ENV, "", environ)
    entries = read_config(path, _CONVERTERS) if path else {}
    values: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for option in CONFIG_OPTIONS:
        key, text = option.key, env_default(option.env, "", environ)
        if key in given:
            values[key], sources[key] = given[key], f"option {option.flags[-1]}"
        elif text:
            values[key], sources[key] = _from_environment(option, text), f"environment {option.env}"
        elif key in entries:
            values[key], sources[key] = entries[key].value, f"file {path}, line {entries[key].line}"
        else:
            values[key], sources[key] = option.default, "default"
    _check(values, sources)
    fields = {option.key for option in SERVER_OPTIONS + FLAG_OPTIONS}
    settings = ServerSettings(**{key: values[key] for key in fields})  # type: ignore[arg-type]
    return EffectiveSettings(settings, values, sources, path or None, print_config)


def server_settings(argv: Optional[List[str]] = None,
                    environ: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """The settings a server runs with (see effective_settings)."""
    return effective_settings(argv, environ).settings


def config_environ(path: Optional[str],
                   environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``environ`` (default os.environ) with the config file's settings added as NIKI_* variables.

    For the command-line tools: they go on reading env_default(), default_db()
    and configured_peers(), and the file slots in beneath the environment.  A
    variable already set (not empty) wins over the file.  ``path`` None or
    empty: NIKI_CONFIG's file, or none.  Keys a tool has no use for (``port``)
    are carried along harmlessly.  Raises ConfigurationError for a bad file.
    """
    environ = os.environ if environ is None else environ
    merged = dict(environ)
    path = path or env_default(CONFIG_ENV, "", environ)
    if not path:
        return merged
    entries = read_config(path, _CONVERTERS)
    for option in CONFIG_OPTIONS:
        entry = entries.get(option.key)
        if entry is not None and not env_default(option.env, "", environ):
            merged[option.env] = _text(entry.value) if option in FLAG_OPTIONS else entry.text
    return merged


def describe_effective(effective: EffectiveSettings) -> str:
    """--print-config: the settings as a config file, each with its source; secrets masked."""
    from messaging_server.storage import describe_url

    def shown(key: str, value: object) -> str:
        if key == "db":
            return describe_url(str(value))
        if key == "api_token" and value:
            return MASK
        return _text(value)

    rows = []
    for option in CONFIG_OPTIONS:
        source = effective.sources[option.key]
        if source == "default" and option.default_text.startswith("default:"):
            source = option.default_text  # "default: port + 1" says more than an empty value
        side = " (enqueue side: niki-enqueue, enqueue())" if option in ENQUEUE_OPTIONS else ""
        rows.append((option.key, shown(option.key, effective.values[option.key]),
                     f"from {source}{side}"))
    header = ["Niki's effective settings, from python -m messaging_server --print-config",
              f"config file: {effective.config_path or 'none'}",
              "precedence: command-line option > environment > config file > default",
              f"an empty value means the default; secrets are shown as {MASK}"]
    return render(rows, header)


_CONVERTERS = {option.key: option.convert for option in CONFIG_OPTIONS}


def _text(value: object) -> str:
    """A value as the config file writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _from_environment(option: Option, text: str) -> object:
    if option in FLAG_OPTIONS:
        return _env_flag(text)
    try:
        return option.convert(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigurationError(f"environment variable {option.env}={text!r}: {exc}") from None


def _check(values: Mapping[str, object], sources: Mapping[str, str]) -> None:
    """The rules that concern more than one value, or an empty one."""
    if not str(values["db"]).strip():
        raise ConfigurationError(f"--db must not be empty (db from {sources['db']})")
    if values["tls_key"] and not values["tls_cert"]:
        raise ConfigurationError(f"--tls-key needs --tls-cert (tls_key from {sources['tls_key']})")
    if values["http_port"] != 0:
        check_exposure(str(values["http_host"]), str(values["api_token"]))
