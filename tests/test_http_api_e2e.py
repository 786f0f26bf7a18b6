"""The HTTP API of a real server process, end to end, on SQLite and on MariaDB.

``python -m messaging_server -p 0`` (its HTTP API on by default) on free ports, spoken to with
``http.client`` over real sockets; clients connect over TCP as in production.
What is proved here:

* Every status of the message routes: 201 with the message id and its
  Location, 200 duplicate, 404 unknown or malformed client, 413 body over 4096
  bytes, 422 bad JSON / body / ttl / line break, 429 queue full, 503 database
  unavailable (and back), and the whole credential in the path counting as its id.
* The batch form: one result per item, in order, each with the single form's
  status in ``code``; its limits.
* Receipts: pending -> delivered for a legacy client, pending -> acknowledged
  for an ACK-mode client; the client's state (pending, connected, its server).
* A message queued over HTTP reaches its connected client at once, on this
  server (in-process) and on another one (wake-up datagram), with sweeps too
  rare to be what delivered it.
* The bearer token (401 and WWW-Authenticate everywhere but /healthz), the
  refusal to start on a non-loopback address without one (exit status 2),
  the Host check without one, 404 / 405 with Allow, /metrics counting.
* Bounds: a slow (trickling) request is dropped after the timeout, an
  oversized body is refused from its Content-Length before it is sent, an
  oversized head gets 431, connections beyond the cap get 503 when every one is
  serving a request, and connections still waiting for a request head (slow
  strangers, idle keep-alives) give way, oldest first, so that they cannot lock
  out /healthz or a caller with the token.
* Ambiguous framing (RFC 9112 6.3): two Content-Length headers (even equal),
  Content-Length with Transfer-Encoding, a Content-Length that is not ASCII
  digits, a malformed header line: 400, connection closed, nothing stored.
* No secret (credential, token) in any response or log line.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from messaging_server.client.sdk import Client
from messaging_server.server.http.transport import KEEPALIVE_IDLE_S, MAX_HTTP_CONNECTIONS
from messaging_server.storage.interface import HEARTBEAT_INTERVAL_S
from tests.helpers import (
    REFUSED_BODY,
    ServerProcess,
    numeric_id,
    port_with_free_neighbours,
    query,
    refuse_body,
    wait_until,
)

# Routed mode and no API token unless a test sets one: no NIKI_* setting may leak in.
pytestmark = pytest.mark.usefixtures("no_niki_environment")

TOKEN = "t0ps3cret-token-for-tests"
# Sweeps this rare cannot be what delivers a message within PROMPT_S.
RARE_SWEEP = "30"
PROMPT_S = 3.0
TIMEOUT = "1"  # --handshake-timeout: also how long an HTTP request may take to arrive


@dataclass
class Reply:
    status: int
    headers: Dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Api:
    """A small HTTP client for one server's API: one connection per request."""

    def __init__(self, port: int, token: Optional[str] = None) -> None:
        self.port = port
        self.token = token
        self.seen: List[bytes] = []  # every response body, to look for leaked secrets

    def request(self, method: str, path: str, payload: Any = None, *, raw: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, token: Optional[str] = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            sent = dict(headers or {})
            body = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
            if body is not None:
                sent.setdefault("Content-Type", "application/json")
            token = token or self.token
            if token:
                sent.setdefault("Authorization", f"Bearer {token}")
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            conn.close()
        self.seen.append(reply.raw)
        return reply

    def post(self, client: Any, payload: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", f"/v1/clients/{client}/messages", payload, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)


def start(db_url: str, *args: str, env: Optional[Dict[str, str]] = None) -> ServerProcess:
    server = ServerProcess(db_url, "--advertise-host", "127.0.0.1",
                           *args, env=env).start()
    assert server.http_port, server.log
    return server


@contextlib.contextmanager
def running(db_url: str, *args: str, env: Optional[Dict[str, str]] = None) -> Iterator[ServerProcess]:
    server = start(db_url, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


def new_client(server: ServerProcess) -> str:
    """A client created over TCP, then offline: its credential."""
    with server.connect() as raw:
        return raw.handshake()


def receipt(api: Api, message_id: int) -> Dict[str, Any]:
    reply = api.get(f"/v1/messages/{message_id}")
    assert reply.status == 200, reply.raw
    return reply.json


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# --- queueing: every status of the single form ---------------------------------------


def test_queue_one_message_every_status(db_url: str) -> None:
    with running(db_url, env={"NIKI_MAX_PENDING": "3"}) as server:
        api = Api(server.http_port)
        credential = new_client(server)
        cid = numeric_id(credential)
        # Until the server has seen the client go, a message could still be written to it
        # (and count as delivered, not pending, for the cap below).
        wait_until(lambda: not api.get(f"/v1/clients/{cid}").json["connected"], 10,
                   "the server to see the client's connection end")

        created = api.post(cid, {"body": "hello client", "ttl": 60})
        assert created.status == 201, created.raw
        assert created.json == {"id": created.json["id"], "status": "pending"}
        assert created.headers["location"] == f"/v1/messages/{created.json['id']}"
        assert created.headers["content-type"] == "application/json"
        assert api.post(cid, {"body": "hello client"}).json == {"status": "duplicate"}
        assert api.post(cid, {"body": "hello client"}).status == 200
        # The whole credential counts as its id; 4096 bytes of UTF-8 are within the limit.
        assert api.post(credential, {"body": "é" * 2048}).status == 201

        assert api.post(cid, {"body": "x" * 4097}).status == 413
        assert api.post(cid, {"body": "é" * 2049}).status == 413
        for bad in ({"body": "two\nlines"}, {"body": "cr\r"}, {"body": ""}, {"body": 5},
                    {"text": "no body"}, ["body"], {"body": "x", "ttl": 0}, {"body": "x", "ttl": 1e-300},
                    {"body": "x", "ttl": -1}, {"body": "x", "ttl": "60"}, {"body": "x", "ttl": True},
                    {"body": "x", "ttl": 10**12}):
            reply = api.post(cid, bad)
            assert reply.status == 422, (bad, reply.raw)
            assert reply.json["error"]
        assert api.post(cid, raw=b"{not json").status == 422
        assert api.post(cid, raw=b"\xff\xfe").status == 422
        assert api.post(cid, raw=b"[" * 100_000).status == 422
        assert api.post(cid, raw=b'{"body": "x"}', headers={"Content-Type": "text/html"}).status == 415

        for unknown in (cid + 1000, "abc", "0", "-1", f"{cid}.", "99999999999999999999999"):
            reply = api.post(unknown, {"body": "x"})
            assert reply.status == 404, (unknown, reply.raw)
        full = api.post(cid, {"body": "third"})  # the client now has 3 pending: the cap
        assert full.status == 201
        assert api.post(cid, {"body": "fourth"}).status == 429

        pending = receipt(api, created.json["id"])
        assert pending["status"] == "pending" and pending["client_id"] == cid
        assert pending["expires_at"] and pending["created_at"].endswith("Z")
        assert pending["delivered_at"] is None and pending["acknowledged_at"] is None
        assert api.get("/v1/messages/999999").status == 404
        assert api.get("/v1/messages/abc").status == 404

        wait_until(lambda: not api.get(f"/v1/clients/{cid}").json["connected"], 10,
                   "the server to see the client's connection end")
        client = api.get(f"/v1/clients/{credential}")
        assert client.status == 200
        assert client.json["id"] == cid and client.json["pending"] == 3
        assert client.json["connected"] is False and client.json["server"] is None
        assert client.json["created_at"] and client.json["last_seen_at"]
        assert api.get(f"/v1/clients/{cid + 1000}").status == 404

        text = api.get("/metrics").raw.decode()
        assert metric(text, "niki_messages_queued_total") == 3
        assert metric(text, 'niki_messages_rejected_total{reason="queue_full"}') == 1
        assert metric(text, 'niki_messages_rejected_total{reason="body_too_large"}') == 2
        assert metric(text, 'niki_messages_rejected_total{reason="unknown_client"}') == 6

        secret = credential.partition(".")[2]
        assert not any(secret.encode() in body for body in api.seen)
        assert secret not in server.log


def test_routes_methods_and_health(sqlite_url: str) -> None:
    with running(sqlite_url) as server:
        api = Api(server.http_port)
        health = api.get("/healthz")
        assert health.status == 200
        assert health.json == {"status": "ok", "database": "ok", "listener": "ok"}
        assert api.get("/nowhere").status == 404
        assert api.get("/v1/clients/1/messages/extra").status == 404
        assert api.get("/healthz/").status == 404
        for method, path, allow in (("PUT", "/v1/messages", "POST"),
                                    ("DELETE", "/v1/clients/1", "GET"),
                                    ("GET", "/v1/clients/1/messages", "POST"),
                                    ("POST", "/healthz", "GET"),
                                    ("POST", "/metrics", "GET")):
            reply = api.request(method, path)
            assert reply.status == 405, (method, path, reply.raw)
            assert reply.headers["allow"] == allow
            assert "error" in reply.json
        metrics = api.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        # Without a token the API serves this machine only: not a page's rebound name.
        foreign = api.get("/v1/clients/1", headers={"Host": "attacker.example"})
        assert foreign.status == 403
        assert api.get("/v1/clients/1", headers={"Host": "localhost:1"}).status == 404


# --- the batch form ------------------------------------------------------------------------


def test_a_text_body_is_the_message_and_unknown_fields_are_refused(db_url: str) -> None:
    """`curl -d 'hello' URL` (the form type, not form-decoded) and text/plain queue the
    body as it is, as ntfy does; a JSON field the API does not know is refused (422),
    so that a misspelt ``tll`` cannot queue a message that never expires."""
    with running(db_url) as server, Client("127.0.0.1", server.port) as client:
        api = Api(server.http_port)
        cid = numeric_id(str(client.client_id))
        sent = {"application/x-www-form-urlencoded": "hello from curl & co=1",
                "text/plain": "plain text ünïcode",
                "text/plain; charset=latin-1": "latin \xe9"}
        for content_type, text in sent.items():
            raw = text.encode("latin-1") if "latin" in content_type else text.encode()
            reply = api.post(cid, raw=raw, headers={"Content-Type": content_type})
            assert reply.status == 201, (content_type, reply.raw)
        assert [client.receive(timeout=10) for _ in sent] == [
            "hello from curl & co=1", "plain text ünïcode", "latin é"]
        for bad in (b"two\nlines", b"", b"\xff\xfe"):
            reply = api.post(cid, raw=bad, headers={"Content-Type": "text/plain"})
            assert reply.status == 422, (bad, reply.raw)
        assert api.post(cid, "a JSON string").status == 422  # JSON must be a message object
        misspelt = api.post(cid, {"body": "x", "tll": 60})
        assert misspelt.status == 422 and "'tll'" in misspelt.json["error"], misspelt.raw
        batch = api.request("POST", "/v1/messages", {"messages": [
            {"client_id": cid, "body": "y", "priority": 5}]})
        assert batch.status == 422 and "'priority'" in batch.json["error"], batch.raw
        extra = api.request("POST", "/v1/messages", {"messages": [], "dry_run": True})
        assert extra.status == 422, extra.raw
        # A page of another site may post a text body without a preflight: refused, as
        # is anything a browser marks cross-site; the API's own origin is not.
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}):
            reply = api.post(cid, raw=b"csrf", headers={"Content-Type": "text/plain", **headers})
            assert reply.status == 403, (headers, reply.raw)
        own = api.post(cid, raw=b"same origin", headers={
            "Content-Type": "text/plain", "Origin": f"http://127.0.0.1:{server.http_port}"})
        assert own.status == 201, own.raw
        assert client.receive(timeout=10) == "same origin"
        stored = query(server.db_url, "SELECT body FROM messages WHERE client_id = %s ORDER BY id", (cid,))
        assert [row[0] for row in stored] == [*list(sent.values())[:2], "latin é", "same origin"]


def test_batch(db_url: str) -> None:
    with running(db_url) as server:
        api = Api(server.http_port)
        one, two = numeric_id(new_client(server)), new_client(server)
        reply = api.request("POST", "/v1/messages", {"messages": [
            {"client_id": one, "body": "a"},
            {"client_id": two, "body": "b", "ttl": 30},
            {"client_id": one, "body": "a"},  # a duplicate of the first
            {"client_id": 999_999, "body": "c"},
            {"client_id": "not an id", "body": "c"},
            {"client_id": one, "body": "x" * 5000},
            {"client_id": one, "body": "bad\nline"},
            {"client_id": one, "body": ""},
            {"client_id": one, "body": "last", "ttl": 30},
        ]})
        assert reply.status == 200, reply.raw
        results = reply.json["results"]
        assert [r["code"] for r in results] == [201, 201, 200, 404, 404, 413, 422, 422, 201]
        assert results[2]["status"] == "duplicate"
        ids = [results[i]["id"] for i in (0, 1, 8)]
        assert ids[0] < ids[1] < ids[2]  # stored in the order given
        assert receipt(api, ids[1])["expires_at"] and receipt(api, ids[2])["expires_at"]
        assert receipt(api, ids[0])["expires_at"] is None
        assert all("error" in results[i] for i in range(3, 8))

        assert api.request("POST", "/v1/messages", {"messages": []}).json == {"results": []}
        too_many = [{"client_id": one, "body": f"m{i}"} for i in range(101)]
        assert api.request("POST", "/v1/messages", {"messages": too_many}).status == 413
        # A malformed item refuses the whole request: the good items before it are not stored.
        for bad in ({"message": []}, [], {"messages": {"client_id": one}},
                    {"messages": [{"client_id": one, "body": "ok"}, "not an object"]},
                    {"messages": [{"client_id": one, "body": "ok"}, {"client_id": [1], "body": "c"}]},
                    {"messages": [{"client_id": one, "body": "ok"}, {"client_id": 0, "body": "c"}]},
                    {"messages": [{"client_id": one, "body": "ok"}, {"client_id": one}]},
                    {"messages": [{"client_id": one, "body": "ok"}, {"client_id": one, "body": 7}]},
                    {"messages": [{"client_id": one, "body": "ok", "ttl": -5}]}):
            refused = api.request("POST", "/v1/messages", bad)
            assert refused.status == 422, (bad, refused.raw)
            assert refused.json["error"]
        # Nothing of the refused batches was stored.
        assert api.get(f"/v1/clients/{one}").json["pending"] == 2


# --- receipts and prompt delivery -----------------------------------------------------------


def test_legacy_client_gets_it_at_once_and_the_receipt_says_delivered(db_url: str) -> None:
    with running(db_url, "--sweep-interval", RARE_SWEEP) as server:
        api = Api(server.http_port)
        with server.connect() as raw:
            cid = numeric_id(raw.handshake())
            wait_until(lambda: api.get(f"/v1/clients/{cid}").json["connected"], PROMPT_S,
                       "the client to show as connected")
            state = api.get(f"/v1/clients/{cid}").json
            assert state["server"]["port"] == server.port and state["server"]["id"] >= 1
            sent = time.monotonic()
            message_id = api.post(cid, {"body": "right now"}).json["id"]
            assert raw.read_line(timeout=PROMPT_S) == "MESSAGE: right now"
            assert time.monotonic() - sent < PROMPT_S
            wait_until(lambda: receipt(api, message_id)["status"] == "delivered", PROMPT_S,
                       "the receipt to say delivered")
            done = receipt(api, message_id)
            assert done["delivered_at"] and done["acknowledged_at"] is None
            # Woken in-process: the server sent itself no datagram.
            assert metric(api.get("/metrics").raw.decode(), "niki_wakeups_received_total") == 0


def test_ack_client_receipt_goes_pending_delivered_acknowledged(db_url: str) -> None:
    with running(db_url, "--sweep-interval", RARE_SWEEP) as server:
        api = Api(server.http_port)
        with Client("127.0.0.1", server.port, ack=True, auto_ack=False, timeout=PROMPT_S) as client:
            cid = numeric_id(client.client_id)
            wait_until(lambda: api.get(f"/v1/clients/{cid}").json["connected"], PROMPT_S,
                       "the client to show as connected")
            message_id = api.post(cid, {"body": "confirm me"}).json["id"]
            message = client.receive_message(timeout=PROMPT_S)
            assert message.body == "confirm me" and message.message_id == message_id
            assert receipt(api, message_id)["status"] == "pending"  # written, not yet confirmed
            client.ack(message_id)
            wait_until(lambda: receipt(api, message_id)["status"] == "acknowledged", PROMPT_S,
                       "the receipt to say acknowledged")
            assert receipt(api, message_id)["acknowledged_at"]


def test_a_client_on_another_server_is_woken(db_url: str, stack: contextlib.ExitStack) -> None:
    api_server = stack.enter_context(running(db_url, "--sweep-interval", RARE_SWEEP))
    other = stack.enter_context(ServerProcess(db_url, "--sweep-interval", RARE_SWEEP,
                                              "--advertise-host", "127.0.0.1"))
    api = Api(api_server.http_port)
    with other.connect() as raw:
        cid = numeric_id(raw.handshake())
        wait_until(lambda: api.get(f"/v1/clients/{cid}").json["connected"], PROMPT_S,
                   "the client to show as connected")
        reply = api.request("POST", "/v1/messages", {"messages": [{"client_id": cid, "body": "hop"}]})
        assert reply.json["results"][0]["code"] == 201
        assert raw.read_line(timeout=PROMPT_S) == "MESSAGE: hop"


# --- the database away ---------------------------------------------------------------------


def _rename(db_url: str, old: str, new: str) -> None:
    if db_url.startswith("sqlite:"):
        query(db_url, f"ALTER TABLE {old} RENAME TO {new}")
    else:
        query(db_url, f"RENAME TABLE {old} TO {new}")


def test_database_unavailable_is_503_and_recovers(db_url: str) -> None:
    """Tables gone: every route answers 503; /healthz within a heartbeat or so (it reports
    the server's own writes, and the heartbeat's fails too); all back once they return."""
    with running(db_url) as server:
        api = Api(server.http_port)
        cid = numeric_id(new_client(server))
        _rename(db_url, "clients", "clients_away")
        _rename(db_url, "servers", "servers_away")
        try:
            assert api.post(cid, {"body": "lost?"}).status == 503
            assert api.get(f"/v1/clients/{cid}").status == 503
            batch = api.request("POST", "/v1/messages", {"messages": [{"client_id": cid, "body": "b"}]})
            assert batch.status == 503 and "error" in batch.json
            wait_until(lambda: api.get("/healthz").status == 503, 3 * HEARTBEAT_INTERVAL_S,
                       "/healthz to say the database is unavailable")
            assert api.get("/healthz").json["database"] == "unavailable"
        finally:
            _rename(db_url, "clients_away", "clients")
            _rename(db_url, "servers_away", "servers")
        wait_until(lambda: api.get("/healthz").status == 200, 3 * HEARTBEAT_INTERVAL_S,
                   "/healthz to say ok again")
        assert api.post(cid, {"body": "lost?"}).status == 201  # the refused one was not stored


def test_a_statement_the_database_refuses_is_500_not_503(db_url: str) -> None:
    # A bug is not "database unavailable": 500 with a generic body, the traceback logged once.
    with running(db_url) as server:
        api = Api(server.http_port)
        cid = numeric_id(new_client(server))
        refuse_body(db_url)
        refused = api.post(cid, {"body": REFUSED_BODY})
        assert (refused.status, refused.json) == (500, {"error": "internal error"})
        batch = api.request("POST", "/v1/messages", {"messages": [{"client_id": cid, "body": "ok"},
                                                                  {"client_id": cid, "body": REFUSED_BODY}]})
        assert batch.status == 500
        assert api.post(cid, {"body": "fine"}).status == 201
        assert api.get("/healthz").status == 200
        # Each logged once, with its traceback (the driver's error chained beneath it).
        wait_until(lambda: server.log.count("messaging_server.errors.StorageFault") == 2, 5,
                   message=server.log)
        failed = [line for line in server.log.splitlines() if "failed" in line and "HTTP POST" in line]
        assert len(failed) == 2 and "database unavailable" not in server.log, server.log
    assert [row[0] for row in query(db_url, "SELECT body FROM messages")] == ["fine"]


# --- who may call it ------------------------------------------------------------------------


def test_bearer_token(db_url: str) -> None:
    with running(db_url, "--api-token", TOKEN) as server:
        api = Api(server.http_port)
        credential = new_client(server)
        cid = numeric_id(credential)
        assert api.get(f"/v1/clients/{credential}").status == 401
        wait_until(lambda: f"/v1/clients/{cid}.*** -> 401" in server.log, 10,
                   "the refused request to be logged, its secret hidden")
        for method, path in (("POST", f"/v1/clients/{cid}/messages"), ("POST", "/v1/messages"),
                             ("GET", f"/v1/clients/{cid}"), ("GET", "/v1/messages/1"),
                             ("GET", "/metrics"), ("GET", "/nowhere")):
            for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
                headers = {} if token is None else {"Authorization": f"Bearer {token}"}
                reply = api.request(method, path, {"body": "x"}, headers=headers)
                assert reply.status == 401, (method, path, token)
                assert reply.headers["www-authenticate"].startswith("Bearer")
        basic = api.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status == 401
        assert api.get("/healthz").status == 200  # no token needed
        assert api.post(cid, {"body": "with token"}, token=TOKEN).status == 201
        assert api.get("/metrics", token=TOKEN).status == 200
        assert api.get(f"/v1/clients/{cid}", headers={"Host": "anywhere.example"},
                       token=TOKEN).status == 200
        assert not any(TOKEN.encode() in body for body in api.seen)
        assert TOKEN not in server.log and credential.partition(".")[2] not in server.log


def test_refuses_to_serve_other_machines_without_a_token(sqlite_url: str) -> None:
    command = [sys.executable, "-m", "messaging_server", "-p", "0", "--db", sqlite_url,
               "--http-host", "0.0.0.0"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2, refused.stderr
    assert "--api-token" in refused.stderr and "0.0.0.0" in refused.stderr
    assert "listening on" not in refused.stderr
    with running(sqlite_url, "--http-host", "0.0.0.0", "--api-token", TOKEN) as server:
        assert "HTTP API on http://0.0.0.0:" in server.log
        assert Api(server.http_port).get("/healthz").status == 200


# --- bounds ---------------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket, timeout: float) -> Tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    began = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - began


def test_slow_and_oversized_requests_are_refused(sqlite_url: str) -> None:
    with running(sqlite_url, "--handshake-timeout", TIMEOUT) as server:
        port = server.http_port
        # A head that never ends is dropped after the timeout.
        with _connect(port) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            data, took = _read_all(idle, 10)
            assert data == b"" and took < 5
        # So is one trickling a byte at a time, each well within the timeout.
        with _connect(port) as slow:
            began = time.monotonic()
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
                if time.monotonic() - began > 5:
                    break
            if not closed:
                data, _ = _read_all(slow, 5)
                assert b"200 OK" not in data
            assert time.monotonic() - began < 5
        # A body over the limit is refused from its Content-Length, before it is sent.
        with _connect(port) as big:
            big.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n")
            data, _ = _read_all(big, 5)
            assert data.startswith(b"HTTP/1.1 413 ")
            assert b"Connection: close" in data
        # A head over the limit gets 431.
        with _connect(port) as tall:
            tall.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            with contextlib.suppress(OSError):
                for i in range(50):
                    tall.sendall(f"X-Filler-{i}: {'y' * 1000}\r\n".encode())
            data, _ = _read_all(tall, 5)
            assert data.startswith(b"HTTP/1.1 431 ")
        with _connect(port) as long_line:
            long_line.sendall(b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n")
            data, _ = _read_all(long_line, 5)
            assert data.startswith(b"HTTP/1.1 431 ")
        # No Content-Length, or a chunked body: 411.
        with _connect(port) as chunked:
            chunked.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n")
            data, _ = _read_all(chunked, 5)
            assert data.startswith(b"HTTP/1.1 411 ")
        # A keep-alive connection serves several requests.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() and True
        conn.close()
        assert Api(port).get("/healthz").status == 200  # still serving


# Heads whose body framing two HTTP implementations could read differently (RFC 9112 6.3):
# a proxy that honours the other reading would see another request than the server.
AMBIGUOUS_FRAMING = {
    "two different lengths": b"Content-Length: 0\r\nContent-Length: 13\r\n",
    "the same length twice": b"Content-Length: 13\r\nContent-Length: 13\r\n",
    "a list of lengths": b"Content-Length: 13, 13\r\n",
    "length and chunked": b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n",
    "chunked and length": b"Transfer-Encoding: chunked\r\ncontent-length: 13\r\n",
    "a sign": b"Content-Length: +13\r\n",
    "hexadecimal": b"Content-Length: 0xd\r\n",
    "non-ASCII digits": b"Content-Length: \xb9\xb3\r\n",  # Latin-1 superscripts 1 and 3
    "space before the colon": b"Content-Length : 13\r\n",
    "a folded value": b"Content-Length: 1\r\n 3\r\n",
}


def test_ambiguous_body_framing_is_400_and_closes(sqlite_url: str) -> None:
    with running(sqlite_url) as server:
        cid = numeric_id(new_client(server))
        for framing, header in AMBIGUOUS_FRAMING.items():
            for path in (f"/v1/clients/{cid}/messages", "/healthz"):
                with _connect(server.http_port) as sock:
                    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                                 + b"Content-Type: application/json\r\n" + header + b"\r\n"
                                 + b'{"body": "x"}' + b"GET /healthz HTTP/1.1\r\n\r\n")
                    data, _ = _read_all(sock, 5)
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400 "), (framing, path, data)
                assert b"Connection: close" in head
                assert b"HTTP/1.1" not in body, "the rest was read as another request"
                error = json.loads(body)["error"]
                assert "Content-Length" in error or "header" in error, error
        api = Api(server.http_port)
        assert api.get(f"/v1/clients/{cid}").json["pending"] == 0  # nothing stored
        # Optional whitespace around one plain length is fine.
        assert api.post(cid, raw=b'{"body": "x"}', headers={"Content-Length": " 13\t"}).status == 201


def test_idle_keep_alive_and_refused_callers_do_not_hold_connections(sqlite_url: str) -> None:
    """A kept-alive connection idle for KEEPALIVE_IDLE_S is closed, though a request may take
    longer to arrive (the request timeout, 30 s here); one whose request lacked the token is
    closed right after its 401."""
    with running(sqlite_url, "--handshake-timeout", "30", "--api-token", TOKEN) as server:
        with _connect(server.http_port) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data, took = _read_all(idle, 20)
            assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in data
            # Kept open for a next request, then closed when none came.
            assert KEEPALIVE_IDLE_S - 1 < took < KEEPALIVE_IDLE_S + 3, took
        with _connect(server.http_port) as stranger:
            stranger.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data, took = _read_all(stranger, 10)
            assert data.startswith(b"HTTP/1.1 401 ") and took < 0.5, took


def _busy(port: int) -> socket.socket:
    """A connection serving a request: its POST head read (the server said 100 Continue),
    its body coming slowly (held until the request timeout)."""
    sock = _connect(port)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
    sock.sendall(b'{"messages": [')
    return sock


def test_connections_beyond_the_cap_get_503_when_all_are_serving(sqlite_url: str) -> None:
    with running(sqlite_url) as server, contextlib.ExitStack() as held:
        socks = [held.enter_context(_busy(server.http_port)) for _ in range(MAX_HTTP_CONNECTIONS)]
        with _connect(server.http_port) as extra:
            data, _ = _read_all(extra, 10)
            assert data.startswith(b"HTTP/1.1 503 ")
        for sock in socks:
            sock.close()
        wait_until(lambda: Api(server.http_port).get("/healthz").status == 200, 10,
                   "the API to serve again once connections were closed")


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_slow_strangers_do_not_lock_out_the_probe_or_token_holders(sqlite_url: str) -> None:
    """Twice the cap's worth of connections that need no token send half a request head and
    never finish it; /healthz and a caller with the token still get their answers at once,
    and the server holds no more threads than the cap allows."""
    with running(sqlite_url, "--api-token", TOKEN) as server, contextlib.ExitStack() as held:
        port, pid = server.http_port, server.proc.pid
        api = Api(port, TOKEN)
        cid = numeric_id(new_client(server))
        assert api.get(f"/v1/clients/{cid}").status == 200
        threads, resident = _threads(pid), _resident_bytes(pid)
        slow = []
        for _ in range(2 * MAX_HTTP_CONNECTIONS):
            sock = held.enter_context(_connect(port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(sock)
        for _ in range(3):
            began = time.monotonic()
            health = Api(port).get("/healthz")
            assert health.status == 200, health.raw
            assert api.get(f"/v1/clients/{cid}").status == 200
            assert api.post(cid, {"body": f"through {began}"}).status == 201
            assert time.monotonic() - began < PROMPT_S
            slow.append(held.enter_context(_connect(port)))  # the strangers come back
            slow[-1].sendall(b"GET /metrics HTTP/1.1\r\n")
        # The oldest strangers gave way (closed without an answer); the thread count is
        # bounded by the cap, and so is what they cost.
        data, _ = _read_all(slow[0], 5)
        assert data == b""
        wait_until(lambda: _threads(pid) <= threads + MAX_HTTP_CONNECTIONS, 5,
                   "the threads of the closed connections to end")
        assert _resident_bytes(pid) - resident < 32 * 1024 * 1024


def test_on_by_default_at_the_client_port_plus_two_and_off_with_zero(sqlite_url: str) -> None:
    port = port_with_free_neighbours()
    with ServerProcess(sqlite_url, port=port, http_follows_port=True) as server:
        assert server.http_port == port + 2, server.log
        assert f"HTTP API on http://127.0.0.1:{port + 2}" in server.log
        assert Api(port + 2).get("/healthz").status == 200
    port = port_with_free_neighbours()
    with ServerProcess(sqlite_url, "--http-port", "0", port=port) as server:
        assert "HTTP API" not in server.log and server.http_port == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port + 2), timeout=2).close()


def test_the_status_page_and_its_data(db_url: str) -> None:
    with running(db_url) as server, Client("127.0.0.1", server.port) as client:
        api = Api(server.http_port)
        page = api.get("/")
        assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert b"v1/status" in page.raw and b"<script" in page.raw and b"src=" not in page.raw
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        before = api.get("/v1/status").json
        (me,) = [s for s in before["servers"] if s["id"] == before["server_id"]]
        assert me["alive"] and me["clients"] == 1 and before["clients_connected_here"] == 1
        assert before["pending"] == 0
        api.post(numeric_id(str(client.client_id)) + 10**6, {"body": "nobody"})  # 404: no change
        with Client("127.0.0.1", server.port) as offline:
            credential = str(offline.client_id)
        api.post(numeric_id(credential), {"body": "waits"})
        after = api.get("/v1/status").json
        assert after["pending"] == 1 and after["clients_connected_here"] == 1


def test_the_status_page_asks_a_browser_for_the_token(sqlite_url: str) -> None:
    with running(sqlite_url, "--api-token", "tok3n") as server:
        api = Api(server.http_port)
        page = api.get("/")
        assert page.status == 401 and page.headers["www-authenticate"] == 'Basic realm="niki"'
        assert api.get("/v1/status").headers["www-authenticate"] == 'Bearer realm="niki"'
        basic = "Basic " + base64.b64encode(b"anyone:tok3n").decode()
        assert api.get("/", headers={"Authorization": basic}).status == 200
        assert api.get("/v1/status", headers={"Authorization": basic}).status == 200
        wrong = "Basic " + base64.b64encode(b"anyone:guess").decode()
        assert api.get("/", headers={"Authorization": wrong}).status == 401
