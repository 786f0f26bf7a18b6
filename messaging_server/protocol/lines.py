"""The Niki line protocol as a pure state machine: bytes in, events out.

Nothing here touches a socket, a database or a clock (the model is h11).  The
server feeds what it reads from a client into :class:`ServerProtocol` and
acts on the events it gets back; it turns what it wants to say into bytes with
the ``ServerProtocol`` methods.  :class:`ClientProtocol` is the mirror image
used by :mod:`messaging_server.client.sdk`.

The conversation (see docs/PROTOCOL.md)::

    server: GET_CLIENT_ID
    client: NONE | <id>.<secret>  [ACK]
    server: SET_CLIENT_ID: <id>.<secret>    (bare <id>s with --legacy-ids)
    server: MESSAGE: <body>          (pending messages, then new ones)
    server: MESSAGE <n>: <body>      (the same, for a client that said ACK)
    client: ACK <n>                  (ACK clients: message n is safely received)
    client: PING               ->    server: PONG
    client: DISCONNECT               (the server closes the connection)
    client: <any other line>   ->    server: Invalid command: <line>

Lines end in ``\\n``; a ``\\r`` before it is dropped, so telnet's ``\\r\\n`` works.
States: ``AWAITING_ID`` -> ``IDENTIFIED`` -> ``CLOSED``; nothing leaves ``CLOSED``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Set, Tuple, Union

from messaging_server.protocol.credentials import parse_credential

# Longest line a client may send, terminator included.  Client lines are an id
# or a command: a few dozen bytes.  1 KiB leaves room for future capability
# words while bounding what a stranger can make the server buffer per socket.
MAX_CLIENT_LINE = 1024

# Longest line a server may send to a client (read by ClientProtocol).  A
# MESSAGE line carries a body of at most the enqueue limit; 64 KiB leaves room
# for servers configured with a larger body limit.
MAX_SERVER_LINE = 65536

GREETING = "GET_CLIENT_ID"
NEW_CLIENT = "NONE"
SET_CLIENT_ID_PREFIX = "SET_CLIENT_ID: "
MESSAGE_PREFIX = "MESSAGE: "
INVALID_COMMAND_PREFIX = "Invalid command: "
ERROR_PREFIX = "ERROR: "
DISCONNECT = "DISCONNECT"
PING, PONG = "PING", "PONG"
ACK = "ACK"
# Capability words a client may put after its id.
CAPABILITY_ACK = "ACK"

# Largest id the storage layer can hold (signed 64-bit, as SQLite's INTEGER).
MAX_CLIENT_ID = 2**63 - 1


class State(enum.Enum):
    AWAITING_ID = "awaiting id"
    IDENTIFIED = "identified"
    CLOSED = "closed"


class ProtocolError(Exception):
    """A protocol object was used against its state (a bug in the caller)."""


# --- events a server receives ------------------------------------------------


@dataclass(frozen=True)
class Identify:
    """The client's answer to GET_CLIENT_ID.

    ``client_id`` is None for ``NONE`` and for an answer that is not a valid
    id or credential; ``malformed`` tells the two apart so the server can log
    the latter.  ``secret`` is the part after the dot (None for a bare id);
    the server, not the protocol, decides whether it is right.
    ``capabilities`` are the words after the id.
    """

    client_id: Optional[int]
    raw: str
    malformed: bool = False
    capabilities: Tuple[str, ...] = ()
    secret: Optional[str] = None


@dataclass(frozen=True)
class Disconnect:
    """The client asked the server to close the connection."""


@dataclass(frozen=True)
class Ping:
    """The client checks that the connection is alive."""


@dataclass(frozen=True)
class Ack:
    """An ACK client confirms it has message ``message_id``."""

    message_id: int


@dataclass(frozen=True)
class BadAck:
    """``ACK`` with something that is not a message id."""

    line: str


@dataclass(frozen=True)
class InvalidCommand:
    """A line that is not a command; the server answers it and carries on."""

    line: str


@dataclass(frozen=True)
class LineTooLong:
    """The client sent more than ``limit`` bytes without a newline."""

    limit: int


@dataclass(frozen=True)
class ConnectionClosed:
    """The client closed its side of the connection."""


ServerEvent = Union[Identify, Disconnect, Ping, Ack, BadAck, InvalidCommand, LineTooLong,
                    ConnectionClosed]


# --- events a client receives ------------------------------------------------


@dataclass(frozen=True)
class IdRequested:
    """The server sent GET_CLIENT_ID."""


@dataclass(frozen=True)
class IdAssigned:
    client_id: str


@dataclass(frozen=True)
class Message:
    body: str
    message_id: Optional[int] = None  # set in ACK mode


@dataclass(frozen=True)
class Notice:
    """Any other line from the server (``Invalid command: …``, ``ERROR: …``)."""

    line: str


ClientEvent = Union[IdRequested, IdAssigned, Message, Notice, LineTooLong, ConnectionClosed]


class LineBuffer:
    """Splits a byte stream into lines, holding at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> Tuple[List[str], bool]:
        """Add ``data``; return the complete lines and whether the limit was passed."""
        self._buf += data
        lines: List[str] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            if end + 1 - start > self.limit:
                return lines, True
            raw = bytes(self._buf[start:end])
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            lines.append(raw.decode("utf-8", errors="replace"))
            start = end + 1
        del self._buf[:start]
        return lines, len(self._buf) > self.limit

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a line."""
        return len(self._buf)


def parse_client_id(text: str) -> Optional[int]:
    """The id in ``text`` (ASCII digits, 1 to MAX_CLIENT_ID), or None."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value <= MAX_CLIENT_ID else None


def check_body(body: str) -> None:
    """Raise ValueError when ``body`` cannot travel on one protocol line."""
    if "\n" in body or "\r" in body:
        raise ValueError("a message body cannot contain a line break")


class ServerProtocol:
    """The server's side of one client connection: every line received and every line
    sent goes through it, and it holds the connection's protocol state.

    What is received is parsed into events (``receive_data``).  What is sent is formatted
    here and refused (ProtocolError) out of order: no greeting twice, no SET_CLIENT_ID
    before the client's id or twice, no MESSAGE before SET_CLIENT_ID, no command reply
    before the id.  In ACK mode it keeps the window of messages written and not yet
    acknowledged (at most ``max_inflight``): ``room`` says how many more may be written,
    ``written`` adds to it, ``acknowledged`` takes the client's ACKs out of it and says
    which were in it (an ACK for anything else is the caller's to refuse).  The sending
    side is used by one thread (the connection's handler); ``receive_data`` may run on
    another (the command listener) and touches only the receiving state.
    """

    def __init__(self, max_line: int = MAX_CLIENT_LINE, max_inflight: int = 100) -> None:
        self.state = State.AWAITING_ID
        self.ack_mode = False  # the client said ACK after its id
        self.assigned = False  # SET_CLIENT_ID sent: messages may follow
        self.max_inflight = max_inflight
        self._greeted = False
        self._inflight: Set[int] = set()  # ACK mode: written, not yet acknowledged
        self._lines = LineBuffer(max_line)

    def receive_data(self, data: bytes) -> List[ServerEvent]:
        """Feed bytes read from the client; ``b""`` means the client closed."""
        if self.state is State.CLOSED:
            return []
        if not data:
            self.state = State.CLOSED
            return [ConnectionClosed()]
        lines, overflow = self._lines.feed(data)
        events: List[ServerEvent] = []
        for line in lines:
            events.append(self._line_event(line))
            if self.state is State.CLOSED:
                return events
        if overflow:
            self.state = State.CLOSED
            events.append(LineTooLong(self._lines.limit))
        return events

    def _line_event(self, line: str) -> ServerEvent:
        if self.state is State.AWAITING_ID:
            self.state = State.IDENTIFIED
            identify = _identify(line)
            self.ack_mode = CAPABILITY_ACK in (c.upper() for c in identify.capabilities)
            return identify
        command = line.strip()
        if command == DISCONNECT:
            self.state = State.CLOSED
            return Disconnect()
        if command == PING:
            return Ping()
        if self.ack_mode and command.split(" ", 1)[0] == ACK:
            message_id = parse_client_id(command[len(ACK):].strip())
            return BadAck(line) if message_id is None else Ack(message_id)
        return InvalidCommand(line)

    # --- the ACK window ---

    @property
    def awaiting_acks(self) -> bool:
        """Messages were written that the client has not acknowledged yet."""
        return bool(self._inflight)

    def room(self, wanted: int) -> int:
        """How many of ``wanted`` messages may be written now: all but in ACK mode, where
        the window's free places bound them (0: paused until ACKs come)."""
        return min(wanted, self.max_inflight - len(self._inflight)) if self.ack_mode else wanted

    def written(self, message_ids: Iterable[int]) -> None:
        """These messages reached the socket whole: in ACK mode they wait for their ACK."""
        if self.ack_mode:
            self._inflight.update(message_ids)

    def acknowledged(self, message_ids: Iterable[int]) -> List[int]:
        """The client's ACKs: those of messages in the window, taken out of it."""
        known = []
        for message_id in message_ids:
            if message_id in self._inflight:
                self._inflight.discard(message_id)
                known.append(message_id)
        return known

    # --- what the server says ---

    def greeting(self) -> bytes:
        if self.state is not State.AWAITING_ID or self._greeted:
            raise ProtocolError(f"greeting in state {self.state.value}")
        self._greeted = True
        return _line(GREETING)

    def set_client_id(self, client_id: Union[int, str]) -> bytes:
        if self.state is State.AWAITING_ID or self.assigned:
            raise ProtocolError("SET_CLIENT_ID before the client's id, or twice")
        self.assigned = True
        return _line(f"{SET_CLIENT_ID_PREFIX}{client_id}")

    def message(self, body: str, message_id: int = 0) -> bytes:
        """A MESSAGE line; in ACK mode it carries ``message_id`` for the client to ACK."""
        if not self.assigned:
            raise ProtocolError("MESSAGE before SET_CLIENT_ID")
        check_body(body)
        if self.ack_mode:
            return _line(f"MESSAGE {message_id}: {body}")
        return _line(MESSAGE_PREFIX + body)

    def pong(self) -> bytes:
        self._after_id("PONG")
        return _line(PONG)

    def invalid_command(self, line: str) -> bytes:
        self._after_id("Invalid command")
        return _line(INVALID_COMMAND_PREFIX + line)

    def error(self, text: str) -> bytes:
        """An ERROR line: in any state (a refusal may come before anything else)."""
        return _line(ERROR_PREFIX + text)

    def _after_id(self, what: str) -> None:
        if self.state is State.AWAITING_ID:
            raise ProtocolError(f"{what} before the client's id: it answers a command")


def _identify(line: str) -> Identify:
    words = line.split()
    if not words:
        return Identify(None, line, malformed=True)
    head, capabilities = words[0], tuple(words[1:])
    if head.upper() == NEW_CLIENT:
        return Identify(None, line, capabilities=capabilities)
    credential = parse_credential(head, MAX_CLIENT_ID)
    if credential is None:
        return Identify(None, line, malformed=True, capabilities=capabilities)
    return Identify(credential.client_id, line, capabilities=capabilities, secret=credential.secret)


def _line(text: str) -> bytes:
    return (text + "\n").encode("utf-8")


class ClientProtocol:
    """The client's side: parses what a server sends, formats what a client says."""

    def __init__(self, max_line: int = MAX_SERVER_LINE) -> None:
        self._lines = LineBuffer(max_line)
        self.closed = False

    def receive_data(self, data: bytes) -> List[ClientEvent]:
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [ConnectionClosed()]
        lines, overflow = self._lines.feed(data)
        events: List[ClientEvent] = [_server_line_event(line) for line in lines]
        if overflow:
            self.closed = True
            events.append(LineTooLong(self._lines.limit))
        return events

    @staticmethod
    def identify(client_id: Optional[Union[int, str]], ack: bool = False) -> bytes:
        word = NEW_CLIENT if client_id is None else str(client_id)
        check_body(word)
        return _line(f"{word} {CAPABILITY_ACK}" if ack else word)

    @staticmethod
    def ack(message_id: int) -> bytes:
        return _line(f"{ACK} {message_id}")

    @staticmethod
    def command(text: str) -> bytes:
        check_body(text)
        return _line(text)


def _server_line_event(line: str) -> ClientEvent:
    if line == GREETING:
        return IdRequested()
    if line.startswith(SET_CLIENT_ID_PREFIX):
        return IdAssigned(line[len(SET_CLIENT_ID_PREFIX):])
    if line.startswith(MESSAGE_PREFIX):
        return Message(line[len(MESSAGE_PREFIX):])
    match = _ACK_MESSAGE_RE.match(line)
    if match:
        return Message(match.group(2), int(match.group(1)))
    return Notice(line)


_ACK_MESSAGE_RE = re.compile(r"MESSAGE ([0-9]+): (.*)\Z", re.S)
