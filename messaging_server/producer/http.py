"""Queue messages through a server's HTTP API: no database credentials, no UDP.

:class:`HttpEnqueuer` has the calls of :class:`~messaging_server.producer.enqueuer.Enqueuer`
(``enqueue``, ``submit``, ``enqueue_many``, ``submit_many``) with the same results and
errors, so that ``niki-enqueue --url http://push1:8002`` (or ``NIKI_URL``) and an
application can publish as ``mosquitto_pub`` or ``curl`` would, by talking to a server.
The server applies ``enqueue``'s rules and wakes the client's server itself.

HTTP answers map to the library's errors: 404 UnknownClient; 413 and 422 BodyRejected;
429 QueueFull; 503, and a server that cannot be reached, StorageUnavailable; 500
StorageFault; 401 and 403 AccessDenied.  A request whose answer was lost (the connection
broke after it was sent) is not sent again: the message may have been queued, and the
caller hears StorageUnavailable, as with a lost COMMIT.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from messaging_server.config import settings
from messaging_server.errors import (
    AccessDenied,
    BodyRejected,
    ConfigurationError,
    NikiError,
    QueueFull,
    StorageFault,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.producer.enqueuer import (
    ClientId,
    Item,
    Submitted,
    check_body,
    check_ttl,
    client_id_of,
    unpack_item,
)

# Messages per request: the API's own limit (http_api.MAX_HTTP_BATCH).
MAX_HTTP_BATCH = 100
# Connecting and each answer; a server answers in milliseconds.
TIMEOUT_S = 30.0


class HttpEnqueuer:
    """Queues messages through the HTTP API at ``url`` (``http://host:port``), with the
    bearer ``token`` when the server requires one.  Thread-safe (one request at a time
    over one kept-alive connection); ``close()`` it when done."""

    max_batch = MAX_HTTP_BATCH

    def __init__(self, url: str, token: Optional[str] = None, *,
                 max_body_bytes: int = settings.MAX_BODY_BYTES, timeout: float = TIMEOUT_S) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"{url!r}: expected http://host:port (the server's HTTP API)")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"{url!r}: the port must be a number from 1 to 65535") from None
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = port or (443 if parts.scheme == "https" else 80)
        self._https = parts.scheme == "https"
        self._prefix = parts.path.rstrip("/")
        self._token = token or ""
        self.max_body_bytes = max_body_bytes
        self._timeout = timeout
        self._connection: Optional[http.client.HTTPConnection] = None
        self._lock = threading.Lock()

    # --- the Enqueuer calls ---

    def enqueue(self, client_id: ClientId, body: Union[str, bytes], *,
                ttl: Optional[float] = None) -> bool:
        """Queue ``body`` for ``client_id``; False when it duplicates one from the last 5 s."""
        return self.submit(client_id, body, ttl=ttl) is not None

    def submit(self, client_id: ClientId, body: Union[str, bytes], *,
               ttl: Optional[float] = None) -> Optional[int]:
        """As :meth:`enqueue`, but the new message's id (None for a duplicate)."""
        numeric_id = client_id_of(client_id)
        text = check_body(body, self.max_body_bytes)
        check_ttl(ttl)
        payload: Dict[str, Any] = {"body": text}
        if ttl is not None:
            payload["ttl"] = ttl
        status, answer = self._post(f"/v1/clients/{numeric_id}/messages", payload)
        return _submitted(status, answer)

    def enqueue_many(self, items: Iterable[Item], *,
                     ttl: Optional[float] = None) -> List[Union[bool, NikiError]]:
        return [outcome if isinstance(outcome, NikiError) else outcome is not None
                for outcome in self.submit_many(items, ttl=ttl)]

    def submit_many(self, items: Iterable[Item], *, ttl: Optional[float] = None) -> List[Submitted]:
        """As Enqueuer.submit_many, in one request (at most ``max_batch`` items):
        StorageUnavailable means nothing of the call was stored."""
        items = list(items)
        if len(items) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} messages per request, not {len(items)}")
        check_ttl(ttl)
        results: List[Submitted] = [None] * len(items)
        sent: List[Dict[str, Any]] = []
        positions: List[int] = []
        for position, item in enumerate(items):
            try:
                client_id, body, item_ttl = unpack_item(item)
                entry: Dict[str, Any] = {"client_id": client_id,
                                         "body": check_body(body, self.max_body_bytes)}
                if item_ttl is not None or ttl is not None:
                    entry["ttl"] = ttl if item_ttl is None else item_ttl
                sent.append(entry)
                positions.append(position)
            except NikiError as exc:
                results[position] = exc
        if sent:
            status, answer = self._post("/v1/messages", {"messages": sent})
            if status != 200:
                raise _error(status, answer)
            for position, result in zip(positions, answer.get("results", [])):
                code = int(result.get("code", 0))
                results[position] = (_submitted(code, result) if code in (200, 201)
                                     else _error(code, result))
        return results

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> HttpEnqueuer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- HTTP ---

    def _post(self, path: str, payload: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        with self._lock:
            connection = self._open()
            try:
                connection.request("POST", self._prefix + path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except http.client.BadStatusLine as exc:  # an answer, but not HTTP: nothing queued
                self._drop()
                raise StorageUnavailable(
                    f"{self.url} does not answer HTTP (it said {str(exc).strip()[:40]!r}); is it the "
                    "HTTP API's port (the client port + 2, 8002 by default)?") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise StorageUnavailable(f"{self.url}: no answer ({exc or type(exc).__name__}); the "
                                         "message may or may not have been queued") from exc
            if response.will_close:
                self._drop()
        try:
            answer = json.loads(data.decode("utf-8")) if data else {}
        except ValueError:
            answer = {"error": data[:200].decode("utf-8", "replace")}
        return response.status, answer if isinstance(answer, dict) else {}

    def _open(self) -> http.client.HTTPConnection:
        """The kept-alive connection, if the server has not closed it meanwhile (a look at
        its socket, no round trip), else a new one; StorageUnavailable when none opens."""
        connection = self._connection
        if connection is not None and connection.sock is not None:
            poller = select.poll()  # not select(): an application may hold fds past 1024
            poller.register(connection.sock, select.POLLIN)
            if not poller.poll(0):
                return connection
        self._drop()
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self._timeout)
        try:
            connection.connect()
        except OSError as exc:
            raise StorageUnavailable(f"cannot reach the server's HTTP API at {self.url}: "
                                     f"{exc.strerror or exc}") from exc
        self._connection = connection
        return connection

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _submitted(status: int, answer: Dict[str, Any]) -> Optional[int]:
    """A queued message's id (201), None for a duplicate (200); the error otherwise."""
    if status == 201:
        return int(answer["id"])
    if status == 200 and answer.get("status") == "duplicate":
        return None
    raise _error(status, answer)


ERRORS: Sequence[Tuple[Tuple[int, ...], type]] = (
    ((404,), UnknownClient), ((413, 422), BodyRejected), ((429,), QueueFull),
    ((401, 403), AccessDenied), ((500,), StorageFault),
)


def _error(status: int, answer: Dict[str, Any]) -> NikiError:
    """The library's error for an HTTP refusal."""
    message = str(answer.get("error") or f"HTTP {status}")
    for statuses, kind in ERRORS:
        if status in statuses:
            if kind is AccessDenied:
                message += " (set NIKI_API_TOKEN to the server's --api-token)"
            return kind(message)
    return StorageUnavailable(f"HTTP {status}: {message}")
