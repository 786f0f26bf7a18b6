"""Console scripts.  ``niki-enqueue CLIENT_ID MESSAGE`` queues a message from a shell.

Exit status: 0 queued, 3 duplicate (same body for the same client within 5 s),
4 queue full (the client has the maximum of pending messages), 2 bad input
(unknown client, bad body, bad arguments), 1 database or other error.  With
``-`` as MESSAGE, one message per line is read from stdin; the status is then
that of the worst line (1 before 2 before 4 before 3 before 0), and the run
stops at the first database error, saying how many lines were queued.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Iterable, List, Optional, TextIO, Union

from . import settings
from .enqueue import Enqueuer, check_ttl
from .errors import (
    BodyRejected,
    ConfigurationError,
    NikiError,
    QueueFull,
    StorageUnavailable,
    UnknownClient,
)

EXIT_QUEUED, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_DUPLICATE, EXIT_QUEUE_FULL = 0, 1, 2, 3, 4
# Which outcome wins when a bulk run has several.
_SEVERITY = {EXIT_QUEUED: 0, EXIT_DUPLICATE: 1, EXIT_QUEUE_FULL: 2, EXIT_BAD_INPUT: 3, EXIT_ERROR: 4}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def enqueue_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="niki-enqueue",
        description="Queue a message for a Niki client. It is delivered at once if the client "
        "is connected, or when it next connects.",
        epilog="Exit status: 0 queued, 3 duplicate (same message for the same client within 5 s, "
        "ignored), 4 queue full, 2 bad input, 1 database or other error.",
    )
    p.add_argument("client_id", metavar="CLIENT_ID",
                   help="the client id: the number before the dot in what the server sent "
                   "after SET_CLIENT_ID: (the whole credential works too)")
    p.add_argument("message", metavar="MESSAGE",
                   help="the message text (one line, at most 4096 bytes of UTF-8), "
                   "or - to read one message per line from stdin")
    p.add_argument("--db", default=None,
                   help=f"database URL [NIKI_DB] (default {settings.DEFAULT_DB})")
    p.add_argument("--peers", default=None,
                   help="broadcast mode: servers to wake for every message, host:eventport,... "
                   "[NIKI_PEERS] (default: wake only the server the client is connected to)")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="drop the message, unsent, if it is not delivered within SECONDS")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def enqueue_main(argv: Optional[List[str]] = None, stdin: Optional[TextIO] = None) -> int:
    args = enqueue_parser().parse_args(argv)
    try:
        check_ttl(args.ttl)
    except BodyRejected as exc:
        return _fail(EXIT_BAD_INPUT, f"--ttl: {exc}")
    try:
        enqueuer = Enqueuer(args.db, args.peers)
    except ConfigurationError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    with enqueuer:
        if args.message == "-":
            # Read bytes: a line that is not UTF-8 is rejected alone, whatever the locale.
            source = stdin or sys.stdin
            lines = getattr(source, "buffer", source)
            return _enqueue_lines(enqueuer, args.client_id, lines, args.quiet, args.ttl)
        return _enqueue_one(enqueuer, args.client_id, args.message, args.quiet, args.ttl)


def _shown(client_id: str) -> str:
    """The id to print: never the secret of a credential (outputs end up in logs)."""
    return client_id.partition(".")[0]


def _enqueue_one(enqueuer: Enqueuer, client_id: str, body: str, quiet: bool,
                 ttl: Optional[float]) -> int:
    try:
        queued = enqueuer.enqueue(client_id, body, ttl=ttl)
    except (UnknownClient, BodyRejected) as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except QueueFull as exc:
        return _fail(EXIT_QUEUE_FULL, str(exc))
    except NikiError as exc:
        return _fail(EXIT_ERROR, str(exc))
    if not queued:
        return _fail(EXIT_DUPLICATE, f"duplicate: the same message was queued for client "
                     f"{_shown(client_id)} less than {settings.DUPLICATE_WINDOW_S:g} s ago; ignored")
    if not quiet:
        print(f"queued for client {_shown(client_id)}")
    return EXIT_QUEUED


def _enqueue_lines(enqueuer: Enqueuer, client_id: str, lines: Iterable[Union[str, bytes]],
                   quiet: bool, ttl: Optional[float]) -> int:
    counts: Dict[str, int] = {"queued": 0, "duplicate": 0, "rejected": 0, "queue full": 0}
    status = EXIT_QUEUED
    for number, line in enumerate(lines, 1):
        body = line.rstrip(b"\n" if isinstance(line, bytes) else "\n")
        body = body[:-1] if body[-1:] in ("\r", b"\r") else body
        try:
            if enqueuer.enqueue(client_id, body, ttl=ttl):
                counts["queued"] += 1
                continue
            counts["duplicate"] += 1
            status = _worst(status, EXIT_DUPLICATE)
        except (UnknownClient, BodyRejected) as exc:
            counts["rejected"] += 1
            print(f"niki-enqueue: line {number}: {exc}", file=sys.stderr)
            status = _worst(status, EXIT_BAD_INPUT)
        except QueueFull as exc:
            counts["queue full"] += 1
            print(f"niki-enqueue: line {number}: {exc}", file=sys.stderr)
            status = _worst(status, EXIT_QUEUE_FULL)
        except StorageUnavailable as exc:
            print(f"niki-enqueue: line {number}: {exc}; stopping (lines from {number} on "
                  "were not queued)", file=sys.stderr)
            status = EXIT_ERROR
            break
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n or what != "queue full")
    if not quiet or status != EXIT_QUEUED:
        print(summary, file=sys.stdout if status == EXIT_QUEUED else sys.stderr)
    return status


def _worst(a: int, b: int) -> int:
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


def _fail(status: int, message: str) -> int:
    print(f"niki-enqueue: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(enqueue_main())
