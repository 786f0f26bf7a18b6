"""Admission: how many client connections a server holds, in all and per address.

Each connection costs a thread and a descriptor, so the caps bound what a
stranger can make the server hold.  The accepting thread asks :meth:`enter`
before any thread exists for the connection; the handler calls :meth:`leave`
when it ends.
"""

from __future__ import annotations

import resource
import threading
from typing import Dict

# Descriptors kept back from client connections: listening and wake-up
# sockets, the database pool, log files, the listener's wake-up pair.
RESERVED_FILES = 128


def same_address(address: str) -> str:
    """One spelling per address: a dual-stack client port sees an IPv4 peer as
    ``::ffff:a.b.c.d``, the HTTP port (and so a WebSocket) as ``a.b.c.d``."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class Admission:
    def __init__(self, max_total: int, max_per_address: int = 0) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address  # 0: no per-address cap
        self.refused = 0
        self._total = 0
        self._by_address: Dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, address: str) -> str:
        """Count a new connection from ``address`` in; "" if admitted, else why not."""
        address = same_address(address)
        with self._lock:
            if self._total >= self.max_total:
                self.refused += 1
                return "server busy"
            held = self._by_address.get(address, 0)
            if self.max_per_address and held >= self.max_per_address:
                self.refused += 1
                return "server busy: too many connections from your address"
            self._total += 1
            self._by_address[address] = held + 1
            return ""

    def leave(self, address: str) -> None:
        address = same_address(address)
        with self._lock:
            self._total -= 1
            held = self._by_address.pop(address, 0) - 1
            if held > 0:
                self._by_address[address] = held

    @property
    def active(self) -> int:
        with self._lock:
            return self._total


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def connection_cap(requested: int) -> int:
    """``requested``, lowered to what the open-file limit leaves for clients."""
    return max(1, min(requested, raise_open_file_limit() - RESERVED_FILES))
