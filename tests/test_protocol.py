"""Unit tests of the line protocol state machine: bytes in, events out, no sockets."""

from __future__ import annotations

from typing import List

import pytest

from messaging_server.protocol import lines as protocol
from messaging_server.protocol.lines import (
    MAX_CLIENT_ID,
    MAX_CLIENT_LINE,
    MAX_SERVER_LINE,
    Ack,
    BadAck,
    ClientProtocol,
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
    Ping,
    ProtocolError,
    ServerProtocol,
    State,
)


def identified(assign: bool = True) -> ServerProtocol:
    """A connection whose client sent its id (and, with ``assign``, got SET_CLIENT_ID)."""
    conn = ServerProtocol()
    assert conn.receive_data(b"NONE\n") == [Identify(None, "NONE")]
    assert conn.state is State.IDENTIFIED
    if assign:
        conn.set_client_id(1)
    return conn


def ack_mode(line: bytes = b"NONE ACK\n") -> ServerProtocol:
    """A connection whose client asked for acknowledged delivery."""
    conn = ServerProtocol()
    [event] = conn.receive_data(line)
    assert isinstance(event, Identify)
    assert conn.ack_mode is True
    conn.set_client_id(1)
    return conn


def feed_bytewise(conn, data: bytes) -> List[object]:
    events: List[object] = []
    for i in range(len(data)):
        events.extend(conn.receive_data(data[i:i + 1]))
    return events


# --- greeting and identification -------------------------------------------------------------


def test_greeting_bytes():
    conn = ServerProtocol()
    assert conn.state is State.AWAITING_ID
    assert conn.greeting() == b"GET_CLIENT_ID\n"
    # Greeting does not change the state; it can be produced again before identification.
    assert conn.state is State.AWAITING_ID


def test_greeting_after_identification_raises():
    conn = identified()
    with pytest.raises(ProtocolError):
        conn.greeting()


def test_greeting_after_close_raises():
    conn = ServerProtocol()
    assert conn.receive_data(b"") == [ConnectionClosed()]
    with pytest.raises(ProtocolError):
        conn.greeting()


@pytest.mark.parametrize("line", ["NONE", "none", "None", "nOnE"])
def test_none_means_new_client(line):
    conn = ServerProtocol()
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
    conn = ServerProtocol()
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
        # docs/PROTOCOL.md section 4: the first word is <id> or <id>.<secret>, the secret
        # 1 to 128 URL-safe characters; anything else makes it malformed.
        "42.",
        "42.x.y",
        "42.a.b",
        ".abc",
        "42..abc",
        "42.abc+",
        "42.ab/c",
        "42.ab=",
        "42.\u00e9",
        "42." + "a" * 129,
        "42." + "a" * 200,
        "0.abc",
        "-1.abc",
        str(MAX_CLIENT_ID + 1) + ".abc",
    ],
    ids=lambda line: line if len(line) < 40 else f"{line[:12]}...({len(line)} chars)",
)
def test_malformed_id(line):
    conn = ServerProtocol()
    events = conn.receive_data(line.encode() + b"\n")
    assert events == [Identify(None, line, malformed=True)]
    # A malformed id still ends the handshake (the server issues a new id).
    assert conn.state is State.IDENTIFIED


@pytest.mark.parametrize(
    ("line", "client_id", "secret", "capabilities"),
    [
        ("42.abc", 42, "abc", ()),
        ("0042.abc", 42, "abc", ()),
        ("42.a", 42, "a", ()),
        ("42.Ab-_9zZ", 42, "Ab-_9zZ", ()),
        ("42." + "a" * 128, 42, "a" * 128, ()),
        ("  7.AbCdEfGhIjKlMnOpQrStUvWx  ", 7, "AbCdEfGhIjKlMnOpQrStUvWx", ()),
        ("7.AbCdEfGhIjKlMnOpQrStUvWx ACK", 7, "AbCdEfGhIjKlMnOpQrStUvWx", ("ACK",)),
        # Words after the first are capabilities: the secret is the first word's tail only.
        ("42.a b", 42, "a", ("b",)),
        (f"{MAX_CLIENT_ID}.x", MAX_CLIENT_ID, "x", ()),
    ],
    ids=lambda v: v if not isinstance(v, str) or len(v) < 40 else f"{v[:12]}...({len(v)} chars)",
)
def test_credential_id_line(line, client_id, secret, capabilities):
    """``<id>.<secret>``: the protocol hands id and secret to the server, which checks the secret."""
    conn = ServerProtocol()
    events = conn.receive_data(line.encode() + b"\r\n")
    assert events == [Identify(client_id, line, capabilities=capabilities, secret=secret)]
    assert conn.state is State.IDENTIFIED


def test_capability_words_kept():
    conn = ServerProtocol()
    assert conn.receive_data(b"42 push v2\n") == [Identify(42, "42 push v2", capabilities=("push", "v2"))]
    conn = ServerProtocol()
    assert conn.receive_data(b"NONE  zlib\n") == [Identify(None, "NONE  zlib", capabilities=("zlib",))]
    conn = ServerProtocol()
    [event] = conn.receive_data(b"x1 cap\n")
    assert event == Identify(None, "x1 cap", malformed=True, capabilities=("cap",))


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_terminators(terminator):
    conn = ServerProtocol()
    assert conn.receive_data(b"7" + terminator) == [Identify(7, "7")]
    assert conn.receive_data(b"hello" + terminator) == [InvalidCommand("hello")]
    assert conn.receive_data(b"DISCONNECT" + terminator) == [Disconnect()]


def test_only_one_carriage_return_is_dropped():
    conn = identified()
    assert conn.receive_data(b"x\r\r\n") == [InvalidCommand("x\r")]


def test_byte_by_byte():
    conn = ServerProtocol()
    data = b"12345 cap\r\nfoo bar\r\nDISCONNECT\r\n"
    assert feed_bytewise(conn, data) == [
        Identify(12345, "12345 cap", capabilities=("cap",)),
        InvalidCommand("foo bar"),
        Disconnect(),
    ]
    assert conn.state is State.CLOSED


def test_no_event_until_newline():
    conn = ServerProtocol()
    assert conn.receive_data(b"12") == []
    assert conn.receive_data(b"3") == []
    assert conn.state is State.AWAITING_ID
    assert conn.receive_data(b"\n") == [Identify(123, "123")]


def test_several_lines_in_one_chunk_in_order():
    conn = ServerProtocol()
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
    conn = ServerProtocol()
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
    conn = ServerProtocol()
    assert conn.receive_data(b"\xff\xfe\n") == [Identify(None, "\ufffd\ufffd", malformed=True)]


def test_multibyte_character_split_across_feeds():
    conn = identified()
    data = "\U0001f600\n".encode()
    assert feed_bytewise(conn, data) == [InvalidCommand("\U0001f600")]


def test_connection_closed():
    conn = ServerProtocol()
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
    conn = ServerProtocol()
    assert conn.receive_data(b"1" * (MAX_CLIENT_LINE + 5)) == [LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


def test_unterminated_line_over_limit_byte_by_byte():
    conn = ServerProtocol()
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
    conn = ServerProtocol()
    events = conn.receive_data(b"5\nhi\n" + b"z" * 3000 + b"\nDISCONNECT\n")
    assert events == [Identify(5, "5"), InvalidCommand("hi"), LineTooLong(MAX_CLIENT_LINE)]
    assert conn.state is State.CLOSED


def test_custom_limit():
    conn = ServerProtocol(max_line=8)
    assert conn.receive_data(b"1234567\n") == [Identify(1234567, "1234567")]
    assert conn.receive_data(b"abcdef\r\n") == [InvalidCommand("abcdef")]  # 8 bytes with \r\n
    assert conn.receive_data(b"abcdefg\r\n") == [LineTooLong(8)]


# --- what the server says -----------------------------------------------------------------


def test_output_formatting():
    assert identified(assign=False).set_client_id(42) == b"SET_CLIENT_ID: 42\n"
    assert identified(assign=False).set_client_id("42") == b"SET_CLIENT_ID: 42\n"
    # message() depends on the connection's mode.
    legacy = identified()
    assert legacy.message("hello world") == b"MESSAGE: hello world\n"
    assert legacy.message("h\u00e9 \U0001f600") == "MESSAGE: h\u00e9 \U0001f600\n".encode()
    # Outside ACK mode the id, if given, is not sent.
    assert legacy.message("hello", 7) == b"MESSAGE: hello\n"
    assert legacy.invalid_command("foo bar") == b"Invalid command: foo bar\n"
    assert legacy.invalid_command("") == b"Invalid command: \n"
    assert ServerProtocol().error("server is shutting down") == b"ERROR: server is shutting down\n"
    conn = identified()
    assert conn.message("x") == b"MESSAGE: x\n"


@pytest.mark.parametrize("body", ["a\nb", "a\rb", "\n", "trailing\r\n"])
def test_message_with_line_break_raises(body):
    with pytest.raises(ValueError):
        identified().message(body)
    with pytest.raises(ValueError):
        ack_mode().message(body, 1)
    with pytest.raises(ValueError):
        protocol.check_body(body)


def test_server_output_parsed_by_client():
    client = ClientProtocol()
    server = ServerProtocol()
    greeting = server.greeting()
    server.receive_data(b"17\n")
    data = greeting + server.set_client_id(17) + server.message("one") + server.invalid_command("x")
    assert client.receive_data(data) == [IdRequested(), IdAssigned("17"), Message("one"),
                                         Notice("Invalid command: x")]


# --- the client side ---------------------------------------------------------------------------


def test_client_parses_server_lines():
    client = ClientProtocol()
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
    client = ClientProtocol()
    body = "caf\u00e9 \U0001f600\U0001f389 \U0001d11e"
    data = ("MESSAGE: " + body + "\n").encode("utf-8")
    assert feed_bytewise(client, data) == [Message(body)]


def test_client_several_lines_in_one_chunk():
    client = ClientProtocol()
    events = client.receive_data(b"GET_CLIENT_ID\nSET_CLIENT_ID: 5\nMESSAGE: a\nMESSAGE: b\nMESS")
    assert events == [IdRequested(), IdAssigned("5"), Message("a"), Message("b")]
    assert client.receive_data(b"AGE: c\n") == [Message("c")]


def test_client_closed_and_too_long():
    client = ClientProtocol()
    assert client.receive_data(b"") == [ConnectionClosed()]
    assert client.closed
    assert client.receive_data(b"MESSAGE: x\n") == []

    client = ClientProtocol()
    assert client.receive_data(b"MESSAGE: " + b"a" * (MAX_SERVER_LINE - 20) + b"\n") == [
        Message("a" * (MAX_SERVER_LINE - 20))
    ]
    assert client.receive_data(b"a" * (MAX_SERVER_LINE + 1)) == [LineTooLong(MAX_SERVER_LINE)]
    assert client.closed
    assert client.receive_data(b"\n") == []


def test_client_output():
    assert ClientProtocol.identify(None) == b"NONE\n"
    assert ClientProtocol.identify(42) == b"42\n"
    assert ClientProtocol.identify("42") == b"42\n"
    assert ClientProtocol.command("DISCONNECT") == b"DISCONNECT\n"
    with pytest.raises(ValueError):
        ClientProtocol.command("DISCONNECT\nNONE")
    # What a client says is what a server parses.
    conn = ServerProtocol()
    assert conn.receive_data(ClientProtocol.identify(42) + ClientProtocol.command("DISCONNECT")) == [
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


# --- PING, in both modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "ack"])
@pytest.mark.parametrize("data", [b"PING\n", b"PING\r\n", b"  PING \t\n"])
def test_ping(mode, data):
    conn = identified() if mode == "legacy" else ack_mode()
    assert conn.receive_data(data) == [Ping()]
    assert conn.state is State.IDENTIFIED
    assert conn.pong() == b"PONG\n"


@pytest.mark.parametrize("mode", ["legacy", "ack"])
@pytest.mark.parametrize("line", ["ping", "Ping", "PING now", "PINGPING", "PONG"])
def test_ping_is_exact(mode, line):
    conn = identified() if mode == "legacy" else ack_mode()
    assert conn.receive_data(line.encode() + b"\n") == [InvalidCommand(line)]


def test_ping_before_identification_is_an_id_line():
    conn = ServerProtocol()
    assert conn.receive_data(b"PING\n") == [Identify(None, "PING", malformed=True)]
    assert conn.state is State.IDENTIFIED
    assert conn.ack_mode is False


# --- the ACK capability ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "client_id", "capabilities"),
    [
        ("NONE ACK", None, ("ACK",)),
        ("none ack", None, ("ack",)),
        ("12 ACK", 12, ("ACK",)),
        ("12 ack", 12, ("ack",)),
        ("12 Ack", 12, ("Ack",)),
        ("12 aCk", 12, ("aCk",)),
        ("  12\tACK  ", 12, ("ACK",)),
        ("12 zlib ACK v2", 12, ("zlib", "ACK", "v2")),
    ],
)
def test_ack_capability_is_case_insensitive(line, client_id, capabilities):
    conn = ServerProtocol()
    expected = Identify(client_id, line, capabilities=capabilities)
    assert conn.receive_data(line.encode() + b"\r\n") == [expected]
    assert conn.ack_mode is True
    conn.set_client_id(client_id or 1)
    assert conn.message("hi", 5) == b"MESSAGE 5: hi\n"


@pytest.mark.parametrize("line", ["12", "NONE", "12 ACKS", "12 NACK", "12 ACK5", "12ACK", "ACK", "12 push",
                                  "12 ACK_", "12 \u0391CK"])
def test_no_ack_capability(line):
    conn = ServerProtocol()
    [event] = conn.receive_data(line.encode() + b"\n")
    assert isinstance(event, Identify)
    assert conn.ack_mode is False
    conn.set_client_id(1)
    assert conn.message("hi", 5) == b"MESSAGE: hi\n"


def test_malformed_id_with_ack_still_asks_for_ack_mode():
    # A malformed id gets a new one (section 4); the capability word still counts.
    conn = ServerProtocol()
    assert conn.receive_data(b"x1 ACK\n") == [Identify(None, "x1 ACK", malformed=True, capabilities=("ACK",))]
    assert conn.ack_mode is True


def test_ack_mode_message_format():
    conn = ack_mode()
    assert conn.message("hello world", 31) == b"MESSAGE 31: hello world\n"
    assert conn.message(" padded ", 1) == b"MESSAGE 1:  padded \n"
    assert conn.message("h\u00e9 \U0001f600", MAX_CLIENT_ID) == (
        f"MESSAGE {MAX_CLIENT_ID}: h\u00e9 \U0001f600\n".encode())
    # A body that itself looks like a message line is carried as is.
    assert conn.message("MESSAGE: x", 2) == b"MESSAGE 2: MESSAGE: x\n"


def test_ack_mode_is_per_connection():
    ack = ack_mode()
    legacy = identified()
    assert ack.message("x", 3) == b"MESSAGE 3: x\n"
    assert legacy.message("x", 3) == b"MESSAGE: x\n"
    assert legacy.ack_mode is False


@pytest.mark.parametrize(
    ("data", "message_id"),
    [
        (b"ACK 1\n", 1),
        (b"ACK 31\r\n", 31),
        (b"ACK 0042\n", 42),
        (b"ACK  7\n", 7),
        (b"  ACK 7  \n", 7),
        (f"ACK {MAX_CLIENT_ID}\n".encode(), MAX_CLIENT_ID),
    ],
)
def test_ack_in_ack_mode(data, message_id):
    conn = ack_mode()
    assert conn.receive_data(data) == [Ack(message_id)]
    assert conn.state is State.IDENTIFIED


@pytest.mark.parametrize(
    "line",
    ["ACK", "ACK ", "ACK x", "ACK 0", "ACK -1", "ACK +1", "ACK 1.5", "ACK 1 2", "ACK 5x",
     f"ACK {MAX_CLIENT_ID + 1}", "ACK \u0665", "ACK NONE"],
)
def test_bad_ack_in_ack_mode(line):
    conn = ack_mode()
    assert conn.receive_data(line.encode() + b"\n") == [BadAck(line)]
    assert conn.state is State.IDENTIFIED
    # The connection carries on.
    assert conn.receive_data(b"ACK 3\n") == [Ack(3)]


@pytest.mark.parametrize("line", ["ack 5", "Ack 5", "ACKNOWLEDGE 5", "ACK5", "NACK 5"])
def test_not_an_ack_command_in_ack_mode(line):
    conn = ack_mode()
    assert conn.receive_data(line.encode() + b"\n") == [InvalidCommand(line)]


@pytest.mark.parametrize("line", ["ACK 5", "ACK", "ACK x", "  ACK 5 "])
def test_ack_in_legacy_mode_is_an_invalid_command(line):
    conn = identified()
    assert conn.receive_data(line.encode() + b"\n") == [InvalidCommand(line)]
    assert conn.state is State.IDENTIFIED
    conn = ServerProtocol()
    assert conn.receive_data(b"12 push\n" + line.encode() + b"\n")[1:] == [InvalidCommand(line)]


def test_ack_mode_commands_in_the_id_packet_byte_by_byte():
    conn = ServerProtocol()
    events = feed_bytewise(conn, b"NONE ACK\r\nACK 1\r\nPING\r\nACK\r\nhello\r\nDISCONNECT\r\nACK 2\r\n")
    assert events == [Identify(None, "NONE ACK", capabilities=("ACK",)), Ack(1), Ping(), BadAck("ACK"),
                      InvalidCommand("hello"), Disconnect()]
    assert conn.state is State.CLOSED


# --- the client side of ACK mode ---------------------------------------------------------------------


def test_client_parses_ack_mode_messages():
    client = ClientProtocol()
    assert client.receive_data(b"MESSAGE 7: body\n") == [Message("body", 7)]
    assert client.receive_data(b"MESSAGE 7: body\r\n") == [Message("body", 7)]
    assert client.receive_data(b"MESSAGE 0042: x\n") == [Message("x", 42)]
    assert client.receive_data(b"MESSAGE 8: \n") == [Message("", 8)]
    assert client.receive_data(b"MESSAGE 9:  two  spaces \n") == [Message(" two  spaces ", 9)]
    assert client.receive_data(b"MESSAGE 10: MESSAGE: nested\n") == [Message("MESSAGE: nested", 10)]
    assert client.receive_data(b"MESSAGE 11: MESSAGE 12: nested\n") == [Message("MESSAGE 12: nested", 11)]
    assert client.receive_data(f"MESSAGE {MAX_CLIENT_ID}: big\n".encode()) == [Message("big", MAX_CLIENT_ID)]
    assert client.receive_data("MESSAGE 13: h\u00e9 \U0001f600\n".encode()) == [
        Message("h\u00e9 \U0001f600", 13)]


@pytest.mark.parametrize("line", ["MESSAGE 7:body", "MESSAGE 7 : x", "MESSAGE -7: x", "MESSAGE x: y",
                                  "MESSAGE : x", "MESSAGE 7", "message 7: x", " MESSAGE 7: x",
                                  "MESSAGE \u0667: x"])
def test_client_malformed_ack_mode_lines_are_notices(line):
    client = ClientProtocol()
    assert client.receive_data(line.encode() + b"\n") == [Notice(line)]


def test_legacy_body_that_looks_like_an_ack_message_is_not_misparsed():
    client = ClientProtocol()
    assert client.receive_data(b"MESSAGE: MESSAGE 7: x\n") == [Message("MESSAGE 7: x")]
    assert client.receive_data(identified().message("MESSAGE 7: x")) == [Message("MESSAGE 7: x", None)]
    assert client.receive_data(b"MESSAGE: 7: x\n") == [Message("7: x")]


def test_client_ack_mode_output_parsed_by_server():
    assert ClientProtocol.identify(None, ack=True) == b"NONE ACK\n"
    assert ClientProtocol.identify(42, ack=True) == b"42 ACK\n"
    assert ClientProtocol.identify("42", ack=False) == b"42\n"
    assert ClientProtocol.ack(31) == b"ACK 31\n"
    conn = ServerProtocol()
    data = (ClientProtocol.identify(42, ack=True) + ClientProtocol.ack(31)
            + ClientProtocol.command("PING"))
    assert conn.receive_data(data) == [Identify(42, "42 ACK", capabilities=("ACK",)), Ack(31), Ping()]
    assert conn.ack_mode is True


def test_ack_mode_round_trip_through_both_sides():
    server, client = ServerProtocol(), ClientProtocol()
    assert client.receive_data(server.greeting()) == [IdRequested()]
    server.receive_data(client.identify(None, ack=True))
    data = server.set_client_id(9) + server.message("one", 100) + server.message("MESSAGE 5: two", 101)
    assert client.receive_data(data) == [IdAssigned("9"), Message("one", 100), Message("MESSAGE 5: two", 101)]
    assert server.receive_data(client.ack(100) + client.ack(101)) == [Ack(100), Ack(101)]


# --- what the server sends goes through the state machine too -----------------------------------


def test_outgoing_lines_out_of_order_are_refused():
    fresh = ServerProtocol()
    with pytest.raises(ProtocolError):
        fresh.set_client_id(1)  # before the client's id
    with pytest.raises(ProtocolError):
        fresh.pong()  # a reply before any command could have come
    assert fresh.error("server busy") == b"ERROR: server busy\n"  # a refusal, any time
    fresh.greeting()
    with pytest.raises(ProtocolError):
        fresh.greeting()  # once
    conn = identified(assign=False)
    assert conn.pong() == b"PONG\n"  # a command in the same packet as the id: answered
    with pytest.raises(ProtocolError):
        conn.message("too early")  # before SET_CLIENT_ID
    conn.set_client_id(1)
    with pytest.raises(ProtocolError):
        conn.set_client_id(1)  # twice
    assert conn.message("now") == b"MESSAGE: now\n"


def test_the_ack_window_is_the_protocols():
    conn = ServerProtocol(max_inflight=3)
    conn.receive_data(b"NONE ACK\n")
    conn.set_client_id(1)
    assert conn.room(10) == 3 and not conn.awaiting_acks
    conn.written([7, 8])
    assert conn.room(10) == 1 and conn.awaiting_acks
    conn.written([9])
    assert conn.room(10) == 0  # paused until ACKs come
    assert conn.acknowledged([8, 99, 8]) == [8]  # 99 was never sent; 8 counts once
    assert conn.room(10) == 1
    assert conn.acknowledged([7, 9]) == [7, 9] and not conn.awaiting_acks
    legacy = identified()
    legacy.written([1, 2])  # legacy: nothing waits for an ACK
    assert legacy.room(10) == 10 and not legacy.awaiting_acks
