"""The database hosts of a MySQL URL, and which one is in use.

``mysql://user:pw@host1:3306,host2:3306,host3/niki`` names the nodes of one
MariaDB Galera cluster (the multi-host form libpq and MongoDB use).  Every
connection goes to the host in use, the first at start; when a connection to it
cannot be opened, or the node says it is out of the cluster (``wsrep_ready``
OFF: a non-primary component, or still joining), the next host in the list is
tried, and the first that works becomes the host in use.  Connections to a host
no longer in use leave the pool as they are next borrowed.  Moving is logged
once per move.  A single-host URL behaves as one host always did.
"""

from __future__ import annotations

import logging
import threading
from typing import List, Sequence, Tuple

from messaging_server.errors import ConfigurationError

log = logging.getLogger("messaging_server.storage")

DEFAULT_PORT = 3306

Address = Tuple[str, int]


def parse_hosts(hostlist: str, url_for_errors: str) -> List[Address]:
    """``host[:port]`` items separated by commas (``[v6 address]:port`` too), in order.

    Raises ConfigurationError naming the URL (password masked by the caller) for an
    empty item, a port that is not a number from 1 to 65535, or a repeated host."""
    hosts: List[Address] = []
    for item in hostlist.split(","):
        item = item.strip()
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ConfigurationError(f"{url_for_errors!r}: cannot read the host {item!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise ConfigurationError(f"{url_for_errors!r}: expected mysql://user:password@host:port/dbname "
                                     "(several hosts separated by commas)")
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigurationError(f"{url_for_errors!r}: the port must be a number from 1 to 65535")
            port = int(port_text)
        elif ":" in item and not item.startswith("["):
            raise ConfigurationError(f"{url_for_errors!r}: the port must be a number from 1 to 65535")
        else:
            port = DEFAULT_PORT
        if (host, port) in hosts:
            raise ConfigurationError(f"{url_for_errors!r}: {host}:{port} is named twice")
        hosts.append((host, port))
    return hosts


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HostList:
    """The hosts in order, and the one in use (thread-safe)."""

    def __init__(self, hosts: Sequence[Address], database: str) -> None:
        if not hosts:
            raise ValueError("at least one host")
        self.hosts: Tuple[Address, ...] = tuple(hosts)
        self._database = database
        self._current = 0
        self._lock = threading.Lock()

    @property
    def several(self) -> bool:
        return len(self.hosts) > 1

    @property
    def current(self) -> Address:
        with self._lock:
            return self.hosts[self._current]

    def in_order(self) -> List[Address]:
        """Every host, the one in use first, then the ones after it (wrapping round)."""
        with self._lock:
            start = self._current
        return [self.hosts[(start + i) % len(self.hosts)] for i in range(len(self.hosts))]

    def use(self, address: Address, why: str) -> None:
        """Make ``address`` the host in use (a connection to it worked after the one in
        use failed for ``why``); logged once per move."""
        with self._lock:
            previous = self.hosts[self._current]
            if previous == address:
                return
            self._current = self.hosts.index(address)
        log.warning("database %r: moved from %s to %s (%s)", self._database,
                    format_address(previous), format_address(address), why)

    def describe(self) -> str:
        return ",".join(format_address(address) for address in self.hosts)
