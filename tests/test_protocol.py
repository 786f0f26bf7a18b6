"""Unit tests of the line protocol state machine: bytes in, events out, no sockets."""

from __future__ import annotations

from typing import List

import pytest

from messaging_server import protocol
from messaging_server.protocol import (
    MAX_CLIENT_ID,
    MAX_CLIENT_LINE,
    MAX_SERVER_LINE,
    ClientConnection,
    ConnectionClosed,
    Disconnect,
    IdAssigned,
    Identify,
    IdRequested,
    InvalidCommand,
    LineBuffer,
    LineTooLong,
    Message,
    Notice,
    ProtocolError,
    ServerConnection,
    State,
)


def identified() -> ServerConnection:
    conn = ServerConnection()
    assert conn.receive_data(b"NONE\n") == [Identify(None, "NONE")]
    assert conn.state is State.IDENTIFIED
    return conn


def feed_bytewise(conn, data: bytes) -> List[object]:
    events: List[object] = []
    for i in range(len(data)):
        events.extend(conn.receive_data(data[i:i + 1]))
    return events


# --- greeting and identification -------------------------------------------------------------


def test_greeting_bytes():
    conn = ServerConnection()
    assert conn.state is State.AWAITING_ID
    assert conn.greeting() == b"GET_CLIENT_ID\n"
    # Greeting does not change the state; it can be produced again before identification.
    assert conn.state is State.AWAITING_ID


def test_greeting_after_identification_raises():
    conn = identified()
    with pytest.raises(ProtocolError):
        conn.greeting()


def test_greeting_after_close_raises():
    conn = ServerConnection()
    assert conn.receive_data(b"") == [ConnectionClosed()]
    with pytest.raises(ProtocolError):
        conn.greeting()


@pytest.mark.parametrize("line", ["NONE", "none", "None", "nOnE"])
def test_none_means_new_client(line):
    conn = ServerConnection()
    assert conn.receive_data(line.encode() + b"\n") == [Identify(None, line, malformed=False)]
    assert conn.state is State.IDENTIFIED


@pytest.mark.parametrize(
    ("line", "client_id"),
    [
        ("1", 1),
        ("42", 42),
        ("0042", 42),
        ("3000", 3000),
        (str(MAX_CLIENT_ID), MAX_CLIENT_ID),
        ("  42  ", 42),
    ],
)
def test_stored_id(line, client_id):
    conn = ServerConnection()
    [event] = conn.receive_data(line.encode() + b"\n")
    assert event == Identify(client_id, line, malformed=False)


@pytest.mark.parametrize(
    "line",
    [
        "abc",
        "12abc",
        "",
        "   ",
        "0",
        "000",
        "-5",
        "+5",
        "1e3",
        "42x",
        ".42",
        str(MAX_CLIENT_ID + 1),
        str(2**64),
        "\u0663",  # ARABIC-INDIC DIGIT THREE: a digit, but not an ASCII one
        "\uff15",  # FULLWIDTH DIGIT FIVE
        "NONE.x",
        # docs/PROTOCOL.md section 4: anything but digits in the first word makes it malformed.
        "42.abc",
        "42.",
        "42.x.y",
    ],
)
def test_malformed_id(line):
    conn = ServerConnection()
    events = conn.receive_data(line.encode() + b"\n")
    assert events == [Identify(None, line, malformed=True)]
    # A malformed id still ends the handshake (the server issues a new id).
    assert conn.state is State.IDENTIFIED


def test_capability_words_kept():
    conn = ServerConnection()
    assert conn.receive_data(b"42 push v2\n") == [Identify(42, "42 push v2", capabilities=("push", "v2"))]
    conn = ServerConnection()
    assert conn.receive_data(b"NONE  zlib\n") == [Identify(None, "NONE  zlib", capabilities=("zlib",))]
    conn = ServerConnection()
    [event] = conn.receive_data(b"x1 cap\n")
    assert event == Identify(None, "x1 cap", malformed=True, capabilities=("cap",))


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_terminators(terminator):
    conn = ServerConnection()
    assert conn.receive_data(b"7" + terminator) == [Identify(7, "7")]
    assert conn.receive_data(b"hello" + terminator) == [InvalidCommand("hello")]
    assert conn.receive_data(b"DISCONNECT" + terminator) == [Disconnect()]


def test_only_one_carriage_return_is_dropped():
    conn = identified()
    assert conn.receive_data(b"x\r\r\n") == [InvalidCommand("x\r")]


def test_byte_by_byte():
    conn = ServerConnection()
    data = b"12345 cap\r\nfoo bar\r\nDISCONNECT\r\n"
    assert feed_bytewise(conn, data) == [
        Identify(12345, "12345 cap", capabilities=("cap",)),
        InvalidCommand("foo bar"),
        Disconnect(),
    ]
    assert conn.state is State.CLOSED


def test_no_event_until_newline():
    conn = ServerConnection()
    assert conn.receive_data(b"12") == []
    assert conn.receive_data(b"3") == []
    assert conn.state is State.AWAITING_ID
    assert conn.receive_data(b"\n") == [Identify(123, "123")]


def test_several_lines_in_one_chunk_in_order():
    conn = ServerConnection()
    events = conn.receive_data(b"99\nfoo\n\nbar\r\nDISCONNECT\nafter\n")
    assert events == [
        Identify(99, "99"),
        InvalidCommand("foo"),
        InvalidCommand(""),
        InvalidCommand("bar"),
        Disconnect(),
    ]
    assert conn.state is State.CLOSED


def test_id_and_command_in_one_packet_with_partial_tail():
    conn = ServerConnection()
    assert conn.receive_data(b"NONE\nhel") == [Identify(None, "NONE")]
    assert conn.receive_data(b"lo\nDISC") == [InvalidCommand("hello")]
    assert conn.receive_data(b"ONNECT\n") == [Disconnect()]


# --- after identification ---------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"DISCONNECT", b"  DISCONNECT  ", b"\tDISCONNECT", b"DISCONNECT\r"])
def test_disconnect(line):
    conn = identified()
    assert conn.receive_data(line + b"\n") == [Disconnect()]
    assert conn.state is State.CLOSED
    # Nothing leaves CLOSED: later data, even a close, produces no event.
    assert conn.receive_data(b"hello\n") == []
    assert conn.receive_data(b"DISCONNECT\n") == []
    assert conn.receive_data(b"x" * (MAX_CLIENT_LINE * 4)) == []
    assert conn.receive_data(b"") == []
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"\n", ""),
        (b"\r\n", ""),
        (b"disconnect\n", "disconnect"),
        (b"Disconnect\n", "Disconnect"),
        (b"DISCONNECT now\n", "DISCONNECT now"),
        (b"DISCONNECTED\n", "DISCONNECTED"),
        (b"NONE\n", "NONE"),
        (b"42\n", "42"),
        (b"GET_CLIENT_ID\n", "GET_CLIENT_ID"),
        (b"  spaced  out \n", "  spaced  out "),
        ("h\u00e9llo \U0001f600\n".encode(), "h\u00e9llo \U0001f600"),
    ],
)
def test_invalid_command_keeps_exact_line(data, line):
    conn = identified()
    assert conn.receive_data(data) == [InvalidCommand(line)]
    assert conn.state is State.IDENTIFIED


def test_invalid_utf8_is_replaced():
    conn = identified()
    assert conn.receive_data(b"ab\xff\xfecd\n") == [InvalidCommand("ab\ufffd\ufffdcd")]
    # A multi-byte character cut by the end of the line is replaced too.
    assert conn.receive_data(b"x\xf0\x9f\x98\n") == [InvalidCommand("x\ufffd")]
    assert conn.state is State.IDENTIFIED


def test_invalid_utf8_as_id_is_malformed():
    conn = ServerConnection()
    assert conn.receive_data(b"\xff\xfe\n") == [Identify(None, "\ufffd\ufffd", malformed=True)]


def test_multibyte_character_split_across_feeds():
    conn = identified()
    data = "\U0001f600\n".encode()
    assert feed_bytewise(conn, data) == [InvalidCommand("\U0001f600")]


def test_connection_closed():
    conn = ServerConnection()
    assert conn.receive_data(b"") == [ConnectionClosed()]
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"NONE\n") == []
    conn = identified()
    assert conn.receive_data(b"partial") == []
    assert conn.receive_data(b"") == [ConnectionClosed()]
    assert conn.state is State.CLOSED


# --- line length -------------------------------------------------------------------------------


def test_longest_allowed_line():
    conn = identified()
    body = b"x" * (MAX_CLIENT_LINE - 1)  # plus "\n" = MAX_CLIENT_LINE, terminator included
    assert conn.receive_data(body + b"\n") == [InvalidCommand(body.decode())]
    assert conn.state is State.IDENTIFIED


def test_unterminated_line_over_limit():
    conn = identified()
    assert conn.receive_data(b"x" * 1000) == []
    events = conn.receive_data(b"x" * (MAX_CLIENT_LINE + 1 - 1000))
    assert events == [LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"\n") == []


def test_unterminated_line_over_limit_before_identification():
    conn = ServerConnection()
    assert conn.receive_data(b"1" * (MAX_CLIENT_LINE + 5)) == [LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


def test_unterminated_line_over_limit_byte_by_byte():
    conn = ServerConnection()
    events = feed_bytewise(conn, b"9" * (MAX_CLIENT_LINE + 10))
    assert events == [LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("size", [MAX_CLIENT_LINE, MAX_CLIENT_LINE + 1, 5000])
def test_long_complete_line(size):
    # A line of `size` bytes before its newline: at least MAX_CLIENT_LINE + 1 with the terminator.
    conn = identified()
    assert conn.receive_data(b"y" * size + b"\n") == [LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


def test_long_line_after_good_lines_in_one_chunk():
    conn = ServerConnection()
    events = conn.receive_data(b"5\nhi\n" + b"z" * 3000 + b"\nDISCONNECT\n")
    assert events == [Identify(5, "5"), InvalidCommand("hi"), LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


def test_custom_limit():
    conn = ServerConnection(max_line=8)
    assert conn.receive_data(b"1234567\n") == [Identify(1234567, "1234567")]
    assert conn.receive_data(b"abcdef\r\n") == [InvalidCommand("abcdef")]  # 8 bytes with \r\n
    assert conn.receive_data(b"abcdefg\r\n") == [LineTooLong(8)]


# --- what the server says -----------------------------------------------------------------


def test_output_formatting():
    assert ServerConnection.set_client_id(42) == b"SET_CLIENT_ID: 42\n"
    assert ServerConnection.set_client_id("42") == b"SET_CLIENT_ID: 42\n"
    assert ServerConnection.message("hello world") == b"MESSAGE: hello world\n"
    assert ServerConnection.message("h\u00e9 \U0001f600") == "MESSAGE: h\u00e9 \U0001f600\n".encode()
    assert ServerConnection.invalid_command("foo bar") == b"Invalid command: foo bar\n"
    assert ServerConnection.invalid_command("") == b"Invalid command: \n"
    assert ServerConnection.error("server is shutting down") == b"ERROR: server is shutting down\n"
    conn = identified()
    assert conn.message("x") == b"MESSAGE: x\n"


@pytest.mark.parametrize("body", ["a\nb", "a\rb", "\n", "trailing\r\n"])
def test_message_with_line_break_raises(body):
    with pytest.raises(ValueError):
        ServerConnection.message(body)
    with pytest.raises(ValueError):
        protocol.check_body(body)


def test_server_output_parsed_by_client():
    client = ClientConnection()
    data = (ServerConnection().greeting() + ServerConnection.set_client_id(17)
            + ServerConnection.message("one") + ServerConnection.invalid_command("x"))
    assert client.receive_data(data) == [IdRequested(), IdAssigned("17"), Message("one"),
                                         Notice("Invalid command: x")]


# --- the client side ---------------------------------------------------------------------------


def test_client_parses_server_lines():
    client = ClientConnection()
    assert client.receive_data(b"GET_CLIENT_ID\n") == [IdRequested()]
    assert client.receive_data(b"SET_CLIENT_ID: 3000\r\n") == [IdAssigned("3000")]
    assert client.receive_data(b"MESSAGE: hello\n") == [Message("hello")]
    assert client.receive_data(b"MESSAGE: \n") == [Message("")]
    assert client.receive_data(b"MESSAGE:  two  spaces \n") == [Message(" two  spaces ")]
    assert client.receive_data(b"Invalid command: foo\n") == [Notice("Invalid command: foo")]
    assert client.receive_data(b"ERROR: busy\n") == [Notice("ERROR: busy")]
    assert client.receive_data(b"get_client_id\n") == [Notice("get_client_id")]
    assert client.receive_data(b"MESSAGE:x\n") == [Notice("MESSAGE:x")]
    assert client.closed is False


def test_client_four_byte_utf8_body_byte_by_byte():
    client = ClientConnection()
    body = "caf\u00e9 \U0001f600\U0001f389 \U0001d11e"
    data = ("MESSAGE: " + body + "\n").encode("utf-8")
    assert feed_bytewise(client, data) == [Message(body)]


def test_client_several_lines_in_one_chunk():
    client = ClientConnection()
    events = client.receive_data(b"GET_CLIENT_ID\nSET_CLIENT_ID: 5\nMESSAGE: a\nMESSAGE: b\nMESS")
    assert events == [IdRequested(), IdAssigned("5"), Message("a"), Message("b")]
    assert client.receive_data(b"AGE: c\n") == [Message("c")]


def test_client_closed_and_too_long():
    client = ClientConnection()
    assert client.receive_data(b"") == [ConnectionClosed()]
    assert client.closed
    assert client.receive_data(b"MESSAGE: x\n") == []

    client = ClientConnection()
    assert client.receive_data(b"MESSAGE: " + b"a" * (MAX_SERVER_LINE - 20) + b"\n") == [
        Message("a" * (MAX_SERVER_LINE - 20))
    ]
    assert client.receive_data(b"a" * (MAX_SERVER_LINE + 1)) == [LineTooLong(MAX_SERVER_LINE)]
    assert client.closed
    assert client.receive_data(b"\n") == []


def test_client_output():
    assert ClientConnection.identify(None) == b"NONE\n"
    assert ClientConnection.identify(42) == b"42\n"
    assert ClientConnection.identify("42") == b"42\n"
    assert ClientConnection.command("DISCONNECT") == b"DISCONNECT\n"
    with pytest.raises(ValueError):
        ClientConnection.command("DISCONNECT\nNONE")
    # What a client says is what a server parses.
    conn = ServerConnection()
    assert conn.receive_data(ClientConnection.identify(42) + ClientConnection.command("DISCONNECT")) == [
        Identify(42, "42"), Disconnect()
    ]


# --- LineBuffer ----------------------------------------------------------------------------------


def test_line_buffer_splits_and_holds():
    buf = LineBuffer(10)
    assert buf.feed(b"ab\ncd") == (["ab"], False)
    assert buf.pending == 2
    assert buf.feed(b"\r\n\n") == (["cd", ""], False)
    assert buf.pending == 0


def test_line_buffer_limit_includes_terminator():
    buf = LineBuffer(10)
    assert buf.feed(b"a" * 9 + b"\n") == (["a" * 9], False)
    assert buf.feed(b"a" * 8 + b"\r\n") == (["a" * 8], False)
    assert buf.feed(b"a" * 10 + b"\n")[1] is True


def test_line_buffer_unterminated_limit():
    buf = LineBuffer(10)
    assert buf.feed(b"a" * 10) == ([], False)  # holding exactly `limit` bytes is allowed
    assert buf.pending == 10
    assert buf.feed(b"a") == ([], True)


def test_line_buffer_reports_lines_before_overflow():
    buf = LineBuffer(10)
    lines, overflow = buf.feed(b"one\ntwo\n" + b"x" * 20 + b"\nthree\n")
    assert lines == ["one", "two"]
    assert overflow is True


def test_line_buffer_does_not_hold_consumed_lines():
    # Many short lines in one feed: only the unterminated tail counts against the limit.
    buf = LineBuffer(10)
    lines, overflow = buf.feed(b"123456789\n" * 100 + b"12345")
    assert lines == ["123456789"] * 100
    assert overflow is False
    assert buf.pending == 5
