"""``niki-admin``: what an operator asks the database, and the purge run on demand.

Subcommands: ``servers``, ``client ID``, ``pending ID``, ``message ID`` and
``purge``.  Each prints aligned text for people or, with ``--json``, one JSON
document for scripts.  Only the public Storage API is used, so the answers are
what the servers and the HTTP API see, on either database.

Exit status: 0 done; 1 the client or message is unknown, or the database cannot
be reached (one line on stderr, never a traceback); 2 usage errors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from messaging_server.config import settings
from messaging_server.errors import ConfigurationError, NikiError, UnknownClient
from messaging_server.producer.enqueuer import client_id_of
from messaging_server.storage import Storage, open_storage
from messaging_server.storage.records import ClientInfo, MessageInfo, ServerInfo
from messaging_server.version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# An operator's command runs one query at a time.
ADMIN_POOL_SIZE = 1
# Message ids are 64-bit signed integers in both databases.
MAX_MESSAGE_ID = 2**63 - 1
# Past a century a retention is surely a typo (and overflows date arithmetic).
MAX_RETENTION_DAYS = 36_600
SECONDS_PER_DAY = 86_400

Handler = Callable[[Storage, argparse.Namespace, Mapping[str, str]], Tuple[int, Any, str]]


def _retention_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not (math.isfinite(days) and 0 <= days <= MAX_RETENTION_DAYS):
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_RETENTION_DAYS} days")
    return days


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    """--db, --config and --json, accepted before and after the subcommand."""
    parser.add_argument("--db", default=default,
                        help=f"database URL [NIKI_DB] (default {settings.DEFAULT_DB})")
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="read settings (db, retention_days) from FILE's [niki] section, "
                        "beneath the NIKI_* environment [NIKI_CONFIG]")
    parser.add_argument("--json", action="store_true", default=default,
                        help="print one JSON document instead of text")


def admin_parser(prog: str = "niki-admin") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Inspect a Niki database: servers, clients, message "
                "receipts; expire and purge old messages now.",
                epilog="Exit status: 0 done, 1 unknown client or message, or database "
                "unreachable, 2 usage error.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(p, None)
    p.set_defaults(json=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(parser, argparse.SUPPRESS)  # given here, it wins over the same before
        return parser

    command("servers", "list the registered servers: addresses, pid, heartbeat, clients")
    command("client", "a client: connected or not and where, pending messages, times"
            ).add_argument("id", metavar="ID", help="client id (or whole credential)")
    command("pending", "how many messages wait for a client"
            ).add_argument("id", metavar="ID", help="client id (or whole credential)")
    command("message", "a message's receipt: status and times"
            ).add_argument("id", metavar="ID", help="message id")
    command("purge", "mark messages past their ttl expired and delete finished ones now"
            ).add_argument("--retention-days", type=_retention_days, default=None, metavar="DAYS",
                           help="delete delivered, ignored and expired messages older than DAYS "
                           f"[NIKI_RETENTION_DAYS] (default {settings.RETENTION_DAYS:g}); 0: all")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = admin_parser().parse_args(argv)
    handler = COMMANDS[args.command]
    try:
        environ = settings.config_environ(args.config)
        storage = open_storage(args.db or settings.default_db(environ), pool_size=ADMIN_POOL_SIZE)
    except ConfigurationError as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        with storage:
            status, document, text = handler(storage, args, environ)
    except (ConfigurationError, UnknownClient) as exc:  # a malformed id or setting
        return _fail(EXIT_USAGE, str(exc))
    except NikiError as exc:  # StorageUnavailable: unreachable, no schema, file missing
        return _fail(EXIT_FAILED, str(exc))
    if status != EXIT_OK:
        return _fail(status, text)
    print(json.dumps(document) if args.json else text)
    return EXIT_OK


def _fail(status: int, message: str) -> int:
    print(f"niki-admin: {message}", file=sys.stderr)
    return status


# --- the subcommands: (status, JSON document, text) -------------------------------------------------


def _servers(storage: Storage, args: argparse.Namespace, environ: Mapping[str, str]) -> Tuple[int, Any, str]:
    servers = storage.list_servers()
    now = _now()
    rows = [[str(s.server_id), s.host, str(s.port), f"{s.event_host}:{s.event_port}", str(s.pid),
             _clock(s.started_at), f"{_duration(_age(s.heartbeat_at, now))} ago",
             "yes" if s.alive else "no", str(s.clients)] for s in servers]
    text = (_table(["ID", "HOST", "PORT", "EVENTS", "PID", "STARTED", "HEARTBEAT", "ALIVE", "CLIENTS"],
                   rows) if servers else "no servers registered")
    return EXIT_OK, [_server_json(s, now) for s in servers], text


def _client(storage: Storage, args: argparse.Namespace, environ: Mapping[str, str]) -> Tuple[int, Any, str]:
    client_id = client_id_of(args.id)
    info = storage.client_info(client_id)
    if info is None:
        return EXIT_FAILED, None, f"no client with id {client_id}"
    now = _now()
    where = ("no" if info.server is None else
             f"yes, to server {info.server.server_id} at {info.server.host}:{info.server.port} "
             f"(pid {info.server.pid})")
    text = _fields([("client", str(client_id)), ("connected", where), ("pending", str(info.pending)),
                    ("created", _when(info.created_at, now)), ("last seen", _when(info.last_seen_at, now)),
                    ("secret", "yes" if info.has_secret else "no (a bare-id client: --legacy-ids)")])
    return EXIT_OK, _client_json(info, now), text


def _pending(storage: Storage, args: argparse.Namespace, environ: Mapping[str, str]) -> Tuple[int, Any, str]:
    # client_info's count, as `client` shows it: pending and not past its ttl.
    client_id = client_id_of(args.id)
    info = storage.client_info(client_id)
    if info is None:
        return EXIT_FAILED, None, f"no client with id {client_id}"
    return (EXIT_OK, {"client_id": client_id, "pending": info.pending},
            f"{info.pending} pending for client {client_id}")


def _message(storage: Storage, args: argparse.Namespace, environ: Mapping[str, str]) -> Tuple[int, Any, str]:
    text_id = args.id.strip()
    if not (text_id.isascii() and text_id.isdigit() and 0 < int(text_id) <= MAX_MESSAGE_ID):
        raise ConfigurationError(f"{args.id!r} is not a message id")
    info = storage.message_info(int(text_id))
    if info is None:
        return EXIT_FAILED, None, f"no message with id {text_id} (never queued, or purged)"
    now = _now()
    text = _fields([("message", str(info.message_id)), ("client", str(info.client_id)),
                    ("status", info.status), ("created", _when(info.created_at, now)),
                    ("expires", _when(info.expires_at, now, "never")),
                    ("delivered", _when(info.delivered_at, now, "no")),
                    ("acknowledged", _when(info.acknowledged_at, now, "no"))])
    return EXIT_OK, _message_json(info), text


def _purge(storage: Storage, args: argparse.Namespace, environ: Mapping[str, str]) -> Tuple[int, Any, str]:
    days = args.retention_days
    if days is None:
        configured = settings.env_default("NIKI_RETENTION_DAYS", "", environ)
        try:
            days = _retention_days(configured) if configured else settings.RETENTION_DAYS
        except argparse.ArgumentTypeError as exc:
            raise ConfigurationError(f"NIKI_RETENTION_DAYS={configured!r}: {exc}") from None
    expired, deleted = storage.purge(days * SECONDS_PER_DAY, settings.PURGE_BATCH)
    text = (f"{expired} expired, {deleted} deleted (delivered, ignored and expired messages older "
            f"than {days:g} days)")
    return EXIT_OK, {"expired": expired, "deleted": deleted, "retention_days": days}, text


COMMANDS: Dict[str, Handler] = {"servers": _servers, "client": _client, "pending": _pending,
                                "message": _message, "purge": _purge}


# --- JSON documents -----------------------------------------------------------------------------------


def _server_json(server: ServerInfo, now: datetime.datetime) -> Dict[str, Any]:
    return {"server_id": server.server_id, "host": server.host, "port": server.port,
            "event_host": server.event_host, "event_port": server.event_port, "pid": server.pid,
            "started_at": server.started_at, "heartbeat_at": server.heartbeat_at,
            "heartbeat_age_s": round(_age(server.heartbeat_at, now), 3), "alive": server.alive,
            "clients": server.clients}


def _client_json(info: ClientInfo, now: datetime.datetime) -> Dict[str, Any]:
    return {"client_id": info.client_id, "connected": info.connected,
            "server": None if info.server is None else _server_json(info.server, now),
            "pending": info.pending, "created_at": info.created_at,
            "last_seen_at": info.last_seen_at, "has_secret": info.has_secret}


def _message_json(info: MessageInfo) -> Dict[str, Any]:
    return {"message_id": info.message_id, "client_id": info.client_id, "status": info.status,
            "created_at": info.created_at, "expires_at": info.expires_at,
            "delivered_at": info.delivered_at, "acknowledged_at": info.acknowledged_at}


# --- text ---------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned on the widest cell."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [headers, *rows])


def _fields(pairs: Sequence[Tuple[str, str]]) -> str:
    """``name  value`` lines, values aligned."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _parse(iso: str) -> datetime.datetime:
    """A stored time (ISO 8601, UTC, ``Z``) as a naive UTC datetime."""
    text = iso.rstrip("Z")
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:  # an unusual fraction: seconds are enough
        return datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")


def _age(iso: str, now: datetime.datetime) -> float:
    """Seconds since ``iso`` by this machine's clock (never below 0: clocks differ a little)."""
    return max(0.0, (now - _parse(iso)).total_seconds())


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"  # unreachable


def _clock(iso: str) -> str:
    """``2024-05-01 10:00:00`` (UTC), for a table."""
    return iso[:19].replace("T", " ")


def _when(iso: Optional[str], now: datetime.datetime, absent: str = "never") -> str:
    """A time for people: UTC, and how long ago (or how far ahead) it is."""
    if iso is None:
        return absent
    delta = (now - _parse(iso)).total_seconds()
    relative = f"{_duration(delta)} ago" if delta >= 0 else f"in {_duration(-delta)}"
    return f"{_clock(iso)} UTC ({relative})"


if __name__ == "__main__":
    sys.exit(main())
