"""Wake-up datagrams: how ``enqueue`` tells servers that a client has new messages.

Two kinds, both ASCII-framed::

    NIKI1 <id>[,<id>…]
    NIKI2 <tag> <client id> <session> <message id> <previous id> <queued ms>\n<body>

``NIKI1`` names client ids only: a lost, forged or repeated one can cause
nothing worse than a delivery check, and the database stays the only source
of truth.  ``NIKI2`` *carries* one message, so that the server owning the
client's connection can write it without reading the database: it names the
client's session when the message was stored and the client's previous
pending message (0: none), which tell the owner whether its connection has
already written everything before it (see delivery.py).  Because such a
datagram becomes a line on a client's socket, it is signed: ``tag`` is an
HMAC-SHA256 (first 16 bytes, hex) of everything after it, under a key kept
in the database (:meth:`Storage.wakeup_key`), which only those who may read
every message anyway can learn.  A datagram with a wrong tag is dropped
after one HMAC over at most MAX_DATAGRAM bytes.

The codec is pure and lives in ``protocol/wakeups.py``.  :class:`WakeupSender` is what ``enqueue``
(and a server taking a client over) uses; :class:`WakeupListener` is what a
server's delivery thread reads, coalescing every datagram waiting in the
socket into one set of ids, plus the carried messages in arrival order, so
that a burst of wake-ups for one client costs one delivery pass.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from messaging_server.config.addresses import Address
from messaging_server.errors import port_error
from messaging_server.protocol.wakeups import (
    CARRY_MAGIC,
    MAX_DATAGRAM,
    Carried,
    decode,
    decode_carried,
    encode,
)

log = logging.getLogger(__name__)

# How long a resolved peer address is reused before it is looked up again.
RESOLVE_TTL_S = 60.0

class WakeupSender:
    """Sends wake-ups over UDP, best effort: a lost one is caught by the servers' sweeps.

    ``broadcast()`` wakes a fixed list of peers (the broadcast mode);
    ``send()`` wakes one server (the routed mode: the client's owner).
    Thread-safe.
    """

    def __init__(self, peers: Sequence[Address] = ()) -> None:
        self.peers = list(peers)
        self._sockets: Dict[int, socket.socket] = {}
        self._resolved: Dict[Address, Tuple[float, int, Optional[tuple]]] = {}
        self._lock = threading.Lock()

    def broadcast(self, client_ids: Iterable[int]) -> int:
        """Wake every peer; return the number of datagrams sent."""
        return self.broadcast_datagrams(encode(client_ids))

    def send(self, address: Address, client_ids: Iterable[int]) -> int:
        """Wake one server; return the number of datagrams sent."""
        return self.send_datagrams(address, encode(client_ids))

    def send_datagrams(self, address: Address, datagrams: Iterable[bytes]) -> int:
        """Send datagrams already encoded (the ids, or a carried message) to one server."""
        return sum(self._send(d, address[0], address[1]) for d in datagrams)

    def broadcast_datagrams(self, datagrams: Sequence[bytes]) -> int:
        """Send datagrams already encoded to every peer."""
        return sum(self._send(d, host, port) for host, port in self.peers for d in datagrams)

    def _send(self, datagram: bytes, host: str, port: int) -> int:
        try:
            family, address = self._resolve(host, port)
            with self._lock:
                sock = self._sockets.get(family)
                if sock is None:
                    sock = self._sockets[family] = socket.socket(family, socket.SOCK_DGRAM)
                sock.sendto(datagram, address)
            return 1
        except OSError as exc:  # the message is stored; a lost wake-up is survivable
            log.warning("wake-up to %s:%s failed: %s", host, port, exc)
            return 0

    def _resolve(self, host: str, port: int) -> Tuple[int, tuple]:
        """getaddrinfo, remembered for RESOLVE_TTL_S: routed wake-ups name hosts per message."""
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > now:
            if cached[2] is None:
                raise OSError(f"{host} did not resolve (cached)")
            return cached[1], cached[2]
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except OSError:
            # Remembered too: a name that does not resolve must not cost a
            # lookup after every commit.
            with self._lock:
                self._resolved[(host, port)] = (now + RESOLVE_TTL_S, 0, None)
            raise
        with self._lock:
            self._resolved[(host, port)] = (now + RESOLVE_TTL_S, family, address)
        return family, address

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> WakeupSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Datagrams coalesced into one set per receive(): plenty for a burst of real
# wake-ups, and a bound on the time and memory one call takes under a flood.
MAX_DATAGRAMS_PER_RECEIVE = 256
# The wake-up socket's receive buffer asked for, in bytes (see WakeupListener).
RECEIVE_BUFFER = 4 * 1024 * 1024


@dataclass
class Wakeups:
    """What one receive() took: client ids to check, and carried messages in arrival order."""

    ids: Set[int] = field(default_factory=set)
    carried: List[Carried] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ids or self.carried)

    def clients(self) -> Set[int]:
        """Every client named, by id or by a carried message."""
        return self.ids | {message.client_id for message in self.carried}


class WakeupListener:
    """A bound UDP socket that yields the waiting wake-ups.

    ``key``: the wake-up key that carried messages must be signed with (None:
    they are dropped as invalid).
    """

    def __init__(self, host: str, port: int,
                 max_per_receive: int = MAX_DATAGRAMS_PER_RECEIVE,
                 key: Optional[bytes] = None) -> None:
        """Bind ``host`` ("" = every interface, IPv4 and IPv6 where possible)."""
        self.max_per_receive = max_per_receive
        self.key = key
        # Datagrams taken, those that were not wake-ups, and client ids named again
        # within one receive() (merged into one); for metrics.  receive() runs
        # on one thread, the only one that writes them.
        self.received = self.invalid = self.merged = 0
        if not host and socket.has_dualstack_ipv6():
            self._sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = "::"
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
        # Room for a burst: a batch for 1,000 connected clients sends 1,000 carried
        # datagrams at once, and each takes about 1 KiB of the kernel's buffer whatever
        # its size.  The kernel caps the request at net.core.rmem_max.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise port_error(exc, "wake-up port (UDP)", host, port) from exc

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def receive(self, timeout: Optional[float]) -> Wakeups:
        """Wait up to ``timeout`` for a datagram, then take those waiting, up to
        ``max_per_receive``.

        The bound matters under a flood (forged datagrams, which anyone who can
        reach the port may send): draining until the socket is empty would never
        return, and what is taken would grow without limit.  The kernel drops
        what its receive buffer cannot hold; the sweep covers a lost wake-up.
        """
        taken = Wakeups()
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(MAX_DATAGRAM + 1)
        except (socket.timeout, OSError):
            return taken
        self._sock.setblocking(False)
        for _ in range(self.max_per_receive - 1):
            self._add(taken, data)
            try:
                data = self._sock.recv(MAX_DATAGRAM + 1)
            except OSError:  # BlockingIOError: nothing more waiting
                return taken
        self._add(taken, data)
        return taken

    def _add(self, taken: Wakeups, data: bytes) -> None:
        self.received += 1
        try:
            if data.startswith(CARRY_MAGIC):
                taken.carried.append(decode_carried(self.key, data))
                return
            named = decode(data)
        except ValueError as exc:
            self.invalid += 1
            log.debug("ignored datagram: %s", exc)
            return
        before = len(taken.ids)
        taken.ids.update(named)
        self.merged += len(named) - (len(taken.ids) - before)

    def close(self) -> None:
        self._sock.close()
