"""A small blocking WebSocket client for the tests (wsproto's client side): one line per
text frame, as a browser running clients/js/niki.js sends and receives them."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import List, Optional, Tuple

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WsRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"WebSocket refused with HTTP {status}")
        self.status = status


class WsClient:
    def __init__(self, port: int, origin: Optional[str] = None, timeout: float = 10.0,
                 path: str = "/v1/ws", host: Optional[str] = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.ws = WSConnection(ConnectionType.CLIENT)
        headers: List[Tuple[bytes, bytes]] = [(b"Origin", origin.encode())] if origin else []
        self.sock.sendall(self.ws.send(Request(host=host or f"127.0.0.1:{port}", target=path,
                                               extra_headers=headers)))
        self.lines: List[str] = []
        self.closed: Optional[int] = None  # the close code, once closed
        self._partial: List[str] = []
        deadline = time.monotonic() + timeout
        while True:
            events = self._events(deadline)
            for index, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    # Frames that came in the same read as the 101 are the first lines.
                    self._take(events[index + 1:])
                    return
                if isinstance(event, (RejectConnection, RejectData)):
                    self.sock.close()
                    raise WsRefused(getattr(event, "status_code", 0))

    def _events(self, deadline: float):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no WebSocket event within the timeout")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return []
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def send_line(self, line: str, finished: bool = True) -> None:
        """One text frame (``finished`` False: a fragment, more of the message follows)."""
        self.sock.sendall(self.ws.send(TextMessage(data=line, message_finished=finished)))

    def read_line(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next line (text frame); None once the server closed the WebSocket."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.lines:
            if self.closed is not None:
                return None
            self._take(self._events(deadline))
        return self.lines.pop(0)

    def _take(self, events: List[object]) -> None:
        for event in events:
            if isinstance(event, TextMessage):
                self._partial.append(event.data)
                if event.message_finished:
                    self.lines.append("".join(self._partial))
                    self._partial = []
            elif isinstance(event, CloseConnection):
                self.closed = event.code
                with contextlib.suppress(Exception):  # the server may be gone already
                    self.sock.sendall(self.ws.send(event.response()))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            if self.closed is None:
                self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.sock.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
