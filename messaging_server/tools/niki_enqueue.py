"""Console scripts.  ``niki-enqueue`` queues messages from a shell, in three ways.

``niki-enqueue CLIENT_ID MESSAGE`` queues one message.  Exit status: 0 queued,
3 duplicate (same body for the same client within 5 s), 4 queue full (the
client has the maximum of pending messages), 2 bad input (unknown client, bad
body, bad arguments), 1 database unavailable or other error, 5 the database refused
the statement (a bug in Niki, or a schema that does not match this version).

``niki-enqueue CLIENT_ID -`` reads one message per line of stdin and commits
each as soon as it is read, so a pipe that stays open (``tail -f``) works.  The
status is that of the worst line (1 before 2 before 4 before 3 before 0); the
run stops at the first database error, saying from which line nothing was queued.

``niki-enqueue --file PATH [CLIENT_ID]`` is a bulk job.  With CLIENT_ID each
line is a body for that client (the format of ``-``); without it each line is a
JSON object naming its own client, so one file can address many clients.  The
format follows from the command line, never from the content: a body that looks
like JSON is still a body.  Messages are stored MAX_BATCH at a time, one
transaction per batch (far fewer commits than one per message).  Exit status:
0 when every message was queued or a duplicate, 1 when some were rejected or
the database failed (batches committed before it stay committed), 2 usage errors,
5 the database refused the statement (as above).

``--json`` reports each message as one JSON object on stdout, and a bulk run
ends with a summary object.  No output ever shows a credential's secret:
outputs end up in logs.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    TextIO,
    Tuple,
    Union,
)

from messaging_server.config import settings
from messaging_server.errors import (
    BodyRejected,
    ConfigurationError,
    NikiError,
    QueueFull,
    StorageError,
    StorageFault,
    UnknownClient,
)
from messaging_server.producer.enqueuer import (
    MAX_BATCH,
    Enqueuer,
    Submitted,
    check_body,
    check_ttl,
    client_id_of,
)
from messaging_server.producer.http import MAX_HTTP_BATCH, HttpEnqueuer
from messaging_server.protocol.credentials import redact
from messaging_server.version import __version__

EXIT_QUEUED, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_DUPLICATE, EXIT_QUEUE_FULL = 0, 1, 2, 3, 4
# Where messages go: the database itself, or a server's HTTP API (--url).
Publisher = Union[Enqueuer, HttpEnqueuer]
EXIT_INTERNAL = 5  # the database refused a statement: a bug, not a state to wait out
# Which outcome wins when a run of stdin lines has several.
_SEVERITY = {EXIT_QUEUED: 0, EXIT_DUPLICATE: 1, EXIT_QUEUE_FULL: 2, EXIT_BAD_INPUT: 3, EXIT_ERROR: 4,
             EXIT_INTERNAL: 5}
# Said after a StorageFault, so that it is reported rather than retried.
FAULT_ADVICE = ("the database refused the statement: a bug in Niki, or a database schema that "
                "does not match this version; please report it with this message")
# A bulk run on a terminal shows a progress bar only past this many lines:
# a shorter one is over before a bar could tell anything.
PROGRESS_THRESHOLD = 500
# What a JSON line may hold.  Any other key is refused, so that a misspelt
# "ttl" does not silently queue a message that never expires.
JSON_LINE_KEYS = frozenset({"client_id", "body", "ttl"})

QUEUED, DUPLICATE, REJECTED = "queued", "duplicate", "rejected"
ShownId = Union[int, str, None]


def enqueue_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # usage errors exit with 2 (EXIT_BAD_INPUT)
        prog="niki-enqueue",
        usage="%(prog)s [options] CLIENT_ID MESSAGE\n"
              "       %(prog)s [options] CLIENT_ID -            (one message per line of stdin)\n"
              "       %(prog)s [options] --file PATH [CLIENT_ID] (bulk; JSON lines without CLIENT_ID)",
        description="Queue messages for Niki clients. A message is delivered at once if its "
        "client is connected, or when it next connects.",
        epilog="Exit status: 0 queued, 3 duplicate (same message for the same client within 5 s, "
        "ignored), 4 queue full, 2 bad input, 1 database unavailable or other error, 5 the "
        "database refused the statement (a bug: please report it). With --file: 0 all "
        "queued or duplicate, 1 some rejected or the database unavailable, 2 usage error, 5 as above.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("client_id", metavar="CLIENT_ID", nargs="?",
                   help="the client id: the number before the dot in what the server sent "
                   "after SET_CLIENT_ID: (the whole credential works too)")
    p.add_argument("message", metavar="MESSAGE", nargs="?",
                   help="the message text (one line, at most 4096 bytes of UTF-8), "
                   "or - to read one message per line from stdin")
    p.add_argument("--file", metavar="PATH", default=None,
                   help="bulk: read messages from PATH (- for stdin), stored up to "
                   f"{MAX_BATCH} per transaction ({MAX_HTTP_BATCH} per request with --url). "
                   "With CLIENT_ID, each line is a message for it; "
                   'without, each line is a JSON object {"client_id": ..., "body": ..., "ttl": ...}')
    p.add_argument("--json", action="store_true",
                   help="report each message as a JSON object on stdout (client_id, status, id, "
                   "error), and bulk runs end with a summary object")
    p.add_argument("--url", default=None, metavar="URL",
                   help="publish through a server's HTTP API, e.g. http://127.0.0.1:8002 (default: "
                        "NIKI_URL; its token from NIKI_API_TOKEN): no database, no UDP needed")
    p.add_argument("--db", default=None,
                   help=f"database URL [NIKI_DB] (default {settings.DEFAULT_DB})")
    p.add_argument("--peers", default=None,
                   help="broadcast mode: servers to wake for every message, host:eventport,... "
                   "[NIKI_PEERS] (default: wake only the server the client is connected to)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read settings (db, peers, max_pending) from FILE's [niki] section, "
                   "beneath the NIKI_* environment [NIKI_CONFIG]")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="drop the message, unsent, if it is not delivered within SECONDS "
                   "(with --file: for lines that give no ttl)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


# --- what became of a message ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one message, as ``--json`` reports it."""

    client_id: ShownId  # as shown: never a secret
    status: str  # QUEUED, DUPLICATE or REJECTED
    message_id: Optional[int] = None
    error: Optional[str] = None
    line: Optional[int] = None
    queue_full: bool = False

    def as_json(self) -> Dict[str, Any]:
        fields: Dict[str, Any] = {"client_id": self.client_id, "status": self.status,
                                  "id": self.message_id, "error": self.error}
        if self.line is not None:
            fields["line"] = self.line
        return fields


def _shown(client_id: str) -> str:
    """The id to print, as the server knows it (``0001`` is client 1, as on the wire):
    never the secret of a credential (outputs end up in logs)."""
    head = client_id.strip().partition(".")[0]
    return str(int(head)) if head.isascii() and head.isdigit() else head


def shown_id(client_id: object) -> ShownId:
    """``client_id`` as --json shows it: the number, or ``<id>.***`` for a credential."""
    if isinstance(client_id, int) and not isinstance(client_id, bool):
        return client_id
    if not isinstance(client_id, str):
        return None
    shown = redact(client_id.strip())
    return int(shown) if shown.isascii() and shown.isdigit() else shown


# --- output -----------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on stderr for a long bulk run on a terminal; a no-op otherwise."""

    def __init__(self, enabled: bool, total: Optional[int] = None) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self._bar: Any = None
        if enabled and total is not None and total > PROGRESS_THRESHOLD:
            self._start()

    def _start(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, initial=self.done, unit=" lines", file=sys.stderr,
                         leave=False, dynamic_ncols=True)

    def advance(self, lines: int = 1) -> None:
        self.done += lines
        if self._bar is not None:
            self._bar.update(lines)
        elif self.enabled and self.done > PROGRESS_THRESHOLD:
            self._start()

    def write(self, text: str) -> None:
        """A line on stderr that does not tear the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Report:
    """Counts outcomes and writes them: JSON on stdout, or rejected lines on stderr."""

    def __init__(self, as_json: bool, progress: Optional[_Progress] = None) -> None:
        self.as_json = as_json
        self.progress = progress or _Progress(False)
        self.counts = {QUEUED: 0, DUPLICATE: 0, REJECTED: 0}
        self.queue_full = 0  # of the rejected ones

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self.queue_full += outcome.queue_full
        if self.as_json:
            print(json.dumps(outcome.as_json()))
        elif outcome.status == REJECTED:
            self.progress.write(f"niki-enqueue: line {outcome.line}: {outcome.error}")
        self.progress.advance()

    def summary_counts(self) -> Dict[str, int]:
        """The summary's counts; "rejected" leaves out the queue-full ones, counted apart."""
        return {"queued": self.counts[QUEUED], "duplicate": self.counts[DUPLICATE],
                "rejected": self.counts[REJECTED] - self.queue_full, "queue full": self.queue_full}

    def finish(self, to_stdout: bool, silent: bool, error: Optional[str] = None,
               stopped_at: Optional[int] = None) -> None:
        """The summary: the text line (on stdout or stderr; none when ``silent``), and with
        --json the summary object on stdout."""
        self.progress.close()
        counts = self.summary_counts()
        if self.as_json:
            print(json.dumps({"summary": {k.replace(" ", "_"): n for k, n in counts.items()},
                              "error": error, "stopped_at_line": stopped_at}))
            to_stdout = False  # stdout carries JSON only
        if not silent:
            text = ", ".join(f"{n} {what}" for what, n in counts.items() if n or what != "queue full")
            print(text, file=sys.stdout if to_stdout else sys.stderr)
        sys.stdout.flush()


# --- entry point ------------------------------------------------------------------------------------


def enqueue_main(argv: Optional[List[str]] = None, stdin: Optional[TextIO] = None) -> int:
    parser = enqueue_parser()
    args = parser.parse_args(argv)
    if args.file is None and (args.client_id is None or args.message is None):
        parser.error("the following arguments are required: CLIENT_ID, MESSAGE (or --file PATH)")
    if args.file is not None and args.message is not None:
        parser.error("--file takes at most CLIENT_ID, not MESSAGE")
    try:
        check_ttl(args.ttl)
    except BodyRejected as exc:
        return _fail(EXIT_BAD_INPUT, f"--ttl: {exc}")
    source = stdin or sys.stdin
    try:
        bulk = None if args.file is None else _open_input(args.file, source)
    except OSError as exc:
        return _fail(EXIT_BAD_INPUT, f"cannot read {args.file}: {exc.strerror or exc}")
    try:
        try:
            enqueuer = _open_enqueuer(args)
        except ConfigurationError as exc:
            return _fail(EXIT_BAD_INPUT, str(exc))
        with enqueuer:
            if bulk is not None:
                return _enqueue_file(enqueuer, args, bulk)
            if args.message == "-":
                # Read bytes: a line that is not UTF-8 is rejected alone, whatever the locale.
                lines = getattr(source, "buffer", source)
                return _enqueue_lines(enqueuer, args.client_id, lines, args)
            return _enqueue_one(enqueuer, args.client_id, args.message, args)
    finally:
        if bulk is not None and bulk is not getattr(source, "buffer", source):
            bulk.close()


def _open_enqueuer(args: argparse.Namespace) -> Publisher:
    """An HttpEnqueuer for --url (or NIKI_URL), else an Enqueuer on the configured
    database; ConfigurationError for bad settings."""
    environ = settings.config_environ(args.config)
    url = args.url or settings.env_default("NIKI_URL", "", environ)
    if url:
        if args.db or args.peers is not None:
            raise ConfigurationError("--url publishes through a server: it takes neither --db nor --peers")
        return HttpEnqueuer(url, settings.env_default("NIKI_API_TOKEN", "", environ))
    db = args.db or settings.default_db(environ)
    peers = args.peers if args.peers is not None else settings.env_default("NIKI_PEERS", "", environ)
    return Enqueuer(db, peers, max_pending=settings.default_max_pending(environ))


def _fail(status: int, message: str) -> int:
    print(f"niki-enqueue: {message}", file=sys.stderr)
    return status


def _worst(a: int, b: int) -> int:
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


# --- one message, and stdin line by line --------------------------------------------------------------


def _store_one(enqueuer: Publisher, client_id: str, body: Union[str, bytes], ttl: Optional[float],
               line: Optional[int] = None) -> Outcome:
    """Queue one message; StorageUnavailable propagates (the message was not stored)."""
    result: Submitted
    try:
        result = enqueuer.submit(client_id, body, ttl=ttl)
    except (UnknownClient, BodyRejected, QueueFull) as exc:
        result = exc
    return _outcome(shown_id(client_id), line, result)


def _enqueue_one(enqueuer: Publisher, client_id: str, body: str, args: argparse.Namespace) -> int:
    try:
        outcome = _store_one(enqueuer, client_id, body, args.ttl)
    except StorageFault as exc:
        return _fail(EXIT_INTERNAL, f"{exc}; {FAULT_ADVICE}")
    except NikiError as exc:
        return _fail(EXIT_ERROR, str(exc))
    if args.json:
        print(json.dumps(outcome.as_json()))
    if outcome.status == REJECTED:
        status = EXIT_QUEUE_FULL if outcome.queue_full else EXIT_BAD_INPUT
        return status if args.json else _fail(status, str(outcome.error))
    if outcome.status == DUPLICATE:
        message = (f"duplicate: the same message was queued for client {_shown(client_id)} less "
                   f"than {settings.DUPLICATE_WINDOW_S:g} s ago; ignored")
        return EXIT_DUPLICATE if args.json else _fail(EXIT_DUPLICATE, message)
    if not args.quiet and not args.json:
        print(f"queued for client {_shown(client_id)}")
    return EXIT_QUEUED


def _enqueue_lines(enqueuer: Publisher, client_id: str, lines: Iterable[Union[str, bytes]],
                   args: argparse.Namespace) -> int:
    report = _Report(args.json)
    status = EXIT_QUEUED
    for number, body in _numbered(lines):
        try:
            outcome = _store_one(enqueuer, client_id, body, args.ttl, number)
        except StorageError as exc:
            print(f"niki-enqueue: line {number}: {_reason(exc)}; stopping (lines from {number} on "
                  "were not queued)", file=sys.stderr)
            report.finish(False, False, str(exc), number)
            return _storage_status(exc)
        report.add(outcome)
        if args.json:
            sys.stdout.flush()  # a pipe that stays open sees each answer as its line is stored
        if outcome.status == DUPLICATE:
            status = _worst(status, EXIT_DUPLICATE)
        elif outcome.status == REJECTED:
            status = _worst(status, EXIT_QUEUE_FULL if outcome.queue_full else EXIT_BAD_INPUT)
    report.finish(status == EXIT_QUEUED, args.quiet and status == EXIT_QUEUED)
    return status


def _numbered(lines: Iterable[Union[str, bytes]]) -> Iterator[Tuple[int, Union[str, bytes]]]:
    """Each line with its number, without its ``\\n`` or ``\\r\\n``."""
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            raw = line.rstrip(b"\n")
            yield number, raw[:-1] if raw.endswith(b"\r") else raw
        else:
            text = line.rstrip("\n")
            yield number, text[:-1] if text.endswith("\r") else text


# --- bulk: --file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """A message that passed every check: it goes to the database."""

    line: int
    shown: ShownId
    client_id: int
    body: str
    ttl: Optional[float]


# One line of input: a message to store, or an outcome decided before the database.
Entry = Union[_Item, Outcome]


def _open_input(path: str, stdin: IO[Any]) -> IO[Any]:
    return getattr(stdin, "buffer", stdin) if path == "-" else open(path, "rb")


def _line_count(source: IO[Any]) -> Optional[int]:
    """How many lines a regular file has (for the progress bar); None for a pipe."""
    try:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode) or not source.seekable():
            return None
        start = source.tell()
        count = sum(1 for _ in source)
        source.seek(start)
        return count
    except (OSError, ValueError, AttributeError):
        return None


def _enqueue_file(enqueuer: Publisher, args: argparse.Namespace, source: IO[Any]) -> int:
    show_bar = sys.stderr.isatty()
    report = _Report(args.json, _Progress(show_bar, _line_count(source) if show_bar else None))
    client_id: Optional[str] = args.client_id

    def parse(number: int, text: Union[str, bytes]) -> Optional[Entry]:
        if client_id is not None:  # every line is a body for CLIENT_ID
            return _entry(number, client_id, text, args.ttl)
        return _json_entry(number, text, args.ttl)

    batch: List[Entry] = []
    items = 0
    for number, text in _numbered(source):
        entry = parse(number, text)
        if entry is None:  # a blank line between JSON objects
            report.progress.advance()
            continue
        batch.append(entry)
        items += isinstance(entry, _Item)
        if items == enqueuer.max_batch:
            failure = _store_batch(enqueuer, batch, report)
            if failure is not None:
                return _stopped(report, *failure)
            batch, items = [], 0
    failure = _store_batch(enqueuer, batch, report)
    if failure is not None:
        return _stopped(report, *failure)
    status = EXIT_QUEUED if report.counts[REJECTED] == 0 else EXIT_ERROR
    report.finish(False, args.quiet and status == EXIT_QUEUED)
    return status


def _stopped(report: _Report, line: int, exc: StorageError) -> int:
    """The database failed at ``line``: what was committed before stays, the rest was not queued."""
    report.progress.write(
        f"niki-enqueue: line {line}: {_reason(exc)}; stopping: the {report.counts[QUEUED]} messages "
        f"queued from the lines before stay queued; lines from {line} on were not queued")
    report.finish(False, False, str(exc), line)
    return _storage_status(exc)


def _reason(exc: StorageError) -> str:
    return f"{exc} ({FAULT_ADVICE})" if isinstance(exc, StorageFault) else str(exc)


def _storage_status(exc: StorageError) -> int:
    return EXIT_INTERNAL if isinstance(exc, StorageFault) else EXIT_ERROR


def _entry(line: int, client_id: Union[int, str], body: Union[str, bytes],
           ttl: Optional[float]) -> Entry:
    """The message if it can be stored, else its rejection."""
    shown = shown_id(client_id)
    try:
        numeric = client_id_of(client_id)
        text = check_body(body)
    except (UnknownClient, BodyRejected) as exc:
        return Outcome(shown, REJECTED, error=str(exc), line=line)
    return _Item(line, shown, numeric, text, ttl)


def _json_entry(line: int, text: Union[str, bytes], default_ttl: Optional[float]) -> Optional[Entry]:
    """One JSON line ``{"client_id": ..., "body": ..., "ttl": ...}``; None for a blank line."""
    if not text.strip():
        return None

    def rejected(reason: str, shown: ShownId = None) -> Outcome:
        return Outcome(shown, REJECTED, error=reason, line=line)

    try:
        fields = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError:
        return rejected("the line is not valid UTF-8")
    except ValueError as exc:  # the message names the position, never the content
        return rejected(f"not valid JSON: {getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')} "
                        "(without CLIENT_ID, each line of --file is a JSON object)")
    if not isinstance(fields, dict):
        return rejected('expected a JSON object {"client_id": ..., "body": ...}')
    shown = shown_id(fields.get("client_id"))
    unknown = sorted(set(fields) - JSON_LINE_KEYS)
    if unknown:
        return rejected(f"unknown key {unknown[0]!r} (expected client_id, body, ttl)", shown)
    for key in ("client_id", "body"):
        if key not in fields:
            return rejected(f"no {key}", shown)
    client_id, body = fields["client_id"], fields["body"]
    if isinstance(client_id, bool) or not isinstance(client_id, (int, str)):
        return rejected("client_id must be a number or a credential string", shown)
    if not isinstance(body, str):
        return rejected("body must be a string", shown)
    ttl = fields.get("ttl")
    if ttl is None:
        ttl = default_ttl
    else:
        try:
            check_ttl(ttl)
        except BodyRejected as exc:
            return rejected(f"ttl: {exc}", shown)
    return _entry(line, client_id, body, ttl)


def _store_batch(enqueuer: Publisher, batch: List[Entry],
                 report: _Report) -> Optional[Tuple[int, StorageError]]:
    """Store a batch's messages in one transaction (each with its own ttl) and report every
    entry, in order.  When the database fails, nothing of the batch was stored: its first
    line is returned with the error."""
    items = [entry for entry in batch if isinstance(entry, _Item)]
    try:
        results = enqueuer.submit_many([(item.client_id, item.body, item.ttl) for item in items])
    except StorageError as exc:
        return (batch[0].line or 0, exc)
    outcomes = {item.line: _outcome(item.shown, item.line, result)
                for item, result in zip(items, results)}
    for entry in batch:
        report.add(entry if isinstance(entry, Outcome) else outcomes[entry.line])
    sys.stdout.flush()
    return None


def _outcome(shown: ShownId, line: Optional[int], result: Submitted) -> Outcome:
    """What became of one message: queued (its message id), a duplicate, or refused."""
    if isinstance(result, int):
        return Outcome(shown, QUEUED, result, line=line)
    if result is None:
        return Outcome(shown, DUPLICATE, line=line)
    return Outcome(shown, REJECTED, error=str(result), line=line,
                   queue_full=isinstance(result, QueueFull))


if __name__ == "__main__":
    sys.exit(enqueue_main())
