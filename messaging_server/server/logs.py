"""The server's log set-up: plain lines for people, or one JSON object per line for collectors.

Everything goes to stderr, in either format, so that systemd's journal, a
container runtime or a shell redirection collects it without configuration.

``plain`` is the format Niki always had (``asctime levelname message``); tools
and tests read it, so it must not change.  ``json`` writes one object per line
with ``time`` (ISO 8601, UTC, milliseconds, ``Z``), ``level``, ``logger`` and
``message``, plus ``exception`` (the formatted traceback) when there is one.
With ``--workers`` above 1 every line names its process: plain lines carry a
tag after the level (``w0``, ``w1``... for the workers, ``supervisor`` for the
process that starts them) and JSON objects a ``process`` key; a single-process
server's lines are unchanged.
In JSON mode, Python warnings and uncaught exceptions in any thread are logged
too, so that no stray plain-text line breaks a collector's parser.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
from types import TracebackType
from typing import Optional, TextIO, Type

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOGGER = "messaging_server"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.tag:
            entry["process"] = self.tag
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a log line can then never fail to encode, whatever the locale.
        return json.dumps(entry, ensure_ascii=True)


def iso_time(created: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds, as log collectors expect."""
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def formatter(log_format: str, tag: str = "") -> logging.Formatter:
    """The formatter for ``plain`` or ``json`` (settings.LOG_FORMATS); ``tag`` names the
    process (``w1``, ``supervisor``) when there are several."""
    if log_format == "json":
        return JsonFormatter(tag)
    if log_format == "plain":
        if tag:  # a literal % in a tag would be read as a format directive
            return logging.Formatter(PLAIN_FORMAT.replace(" %(message)s",
                                                          f" {tag.replace('%', '%%')} %(message)s"))
        return logging.Formatter(PLAIN_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}")


def configure_logging(verbose: bool, log_format: str = "plain",
                      stream: Optional[TextIO] = None, tag: str = "") -> None:
    """Send every log record to ``stream`` (default stderr) in ``log_format``, each
    line tagged with ``tag`` if one is given (see formatter)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format, tag))
    # No format shows the thread, and looking it up from a connection's handler (a bare
    # _thread thread, see core.py) would leave a dummy Thread object behind each time.
    logging.logThreads = False
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        force=True)
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: Type[BaseException], value: BaseException,
                  traceback: Optional[TracebackType]) -> None:
    logging.getLogger(LOGGER).critical("uncaught exception", exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # as the default hook: a thread may exit this way
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger(LOGGER).error("uncaught exception in thread %s", name,
                                    exc_info=args.exc_value or True)
