"""Properties of the line protocol state machines, checked with hypothesis (no sockets).

Whatever bytes arrive, in whatever pieces, the parsers give the same events, never
raise, never hold more than a line's worth of bytes, and what one side formats the
other parses back.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messaging_server.protocol.lines import (
    MAX_CLIENT_ID,
    MAX_CLIENT_LINE,
    Ack,
    BadAck,
    ClientProtocol,
    ConnectionClosed,
    Disconnect,
    Identify,
    InvalidCommand,
    LineTooLong,
    Message,
    Ping,
    ServerProtocol,
    State,
)

# Modest example counts: the whole file runs in a few seconds.
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# For the properties whose examples are big (many lines, many pieces).
HEAVY = settings(PROPERTY, max_examples=50)

Parser = Union[ServerProtocol, ClientProtocol]

# Bytes that matter to the parsers, mixed with arbitrary ones: line ends, NUL, bytes that are
# never valid UTF-8, the start of a multi-byte character, and fragments of real commands.
INTERESTING = [b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xf0\x9f\x98", b"\xe2\x82",
               b" ", b"\t", b"NONE", b"ACK", b"ACK 5", b"PING", b"DISCONNECT", b"42", b"MESSAGE: ",
               b"MESSAGE 7: ", b"GET_CLIENT_ID", b"SET_CLIENT_ID: "]
fragment = st.one_of(st.binary(min_size=1, max_size=40), st.sampled_from(INTERESTING))
# Sometimes one long run, so that the line limit is crossed in every possible way.
long_run = st.builds(lambda byte, n: byte * n, st.sampled_from([b"x", b"\xff", b"\x00", b"\r"]),
                     st.integers(MAX_CLIENT_LINE - 3, MAX_CLIENT_LINE + 3))
stream = st.lists(st.one_of(fragment, fragment, fragment, long_run), max_size=20).map(b"".join)


def split_points(data: bytes) -> st.SearchStrategy[List[int]]:
    return st.lists(st.integers(0, len(data)), max_size=10).map(sorted)


def pieces(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def feed(parser: Parser, chunks: Sequence[bytes]) -> List[object]:
    """Feed data (never ``b""``, which means the peer closed) in the given pieces."""
    events: List[object] = []
    for chunk in chunks:
        assert chunk
        events.extend(parser.receive_data(chunk))
    return events


def server_after_id(id_line: bytes) -> ServerProtocol:
    conn = ServerProtocol()
    [event] = conn.receive_data(id_line)
    assert isinstance(event, Identify)
    conn.set_client_id(1)
    return conn


# --- any bytes, any split ------------------------------------------------------------------------


@PROPERTY
@given(st.data(), stream, st.booleans())
def test_server_split_does_not_change_events(data, payload: bytes, close: bool):
    cuts = data.draw(split_points(payload))
    whole, split = ServerProtocol(), ServerProtocol()
    expected = feed(whole, [payload] if payload else [])
    got = feed(split, pieces(payload, cuts))
    assert got == expected
    if close:
        expected += whole.receive_data(b"")
        got += split.receive_data(b"")
    assert got == expected
    assert split.state is whole.state
    assert split.ack_mode == whole.ack_mode


@HEAVY
@given(st.data(), stream, st.booleans())
def test_client_split_does_not_change_events(data, payload: bytes, close: bool):
    cuts = data.draw(split_points(payload))
    whole, split = ClientProtocol(max_line=MAX_CLIENT_LINE), ClientProtocol(max_line=MAX_CLIENT_LINE)
    expected = feed(whole, [payload] if payload else [])
    got = feed(split, pieces(payload, cuts))
    assert got == expected
    if close:
        expected += whole.receive_data(b"")
        got += split.receive_data(b"")
    assert got == expected
    assert split.closed == whole.closed


@PROPERTY
@given(st.lists(st.one_of(fragment, long_run), max_size=20))
def test_server_never_raises_and_stays_bounded(chunks: List[bytes]):
    conn = ServerProtocol()
    reported_too_long = False
    for chunk in chunks:
        events = conn.receive_data(chunk)  # never raises
        if LineTooLong(MAX_CLIENT_LINE) in events:
            assert events[-1] == LineTooLong(MAX_CLIENT_LINE)
            assert conn.state is State.CLOSED
            reported_too_long = True
        if conn.state is not State.CLOSED:
            # An open connection never holds more than one line's worth of bytes.
            assert conn._lines.pending <= MAX_CLIENT_LINE
    was_open = conn.state is not State.CLOSED
    assert conn.receive_data(b"") == ([ConnectionClosed()] if was_open else [])
    assert conn.receive_data(b"more\n") == []
    if reported_too_long:
        assert conn.state is State.CLOSED


@PROPERTY
@given(st.lists(st.one_of(fragment, long_run), max_size=20))
def test_client_never_raises_and_stays_bounded(chunks: List[bytes]):
    limit = MAX_CLIENT_LINE  # a small limit, so that the generated runs cross it
    client = ClientProtocol(max_line=limit)
    for chunk in chunks:
        events = client.receive_data(chunk)
        if LineTooLong(limit) in events:
            assert events[-1] == LineTooLong(limit)
            assert client.closed
        if not client.closed:
            assert client._lines.pending <= limit
    was_open = not client.closed
    assert client.receive_data(b"") == ([ConnectionClosed()] if was_open else [])
    assert client.receive_data(b"MESSAGE: x\n") == []


@PROPERTY
@given(st.integers(0, 3 * MAX_CLIENT_LINE), st.data())
def test_line_too_long_exactly_when_over_the_limit(size: int, data):
    """A line of ``size`` bytes before ``\\n`` is refused iff, terminator included, it passes the limit."""
    conn = server_after_id(b"NONE\n")
    payload = b"a" * size + b"\n"
    events = feed(conn, pieces(payload, data.draw(split_points(payload))))
    if size + 1 <= MAX_CLIENT_LINE:
        assert events == [InvalidCommand("a" * size)]
        assert conn.state is State.IDENTIFIED
    else:
        assert events == [LineTooLong(MAX_CLIENT_LINE)]
        assert conn.state is State.CLOSED


# --- every complete line after identification is one event -----------------------------------------

# A line: arbitrary bytes without "\n", short enough for the limit (with "\r\n").
line_bytes = st.lists(st.one_of(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
                                st.sampled_from([b"ACK", b"ACK ", b"PING", b"DISCONNECT", b"7", b" ",
                                                 b"\r", b"\x00", b"\xff", b"\xc3"])),
                      max_size=8).map(b"".join)


def expected_event(line: str, ack: bool) -> object:
    """What docs/PROTOCOL.md sections 5a and 6 say a command line means."""
    command = line.strip()
    if command == "DISCONNECT":
        return Disconnect()
    if command == "PING":
        return Ping()
    if ack and (command == "ACK" or command.startswith("ACK ")):
        rest = command[3:].strip()
        if rest.isascii() and rest.isdigit() and 0 < int(rest) <= MAX_CLIENT_ID:
            return Ack(int(rest))
        return BadAck(line)
    return InvalidCommand(line)


@HEAVY
@given(st.sampled_from([b"NONE", b"12", b"NONE ACK", b"12 ack", b"x ACK", b""]),
       st.lists(line_bytes, max_size=15), st.sampled_from([b"\n", b"\r\n"]), st.data())
def test_each_complete_line_is_one_event(id_line: bytes, lines: List[bytes], terminator: bytes, data):
    conn = ServerProtocol()
    payload = id_line + terminator + b"".join(line + terminator for line in lines)
    events = feed(conn, pieces(payload, data.draw(split_points(payload))))
    assert isinstance(events[0], Identify)
    ack = b"ack" in id_line.lower()
    assert conn.ack_mode is ack
    expected: List[object] = []
    for raw in lines:
        if raw.endswith(b"\r") and terminator == b"\n":
            raw = raw[:-1]  # "\r\n" after all: the "\r" is part of the terminator
        event = expected_event(raw.decode("utf-8", errors="replace"), ack)
        expected.append(event)
        if event == Disconnect():
            break
    assert events[1:] == expected
    assert conn.state is (State.CLOSED if Disconnect() in expected else State.IDENTIFIED)


# --- what one side formats, the other parses -------------------------------------------------------

# Any text a message may carry: no line breaks, no lone surrogates (bodies are valid UTF-8).
any_char = st.characters(codec="utf-8", exclude_characters="\r\n")
body_text = st.lists(st.one_of(st.text(any_char, max_size=10),
                               st.sampled_from([" ", "  ", "\t", ":", ": ", "MESSAGE", "MESSAGE: ",
                                                "MESSAGE 7: ", "ACK", "7", "\x00", "\x0b", "\x85",
                                                "\u2028", "\u00e9", "\U0001f600"])),
                     max_size=6).map("".join)
message_ids = st.integers(1, MAX_CLIENT_ID)


@HEAVY
@given(st.lists(st.tuples(body_text, message_ids), min_size=1, max_size=6), st.booleans(), st.data())
def test_message_round_trip(messages: List[Tuple[str, int]], ack: bool, data):
    server = server_after_id(b"NONE ACK\n" if ack else b"NONE\n")
    assert server.ack_mode is ack
    payload = b"".join(server.message(body, message_id) for body, message_id in messages)
    client = ClientProtocol()
    events = feed(client, pieces(payload, data.draw(split_points(payload))))
    assert events == [Message(body, message_id if ack else None) for body, message_id in messages]


@PROPERTY
@given(message_ids)
def test_ack_ids_round_trip(message_id: int):
    server = server_after_id(ClientProtocol.identify(None, ack=True))
    assert server.receive_data(ClientProtocol.ack(message_id)) == [Ack(message_id)]
    legacy = server_after_id(ClientProtocol.identify(None))
    assert legacy.receive_data(ClientProtocol.ack(message_id)) == [InvalidCommand(f"ACK {message_id}")]


@PROPERTY
@given(st.one_of(st.none(), message_ids), st.booleans())
def test_identify_round_trip(client_id, ack: bool):
    conn = ServerProtocol()
    [event] = conn.receive_data(ClientProtocol.identify(client_id, ack=ack))
    assert isinstance(event, Identify)
    assert event.client_id == client_id
    assert not event.malformed
    assert event.capabilities == (("ACK",) if ack else ())
    assert conn.ack_mode is ack


@PROPERTY
@given(body_text)
def test_invalid_command_keeps_any_text(text: str):
    conn = server_after_id(b"NONE\n")
    [event] = conn.receive_data(text.encode("utf-8") + b"\n")
    assert event == expected_event(text, ack=False)
