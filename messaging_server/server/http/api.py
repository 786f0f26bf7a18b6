"""The HTTP API inside a server process: queue messages, read receipts, health, metrics.

Applications that cannot load Python (or reach the database) queue messages
over HTTP instead of calling ``enqueue()``; operators read a client's or a
message's state, and probes and Prometheus read ``/healthz`` and ``/metrics``.
The routes, statuses and bodies are in docs/HTTP_API.md and docs/openapi.yaml.

It is the standard library's ``ThreadingHTTPServer`` on its own port
(``--http-port``: the client port + 2 by default, 0 for none), one daemon thread
per connection.  It
queues through an :class:`~messaging_server.producer.enqueuer.Enqueuer` built on the
server's own storage, so the rules are exactly ``enqueue``'s, and a client
connected to this very server is asked for a delivery pass directly, with no
datagram; other owners are woken as ``enqueue`` wakes them.

Everything a stranger can make it hold is bounded, by the transport
(:mod:`messaging_server.server.http.transport`: connections, request head and body, time)
and here (MAX_HTTP_BATCH messages per batch).
Who may call it is :mod:`messaging_server.server.http.auth`'s business.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

from messaging_server.config.settings import ServerSettings
from messaging_server.errors import BodyRejected, NikiError, QueueFull, StorageUnavailable, UnknownClient
from messaging_server.producer.enqueuer import (
    Enqueuer,
    Submitted,
    WakeHere,
    check_body,
    check_ttl,
    client_id_of,
)
from messaging_server.protocol.credentials import redact
from messaging_server.server import metrics, websocket
from messaging_server.server.connection import ClientConnection
from messaging_server.server.http.auth import BearerToken, cross_site, loopback_host_header
from messaging_server.server.http.transport import MAX_REQUEST_BYTES, BoundedHTTPServer, BoundedRequestHandler
from messaging_server.storage import Storage
from messaging_server.storage.records import ServerAddress
from messaging_server.version import __version__

log = logging.getLogger("messaging_server.http")

# Messages in one POST /v1/messages.
MAX_HTTP_BATCH = 100
STATUS_PAGE = resources.files(__package__).joinpath("status_page.html").read_bytes()
# Message ids are signed 64-bit in both databases.
MAX_MESSAGE_ID = 2**63 - 1
# How much of a request path a log line shows.
MAX_LOGGED_PATH = 200

JSON_TYPE = "application/json"
# A single message's body may also be the message itself: `curl -d 'hello' URL` sends
# the form type, taken as it is (not form-decoded).
TEXT_TYPES = ("text/plain", "application/x-www-form-urlencoded")
# The fields a message may have, in the single-message call and in a batch item.
MESSAGE_KEYS = ("body", "ttl")
BATCH_ITEM_KEYS = ("client_id", "body", "ttl")


class RequestRefused(NikiError):
    """A request the API answers with an error status; ``reason`` labels the rejected-messages
    metric when it refuses a message (None: it does not count)."""

    def __init__(self, status: int, message: str, reason: Optional[str] = None,
                 close: bool = False, headers: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.close = close  # the request's body was not read: the connection cannot go on
        self.headers = tuple(headers)


# What an enqueue error becomes: (status, rejected-messages reason or None).
ERROR_STATUS: Dict[type, Tuple[int, Optional[str]]] = {
    UnknownClient: (HTTPStatus.NOT_FOUND, "unknown_client"),
    QueueFull: (HTTPStatus.TOO_MANY_REQUESTS, "queue_full"),
    BodyRejected: (HTTPStatus.UNPROCESSABLE_ENTITY, "bad_request"),
    StorageUnavailable: (HTTPStatus.SERVICE_UNAVAILABLE, None),
}


def error_status(exc: NikiError) -> Tuple[int, Optional[str]]:
    for kind, answer in ERROR_STATUS.items():
        if isinstance(exc, kind):
            return answer
    return HTTPStatus.INTERNAL_SERVER_ERROR, None


def public_message(exc: NikiError) -> str:
    """What the caller is told: the database's own words stay in the log."""
    if isinstance(exc, StorageUnavailable):
        return "database unavailable, try again later"
    return str(exc)


def redact_path(path: str) -> str:
    """A request path fit for the log: no query, no credential secret, bounded."""
    path = path.partition("?")[0]
    return "/".join(redact(segment) for segment in path.split("/"))[:MAX_LOGGED_PATH]


def in_process_wake(lookup: Callable[[int], Optional[ClientConnection]],
                    server_id: Callable[[], int]) -> WakeHere:
    """Enqueuer's ``wake_here`` for a server: ask a client connected here for a delivery pass.

    Not when the database names another live server as the owner (a takeover
    in progress): that one gets its datagram, and this connection is about to close.
    """
    def wake_here(client_id: int, owner: Optional[ServerAddress]) -> bool:
        conn = lookup(client_id)
        if conn is None or (owner is not None and owner.server_id != server_id()):
            return False
        conn.request_delivery()
        return True
    return wake_here


@dataclass(frozen=True)
class ApiBackend:
    """What the API needs from its server."""

    storage: Storage
    enqueuer: Enqueuer
    listening: Callable[[], bool]  # the client port accepts connections
    status: Callable[[], Dict[str, Any]]  # the status page's data (activity.py)
    adopt: websocket.Adopt  # serves a WebSocket's socket pair as a client connection
    ws_origins: Tuple[str, ...]  # pages of other origins that may open a WebSocket


class HttpApi(BoundedHTTPServer):
    """The API's server: its backend and token, shared by its handlers."""

    def __init__(self, host: str, port: int, backend: ApiBackend, token: str,
                 request_timeout: float, write_timeout: float) -> None:
        self.backend = backend
        self.token = BearerToken(token)
        super().__init__(host, port, ApiHandler, request_timeout, write_timeout)

    def stop(self) -> None:
        super().stop()
        self.backend.enqueuer.close()


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern
    methods: Dict[str, str]  # HTTP method -> handler method name
    public: bool = False  # served without the token


ROUTES = (
    Route(re.compile(r"/"), {"GET": "_status_page"}),
    Route(re.compile(r"/v1/status"), {"GET": "_status"}),
    Route(re.compile(r"/healthz"), {"GET": "_health"}, public=True),
    # Public as the client port is: a client proves who it is inside the protocol.
    Route(re.compile(websocket.PATH), {"GET": "_websocket"}, public=True),
    Route(re.compile(r"/metrics"), {"GET": "_metrics"}),
    Route(re.compile(r"/v1/messages"), {"POST": "_post_batch"}),
    Route(re.compile(r"/v1/messages/([^/]+)"), {"GET": "_get_message"}),
    Route(re.compile(r"/v1/clients/([^/]+)"), {"GET": "_get_client"}),
    Route(re.compile(r"/v1/clients/([^/]+)/messages"), {"POST": "_post_message"}),
)


class ApiHandler(BoundedRequestHandler):
    """The API's requests on one connection: routes, authorisation, JSON in and out."""

    server: HttpApi

    def version_string(self) -> str:
        return f"Niki/{__version__}"  # not the Python version: nobody's business

    # Every method goes through one dispatcher, so that a known path with the
    # wrong method gets 405 and its Allow header.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        self._body_unread = bool(self.headers.get("Transfer-Encoding")) or \
            bool(self.content_length())
        path = self.path.partition("?")[0]
        try:
            route, match = self._route(path)
            if route is None or not route.public:
                self._authorize()
            if route is None:
                raise RequestRefused(HTTPStatus.NOT_FOUND, "no such resource")
            name = route.methods.get(self.command)
            if name is None:
                allow = ", ".join(sorted(route.methods))
                raise RequestRefused(HTTPStatus.METHOD_NOT_ALLOWED,
                                     f"method {self.command} not allowed here; use {allow}",
                                     headers=[("Allow", allow)])
            assert match is not None  # a route was found by it
            getattr(self, name)(*(unquote(group) for group in match.groups()))
        except RequestRefused as refused:
            if refused.reason is not None:
                metrics.MESSAGES_REJECTED.labels(reason=refused.reason).inc()
            self._reply(refused.status, {"error": str(refused)}, refused.headers,
                        close=refused.close)
        except StorageUnavailable as exc:
            log.warning("HTTP %s %s: database unavailable: %s", self.command, redact_path(path), exc)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": public_message(exc)})
        except OSError:
            raise  # the connection broke, or the client closed mid-body: nothing to answer
        except Exception:
            log.exception("HTTP %s %s failed", self.command, redact_path(path))
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, close=True)

    @staticmethod
    def _route(path: str) -> Tuple[Optional[Route], Optional[re.Match]]:
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match:
                return route, match
        return None, None

    def _authorize(self) -> None:
        token = self.server.token
        if not token.accepts(self.headers.get("Authorization")):
            # Closed after the answer: a caller without the token holds no connection.
            # The status page asks a browser for it (as the password: Basic).
            page = self.path.partition("?")[0] == "/"
            raise RequestRefused(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required",
                                 close=True,
                                 headers=[("WWW-Authenticate",
                                           'Basic realm="niki"' if page else 'Bearer realm="niki"')])
        headers = self.headers
        if cross_site(headers.get("Origin"), headers.get("Host"), headers.get("Sec-Fetch-Site")):
            raise RequestRefused(HTTPStatus.FORBIDDEN, "requests from another site's web pages are "
                                 "refused", close=True)
        self._check_host()

    def _check_host(self) -> None:
        """Without a token the port serves this machine only; a foreign Host is a web
        page's DNS-rebinding attempt to reach it through a browser."""
        if not self.server.token.required and not loopback_host_header(self.headers.get("Host")):
            raise RequestRefused(HTTPStatus.FORBIDDEN,
                                 "the Host header must name this machine (no API token is set)")

    # --- reading the request ---

    def _read_json(self, text_too: bool = False) -> Any:
        """The request body as JSON, read only if it is within the limits.  ``text_too``:
        a text/plain body (or curl -d's form type, taken as it is, not form-decoded, as
        ntfy does) is returned as a str: the message body itself."""
        headers = self.headers
        if headers.get("Transfer-Encoding"):
            raise RequestRefused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length "
                                 "(chunked bodies are not accepted)", "bad_request", close=True)
        length = self.content_length()  # one, of ASCII digits: the transport saw to that
        if length is None:
            raise RequestRefused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required",
                                 "bad_request")
        if length > MAX_REQUEST_BYTES:
            raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"the request body is over the limit of {MAX_REQUEST_BYTES} bytes",
                                 "body_too_large", close=True)
        content_type = headers.get_content_type()
        text = text_too and content_type in TEXT_TYPES
        if content_type != JSON_TYPE and not text:
            wanted = f"{JSON_TYPE} or text/plain" if text_too else JSON_TYPE
            raise RequestRefused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"the request body must be {wanted}", "bad_request", close=True)
        self._reader.budget = None  # the body is bounded by its Content-Length, checked above
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("the client closed the connection in the request body")
        self._body_unread = False
        if text:
            try:
                return TextBody(data.decode(headers.get_content_charset() or "utf-8"))
            except (LookupError, UnicodeDecodeError):
                raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, "the request body is not "
                                     "valid text in its charset (UTF-8 by default)", "bad_request") from None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, "the request body is not JSON",
                                 "bad_request") from None

    def _message_fields(self, item: Any,
                        known: Tuple[str, ...] = MESSAGE_KEYS) -> Tuple[str, Optional[float]]:
        """``body`` and ``ttl`` of one message object, checked as ``enqueue`` checks them."""
        if isinstance(item, TextBody):  # a text body: the message itself
            item = {"body": str(item)}
        if not isinstance(item, dict):
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, "a message must be a JSON object",
                                 "bad_request")
        unknown = unknown_keys(item, known)
        if unknown:
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, unknown, "bad_request")
        body, ttl = item.get("body"), item.get("ttl")
        if not isinstance(body, str):
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, "body must be a string",
                                 "bad_request")
        size = len(body.encode("utf-8", errors="surrogatepass"))
        limit = self.server.backend.enqueuer.max_body_bytes
        if size > limit:
            raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"the message body is {size} bytes; the limit is {limit}",
                                 "body_too_large")
        try:
            check_ttl(ttl)
        except BodyRejected as exc:
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), "bad_request") from None
        return body, ttl

    @staticmethod
    def _client_id(text: Any) -> int:
        if isinstance(text, bool) or not isinstance(text, (int, str)):
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY,
                                 "client_id must be a number or a string", "bad_request")
        try:
            return client_id_of(text)
        except UnknownClient as exc:
            raise RequestRefused(HTTPStatus.NOT_FOUND, str(exc), "unknown_client") from None

    # --- the routes ---

    def _health(self) -> None:
        """The outcome of the server's own recent writes (its heartbeat writes every 2 s),
        not a query: a read proves nothing about writes, and on SQLite it would queue
        behind the writers (storage/write_health.py)."""
        backend = self.server.backend
        listening = backend.listening()
        writes = backend.storage.write_health.state()
        answer: Dict[str, Any] = {"status": "ok" if writes.ok and listening else "unavailable",
                                  "database": "ok" if writes.ok else "unavailable",
                                  "listener": "ok" if listening else "down"}
        if answer["status"] == "ok":
            self._reply(HTTPStatus.OK, answer)
        else:
            answer["error"] = writes.problem or "client port not listening"
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, answer)

    def _websocket(self) -> None:
        """The line protocol over WebSocket (websocket.py), for the rest of the connection.
        It no longer counts against the HTTP connections: the client port's caps apply."""
        headers = self.headers
        if (headers.get("Upgrade") or "").lower() != "websocket":
            raise RequestRefused(HTTPStatus.UPGRADE_REQUIRED, "GET /v1/ws is a WebSocket: "
                                 "send Upgrade: websocket", headers=[("Upgrade", "websocket")])
        if self._body_unread:  # an upgrade has no body: its bytes would be taken for frames
            raise RequestRefused(HTTPStatus.BAD_REQUEST, "a WebSocket upgrade request has no body",
                                 close=True)
        self._check_host()  # public as the client port, but not to a rebinding page
        self.close_connection = True
        self.server.slots.release(self.connection)
        backend = self.server.backend
        outcome = websocket.serve(
            self.connection,
            websocket.raw_request(self.raw_requestline, headers.items()),  # type: ignore[attr-defined]
            headers.get("Origin"), headers.get("Host"), backend.ws_origins, backend.adopt,
            self.client_address, self.server.write_timeout)
        log.debug("WebSocket from %s: %s", self.client_address[0], outcome)

    def _status_page(self) -> None:
        """One HTML page, no external assets: it reads /v1/status every 5 s."""
        self._send(HTTPStatus.OK, STATUS_PAGE, "text/html; charset=utf-8", [
            ("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                        "style-src 'unsafe-inline'; frame-ancestors 'none'"),
            ("X-Frame-Options", "DENY")])

    def _status(self) -> None:
        self._reply(HTTPStatus.OK, self.server.backend.status())

    def _metrics(self) -> None:
        body, content_type = metrics.render()
        self._send(HTTPStatus.OK, body, content_type)

    def _get_client(self, text: str) -> None:
        client_id = self._client_id(text)
        info = self.server.backend.storage.client_info(client_id)
        if info is None:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f"no client with id {client_id}")
        server = None if info.server is None else {
            "id": info.server.server_id, "host": info.server.host, "port": info.server.port}
        self._reply(HTTPStatus.OK, {
            "id": info.client_id, "pending": info.pending, "connected": info.connected,
            "server": server, "created_at": info.created_at, "last_seen_at": info.last_seen_at})

    def _get_message(self, text: str) -> None:
        if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_MESSAGE_ID:
            raise RequestRefused(HTTPStatus.NOT_FOUND, "no such message")
        info = self.server.backend.storage.message_info(int(text))
        if info is None:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f"no message with id {int(text)}")
        self._reply(HTTPStatus.OK, {
            "id": info.message_id, "client_id": info.client_id, "status": info.status,
            "created_at": info.created_at, "expires_at": info.expires_at,
            "delivered_at": info.delivered_at, "acknowledged_at": info.acknowledged_at})

    def _post_message(self, text: str) -> None:
        payload = self._read_json(text_too=True)  # first: a refusal keeps the connection usable
        client_id = self._client_id(text)
        body, ttl = self._message_fields(payload)
        try:
            message_id = self.server.backend.enqueuer.submit(client_id, body, ttl=ttl)
        except (UnknownClient, QueueFull, BodyRejected) as exc:
            status, reason = error_status(exc)
            raise RequestRefused(status, public_message(exc), reason) from None
        status, answer = submitted(message_id)
        self._reply(status, answer, [("Location", f"/v1/messages/{message_id}")]
                    if message_id is not None else ())

    def _post_batch(self) -> None:
        payload = self._read_json()
        items = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(items, list) or len(payload) > 1:
            raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY,
                                 'the request body must be {"messages": [...]}, nothing else',
                                 "bad_request")
        if len(items) > MAX_HTTP_BATCH:
            metrics.MESSAGES_REJECTED.labels(reason="bad_request").inc(len(items) - 1)
            raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"at most {MAX_HTTP_BATCH} messages per request, not {len(items)}",
                                 "bad_request")
        # A malformed item (what the document's schema forbids) refuses the whole
        # request: the caller's code is wrong, not one message.  What only the
        # server can judge (the client, the body's bytes, the queue) is per item.
        for position, item in enumerate(items):
            problem = batch_item_problem(item)
            if problem:
                metrics.MESSAGES_REJECTED.labels(reason="bad_request").inc(len(items) - 1)
                raise RequestRefused(HTTPStatus.UNPROCESSABLE_ENTITY,
                                     f"messages[{position}]: {problem}", "bad_request")
        results: List[Optional[Dict[str, Any]]] = [None] * len(items)
        valid: List[Tuple[int, int, str, Optional[float]]] = []  # position, client, body, ttl
        for position, item in enumerate(items):
            try:
                client_id = self._client_id(item["client_id"])
                body, ttl = self._message_fields(item, BATCH_ITEM_KEYS)
                check_body(body, self.server.backend.enqueuer.max_body_bytes)
                valid.append((position, client_id, body, ttl))
            except (RequestRefused, BodyRejected) as exc:
                refused = exc if isinstance(exc, RequestRefused) else RequestRefused(
                    HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), "bad_request")
                if refused.reason is not None:
                    metrics.MESSAGES_REJECTED.labels(reason=refused.reason).inc()
                results[position] = {"code": refused.status, "error": str(refused)}
        # One transaction for the whole batch (each item with its own ttl): when the
        # database fails, nothing was stored and the request gets 503.
        outcomes = self.server.backend.enqueuer.submit_many(
            [(client_id, body, ttl) for _, client_id, body, ttl in valid])
        for (position, *_), outcome in zip(valid, outcomes):
            results[position] = self._outcome(outcome)
        self._reply(HTTPStatus.OK, {"results": results})

    @staticmethod
    def _outcome(outcome: Submitted) -> Dict[str, Any]:
        if isinstance(outcome, NikiError):
            status, reason = error_status(outcome)
            if reason is not None:
                metrics.MESSAGES_REJECTED.labels(reason=reason).inc()
            return {"code": status, "error": public_message(outcome)}
        status, answer = submitted(outcome)
        return {"code": status, **answer}

    # --- writing the response ---

    def _reply(self, status: int, payload: Dict[str, Any],
               headers: Sequence[Tuple[str, str]] = (), close: bool = False) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), JSON_TYPE, headers, close)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Sequence[Tuple[str, str]] = (), close: bool = False) -> None:
        # A client that does not read its answer holds its thread for at most this long.
        self.connection.settimeout(self.server.write_timeout)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers:
            self.send_header(name, value)
        if close or self._body_unread:
            self.send_header("Connection", "close")
            self._linger = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """The transport's own refusals (bad request line, oversized headers, ambiguous
        framing) as JSON: the status's phrase, and what was wrong."""
        try:
            phrase = HTTPStatus(code).phrase.lower()
        except ValueError:
            phrase = "error"
        self._reply(code, {"error": f"{phrase}: {message}" if message else phrase}, close=True)

    # --- logging: never the query string, a credential's secret or a header ---

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        status = int(code) if str(code).isdigit() else 0
        level = (logging.WARNING if status >= 500 else
                 logging.INFO if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN)
                 else logging.DEBUG)
        log.log(level, "HTTP %s %s -> %s (from %s)", self.command or "-",
                redact_path(getattr(self, "path", "") or ""), status, self.client_address[0])

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):
            log.info("HTTP connection from %s dropped: no complete request within %g s",
                     self.client_address[0], self.server.request_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP connection from %s: %s", self.client_address[0], format)


class TextBody(str):
    """A request body that is the message itself (text/plain), told apart from a JSON
    string, which is not a message object."""


def unknown_keys(item: Dict[str, Any], known: Tuple[str, ...]) -> str:
    """What is wrong with keys of ``item`` outside ``known`` ("" when there are none): a
    misspelt ``tll`` must not queue a message that never expires."""
    unknown = sorted(key for key in item if key not in known)
    if not unknown:
        return ""
    return (f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(a message has {', '.join(known)})")


def batch_item_problem(item: Any) -> str:
    """Why ``item`` does not have the shape of a batch item ("" when it does)."""
    if not isinstance(item, dict):
        return "must be a JSON object"
    unknown = unknown_keys(item, BATCH_ITEM_KEYS)
    if unknown:
        return unknown
    client_id = item.get("client_id")
    if isinstance(client_id, bool) or not isinstance(client_id, (int, str)):
        return "client_id must be a number or a string"
    if isinstance(client_id, int) and client_id < 1:
        return "client_id must be at least 1"
    if not isinstance(item.get("body"), str):
        return "body must be a string"
    try:
        check_ttl(item.get("ttl"))
    except BodyRejected as exc:
        return str(exc)
    return ""


def submitted(message_id: Optional[int]) -> Tuple[int, Dict[str, Any]]:
    """The answer to a message that was stored: queued (201) or a duplicate (200)."""
    if message_id is None:
        return HTTPStatus.OK, {"status": "duplicate"}
    metrics.MESSAGES_QUEUED.inc()
    return HTTPStatus.CREATED, {"id": message_id, "status": "pending"}


def open_http_api(settings: ServerSettings, storage: Storage, wake_here: WakeHere,
                  listening: Callable[[], bool], status: Callable[[], Dict[str, Any]],
                  adopt: websocket.Adopt) -> HttpApi:
    """Bind the HTTP API (OSError when the port is taken); ``start()`` it when ready.

    Its Enqueuer uses the server's storage and wakes clients connected to this
    server in-process; routed or broadcast mode and the pending cap come from
    NIKI_PEERS and NIKI_MAX_PENDING, as for ``enqueue``.
    """
    enqueuer = Enqueuer(settings.db, storage=storage, wake_here=wake_here)
    try:
        return HttpApi(settings.http_host, settings.resolved_http_port or 0,
                       ApiBackend(storage, enqueuer, listening, status, adopt,
                                  tuple(o.strip() for o in settings.ws_origins.split(",") if o.strip())),
                       settings.api_token,
                       request_timeout=settings.handshake_timeout,
                       write_timeout=settings.write_timeout)
    except BaseException:
        enqueuer.close()
        raise
