"""Client credentials end to end: real server processes, real sockets, SQLite and MariaDB.

What is proved here (docs/PROTOCOL.md section 4):

* knowing an id is not enough: a guessed bare id or a wrong secret gets a new
  client, none of the real client's messages, and leaves the real client's
  connection open and its row untouched; the server logs the peer;
* the credential from ``SET_CLIENT_ID:`` works across reconnects, takeovers and
  a restart of the server on the same database;
* ``--legacy-ids`` (and NIKI_LEGACY_IDS=1) gives the seed's bare ids back;
* the database holds only the SHA-256 of each secret;
* SQL in the id line, in the credential and in message bodies is only data;
* an old SQLite database gets ``clients.secret_hash`` when the server starts,
  and its clients keep their pending messages (under ``--legacy-ids``).

Every wait has a deadline; silence is asserted only after a positive marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import select
import sqlite3
import subprocess
import sys
from typing import Callable, Iterator, List, Tuple

import pytest

import messaging_server
from messaging_server import Enqueuer
from messaging_server.protocol.credentials import redact
from tests.helpers import CREDENTIAL, RawClient, ServerGroup, ServerProcess, numeric_id, query, wait_until

SILENCE = 0.3  # after a marker: long enough for a stray delivery to show up on loopback
CREDENTIAL_LINE = re.compile(rf"SET_CLIENT_ID: ({CREDENTIAL})")
BARE_ID_LINE = re.compile(r"SET_CLIENT_ID: ([1-9][0-9]*)")
WRONG_SECRET = "AAAAAAAAAAAAAAAAAAAAAAAA"

Put = Callable[..., bool]
Launch = Callable[..., ServerProcess]


# Routed mode needs NIKI_PEERS unset; no NIKI_* setting may leak into the servers.
pytestmark = pytest.mark.usefixtures("no_niki_environment")


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(db_url, *options, env=None)``: a started server with a loopback wake-up address.

    All are stopped together at the end, and none may have logged a traceback.
    """
    group = ServerGroup("--advertise-host", "127.0.0.1")
    yield group.start
    group.close()


def enqueuer(stack: contextlib.ExitStack, db_url: str) -> Put:
    """``put(client_id, body)`` in routed mode: wakes whichever server holds the client."""
    enq = stack.enter_context(Enqueuer(db_url))
    assert enq.mode == "routed"
    return enq.enqueue


def identify(client: RawClient, answer: str = "NONE", pattern: re.Pattern = CREDENTIAL_LINE) -> str:
    """The handshake, transcript checked; returns what follows ``SET_CLIENT_ID: ``."""
    assert client.read_line() == "GET_CLIENT_ID"
    client.send_line(answer)
    line = client.read_line() or ""
    match = pattern.fullmatch(line)
    assert match, f"answer {answer!r}: expected {pattern.pattern!r}, got {line!r}"
    return match.group(1)


def secret_of(credential: str) -> str:
    return credential.partition(".")[2]


def client_row(db_url: str, client_id: int) -> Tuple[object, ...]:
    """What identification may change: session, owner and stored hash."""
    rows = query(db_url, "SELECT session, owner_server_id, secret_hash FROM clients WHERE id = %s",
                 (client_id,))
    assert len(rows) == 1, rows
    session, owner, stored = rows[0]
    return int(session), owner, None if stored is None else bytes(stored)


def disconnected(server: ServerProcess, credential: str) -> Callable[[], bool]:
    """True once the server logged the end of the client's connection (after releasing it)."""
    pattern = re.compile(rf"client {numeric_id(credential)} disconnected from ")
    return lambda: pattern.search(server.log) is not None


def peer(client: RawClient) -> str:
    """How the server names this connection in its log."""
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def assert_all_silent(clients: List[RawClient], seconds: float = SILENCE) -> None:
    """None of ``clients`` gets anything for ``seconds`` (after their markers arrived): one wait for all."""
    assert all(not c.buf for c in clients), [c.buf for c in clients]
    readable, _, _ = select.select([c.sock for c in clients], [], [], seconds)
    assert not readable, "a client received something after its marker"


def run_niki_enqueue(db_url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``niki-enqueue`` as a subprocess, routed mode (no NIKI_PEERS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    env["NIKI_DB"] = db_url
    return subprocess.run([sys.executable, "-m", "messaging_server.tools.niki_enqueue", *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


# --- (a) knowing an id is not enough ------------------------------------------------------


def test_guessed_id_or_wrong_secret_gets_a_new_client(db_url: str, launch: Launch,
                                                      stack: contextlib.ExitStack) -> None:
    server = launch(db_url)
    put = enqueuer(stack, db_url)
    online = stack.enter_context(server.connect())
    a = identify(online)
    with server.connect() as leaving:
        b = identify(leaving)
        leaving.send_line("DISCONNECT")
        assert leaving.wait_closed() == []
    wait_until(disconnected(server, b), message="the server to release the offline client")

    for i in range(3):
        assert put(a, f"a before {i}") is True
        assert put(b, f"b before {i}") is True
    assert online.read_lines(3) == [f"MESSAGE: a before {i}" for i in range(3)]
    rows_before = {cred: client_row(db_url, numeric_id(cred)) for cred in (a, b)}

    def flipped(secret: str) -> str:
        return secret[:-1] + ("B" if secret[-1] != "B" else "C")

    attacks: List[Tuple[str, str]] = []  # (id line, what the log says about the secret)
    for cred in (a, b):
        n, secret = numeric_id(cred), secret_of(cred)
        attacks += [(str(n), "no secret"), (f"{n} ACK", "no secret"), (f"{n:05d}", "no secret"),
                    (f"{n}.{WRONG_SECRET}", "a secret"), (f"{n}.{flipped(secret)}", "a secret"),
                    (f"{n}.{secret[:-1]}", "a secret"), (f"{n}.{secret}x", "a secret"),
                    (f"{n}.{secret.swapcase()}", "a secret")]
    attackers: List[RawClient] = []
    issued = {numeric_id(a), numeric_id(b)}
    for k, (line, secret_note) in enumerate(attacks):
        attacker = stack.enter_context(server.connect())
        attackers.append(attacker)
        new = identify(attacker, line)
        assert numeric_id(new) not in issued, f"{line!r} got an id handed out before: {new}"
        issued.add(numeric_id(new))
        # Messages queued for the real clients meanwhile go to them, not to the attacker.
        assert put(a, f"a during {k}") is True
        assert put(b, f"b during {k}") is True
        assert online.read_line() == f"MESSAGE: a during {k}", "the real client's connection must stay"
        ack_mode = line.endswith(" ACK")
        assert put(new, f"for attacker {k}") is True
        got = attacker.read_line() or ""
        expected = r"MESSAGE [1-9][0-9]*: " if ack_mode else "MESSAGE: "
        assert re.fullmatch(expected + re.escape(f"for attacker {k}"), got), \
            f"{line!r}: the attacker's first message line is {got!r}"
        warning = (f"{peer(attacker)} presented client id {numeric_id(line.split()[0])} "
                   f"with {secret_note}: rejected")
        wait_until(lambda w=warning: w in server.log, 5, f"the warning {warning!r}")

    assert {cred: client_row(db_url, numeric_id(cred)) for cred in (a, b)} == rows_before, \
        "a refused credential must change nothing about the real client"
    assert put(a, "a marker") is True
    assert online.read_line() == "MESSAGE: a marker"
    assert_all_silent([online, *attackers])

    # The offline client comes back with its credential: everything, in order, once.
    with server.connect() as back:
        assert identify(back, b) == b
        expected_b = [f"b before {i}" for i in range(3)] + [f"b during {k}" for k in range(len(attacks))]
        assert back.read_lines(len(expected_b)) == [f"MESSAGE: {body}" for body in expected_b]
        assert put(b, "b marker") is True
        assert back.read_line() == "MESSAGE: b marker"
        assert_all_silent([back, online, *attackers])
    for cred in (a, b):
        assert secret_of(cred) not in server.log, "a secret was written to the log"


# --- (b) the credential works across reconnects, takeovers and a restart -------------------


def test_credential_across_reconnects_takeover_and_restart(db_url: str, launch: Launch,
                                                           stack: contextlib.ExitStack) -> None:
    first = launch(db_url)
    put = enqueuer(stack, db_url)
    with first.connect() as client:
        cred = identify(client)
        assert put(cred, "one") is True
        assert client.read_line() == "MESSAGE: one"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    wait_until(disconnected(first, cred), message="the server to see the DISCONNECT")
    stored = client_row(db_url, numeric_id(cred))[2]
    assert put(cred, "two") is True

    # The same credential back: the same line, the backlog.  Leading zeros are the same id.
    old = stack.enter_context(first.connect())
    assert identify(old, cred) == cred
    assert old.read_line() == "MESSAGE: two"
    new = stack.enter_context(first.connect())
    assert identify(new, f"000{cred} ACK") == cred, "the answer names the id without leading zeros"
    assert old.wait_closed() == [], "a takeover with the credential closes the older connection"
    assert put(cred, "three") is True
    line = new.read_line() or ""
    match = re.fullmatch(r"MESSAGE ([1-9][0-9]*): three", line)
    assert match, line
    new.send_line(f"ACK {match.group(1)}")
    new.send_line("DISCONNECT")
    assert new.wait_closed() == []
    wait_until(lambda: query(db_url, "SELECT status FROM messages WHERE id = %s", (int(match.group(1)),))
               == [("delivered",)], 5, "the ACK to be recorded")

    assert first.stop() == 0
    assert put(cred, "while down") is True

    # A new process on the same database: the credential still works, a bare id still does not.
    second = launch(db_url)
    with second.connect() as client:
        assert identify(client, cred) == cred
        assert client.read_line() == "MESSAGE: while down"
        assert put(cred, "live after restart") is True
        assert client.read_line() == "MESSAGE: live after restart"
        with second.connect() as guesser:
            assert numeric_id(identify(guesser, str(numeric_id(cred)))) != numeric_id(cred)
            assert put(cred, "marker") is True
            assert client.read_line() == "MESSAGE: marker"
            assert_all_silent([client, guesser])
    assert client_row(db_url, numeric_id(cred))[2] == stored == hash_of(cred)


def hash_of(credential: str) -> bytes:
    return hashlib.sha256(secret_of(credential).encode("ascii")).digest()


# --- (c) --legacy-ids -----------------------------------------------------------------------


def test_legacy_ids_bring_back_the_seed_behaviour(db_url: str, launch: Launch,
                                                  stack: contextlib.ExitStack) -> None:
    """Two servers on one database: one with --legacy-ids, one (NIKI_LEGACY_IDS=0) without."""
    legacy = launch(db_url, "--legacy-ids")
    secure = launch(db_url, env={"NIKI_LEGACY_IDS": "0"})
    put = enqueuer(stack, db_url)

    # Bare ids handed out, no secret stored, the bare id takes the client over (the seed).
    old = stack.enter_context(legacy.connect())
    bare = identify(old, pattern=BARE_ID_LINE)
    assert client_row(db_url, int(bare))[2] is None
    assert put(bare, "live") is True
    assert old.read_line() == "MESSAGE: live"
    old.send_line("DISCONNECT")
    assert old.wait_closed() == []
    wait_until(disconnected(legacy, bare), message="the server to see the DISCONNECT")
    assert put(int(bare), "waiting") is True
    old = stack.enter_context(legacy.connect())
    assert identify(old, bare, BARE_ID_LINE) == bare
    assert old.read_line() == "MESSAGE: waiting"
    guesser = stack.enter_context(legacy.connect())
    assert identify(guesser, bare, BARE_ID_LINE) == bare, "with --legacy-ids a guessed id is enough"
    assert old.wait_closed() == [], "...and cuts the real connection off"
    assert put(bare, "to whoever holds the id") is True
    assert guesser.read_line() == "MESSAGE: to whoever holds the id"
    guesser.send_line("DISCONNECT")
    assert guesser.wait_closed() == []
    wait_until(lambda: legacy.log.count(f"client {bare} disconnected from ") >= 3, 5,
               "the server to see the DISCONNECT")

    # Without the option, that secret-less client is out of reach, by bare id or any secret.
    assert put(bare, "kept for the bare id") is True
    for answer in (bare, f"{bare}.{WRONG_SECRET}"):
        with secure.connect() as client:
            other = identify(client, answer)
            assert numeric_id(other) != int(bare)
            assert put(other, "marker") is True
            assert client.read_line() == "MESSAGE: marker", f"{answer!r} reached the legacy client"

    # A client with a secret, on the legacy server: its bare id and its credential work,
    # a wrong secret does not.
    with secure.connect() as client:
        cred = identify(client)
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    wait_until(disconnected(secure, cred), message="the server to see the DISCONNECT")
    assert put(cred, "for the credential") is True
    with legacy.connect() as client:
        assert identify(client, str(numeric_id(cred)), BARE_ID_LINE) == str(numeric_id(cred))
        assert client.read_line() == "MESSAGE: for the credential"
        client.send_line("DISCONNECT")
        assert client.wait_closed() == []
    wait_until(disconnected(legacy, cred), message="the server to see the DISCONNECT")
    with legacy.connect() as client:
        wrong = identify(client, f"{numeric_id(cred)}.{WRONG_SECRET}", BARE_ID_LINE)
        assert int(wrong) != numeric_id(cred)
        assert f"presented client id {numeric_id(cred)} with a secret: rejected" in legacy.log
        assert put(cred, "after the wrong secret") is True
        with legacy.connect() as real:
            assert identify(real, cred) == cred
            assert real.read_line() == "MESSAGE: after the wrong secret"
            assert put(int(wrong), "to the new client") is True
            assert client.read_line() == "MESSAGE: to the new client"
            assert_all_silent([client, real])

    # A secret-less client under --legacy-ids: any secret is taken, as the bare id is.
    with legacy.connect() as client:
        answer = identify(client, f"{bare}.whatever", re.compile(r"SET_CLIENT_ID: (\S+)"))
        assert numeric_id(answer) == int(bare)
        assert client.read_line() == "MESSAGE: kept for the bare id"


def test_legacy_ids_from_the_environment(sqlite_url: str, launch: Launch) -> None:
    """NIKI_LEGACY_IDS=1 is the same switch as --legacy-ids (database-independent: SQLite only)."""
    server = launch(sqlite_url, env={"NIKI_LEGACY_IDS": "1"})
    with server.connect() as first, server.connect() as second:
        bare = identify(first, pattern=BARE_ID_LINE)
        assert identify(second, bare, BARE_ID_LINE) == bare
        assert first.wait_closed() == [], "the bare id took the client over, as in the seed"


# --- (d) the database keeps only the hash -----------------------------------------------------


def test_database_holds_only_the_hash(db_url: str, launch: Launch) -> None:
    server = launch(db_url)
    clients = [server.connect() for _ in range(3)]
    try:
        creds = [identify(c) for c in clients]
    finally:
        for c in clients:
            c.close()
    assert len({secret_of(c) for c in creds}) == 3
    for cred in creds:
        [(stored,)] = query(db_url, "SELECT secret_hash FROM clients WHERE id = %s", (numeric_id(cred),))
        assert bytes(stored) == hashlib.sha256(secret_of(cred).encode("ascii")).digest()
    # No column of any row holds a secret, as text or as bytes.
    for row in query(db_url, "SELECT * FROM clients"):
        for value in row:
            raw = value if isinstance(value, (bytes, bytearray, memoryview)) else str(value).encode()
            for cred in creds:
                assert secret_of(cred).encode() not in bytes(raw), f"a secret is stored in clients: {row!r}"
    if db_url.startswith("sqlite:"):
        # Nor anywhere in the database files (free pages and the write-ahead log included).
        path = db_url.split(":///", 1)[1]
        server.stop()
        for name in (path, path + "-wal", path + "-journal"):
            if os.path.exists(name):
                with open(name, "rb") as f:
                    data = f.read()
                for cred in creds:
                    assert secret_of(cred).encode() not in data, f"a secret is in {name}"
    for cred in creds:
        assert secret_of(cred) not in server.log


# --- (e) SQL is only data ------------------------------------------------------------------------

MALFORMED_ID_LINES = [
    "1; DROP TABLE clients; --",
    "1' OR '1'='1",
    "1.x' OR '1'='1",
    "1.' UNION SELECT secret_hash FROM clients --",
    "' OR 1=1 --",
    "1;DROP/**/TABLE/**/clients",
    "1.x';DROP/**/TABLE/**/messages;--",
    "1)/**/OR/**/(1=1",
    "1.%27%20OR%201%3D1",
    "1\\' OR 1=1 #",
    "1.abc\\",
    "1.abc\";DELETE/**/FROM/**/clients;--",
]

INJECTION_BODIES = [
    "'); DROP TABLE messages; --",
    "'; DROP TABLE clients; --",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "1; DELETE FROM messages WHERE 1=1; --",
    "Robert'); DROP TABLE servers;--",
    "\\'; DROP TABLE messages; -- ",
    "\\\\' OR 1=1 #",
    "%s %s %(body)s ? :1 $1 {0}",
    "' UNION SELECT secret_hash FROM clients --",
    "\u02bc OR 1=1 -- \u2019 \uff07 \u00b4",
    "/**/UNION/**/SELECT/**/1,2,3",
    "0x27 CHAR(39) '' ''' ''''",
    "_%' LIKE '%",
    "  leading and trailing spaces ';  ",
]


def test_sql_in_id_lines_and_bodies_is_only_data(db_url: str, launch: Launch,
                                                 stack: contextlib.ExitStack) -> None:
    server = launch(db_url)
    enq = stack.enter_context(Enqueuer(db_url))
    real = stack.enter_context(server.connect())
    cred = identify(real)
    assert numeric_id(cred) == 1, "the injections below aim at client 1: it must be a real client"
    row_before = client_row(db_url, 1)

    attackers: List[RawClient] = []
    issued = {1}
    for line in [*MALFORMED_ID_LINES, "1 OR 1=1"]:
        attacker = stack.enter_context(server.connect())
        attackers.append(attacker)
        new = identify(attacker, line)
        assert numeric_id(new) not in issued, f"{line!r} got an id handed out before"
        issued.add(numeric_id(new))
        assert enq.enqueue(new, "for the attacker") is True
        assert attacker.read_line() == "MESSAGE: for the attacker"
        if line == "1 OR 1=1":  # a bare id 1 followed by ignored words: refused like a guess
            logged = f"{peer(attacker)} presented client id 1 with no secret"
        else:
            logged = f"{peer(attacker)} presented malformed client id {redact(line)!r}"
        wait_until(lambda w=logged: w in server.log, 5, f"the log line {logged!r}")
    assert client_row(db_url, 1) == row_before

    # Bodies through every way in: Enqueuer.enqueue, enqueue(), niki-enqueue (argument and stdin).
    expected: List[str] = []
    for body in INJECTION_BODIES:
        expected.append(f"{body} [Enqueuer]")
        assert enq.enqueue(cred, expected[-1]) is True
    for body in INJECTION_BODIES[:4]:
        expected.append(f"{body} [enqueue()]")
        assert messaging_server.enqueue(1, expected[-1], db=db_url) is True
    stack.callback(importlib.import_module("messaging_server.producer.enqueuer")._close_shared)
    expected.append(f"{INJECTION_BODIES[0]} [argv]")
    result = run_niki_enqueue(db_url, cred, expected[-1])
    assert result.returncode == 0, result.stderr
    stdin_bodies = [f"{body} [stdin]" for body in INJECTION_BODIES]
    expected += stdin_bodies
    result = run_niki_enqueue(db_url, "1", "-", stdin="".join(b + "\n" for b in stdin_bodies).encode())
    assert result.returncode == 0, result.stderr

    got = [real.read_line() for _ in expected]
    assert got == [f"MESSAGE: {body}" for body in expected]
    assert real.buf == b""
    assert enq.enqueue(cred, "marker") is True
    assert real.read_line() == "MESSAGE: marker"
    assert_all_silent([real, *attackers])

    # Every table is there, holding exactly what was queued, byte for byte.
    stored = query(db_url, "SELECT body FROM messages WHERE client_id = %s ORDER BY id", (1,))
    assert [str(b) for (b,) in stored] == [*expected, "marker"]
    assert query(db_url, "SELECT COUNT(*) FROM clients") == [(len(issued),)]
    assert query(db_url, "SELECT COUNT(*) FROM servers") == [(1,)]
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(len(expected) + 1 + len(attackers),)]


# --- (f) an old SQLite database -------------------------------------------------------------------

# The tables of messaging_server/storage/schema_sqlite.sql before credentials (git show
# b8025cb^:messaging_server/storage/schema_sqlite.sql): no clients.secret_hash.
OLD_SQLITE_SCHEMA = """
CREATE TABLE clients (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    session       INTEGER NOT NULL DEFAULT 0,
    owner_server_id INTEGER,
    delivery_lease_until TEXT,
    created_at    TEXT    NOT NULL,
    last_seen_at  TEXT
);
CREATE INDEX clients_by_owner ON clients (owner_server_id);
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id     INTEGER NOT NULL,
    body          TEXT    NOT NULL,
    body_hash     BLOB    NOT NULL,
    status        TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'delivered', 'ignored', 'expired')),
    created_at    TEXT    NOT NULL,
    expires_at    TEXT,
    delivered_at  TEXT
);
CREATE INDEX messages_pending_by_client ON messages (client_id, status, id);
CREATE INDEX messages_duplicate_check ON messages (client_id, body_hash, created_at);
CREATE INDEX messages_by_status_expiry ON messages (status, expires_at);
CREATE INDEX messages_by_status_age ON messages (status, created_at);
CREATE TABLE servers (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    host          TEXT    NOT NULL,
    port          INTEGER NOT NULL,
    event_host    TEXT    NOT NULL,
    event_port    INTEGER NOT NULL,
    pid           INTEGER NOT NULL,
    started_at    TEXT    NOT NULL,
    heartbeat_at  TEXT    NOT NULL
);
CREATE INDEX servers_by_address ON servers (event_host, event_port);
"""


def test_old_sqlite_database_gets_the_column(sqlite_url: str, launch: Launch,
                                             stack: contextlib.ExitStack) -> None:
    path = sqlite_url.split(":///", 1)[1]
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.executescript(OLD_SQLITE_SCHEMA)
        con.execute("INSERT INTO clients (session, created_at, last_seen_at) "
                    "VALUES (4, '2024-01-02 03:04:05.000', '2024-01-02 03:04:05.000')")
        for body in ("old 1", "old 2", "old 3"):
            con.execute("INSERT INTO messages (client_id, body, body_hash, status, created_at) "
                        "VALUES (1, ?, ?, 'pending', '2024-01-02 03:04:06.000')",
                        (body, hashlib.sha256(body.encode()).digest()))
        columns = [row[1] for row in con.execute("PRAGMA table_info(clients)")]
    finally:
        con.close()
    assert "secret_hash" not in columns

    # The default server upgrades the schema; the old client is out of its reach.
    secure = launch(sqlite_url)
    assert "secret_hash" in [str(r[1]) for r in query(sqlite_url, "PRAGMA table_info(clients)")]
    assert "upgrading the schema: adding clients.secret_hash" in secure.log
    with secure.connect() as client:
        new = identify(client, "1")
        assert numeric_id(new) == 2
        assert client_row(sqlite_url, 2)[2] == hash_of(new)
        client.send_line("PING")
        assert client.read_line() == "PONG"  # and not the old client's messages
    assert client_row(sqlite_url, 1) == (4, None, None), "the refused id line changed the old row"

    # Under --legacy-ids the old client gets its pending messages, then live ones.
    legacy = launch(sqlite_url, "--legacy-ids")
    assert "upgrading the schema" not in legacy.log, "the column was added once, not twice"
    put = enqueuer(stack, sqlite_url)
    with legacy.connect() as client:
        assert identify(client, "1", BARE_ID_LINE) == "1"
        assert client.read_lines(3) == ["MESSAGE: old 1", "MESSAGE: old 2", "MESSAGE: old 3"]
        assert put(1, "new 1") is True
        assert client.read_line() == "MESSAGE: new 1"
        client.assert_silent(SILENCE)
    assert client_row(sqlite_url, 1)[0] == 5  # one more session on the old row
