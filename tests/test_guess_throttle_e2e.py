"""Guessing credentials, and saying NONE in a loop, from one address: end to end.

A real server with its default limits, on SQLite and MariaDB, spoken to over
TCP from 127.0.0.2 and 127.0.0.3 (127.0.0.1, a local proxy's address, is
exempt by default).  What is proved (docs/SECURITY.md, docs/PROTOCOL.md 3):

* guesses at full speed from one address are answered with a new client only
  up to the failed-identification budget, then with
  ``ERROR: too many failed identifications from your address, try again in N s``;
  the client rows made and the log lines written stay bounded;
* ``NONE`` in a loop likewise stops at the new-client budget;
* a real client with its right credential, from the same address, is served
  throughout and gets its messages; another address has its own budget.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Counter, Iterator, List

import pytest

from messaging_server import Enqueuer
from messaging_server.server.throttle import (
    FAILED_IDENTIFICATIONS_PER_MINUTE,
    LOG_LINES_PER_ADDRESS,
    NEW_CLIENTS_PER_MINUTE,
    REFILL_PERIOD_S,
)
from tests.helpers import CREDENTIAL, RawClient, ServerProcess, numeric_id, query, wait_until

TIMEOUT = 10.0
WRONG_SECRET = "A" * 24
THROTTLED = re.compile(r"ERROR: too many (failed identifications|new clients) from your address, "
                       r"try again in ([1-9][0-9]*) s")
NEW_CREDENTIAL = re.compile(rf"SET_CLIENT_ID: ({CREDENTIAL})")

pytestmark = pytest.mark.usefixtures("no_niki_environment")


@pytest.fixture
def server(db_url: str) -> Iterator[ServerProcess]:
    for source in ("127.0.0.2", "127.0.0.3"):
        try:
            with socket.socket() as probe:
                probe.bind((source, 0))
        except OSError as exc:
            pytest.skip(f"cannot use {source} as a loopback address: {exc}")
    with ServerProcess(db_url, "--advertise-host", "127.0.0.1") as proc:
        yield proc
    assert "Traceback" not in proc.log, proc.log


def connect_from(port: int, source: str) -> RawClient:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    return RawClient(sock, TIMEOUT)


def answer(port: int, source: str, id_line: str) -> List[str]:
    """Everything the server says to ``id_line`` until it closes (after DISCONNECT if it served)."""
    with connect_from(port, source) as client:
        assert client.read_line() == "GET_CLIENT_ID"
        client.send_line(id_line)
        first = client.read_line()
        assert first is not None, f"closed without an answer to {id_line!r}"
        if first.startswith("SET_CLIENT_ID: "):
            client.send_line("DISCONNECT")
        return [first, *client.wait_closed()]


def new_client(port: int, source: str) -> str:
    lines = answer(port, source, "NONE")
    match = NEW_CREDENTIAL.fullmatch(lines[0])
    assert match, lines
    return match.group(1)


def client_rows(db_url: str) -> int:
    return int(query(db_url, "SELECT COUNT(*) FROM clients")[0][0])


def flood(port: int, source: str, id_line: str, count: int) -> Counter[str]:
    """``count`` handshakes one after another; how each was answered."""
    kinds: Counter[str] = Counter()
    for _ in range(count):
        lines = answer(port, source, id_line)
        refused = THROTTLED.fullmatch(lines[0])
        if refused:
            assert lines == [lines[0]], lines  # the ERROR line, then the server closed
            assert int(refused.group(2)) <= REFILL_PERIOD_S
            kinds[refused.group(1)] += 1
        else:
            assert NEW_CREDENTIAL.fullmatch(lines[0]) and lines[1:] == [], lines
            kinds["new client"] += 1
    return kinds


def refill_allowance(per_minute: int, seconds: float) -> int:
    """Tokens that may come back in ``seconds`` (plus one for a partly refilled token)."""
    return int(seconds * per_minute / REFILL_PERIOD_S) + 1


def test_guessing_from_one_address_is_throttled_and_costs_bounded_rows_and_log(
        server: ServerProcess, db_url: str) -> None:
    real = new_client(server.port, "127.0.0.2")
    with Enqueuer(db_url) as enq:
        assert enq.enqueue(real, "for the real client") is True
    guess = f"{numeric_id(real)}.{WRONG_SECRET}"
    # The real client's own lines first, so that they are not counted as the guesses'.
    wait_until(lambda: f"client {numeric_id(real)} disconnected" in server.log, 10,
               "the real client's disconnect to be logged")
    rows_before, log_before = client_rows(db_url), len(server.log.splitlines())
    count = FAILED_IDENTIFICATIONS_PER_MINUTE + 40
    started = time.monotonic()
    kinds = flood(server.port, "127.0.0.2", guess, count)
    elapsed = time.monotonic() - started

    allowed = FAILED_IDENTIFICATIONS_PER_MINUTE + refill_allowance(FAILED_IDENTIFICATIONS_PER_MINUTE, elapsed)
    assert FAILED_IDENTIFICATIONS_PER_MINUTE <= kinds["new client"] <= allowed, kinds
    assert kinds["failed identifications"] == count - kinds["new client"] >= count - allowed, kinds
    created = client_rows(db_url) - rows_before
    assert created == kinds["new client"], (created, kinds)
    # Per new client: its INFO line and its disconnect line; the warnings about this
    # address: at most LOG_LINES_PER_ADDRESS; the refused connections: nothing at all.
    added = server.log.splitlines()[log_before:]
    assert len(added) <= 2 * created + LOG_LINES_PER_ADDRESS, "\n".join(added)
    assert sum("127.0.0.2" in line and "WARNING" in line for line in added) <= LOG_LINES_PER_ADDRESS

    # The real client, from the same (throttled) address, is served with its messages.
    with connect_from(server.port, "127.0.0.2") as client:
        assert client.handshake(real) == real
        assert client.read_line() == "MESSAGE: for the real client"
    # Another address has a budget of its own.
    assert NEW_CREDENTIAL.fullmatch(answer(server.port, "127.0.0.3", guess)[0])


def test_none_in_a_loop_from_one_address_stops_at_the_new_client_budget(
        server: ServerProcess, db_url: str) -> None:
    real = new_client(server.port, "127.0.0.2")
    rows_before = client_rows(db_url)
    count = NEW_CLIENTS_PER_MINUTE + 20
    started = time.monotonic()
    kinds = flood(server.port, "127.0.0.2", "NONE", count)
    elapsed = time.monotonic() - started

    allowed = NEW_CLIENTS_PER_MINUTE - 1 + refill_allowance(NEW_CLIENTS_PER_MINUTE, elapsed)
    assert kinds["new client"] <= allowed and kinds["new clients"] == count - kinds["new client"], kinds
    assert kinds["new clients"] >= 1, kinds
    assert client_rows(db_url) - rows_before == kinds["new client"]
    with connect_from(server.port, "127.0.0.2") as client:
        assert client.handshake(real) == real
