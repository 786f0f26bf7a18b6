"""``niki-enqueue`` as a real subprocess.

The single-message and stdin tests run on SQLite only (see ``db_url`` below); the
``--file`` and ``--json`` tests run on both databases (``any_db``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import stat
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from messaging_server.client.sdk import Client
from messaging_server.config.settings import DEFAULT_PORT, MAX_BODY_BYTES
from messaging_server.producer.enqueuer import MAX_BATCH
from messaging_server.storage import Storage, open_storage
from tests.helpers import (
    REFUSED_BODY,
    DatagramCounter,
    ServerProcess,
    numeric_id,
    query,
    refuse_body,
    wait_until,
)


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only, to keep the suite within its time budget: the CLI's behaviour does not depend on
    the database; the storage and end-to-end suites cover both."""
    return sqlite_url


CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "niki-enqueue")
UNREACHABLE_MYSQL = "mysql://root@127.0.0.1:1/niki_nowhere"


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> List[str]:
        return self.stderr.splitlines()

    def one_error_line(self) -> str:
        """The single line on stderr (asserting there is exactly one)."""
        lines = self.stderr_lines
        assert len(lines) == 1, f"expected one line on stderr, got {self.stderr!r}"
        assert lines[0].startswith("niki-enqueue: "), lines[0]
        assert "Traceback" not in self.stderr
        return lines[0]


def run_cli(*args: str, db: Optional[str] = None, peers: Optional[str] = None,
            stdin: Optional[bytes] = None, cwd: Optional[str] = None,
            command: Optional[Sequence[str]] = None, extra_env: Optional[Dict[str, str]] = None) -> Result:
    """Run niki-enqueue; ``db``/``peers`` go in NIKI_DB/NIKI_PEERS (use --db/--peers in args otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    env.update(extra_env or {})
    if db is not None:
        env["NIKI_DB"] = db
    if peers is not None:
        env["NIKI_PEERS"] = peers
    cmd = list(command or [sys.executable, "-m", "messaging_server.tools.niki_enqueue"]) + list(args)
    proc = subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True, env=env,
                          cwd=cwd, timeout=60)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                  proc.stderr.decode("utf-8", "replace"))




def bodies(db_url: str, client_id: int, status: str = "pending") -> List[str]:
    rows = query(db_url, "SELECT body FROM messages WHERE client_id = %s AND status = %s ORDER BY id",
                 (client_id, status))
    return [str(row[0]) for row in rows]


@pytest.fixture
def wakeups() -> Iterator[DatagramCounter]:
    w = DatagramCounter()
    yield w
    w.sock.close()


@pytest.fixture
def client(storage: Storage) -> int:
    return storage.new_client().client_id


# --- one message -----------------------------------------------------------------------------------


def test_queued(db_url, client, wakeups):
    result = run_cli(str(client), "hello world", "--db", db_url, "--peers", wakeups.peers)
    assert result.status == 0, result.stderr
    assert result.stdout == f"queued for client {client}\n"
    assert result.stderr == ""
    assert bodies(db_url, client) == ["hello world"]
    assert wakeups.drain() == [[client]]


def test_leading_zeros_name_the_same_client(sqlite_url, wakeups):
    # As on the wire, 0001 is client 1: the output names the client the server knows.
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    padded = f"{client:04d}"
    result = run_cli(padded, "hello", db=sqlite_url, peers=wakeups.peers)
    assert (result.status, result.stdout, result.stderr) == (0, f"queued for client {client}\n", "")
    result = run_cli(padded, "hello", db=sqlite_url, peers=wakeups.peers)
    assert result.status == 3 and f"for client {client} less" in result.stderr, result.stderr


def test_queued_from_environment(db_url, client, wakeups):
    result = run_cli(str(client), "caf\u00e9 \U0001f600", db=db_url, peers=wakeups.peers)
    assert result.status == 0, result.stderr
    assert bodies(db_url, client) == ["caf\u00e9 \U0001f600"]
    assert wakeups.drain() == [[client]]


def test_options_win_over_environment(db_url, client, wakeups, tmp_path):
    wrong_db = f"sqlite:///{tmp_path / 'missing.sqlite3'}"
    result = run_cli(str(client), "hi", "--db", db_url, "--peers", wakeups.peers, db=wrong_db,
                     peers="127.0.0.1:9")
    assert result.status == 0, result.stderr
    assert wakeups.drain() == [[client]]


def test_quiet(db_url, client, wakeups):
    result = run_cli("-q", str(client), "shh", db=db_url, peers=wakeups.peers)
    assert (result.status, result.stdout, result.stderr) == (0, "", "")
    assert bodies(db_url, client) == ["shh"]


def test_duplicate(db_url, client, wakeups):
    assert run_cli(str(client), "twice", db=db_url, peers=wakeups.peers).status == 0
    assert wakeups.drain() == [[client]]
    result = run_cli(str(client), "twice", db=db_url, peers=wakeups.peers)
    assert result.status == 3
    assert result.stdout == ""
    assert "duplicate" in result.one_error_line()
    assert wakeups.drain() == []
    assert bodies(db_url, client) == ["twice"]
    assert bodies(db_url, client, "ignored") == ["twice"]


@pytest.mark.parametrize("which", ["unknown", "abc", "-1"])
def test_unknown_client(db_url, client, wakeups, which):
    target = str(client + 100) if which == "unknown" else which
    result = run_cli("--", target, "hello", db=db_url, peers=wakeups.peers)
    assert result.status == 2
    assert result.stdout == ""
    result.one_error_line()
    assert wakeups.drain() == []
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]


@pytest.mark.parametrize("body", ["", "\U0001f600" * 1024 + "x", "two\nlines"],
                         ids=["empty", "too-long", "newline"])
def test_bad_body(db_url, client, wakeups, body):
    result = run_cli(str(client), body, db=db_url, peers=wakeups.peers)
    assert result.status == 2
    assert result.stdout == ""
    result.one_error_line()
    assert wakeups.drain() == []
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]


def test_longest_body(db_url, client, wakeups):
    body = "\U0001f600" * (MAX_BODY_BYTES // 4)
    result = run_cli("-q", str(client), body, db=db_url, peers=wakeups.peers)
    assert result.status == 0, result.stderr
    assert bodies(db_url, client) == [body]


# --- bad arguments and unreachable databases (no database needed) --------------------------------------


@pytest.mark.parametrize("args", [(), ("5",), ("5", "a", "b"), ("--bogus", "5", "a")],
                         ids=["none", "one", "three", "unknown-option"])
def test_bad_arguments(args, tmp_path):
    result = run_cli(*args, db=UNREACHABLE_MYSQL, cwd=str(tmp_path))
    assert result.status == 2
    assert result.stdout == ""
    assert result.stderr_lines[-1].startswith("niki-enqueue: error: ")
    assert "Traceback" not in result.stderr


def test_help(tmp_path):
    result = run_cli("--help", cwd=str(tmp_path))
    assert result.status == 0
    assert "CLIENT_ID" in result.stdout and "Exit status" in result.stdout


@pytest.mark.parametrize("db", [UNREACHABLE_MYSQL, "sqlite:///{tmp}/no/such/dir/niki.sqlite3",
                                "sqlite:///{tmp}/missing.sqlite3"],
                         ids=["mysql-closed-port", "sqlite-missing-dir", "sqlite-missing-file"])
def test_unreachable_database(db, tmp_path, wakeups):
    url = db.format(tmp=tmp_path)
    result = run_cli("5", "hello", "--db", url, "--peers", wakeups.peers, cwd=str(tmp_path))
    assert result.status == 1
    assert result.stdout == ""
    result.one_error_line()
    assert wakeups.drain() == []
    assert not (tmp_path / "no").exists()
    assert not (tmp_path / "missing.sqlite3").exists()


def test_default_database_is_not_created(tmp_path, wakeups):
    # No --db and no NIKI_DB: the default database, in the per-user data directory, must
    # exist (only the server creates it); the error names it and the way to create it.
    result = run_cli("5", "hello", peers=wakeups.peers, cwd=str(tmp_path),
                     extra_env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert result.status == 1
    path = tmp_path / "data" / "niki" / "niki.sqlite3"
    assert f"there is no database at {path}" in result.one_error_line()
    assert "python -m messaging_server" in result.one_error_line()
    assert list(tmp_path.iterdir()) == []


def test_the_default_database_is_the_same_from_any_directory(tmp_path, wakeups):
    """The server makes the default database in the per-user data directory (0700), and
    niki-enqueue finds it from any working directory."""
    data = tmp_path / "data"
    with ServerProcess(None, env={"XDG_DATA_HOME": str(data)}) as server, \
            Client("127.0.0.1", server.port) as client:
        path = data / "niki" / "niki.sqlite3"
        assert f"database sqlite:///{path}" in server.log
        assert stat.S_IMODE(os.stat(data / "niki").st_mode) == 0o700
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = run_cli(str(numeric_id(str(client.client_id))), "found it", cwd=str(elsewhere),
                         extra_env={"XDG_DATA_HOME": str(data)})
        assert result.status == 0, result.stderr
        assert client.receive(timeout=10) == "found it"
        assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("opts", [("--db", "postgres://localhost/niki"), ("--db", "sqlite://"),
                                  ("--peers", "no-port-here"), ("--peers", "host:99999")],
                         ids=["db-scheme", "db-no-path", "peers-no-port", "peers-bad-port"])
def test_bad_configuration(opts, tmp_path):
    args = list(opts)
    if args[0] == "--peers":
        args += ["--db", f"sqlite:///{tmp_path / 'x.sqlite3'}"]
    result = run_cli(*args, "5", "hello", cwd=str(tmp_path))
    assert result.status == 2
    result.one_error_line()


def test_console_script(db_url, client, wakeups):
    if not os.path.exists(CONSOLE_SCRIPT):
        pytest.skip("niki-enqueue console script not installed beside this Python")
    result = run_cli(str(client), "via script", db=db_url, peers=wakeups.peers, command=[CONSOLE_SCRIPT])
    assert result.status == 0, result.stderr
    assert bodies(db_url, client) == ["via script"]


# --- bulk mode ---------------------------------------------------------------------------------------


def summary(result: Result, stream: str) -> Dict[str, int]:
    """The counts of the ``N queued, N duplicate, N rejected`` line on ``stream``."""
    text = result.stdout if stream == "stdout" else result.stderr
    line = text.strip().splitlines()[-1]
    counts = {}
    for part in line.split(", "):
        n, what = part.split(" ", 1)
        counts[what] = int(n)
    return counts


def test_bulk_all_good(db_url, client, wakeups):
    lines = [f"message {i}" for i in range(20)]
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers,
                     stdin=("\n".join(lines) + "\n").encode())
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    assert summary(result, "stdout") == {"queued": 20, "duplicate": 0, "rejected": 0}
    assert bodies(db_url, client) == lines
    assert wakeups.drain() == [[client]] * 20


def test_bulk_mixture_reports_worst_status(db_url, client, wakeups):
    stdin = "one\ntwo\none\n\nthree\r\n" + "x" * (MAX_BODY_BYTES + 1) + "\nfour"
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers, stdin=stdin.encode())
    assert result.status == 2  # bad input beats duplicate beats queued
    assert result.stdout == ""
    assert summary(result, "stderr") == {"queued": 4, "duplicate": 1, "rejected": 2}
    errors = [line for line in result.stderr_lines if line.startswith("niki-enqueue: line ")]
    assert [line.split(":")[1].strip() for line in errors] == ["line 4", "line 6"]
    assert bodies(db_url, client) == ["one", "two", "three", "four"]
    assert bodies(db_url, client, "ignored") == ["one"]
    assert wakeups.drain() == [[client]] * 4


def test_bulk_duplicates_only(db_url, client, wakeups):
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers, stdin=b"a\nb\na\nb\n")
    assert result.status == 3
    assert summary(result, "stderr") == {"queued": 2, "duplicate": 2, "rejected": 0}
    assert bodies(db_url, client) == ["a", "b"]


def test_bulk_invalid_utf8_line_is_rejected(db_url, client, wakeups):
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers,
                     stdin=b"good\nbad \xff\xfe\n\xf0\x9f\x98\x80 fine\n")
    assert result.status == 2
    assert summary(result, "stderr") == {"queued": 2, "duplicate": 0, "rejected": 1}
    assert bodies(db_url, client) == ["good", "\U0001f600 fine"]


def test_bulk_invalid_utf8_line_under_strict_utf8_locale(sqlite_url, wakeups):
    # How Python decodes stdin depends on the locale: surrogateescape under C / C.UTF-8 (this
    # machine), errors="strict" under e.g. en_US.UTF-8, which PYTHONIOENCODING=utf-8:strict
    # reproduces.  A bad line must still be one rejected line, not a crash of the whole run.
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    result = run_cli(str(client), "-", db=sqlite_url, peers=wakeups.peers,
                     extra_env={"PYTHONIOENCODING": "utf-8:strict"},
                     stdin=b"good\nbad \xff\xfe\n\xf0\x9f\x98\x80 fine\n")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.status == 2
    assert summary(result, "stderr") == {"queued": 2, "duplicate": 0, "rejected": 1}
    assert bodies(sqlite_url, client) == ["good", "\U0001f600 fine"]


def test_bulk_unknown_client(db_url, client, wakeups):
    result = run_cli(str(client + 50), "-", db=db_url, peers=wakeups.peers, stdin=b"a\nb\n")
    assert result.status == 2
    assert summary(result, "stderr") == {"queued": 0, "duplicate": 0, "rejected": 2}
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert wakeups.drain() == []


def test_bulk_empty_input(db_url, client, wakeups):
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers, stdin=b"")
    assert result.status == 0
    assert summary(result, "stdout") == {"queued": 0, "duplicate": 0, "rejected": 0}


def test_bulk_quiet(db_url, client, wakeups):
    result = run_cli("-q", str(client), "-", db=db_url, peers=wakeups.peers, stdin=b"a\nb\n")
    assert (result.status, result.stdout, result.stderr) == (0, "", "")
    assert bodies(db_url, client) == ["a", "b"]


def test_bulk_unreachable_database(tmp_path, wakeups):
    result = run_cli("5", "-", "--db", UNREACHABLE_MYSQL, peers=wakeups.peers, stdin=b"a\nb\nc\n",
                     cwd=str(tmp_path))
    assert result.status == 1
    assert result.stdout == ""
    lines = result.stderr_lines
    assert lines[0].startswith("niki-enqueue: line 1: ") and "stopping" in lines[0]
    assert summary(result, "stderr") == {"queued": 0, "duplicate": 0, "rejected": 0}
    assert len(lines) == 2
    assert wakeups.drain() == []


def test_malformed_niki_peers_is_bad_configuration(tmp_path):
    result = run_cli("5", "hello", db=f"sqlite:///{tmp_path / 'x.sqlite3'}", peers="127.0.0.1:8001,oops",
                     cwd=str(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.status == 2
    assert result.stdout == ""
    assert "peer" in result.one_error_line()


def test_server_port_variables_no_longer_matter(db_url, client, wakeups):
    # They once chose the default peer (a malformed NIKI_PORT was an error); now they are not read.
    result = run_cli(str(client), "hello", db=db_url, extra_env={"NIKI_PORT": "abc",
                                                                 "NIKI_EVENT_PORT": "abc"})
    assert (result.status, result.stderr) == (0, "")
    assert bodies(db_url, client) == ["hello"]


# --- routed mode: no --peers, no NIKI_PEERS ------------------------------------------------------------


def owned_client(storage: Storage, wakeups: DatagramCounter) -> int:
    """A client connected to a (pretend) live server whose event port is ``wakeups``."""
    port = int(wakeups.peers.rsplit(":", 1)[1])
    server = storage.register_server("box-a", 8000, "127.0.0.1", port, 1)
    return storage.new_client(server).client_id


def test_routed_wakes_only_the_owner(db_url, storage, client, wakeups):
    owned = owned_client(storage, wakeups)
    result = run_cli(str(owned), "to the owner", db=db_url)
    assert result.status == 0, result.stderr
    assert wakeups.drain() == [[owned]]
    # ``client`` is connected nowhere: queued, and nobody is woken.
    result = run_cli(str(client), "to nobody", db=db_url)
    assert result.status == 0, result.stderr
    assert bodies(db_url, client) == ["to nobody"]
    assert wakeups.drain() == []


def test_routed_bulk_one_datagram_per_queued_line(db_url, storage, wakeups):
    owned = owned_client(storage, wakeups)
    result = run_cli("-q", str(owned), "-", db=db_url, stdin=b"a\nb\na\nc\n")
    assert result.status == 3  # one duplicate
    assert bodies(db_url, owned) == ["a", "b", "c"]
    assert wakeups.drain() == [[owned]] * 3


def test_empty_peers_option_means_routed(db_url, storage, wakeups):
    # --peers "" overrides NIKI_PEERS back to routed mode.
    broadcast_target = DatagramCounter()
    try:
        owned = owned_client(storage, wakeups)
        result = run_cli(str(owned), "hello", "--peers", "", db=db_url, peers=broadcast_target.peers)
        assert result.status == 0, result.stderr
        assert wakeups.drain() == [[owned]]
        assert broadcast_target.drain() == []
    finally:
        broadcast_target.sock.close()


def test_help_does_not_advertise_the_old_default_peer(tmp_path):
    result = run_cli("--help", cwd=str(tmp_path))
    assert result.status == 0
    assert f"127.0.0.1:{DEFAULT_PORT + 1}" not in result.stdout


def test_a_statement_the_database_refuses_is_reported_as_a_bug(db_url, storage, client, wakeups):
    refuse_body(db_url)
    result = run_cli(str(client), REFUSED_BODY, db=db_url, peers=wakeups.peers)
    assert result.status == 5, result.stderr
    assert len(result.stderr_lines) == 1 and "bug in Niki" in result.stderr, result.stderr
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers, stdin=f"ok\n{REFUSED_BODY}\n".encode())
    assert result.status == 5 and "line 2" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--file", "-", str(client), db=db_url, peers=wakeups.peers,
                     stdin=f"more\n{REFUSED_BODY}\n".encode())
    assert result.status == 5 and "Traceback" not in result.stderr, result.stderr
    assert bodies(db_url, client) == ["ok"]


# --- --ttl ---------------------------------------------------------------------------------------------


def expires_in(db_url: str, client_id: int) -> List[Optional[float]]:
    """expires_at - created_at in seconds (None: never) of each message of ``client_id``."""
    if db_url.startswith("sqlite:"):
        span = "(julianday(expires_at) - julianday(created_at)) * 86400"
    else:
        span = "TIMESTAMPDIFF(MICROSECOND, created_at, expires_at) / 1000000"
    rows = query(db_url, f"SELECT {span} FROM messages WHERE client_id = %s ORDER BY id", (client_id,))
    return [None if row[0] is None else round(float(row[0]), 2) for row in rows]


def test_ttl(db_url, storage, client, wakeups):
    storage.enqueue(client, "no ttl", 0)
    result = run_cli("--ttl", "30", str(client), "soon gone", db=db_url, peers=wakeups.peers)
    assert (result.status, result.stderr) == (0, "")
    result = run_cli("-q", "--ttl", "1.5", str(client), "-", db=db_url, peers=wakeups.peers, stdin=b"a\nb\n")
    assert (result.status, result.stdout, result.stderr) == (0, "", "")
    assert bodies(db_url, client) == ["no ttl", "soon gone", "a", "b"]
    assert expires_in(db_url, client) == [None, 30.0, 1.5, 1.5]
    assert wakeups.drain() == [[client]] * 3


def test_bad_ttl(sqlite_url, wakeups):
    # Checked before the database is used: one backend is enough.
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    db_url = sqlite_url
    for ttl in ["0", "-5", "1e-300", "0.0001", "nan", "abc"]:
        result = run_cli("--ttl", ttl, str(client), "hello", db=db_url, peers=wakeups.peers)
        assert result.status == 2, (ttl, result.stderr)
        assert result.stdout == ""
        assert result.stderr_lines[-1].startswith("niki-enqueue: "), (ttl, result.stderr)
        assert "Traceback" not in result.stderr
    assert query(db_url, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert wakeups.drain() == []


def test_infinite_ttl_is_not_a_crash(sqlite_url, wakeups):
    # --ttl inf reads as "never expires"; it must be queued (0) or refused as bad input (2), not a traceback.
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    result = run_cli("--ttl", "inf", str(client), "forever", db=sqlite_url, peers=wakeups.peers)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.status in (0, 2), result.stderr
    assert bodies(sqlite_url, client) == (["forever"] if result.status == 0 else [])


# --- queue full: exit 4 --------------------------------------------------------------------------------


def test_queue_full(db_url, storage, client, wakeups):
    env = {"NIKI_MAX_PENDING": "2"}
    storage.enqueue(client, "a", 0)
    assert run_cli("-q", str(client), "b", db=db_url, peers=wakeups.peers, extra_env=env).status == 0
    assert wakeups.drain() == [[client]]
    result = run_cli(str(client), "c", db=db_url, peers=wakeups.peers, extra_env=env)
    assert result.status == 4
    assert result.stdout == ""
    assert "pending" in result.one_error_line()
    assert wakeups.drain() == []
    rows = query(db_url, "SELECT body, status FROM messages ORDER BY id")
    assert rows == [("a", "pending"), ("b", "pending")]
    # Without the lower cap (default 10,000) there is room.
    assert run_cli("-q", str(client), "c", db=db_url, peers=wakeups.peers).status == 0


def test_bulk_queue_full(db_url, client, wakeups):
    env = {"NIKI_MAX_PENDING": "2"}
    result = run_cli(str(client), "-", db=db_url, peers=wakeups.peers, extra_env=env,
                     stdin=b"a\na\nb\nc\nd\n")
    assert result.status == 4  # queue full beats duplicate
    assert result.stdout == ""
    assert summary(result, "stderr") == {"queued": 2, "duplicate": 1, "rejected": 0, "queue full": 2}
    errors = [line for line in result.stderr_lines if line.startswith("niki-enqueue: line ")]
    assert [line.split(":")[1].strip() for line in errors] == ["line 4", "line 5"]
    assert bodies(db_url, client) == ["a", "b"]
    assert wakeups.drain() == [[client]] * 2


def test_bulk_bad_input_beats_queue_full(db_url, client, wakeups):
    # -q silences only success: the summary still goes to stderr.
    result = run_cli("-q", str(client), "-", db=db_url, peers=wakeups.peers,
                     extra_env={"NIKI_MAX_PENDING": "1"}, stdin=b"a\n\nb\n")
    assert result.status == 2
    assert result.stdout == ""
    assert summary(result, "stderr") == {"queued": 1, "duplicate": 0, "rejected": 1, "queue full": 1}
    assert bodies(db_url, client) == ["a"]


def test_bad_niki_max_pending(tmp_path):
    db = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    for value in ("abc", "0"):
        result = run_cli("5", "hello", db=db, extra_env={"NIKI_MAX_PENDING": value}, cwd=str(tmp_path))
        assert result.status == 2
        assert "NIKI_MAX_PENDING" in result.one_error_line()


def test_help_mentions_ttl_and_queue_full(tmp_path):
    result = run_cli("--help", cwd=str(tmp_path))
    assert result.status == 0
    assert "--ttl" in result.stdout
    assert "4 queue full" in " ".join(result.stdout.split())


# --- --json, and bulk --file: on both databases ----------------------------------------------------------

# A credential's secret: never to appear in any output.
SECRET = "Zq9sEcReTsEcReTsEcReT_-x"


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def any_db(request) -> Iterator[Tuple[str, Storage]]:
    """A fresh database with the schema on each backend in turn, and its storage."""
    url = request.getfixturevalue(f"{request.param}_url")
    store = open_storage(url, create=True)
    store.create_schema()
    yield url, store
    store.close()


def json_output(result: Result) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The per-message objects and the summary object of a --json run."""
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert objects and "summary" in objects[-1], result.stdout
    assert all("summary" not in o for o in objects[:-1])
    return objects[:-1], objects[-1]


def assert_no_secret(result: Result) -> None:
    assert SECRET not in result.stdout and SECRET not in result.stderr


def pending_rows(db_url: str) -> List[Tuple[int, int, str]]:
    """(id, client_id, body) of every pending message, by id."""
    return [(int(i), int(c), str(b)) for i, c, b in
            query(db_url, "SELECT id, client_id, body FROM messages WHERE status = 'pending' ORDER BY id")]


def test_json_one_message(any_db, wakeups):
    url, store = any_db
    client = store.new_client().client_id
    result = run_cli("--json", f"{client}.{SECRET}", "hello", db=url, peers=wakeups.peers)
    assert (result.status, result.stderr) == (0, "")
    ((message_id, _, _),) = pending_rows(url)
    assert json.loads(result.stdout) == {"client_id": f"{client}.***", "status": "queued",
                                         "id": message_id, "error": None}
    result = run_cli("--json", str(client), "hello", db=url, peers=wakeups.peers)
    assert result.status == 3
    assert json.loads(result.stdout) == {"client_id": client, "status": "duplicate", "id": None,
                                         "error": None}
    result = run_cli("--json", str(client + 7), "hello", db=url, peers=wakeups.peers)
    assert result.status == 2
    rejected = json.loads(result.stdout)
    assert (rejected["client_id"], rejected["status"], rejected["id"]) == (client + 7, "rejected", None)
    assert str(client + 7) in rejected["error"]
    result = run_cli("--json", str(client), "more", db=url, peers=wakeups.peers,
                     extra_env={"NIKI_MAX_PENDING": "1"})
    assert result.status == 4
    assert json.loads(result.stdout)["status"] == "rejected"
    assert_no_secret(result)
    assert wakeups.drain() == [[client]]


def test_json_unreachable_database_prints_no_object(tmp_path):
    result = run_cli("--json", "5", "hello", "--db", UNREACHABLE_MYSQL, cwd=str(tmp_path))
    assert result.status == 1
    assert result.stdout == ""
    result.one_error_line()


def test_json_stdin_lines(any_db, wakeups):
    url, store = any_db
    client = store.new_client().client_id
    result = run_cli("--json", str(client), "-", db=url, peers=wakeups.peers, stdin=b"a\n\nb\na\n")
    assert result.status == 2  # bad input beats duplicate, as without --json
    objects, summary = json_output(result)
    ids = [row[0] for row in pending_rows(url)]
    assert [(o["line"], o["status"], o["id"]) for o in objects] == [
        (1, "queued", ids[0]), (2, "rejected", None), (3, "queued", ids[1]), (4, "duplicate", None)]
    assert summary == {"summary": {"queued": 2, "duplicate": 1, "rejected": 1, "queue_full": 0},
                       "error": None, "stopped_at_line": None}
    assert result.stderr_lines == ["2 queued, 1 duplicate, 1 rejected"]
    assert wakeups.drain() == [[client]] * 2  # each line its own transaction and wake-up


def test_file_text_lines_for_one_client(any_db, wakeups, tmp_path):
    url, store = any_db
    client = store.new_client().client_id
    path = tmp_path / "bodies.txt"
    path.write_bytes(b"one\ntwo\none\n\nthree\r\n" + b"x" * (MAX_BODY_BYTES + 1) + b"\nbad \xff\nfour")
    result = run_cli("--file", str(path), f"{client}.{SECRET}", db=url, peers=wakeups.peers)
    assert result.status == 1  # some rejected
    assert result.stdout == ""
    errors, summary_line = result.stderr_lines[:-1], result.stderr_lines[-1]
    assert [line.split(":")[1].strip() for line in errors] == ["line 4", "line 6", "line 7"]
    assert summary_line == "4 queued, 1 duplicate, 3 rejected"
    assert bodies(url, client) == ["one", "two", "three", "four"]
    assert bodies(url, client, "ignored") == ["one"]
    assert wakeups.drain() == [[client]]  # one batch: one wake-up
    assert_no_secret(result)


def test_file_json_lines_for_many_clients(any_db, wakeups, tmp_path):
    url, store = any_db
    a, b = store.new_client().client_id, store.new_client().client_id
    lines = [json.dumps(o).encode() for o in [
        {"client_id": a, "body": "hello a"},                       # 1 queued, --ttl 60
        {"client_id": f"{b}.{SECRET}", "body": "hello b", "ttl": 30},  # 2 queued
    ]] + [b"   "] + [json.dumps(o).encode() for o in [              # 3 blank: skipped
        {"client_id": a, "body": "hello a"},                       # 4 duplicate of 1
    ]] + [b'{"client_id": 1, "body"', b"[1, 2]"] + [json.dumps(o).encode() for o in [  # 5, 6
        {"client_id": a, "body": "x", "tll": 5},                   # 7 unknown key
        {"client_id": a},                                          # 8 no body
        {"client_id": a, "body": 5},                               # 9 body not text
        {"client_id": a, "body": "y", "ttl": -1},                  # 10 bad ttl
        {"client_id": b + 100, "body": "z"},                       # 11 no such client
        {"client_id": f"abc.{SECRET}", "body": "z"},               # 12 not a client id
        {"client_id": a, "body": "two\nlines"},                    # 13 line break
    ]] + [b'{"client_id": 1, "body": "\xff"}'] + [json.dumps(o).encode() for o in [  # 14 not UTF-8
        {"client_id": b, "body": "bye b"},                         # 15 queued, --ttl 60
        {"client_id": True, "body": "q"},                          # 16 not an id
    ]]
    path = tmp_path / "messages.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli("--json", "--ttl", "60", "--file", str(path), db=url, peers=wakeups.peers)
    assert result.status == 1
    assert_no_secret(result)
    objects, summary = json_output(result)
    rows = pending_rows(url)
    assert [(r[1], r[2]) for r in rows] == [(a, "hello a"), (b, "hello b"), (b, "bye b")]
    statuses = {o["line"]: (o["status"], o["id"]) for o in objects}
    assert statuses == {1: ("queued", rows[0][0]), 2: ("queued", rows[1][0]), 4: ("duplicate", None),
                        15: ("queued", rows[2][0]),
                        **{n: ("rejected", None) for n in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16)}}
    assert [o["line"] for o in objects] == sorted(statuses)  # in input order
    shown = {o["line"]: o["client_id"] for o in objects}
    assert (shown[1], shown[2], shown[5], shown[11], shown[12], shown[16]) == (
        a, f"{b}.***", None, b + 100, "abc.***", None)
    errors = {o["line"]: o["error"] for o in objects}
    assert errors[1] is None and "'tll'" in errors[7] and "body" in errors[8]
    assert "ttl" in errors[10] and str(b + 100) in errors[11] and "line break" in errors[13]
    assert "UTF-8" in errors[14] and "JSON" in errors[5]
    assert summary == {"summary": {"queued": 3, "duplicate": 1, "rejected": 11, "queue_full": 0},
                       "error": None, "stopped_at_line": None}
    assert result.stderr_lines == ["3 queued, 1 duplicate, 11 rejected"]  # no per-line noise with --json
    assert expires_in(url, b) == [30.0, 60.0]
    # One transaction for the file, each line with its own ttl: one wake-up naming both clients.
    assert [sorted(ids) for ids in wakeups.drain()] == [sorted([a, b])]


def test_file_all_queued_or_duplicate_exits_0(any_db, tmp_path):
    url, store = any_db
    client = store.new_client().client_id
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps({"client_id": client, "body": body}) for body in "aba"))
    result = run_cli("--file", str(path), db=url)
    assert (result.status, result.stdout) == (0, "")
    assert result.stderr_lines == ["2 queued, 1 duplicate, 0 rejected"]
    result = run_cli("-q", "--file", str(path), db=url)
    assert (result.status, result.stdout, result.stderr) == (0, "", "")


def test_file_is_stored_in_batches(any_db, wakeups):
    url, store = any_db
    clients = [store.new_client().client_id for _ in range(3)]
    total = 2 * MAX_BATCH + 500
    lines = []
    for n in range(total):
        if n % 500 == 499:
            lines.append(b"{oops")
        else:
            lines.append(json.dumps({"client_id": clients[n % 3], "body": f"m{n}"}).encode())
    result = run_cli("--file", "-", db=url, peers=wakeups.peers, stdin=b"\n".join(lines) + b"\n")
    bad = total // 500
    assert result.status == 1
    assert result.stderr_lines[-1] == f"{total - bad} queued, 0 duplicate, {bad} rejected"
    assert len(result.stderr_lines) == bad + 1  # one line per rejected line, no progress bar
    for i, client in enumerate(clients):
        assert bodies(url, client) == [f"m{n}" for n in range(i, total, 3) if n % 500 != 499]
    # MAX_BATCH messages per transaction: three batches, one wake-up each, naming every client.
    assert wakeups.drain() == [sorted(clients)] * 3


def test_file_database_goes_away_mid_run(any_db):
    url, store = any_db
    client = store.new_client().client_id
    proc = subprocess.Popen([sys.executable, "-m", "messaging_server.tools.niki_enqueue", "--json",
                             "--file", "-",
                             str(client)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(clean_environment(), NIKI_DB=url))
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"".join(b"m%d\n" % n for n in range(MAX_BATCH)))
        proc.stdin.flush()
        wait_until(lambda: len(bodies(url, client)) == MAX_BATCH, message="the first batch")
        query(url, "ALTER TABLE messages RENAME TO messages_gone")
        stdout, stderr = proc.communicate(b"".join(b"n%d\n" % n for n in range(10)), timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = Result(proc.returncode, stdout.decode(), stderr.decode())
    assert result.status == 1
    objects, summary = json_output(result)
    assert [o["status"] for o in objects] == ["queued"] * MAX_BATCH
    assert summary["summary"] == {"queued": MAX_BATCH, "duplicate": 0, "rejected": 0, "queue_full": 0}
    assert summary["stopped_at_line"] == MAX_BATCH + 1 and summary["error"]
    stop, counts = result.stderr_lines
    assert stop.startswith(f"niki-enqueue: line {MAX_BATCH + 1}: ")
    assert f"the {MAX_BATCH} messages queued from the lines before stay queued" in stop
    assert counts == f"{MAX_BATCH} queued, 0 duplicate, 0 rejected"
    assert len(query(url, "SELECT id FROM messages_gone")) == MAX_BATCH


def clean_environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}


def test_file_unreachable_database(tmp_path):
    result = run_cli("--json", "--file", "-", "5", "--db", UNREACHABLE_MYSQL, stdin=b"a\nb\n",
                     cwd=str(tmp_path))
    assert result.status == 1
    objects, summary = json_output(result)
    assert objects == [] and summary["stopped_at_line"] == 1 and "niki_nowhere" in summary["error"]
    stop, counts = result.stderr_lines
    assert stop.startswith("niki-enqueue: line 1: ") and "the 0 messages queued" in stop
    assert counts == "0 queued, 0 duplicate, 0 rejected"


@pytest.mark.parametrize("args", [("--file", "{tmp}/missing.txt"), ("--file", "-", "5", "hello"),
                                  ("--file", "-", "--ttl", "0")],
                         ids=["missing-file", "file-and-message", "bad-ttl"])
def test_file_usage_errors(args, tmp_path):
    result = run_cli(*(a.format(tmp=tmp_path) for a in args), db=f"sqlite:///{tmp_path / 'x.sqlite3'}",
                     cwd=str(tmp_path))
    assert result.status == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr_lines[-1].startswith("niki-enqueue: ")


def on_a_terminal(args: Sequence[str], env: Dict[str, str]) -> Tuple[int, bytes]:
    """Run niki-enqueue with stderr on a pseudo-terminal of 80 columns; its status and what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "messaging_server.tools.niki_enqueue", *args],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=60), shown


def test_progress_bar_only_on_a_terminal_and_for_long_files(sqlite_url, tmp_path):
    with open_storage(sqlite_url, create=True) as store:
        store.create_schema()
        client = store.new_client().client_id
    env = dict(clean_environment(), NIKI_DB=sqlite_url)
    long_file, short_file = tmp_path / "long.txt", tmp_path / "short.txt"
    long_file.write_text("".join(f"long {n}\n" for n in range(600)))
    short_file.write_text("".join(f"short {n}\n" for n in range(100)))
    status, shown = on_a_terminal(["--file", str(long_file), str(client)], env)
    assert status == 0
    assert b"/600" in shown and b"lines" in shown  # tqdm's n/total and unit
    assert b"600 queued, 0 duplicate, 0 rejected" in shown
    status, shown = on_a_terminal(["--file", str(short_file), str(client)], env)
    assert status == 0
    assert shown.strip() == b"100 queued, 0 duplicate, 0 rejected"
    assert len(bodies(sqlite_url, client)) == 700


def test_config_file(any_db, wakeups, tmp_path):
    url, store = any_db
    client = store.new_client().client_id
    config = tmp_path / "niki.ini"
    config.write_text(f"[niki]\ndb = {url}\npeers = {wakeups.peers}\n")
    result = run_cli("--config", str(config), "--json", str(client), "from the file", cwd=str(tmp_path))
    assert result.status == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "queued"
    assert bodies(url, client) == ["from the file"]
    assert wakeups.drain() == [[client]]
    # NIKI_CONFIG names the file too; an unknown key is a configuration error.
    result = run_cli(str(client), "via NIKI_CONFIG", extra_env={"NIKI_CONFIG": str(config)},
                     cwd=str(tmp_path))
    assert result.status == 0, result.stderr
    config.write_text(f"[niki]\ndb = {url}\ndatabase = {url}\n")
    result = run_cli("--config", str(config), str(client), "bad file", cwd=str(tmp_path))
    assert result.status == 2
    assert "database" in result.one_error_line()
    assert bodies(url, client) == ["from the file", "via NIKI_CONFIG"]
