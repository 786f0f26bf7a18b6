"""``niki-admin`` as a real subprocess, on both databases, against a database filled by a
real server (a registered server, a connected acknowledged-delivery client, a client that
left) and by ``niki-enqueue``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from messaging_server.storage import Storage
from tests.helpers import ServerProcess, numeric_id, wait_until

UNREACHABLE_MYSQL = "mysql://root@127.0.0.1:1/niki_nowhere"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
WINDOW = 5.0


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.status == 0, self.stderr
        assert self.stderr == ""
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The single ``niki-admin: ...`` line on stderr; nothing on stdout."""
        assert "Traceback" not in self.stderr, self.stderr
        assert self.stdout == ""
        lines = self.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("niki-admin: "), self.stderr
        return lines[0]


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    env.update(extra or {})
    return env


def admin(*args: str, db: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> Result:
    """Run niki-admin; ``db`` goes in NIKI_DB."""
    environ = clean_env(env)
    if db is not None:
        environ["NIKI_DB"] = db
    proc = subprocess.run([sys.executable, "-m", "messaging_server.tools.admin", *args], capture_output=True,
                          env=environ, timeout=60)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                  proc.stderr.decode("utf-8", "replace"))


def enqueue_json_lines(db_url: str, items: List[Tuple[str, str]]) -> List[int]:
    """Queue ``(credential, body)`` pairs with ``niki-enqueue --json --file -``; their message ids."""
    stdin = "".join(json.dumps({"client_id": c, "body": b}) + "\n" for c, b in items).encode()
    proc = subprocess.run([sys.executable, "-m", "messaging_server.tools.niki_enqueue", "--json",
                           "--file", "-"],
                          input=stdin, capture_output=True, env=clean_env({"NIKI_DB": db_url}), timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [o["status"] for o in objects[:-1]] == ["queued"] * len(items), objects
    return [o["id"] for o in objects[:-1]]


@dataclass
class World:
    db_url: str
    server: ServerProcess
    connected: int  # an ACK client, connected to ``server``
    offline: int  # connected once, then left
    acknowledged: int  # message ids
    delivered: int
    pending: List[int]
    secrets: List[str]
    outputs: List[str]

    def admin(self, *args: str) -> Result:
        result = admin(*args, db=self.db_url)
        self.outputs += [result.stdout, result.stderr]
        return result

    def assert_no_secret_shown(self) -> None:
        for secret in self.secrets:
            assert not any(secret in output for output in self.outputs)


@pytest.fixture
def world(db_url: str, storage: Storage, stack) -> Iterator[World]:
    server = stack.enter_context(ServerProcess(db_url))
    ack = stack.enter_context(server.connect())
    ack_credential = ack.handshake("NONE ACK")
    legacy = stack.enter_context(server.connect())
    legacy_credential = legacy.handshake()
    acked, delivered = enqueue_json_lines(db_url, [(ack_credential, "for ack"),
                                                   (legacy_credential, "for legacy")])
    assert ack.read_line() == f"MESSAGE {acked}: for ack"
    ack.send_line(f"ACK {acked}")
    assert legacy.read_line() == "MESSAGE: for legacy"
    wait_until(lambda: getattr(storage.message_info(acked), "status", None) == "acknowledged",
               message="the acknowledgement")
    wait_until(lambda: getattr(storage.message_info(delivered), "status", None) == "delivered",
               message="the delivery mark")
    legacy.send_line("DISCONNECT")
    legacy.wait_closed()
    offline = numeric_id(legacy_credential)
    wait_until(lambda: not storage.client_info(offline).connected, message="the client to leave")
    pending = enqueue_json_lines(db_url, [(legacy_credential, "later 1"), (legacy_credential, "later 2")])
    world = World(db_url, server, numeric_id(ack_credential), offline, acked, delivered, pending,
                  [c.partition(".")[2] for c in (ack_credential, legacy_credential)], [])
    yield world
    world.assert_no_secret_shown()


# --- servers ---------------------------------------------------------------------------------------


def test_servers(world: World):
    (server,) = world.admin("servers", "--json").json()
    assert server["host"] == socket.gethostname()
    assert (server["port"], server["event_port"], server["pid"]) == (
        world.server.port, world.server.event_port, world.server.proc.pid)
    assert server["alive"] is True and server["clients"] == 1  # the ACK client; the other left
    assert 0 <= server["heartbeat_age_s"] < 15
    assert ISO_UTC.fullmatch(server["started_at"]) and ISO_UTC.fullmatch(server["heartbeat_at"])

    text = world.admin("servers")
    assert text.status == 0 and text.stderr == ""
    header, row = text.stdout.splitlines()
    assert header.split() == ["ID", "HOST", "PORT", "EVENTS", "PID", "STARTED", "HEARTBEAT", "ALIVE",
                              "CLIENTS"]
    assert row.split()[:5] == [str(server["server_id"]), server["host"], str(world.server.port),
                               f"{server['event_host']}:{world.server.event_port}",
                               str(world.server.proc.pid)]
    assert row.split()[-2:] == ["yes", "1"]
    assert header.index("CLIENTS") == row.rindex("1")  # aligned under its header

    world.server.stop()
    assert world.admin("--json", "servers").json() == []
    assert world.admin("servers").stdout == "no servers registered\n"


# --- client and pending ------------------------------------------------------------------------------


def fields(text: str) -> Dict[str, str]:
    """``name  value`` lines as a dict (names may hold one space: ``last seen``)."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())  # type: ignore[misc]


def test_client_and_pending(world: World):
    (server,) = world.admin("servers", "--json").json()
    connected = world.admin("--json", "client", str(world.connected)).json()
    assert connected["connected"] is True and connected["server"]["server_id"] == server["server_id"]
    assert connected["client_id"] == world.connected and connected["pending"] == 0
    assert connected["has_secret"] is True and ISO_UTC.fullmatch(connected["created_at"])

    offline = world.admin("client", "--json", str(world.offline)).json()
    assert offline["connected"] is False and offline["server"] is None and offline["pending"] == 2
    assert ISO_UTC.fullmatch(offline["last_seen_at"])

    text = fields(world.admin("client", str(world.connected)).stdout)
    assert text["client"] == str(world.connected) and text["pending"] == "0"
    assert text["connected"].startswith(f"yes, to server {server['server_id']} at ")
    assert f"(pid {world.server.proc.pid})" in text["connected"]
    assert text["created"].endswith(" ago)") and " UTC " in text["created"]
    text = fields(world.admin("client", str(world.offline)).stdout)
    assert (text["connected"], text["pending"]) == ("no", "2")
    assert text["last seen"] != "never"

    assert world.admin("pending", str(world.offline), "--json").json() == {
        "client_id": world.offline, "pending": 2}
    assert world.admin("pending", str(world.connected)).stdout == f"0 pending for client {world.connected}\n"
    # The whole credential names the client too; the secret is never echoed (checked at teardown).
    assert world.admin("pending", f"{world.offline}.{world.secrets[1]}").stdout == (
        f"2 pending for client {world.offline}\n")


def test_unknown_or_malformed_client(world: World):
    for command in ("client", "pending"):
        result = world.admin(command, "999999")
        assert result.status == 1
        assert result.error_line() == "niki-admin: no client with id 999999"
        result = world.admin(command, "--json", "abc")
        assert result.status == 2
        assert "not a client id" in result.error_line()


# --- message receipts --------------------------------------------------------------------------------


def test_message_receipts(world: World):
    receipts = {mid: world.admin("message", str(mid), "--json").json()
                for mid in (world.acknowledged, world.delivered, *world.pending)}
    assert [r["status"] for r in receipts.values()] == ["acknowledged", "delivered", "pending", "pending"]
    acked = receipts[world.acknowledged]
    assert acked["client_id"] == world.connected and acked["message_id"] == world.acknowledged
    assert ISO_UTC.fullmatch(acked["acknowledged_at"]) and ISO_UTC.fullmatch(acked["delivered_at"])
    delivered = receipts[world.delivered]
    assert delivered["client_id"] == world.offline and delivered["acknowledged_at"] is None
    assert ISO_UTC.fullmatch(delivered["delivered_at"])
    pending = receipts[world.pending[0]]
    assert pending["delivered_at"] is None and pending["expires_at"] is None

    text = fields(world.admin("message", str(world.acknowledged)).stdout)
    assert (text["message"], text["client"], text["status"]) == (
        str(world.acknowledged), str(world.connected), "acknowledged")
    assert text["acknowledged"].startswith(acked["acknowledged_at"][:10])
    text = fields(world.admin("message", str(world.pending[1])).stdout)
    assert (text["status"], text["expires"], text["delivered"], text["acknowledged"]) == (
        "pending", "never", "no", "no")

    result = world.admin("message", str(world.pending[1] + 1000))
    assert result.status == 1
    assert "no message with id" in result.error_line()
    for bad in ("abc", "0", "-3", str(2**64)):
        result = world.admin("message", "--", bad)
        assert result.status == 2, bad
        result.error_line()


# --- purge (storage API only: no server needed) --------------------------------------------------------


def test_purge(db_url: str, storage: Storage, tmp_path):
    client = storage.new_client().client_id
    lapsed = [storage.enqueue(client, f"brief {i}", WINDOW, ttl=0.000001).message_id for i in range(2)]
    done = storage.enqueue(client, "done", WINDOW).message_id
    assert done is not None and storage.mark_delivered(client, [done]) == 1
    storage.enqueue(client, "done", WINDOW)  # a duplicate of a delivered one: stored as ignored
    waiting = storage.enqueue(client, "waiting", WINDOW).message_id

    # The default retention (7 days) keeps every finished message; the lapsed ones expire.
    assert admin("purge", "--json", db=db_url).json() == {"expired": 2, "deleted": 0, "retention_days": 7.0}
    assert [storage.message_info(m).status for m in lapsed] == ["expired", "expired"]
    # The database from a config file, the retention from the environment: 0 deletes every
    # finished message (a server's retention must be above 0; an operator may purge everything).
    config = tmp_path / "niki.ini"
    config.write_text(f"[niki]\ndb = {db_url}\nretention_days = 30\n")
    result = admin("purge", "--config", str(config), env={"NIKI_RETENTION_DAYS": "0"})
    assert (result.status, result.stderr) == (0, "")
    assert result.stdout.startswith("0 expired, 4 deleted ")
    assert [storage.message_info(m) for m in (*lapsed, done)] == [None, None, None]
    assert storage.message_info(waiting).status == "pending"
    assert admin("purge", "--json", "--retention-days", "0", db=db_url).json()["deleted"] == 0
    assert storage.pending_count(client) == 1


# --- failures: no database, bad usage ----------------------------------------------------------------


COMMANDS = [("servers",), ("client", "1"), ("pending", "1"), ("message", "1"), ("purge",)]


@pytest.mark.parametrize("db", [UNREACHABLE_MYSQL, "sqlite:///{tmp}/missing.sqlite3",
                                "sqlite:///{tmp}/empty.sqlite3"],
                         ids=["mysql-closed-port", "sqlite-missing", "sqlite-no-schema"])
def test_unreachable_database(db: str, tmp_path):
    (tmp_path / "empty.sqlite3").write_bytes(b"")
    url = db.format(tmp=tmp_path)
    for command in [*COMMANDS, ("--json", "servers")]:
        result = admin(*command, db=url)
        assert result.status == 1, (command, result.stderr)
        line = result.error_line()
        assert "missing.sqlite3" in line or "empty.sqlite3" in line or "niki_nowhere" in line
    assert not (tmp_path / "missing.sqlite3").exists()


def test_database_password_from_a_config_file_is_never_shown(tmp_path):
    config = tmp_path / "niki.ini"
    config.write_text("[niki]\ndb = mysql://niki:hunter2@127.0.0.1:1/niki_nowhere\n")
    result = admin("servers", "--config", str(config))
    assert result.status == 1
    assert "hunter2" not in result.error_line()


@pytest.mark.parametrize("args", [(), ("bogus",), ("client",), ("purge", "--retention-days", "-1"),
                                  ("purge", "--retention-days", "nan"), ("--db", "postgres://x/y", "servers"),
                                  ("servers", "--config", "{tmp}/missing.ini")],
                         ids=["none", "unknown-command", "no-id", "negative-retention", "nan-retention",
                              "bad-db-url", "missing-config"])
def test_usage_errors(args: Tuple[str, ...], tmp_path):
    result = admin(*(a.format(tmp=tmp_path) for a in args), db=f"sqlite:///{tmp_path / 'x.sqlite3'}")
    assert result.status == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("niki-admin")


def test_help_lists_every_command():
    result = admin("--help")
    assert result.status == 0
    for command in ("servers", "client", "pending", "message", "purge"):
        assert command in result.stdout
