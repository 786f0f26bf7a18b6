"""``niki-client HOST[:PORT]``: a command-line subscriber, like ``mosquitto_sub``.

It connects to a Niki server, prints every message it receives on its own line
(or, with ``--json``, as one JSON object per line) and keeps doing so across
lost connections and server restarts, reconnecting with exponential back-off
and full jitter (:mod:`messaging_server.backoff`).

Why it is shaped the way it is:

- **No loss, no duplicate.** By default it asks for acknowledged delivery and
  sends ``ACK <id>`` only once the message was written to stdout and flushed:
  if the process dies in between, the server sends the message again on the
  next run (at least once).  Within one run a message the server sends again
  (its ACK was lost with the connection) is recognised by its id, acknowledged
  and not printed twice, so a server restart costs neither a message nor a
  duplicate.  ``--no-ack`` speaks the original protocol, which has no ids.
- **One identity per server.** The credential the server hands out is kept in
  a file (default ``$XDG_CONFIG_HOME/niki/credential-HOST-PORT``), private to
  the user (0600 in a 0700 directory), replaced atomically so that a crash
  never leaves half a credential.  Logs show it as ``<id>.***`` only.
- **Signals.** SIGINT and SIGTERM end the run with status 0 after sending
  DISCONNECT; a signal that arrives while a message is being printed and
  acknowledged waits until that is done.

Exit status (as ``mosquitto_sub``'s): 0 when it did what was asked (``--count``
reached, or stopped by SIGINT/SIGTERM), 27 when ``--timeout`` passed without a message,
1 when it never connected within ``--timeout`` (refused, unreachable, not a Niki
server; the reason is logged) or on a fatal error (credential file in use or
unwritable, stdout closed, certificate check), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Sequence, TextIO, Tuple

from messaging_server.backoff import DEFAULT_BASE, DEFAULT_CAP, ExponentialBackoff
from messaging_server.client.credential_file import CredentialFile, default_credential_path
from messaging_server.client.sdk import Client, ClientError
from messaging_server.config.settings import DEFAULT_PORT, non_negative_float, positive_float, positive_int
from messaging_server.errors import ConfigurationError, NikiError
from messaging_server.protocol.credentials import parse_credential, redact
from messaging_server.protocol.lines import MAX_CLIENT_ID, PING, PONG, Message
from messaging_server.version import __version__

PROG = "niki-client"
EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
EXIT_TIMEOUT = 27  # mosquitto_sub -W's status when its time ran out

CONNECT_TIMEOUT = 10.0  # seconds for TCP connect, TLS and protocol handshake together
DISCONNECT_TIMEOUT = 2.0  # seconds to wait for the server to close after DISCONNECT
# A connection that lived this long counts as having worked: the back-off starts
# again from its base.  Shorter ones (a server that accepts and drops at once,
# "server busy") keep widening it.
STABLE_CONNECTION = 10.0
# Seconds of silence before a PING (as mosquitto_sub's -k); as long again without
# the PONG and the connection counts as dead.  A connection that died without a
# FIN or RST (a phone out of coverage, a NAT that forgot it) is noticed in twice this.
DEFAULT_KEEPALIVE = 60.0
MIN_WAIT = 0.01  # never ask a socket for a zero timeout: that means non-blocking
# Ids of printed messages kept to recognise redeliveries.  Only messages whose
# ACK was lost come again, at most the server's in-flight limit (100 by default).
REMEMBERED_IDS = 10_000



class OutputClosed(NikiError):
    """Standard output cannot be written (a closed pipe, a full disk)."""


class FatalConnectError(NikiError):
    """A connect failure that retrying cannot cure (the server's certificate is not trusted)."""


class StopRequested(BaseException):
    """SIGINT or SIGTERM: end the run cleanly.  A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it."""


class _Finished(Exception):
    """``--count`` messages printed (``timed_out`` False), or ``--timeout`` seconds
    without one."""

    def __init__(self, timed_out: bool = True) -> None:
        super().__init__()
        self.timed_out = timed_out


# --- the server address ---

def parse_address(text: str) -> Tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"{text!r} is not HOST[:PORT]")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a name, an IPv4 address, or an IPv6 address without brackets
        host, port_text = text, str(DEFAULT_PORT)
    if not host or not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"{text!r} is not HOST[:PORT] with a port from 1 to 65535")
    return host, int(port_text)


# --- output ---

def utc_now() -> str:
    """ISO 8601 in UTC with a Z, as the storage layer writes its times."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OutputWriter:
    """One line per message on a byte stream, flushed before ``emit`` returns.

    Bytes, not text: a body is UTF-8 on the wire and stays UTF-8 on stdout,
    whatever the locale.
    """

    def __init__(self, stream: BinaryIO, as_json: bool = False) -> None:
        self.stream = stream
        self.as_json = as_json

    def format(self, message: Message, received_at: str) -> bytes:
        if self.as_json:
            record = {"id": message.message_id, "body": message.body, "received_at": received_at}
            return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        return (message.body + "\n").encode("utf-8", errors="replace")

    def emit(self, message: Message, received_at: str) -> None:
        try:
            self.stream.write(self.format(message, received_at))
            self.stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            raise OutputClosed(f"cannot write to standard output: {exc}") from exc


class RecentIds:
    """The last ``limit`` message ids printed, to skip a message the server sends again."""

    def __init__(self, limit: int = REMEMBERED_IDS) -> None:
        self.limit = limit
        self._ids: Dict[int, None] = {}  # insertion-ordered: the oldest first

    def add(self, message_id: int) -> None:
        if message_id in self._ids:
            return
        self._ids[message_id] = None
        if len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


# --- signals ---

class StopSignals:
    """SIGINT and SIGTERM as a request to stop, raised where the run can stop safely.

    The first signal raises :class:`StopRequested` at once, unless a message is
    being printed and acknowledged (:meth:`deferred`); then it is raised when that
    is done.  Later signals are only noted, so the DISCONNECT on the way out is
    not interrupted.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._depth = 0
        self._settled = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.received is None
        self.received = signum
        if first and self._depth == 0 and not self._settled:
            raise StopRequested(signum)

    def settle(self) -> None:
        """The run is ending: from now on signals are only noted."""
        self._settled = True

    def check(self) -> None:
        """Raise if a signal arrived during a section that had to finish."""
        if self.received is not None and self._depth == 0 and not self._settled:
            raise StopRequested(self.received)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.check()


# --- the subscriber ---

@dataclass(frozen=True)
class Options:
    host: str
    port: int
    ack: bool = True
    count: Optional[int] = None  # exit after this many messages
    idle_timeout: Optional[float] = None  # exit after this many seconds without a message
    max_backoff: float = DEFAULT_CAP
    keepalive: float = DEFAULT_KEEPALIVE  # 0: never PING
    ssl_context: Optional[ssl.SSLContext] = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Keepalive:
    """When to PING a quiet server, and when a PING left unanswered means a dead connection:
    ``interval`` seconds of silence each."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.last_heard = now
        self.ping_sent_at: Optional[float] = None

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.ping_sent_at = None

    def deadline(self) -> Optional[float]:
        if self.ping_sent_at is not None:
            return self.ping_sent_at + self.interval
        return self.last_heard + self.interval if self.interval > 0 else None


def _no_greeting(exc: BaseException) -> bool:
    """Whether a connect failed waiting for the greeting, or on bytes that are not the
    protocol's (a TLS server waits for a ClientHello and answers plain text with an alert)."""
    if isinstance(exc, (TimeoutError, ssl.SSLError)) or "timed out" in str(exc):
        return True
    return isinstance(exc, ClientError) and "expected GET_CLIENT_ID" in str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Subscriber:
    """Connect, print, acknowledge, reconnect: the whole run of ``niki-client``."""

    def __init__(self, options: Options, credentials: CredentialFile, output: OutputWriter,
                 signals: StopSignals, log: Callable[[str], None],
                 backoff: Optional[ExponentialBackoff] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self.credentials = credentials
        self.output = output
        self.signals = signals
        self.log = log
        self.backoff = backoff or ExponentialBackoff(DEFAULT_BASE, options.max_backoff)
        self.sleep = sleep
        self.printed = RecentIds()
        self.count = 0
        self.client: Optional[Client] = None
        self.credential: Optional[str] = None
        self._idle_deadline: Optional[float] = None
        self._retrying = False
        self.connected = False  # identified at least once in this run
        self.last_failure = ""  # why the last connection attempt failed

    def run(self) -> int:
        """Until a signal, ``--count`` or ``--timeout``; fatal errors propagate (after DISCONNECT)."""
        self.credentials.prepare()
        try:
            with self.credentials.in_use():
                self.credential = self.credentials.load()
                self._touch()
                while True:
                    self.signals.check()
                    if self._open():
                        self._serve_until_lost()
        except StopRequested:
            return EXIT_OK
        except _Finished as finished:
            if not finished.timed_out:
                return EXIT_OK
            if not self.connected:
                self.log(f"never connected to {self.options.address} within --timeout "
                         f"{self.options.idle_timeout:g} s ({self.last_failure or 'no attempt'})")
                return EXIT_FATAL
            return EXIT_TIMEOUT
        finally:
            self._hang_up()

    @property
    def _who(self) -> str:
        return "a new client" if self.credential is None else redact(self.credential)

    def _touch(self) -> None:
        if self.options.idle_timeout is not None:
            self._idle_deadline = time.monotonic() + self.options.idle_timeout

    def _idle_left(self) -> Optional[float]:
        if self._idle_deadline is None:
            return None
        return self._idle_deadline - time.monotonic()

    def _open(self) -> bool:
        """Connect and identify; False (after waiting) when that failed."""
        left = self._idle_left()
        timeout = CONNECT_TIMEOUT if left is None else max(MIN_WAIT, min(CONNECT_TIMEOUT, left))
        self.client = Client(self.options.host, self.options.port, client_id=self.credential,
                             timeout=timeout, ack=self.options.ack, auto_ack=False,
                             ssl_context=self.options.ssl_context)
        try:
            self.client.connect()
        except ssl.SSLCertVerificationError as exc:
            raise FatalConnectError(f"{self.options.address}: the server's certificate is not "
                                    f"trusted ({exc.verify_message}); see --cafile") from exc
        except (OSError, ClientError) as exc:
            self._drop()
            self.last_failure = _describe(exc)
            if self.options.ssl_context is None and _no_greeting(exc):
                self.last_failure += ("; the server sent no GET_CLIENT_ID: if it serves TLS "
                                      "(--tls-cert), connect with --tls")
            self._pause(f"cannot connect to {self.options.address} ({self.last_failure})")
            return False
        self.connected = True
        with self.signals.deferred():
            self._adopt(self.client.client_id)
        if self._retrying:
            self.log(f"reconnected to {self.options.address} as {self._who}")
            self._retrying = False
        return True

    def _adopt(self, assigned: Optional[str]) -> None:
        """Keep what SET_CLIENT_ID: returned when it differs from what was presented."""
        if assigned is None or assigned == self.credential:
            return
        stored = None if self.credential is None else parse_credential(self.credential, MAX_CLIENT_ID)
        if stored is not None and assigned == str(stored.client_id):
            return  # a --legacy-ids server answers a valid credential with the bare id
        self.credentials.store(assigned)
        if self.credential is None:
            self.log(f"registered as new client {redact(assigned)}; credential stored in "
                     f"{self.credentials.path}")
        else:
            self.log(f"the server did not accept credential {redact(self.credential)} and made a new "
                     f"client {redact(assigned)}, stored in {self.credentials.path}; messages "
                     "queued for the old id will not arrive")
        self.credential = assigned

    def _serve_until_lost(self) -> None:
        """Print messages until the connection ends, then wait before the next attempt."""
        assert self.client is not None
        started = time.monotonic()
        reason = self._serve(self.client)
        self._drop()
        if time.monotonic() - started >= STABLE_CONNECTION:
            self.backoff.reset()
        self._pause(f"connection to {self.options.address} lost ({reason})")

    def _serve(self, client: Client) -> str:
        """Print and acknowledge messages; return why the connection ended."""
        keepalive = Keepalive(self.options.keepalive, time.monotonic())
        while True:
            deadlines = [d for d in (keepalive.deadline(), self._idle_deadline) if d is not None]
            wait = None if not deadlines else max(MIN_WAIT, min(deadlines) - time.monotonic())
            try:
                message = client.receive_message(wait)
            except TimeoutError:
                lost = self._quiet(client, keepalive)
                if lost:
                    return lost
                continue
            except OSError as exc:
                return _describe(exc)
            if self._heard_pong(client) or message is not None:
                keepalive.heard(time.monotonic())
            if message is None:
                return "closed by the server"
            try:
                self._handle(client, message)
            except OSError as exc:
                return _describe(exc)

    def _quiet(self, client: Client, keepalive: Keepalive) -> Optional[str]:
        """Nothing came in time: end the run, PING, or give the connection up (returns why)."""
        if self._heard_pong(client):
            keepalive.heard(time.monotonic())
        now = time.monotonic()
        if self._idle_deadline is not None and now >= self._idle_deadline:
            raise _Finished()
        due = keepalive.deadline()
        if due is None or now < due:
            return None
        if keepalive.ping_sent_at is not None:
            return f"no answer to PING within {keepalive.interval:g} s"
        try:
            client.send_command(PING)
        except OSError as exc:
            return _describe(exc)
        keepalive.ping_sent_at = now
        return None

    def _heard_pong(self, client: Client) -> bool:
        """Drain the lines that are not messages: PONG is liveness, others are logged."""
        pong = False
        while client.notices:
            line = client.notices.pop(0)
            if line == PONG:
                pong = True
            else:
                self.log(f"server: {line}")
        return pong

    def _handle(self, client: Client, message: Message) -> None:
        """Print, flush, and only then acknowledge; skip a redelivery already printed."""
        message_id = message.message_id
        if message_id is not None and message_id in self.printed:
            client.ack(message_id)  # its ACK was lost with the previous connection
            return
        received_at = utc_now()
        with self.signals.deferred():
            self.output.emit(message, received_at)
            self.count += 1
            self._touch()
            if message_id is not None:
                self.printed.add(message_id)
                client.ack(message_id)
        if self.options.count is not None and self.count >= self.options.count:
            raise _Finished(timed_out=False)

    def _pause(self, what: str) -> None:
        """Log the failure and wait the back-off (or until ``--timeout`` ends the run)."""
        self.signals.check()  # a signal noted while a message was being acknowledged
        delay = self.backoff.next_delay()
        left = self._idle_left()
        if left is not None:
            if left <= 0:
                raise _Finished()
            delay = min(delay, left)
        self.log(f"{what}; reconnecting in {delay:.1f} s as {self._who}")
        self._retrying = True
        self.sleep(delay)
        left = self._idle_left()
        if left is not None and left <= 0:
            raise _Finished()

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _hang_up(self) -> None:
        """DISCONNECT if identified, so the server stops writing; then close."""
        self.signals.settle()
        client, self.client = self.client, None
        if client is None:
            return
        if client.client_id is not None and not client.closed:
            with contextlib.suppress(OSError, NikiError):
                client.disconnect(DISCONNECT_TIMEOUT)
        client.close()


# --- the command line ---

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # usage errors exit with status 2, as documented
        prog=PROG,
        description="Subscribe to a Niki server: print every message for this client, one per "
        "line, reconnecting when the connection is lost.",
        epilog="Exit status: 0 on SIGINT/SIGTERM or --count reached; 27 when --timeout passed "
        "without a message; 1 when it never connected within --timeout, or a fatal error; "
        "2 usage error.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("address", metavar="HOST[:PORT]",
                   help=f"the server (port {DEFAULT_PORT} by default; IPv6 as [::1]:8000)")
    p.add_argument("--credential-file", metavar="PATH", type=Path, default=None,
                   help="where this client's credential is kept (default "
                   "$XDG_CONFIG_HOME/niki/credential-HOST-PORT[-NAME], ~/.config when unset; "
                   "localhost, 127.0.0.1 and [::1] are one host)")
    p.add_argument("--name", default="",
                   help="a name for this subscriber, so that several on one machine and "
                   "server are several clients (each has its own credential file); one file "
                   "serves one niki-client at a time")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per message: {"id", "body", "received_at"}')
    p.add_argument("--no-ack", dest="ack", action="store_false",
                   help="the original protocol: no acknowledgements, no message ids (a message "
                   "written into a dying connection is lost)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (a server with --tls-cert)")
    p.add_argument("--cafile", metavar="FILE",
                   help="trust this PEM certificate (e.g. the server's self-signed one); implies --tls")
    p.add_argument("--count", type=positive_int, metavar="N", help="exit after N messages")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                   help="exit after SECONDS without a message (status 27; 1 if it never connected)")
    p.add_argument("--max-backoff", type=positive_float, default=DEFAULT_CAP, metavar="SECONDS",
                   help=f"longest wait between reconnect attempts (default {DEFAULT_CAP:g}; "
                   f"the first waits up to {DEFAULT_BASE:g})")
    p.add_argument("--keepalive", type=non_negative_float, default=DEFAULT_KEEPALIVE, metavar="SECONDS",
                   help="PING a server silent this long; no PONG within as long again means "
                   f"reconnect (default {DEFAULT_KEEPALIVE:g}; 0: never)")
    return p


def _ssl_context(tls: bool, cafile: Optional[str]) -> Optional[ssl.SSLContext]:
    if not tls and cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load --cafile {cafile}: {_describe(exc)}") from exc


def _stderr_logger(stream: TextIO) -> Callable[[str], None]:
    def log(text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(f"{PROG}: {text}\n")
            stream.flush()
    return log


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.address)
    except ConfigurationError as exc:
        parser.error(str(exc))
    log = _stderr_logger(sys.stderr)
    signals = StopSignals()
    signals.install()
    try:
        options = Options(host=host, port=port, ack=args.ack, count=args.count,
                          idle_timeout=args.timeout, max_backoff=args.max_backoff,
                          keepalive=args.keepalive,
                          ssl_context=_ssl_context(args.tls, args.cafile))
        path = args.credential_file or default_credential_path(host, port, name=args.name)
        subscriber = Subscriber(options, CredentialFile(path), OutputWriter(sys.stdout.buffer, args.json),
                                signals, log)
        return subscriber.run()
    except StopRequested:  # a signal before the run began
        return EXIT_OK
    except OutputClosed as exc:
        # Point stdout at /dev/null so the interpreter's last flush does not fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        log(f"error: {exc}")
        return EXIT_FATAL
    except NikiError as exc:
        log(f"error: {exc}")
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
