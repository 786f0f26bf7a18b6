"""Addresses in the settings: which hosts are this machine, the HTTP API's exposure rule,
the networks exempt from the identify throttle, and its defaults.

Configuration's own vocabulary, so that reading the settings needs none of the server's
modules (the server's throttle and HTTP port import these from here).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import List, Optional, Tuple, Union

from messaging_server.errors import ConfigurationError

# Failed identifications one address may make at once, and again per minute.
# A legitimate client fails only when its row is gone (a database restored from
# an older backup, a switch away from --legacy-ids): once, then it keeps the new
# credential.  30 at once and one per 2 s lets a NAT full of such phones through
# within minutes, while a guesser gets 43,200 a day instead of 579 a second.
FAILED_IDENTIFICATIONS_PER_MINUTE = 30
# New clients (NONE and failed identifications) one address may cause at once,
# and again per minute.  Fresh installs behind one carrier NAT address come a
# few a minute; 120 at once covers a room of phones installing together, and
# 2 a second afterwards bounds the rows a stranger adds to 172,800 a day.
NEW_CLIENTS_PER_MINUTE = 120
# Never throttled: a local TLS terminator or proxy, and the machine's own tools,
# connect from here.  127.0.0.2 and the like are not exempt (tests use them).
DEFAULT_EXEMPT = "127.0.0.1,::1"
NO_EXEMPT = "none"
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

def parse_exempt(text: str) -> Tuple[Network, ...]:
    """``127.0.0.1,::1,10.0.0.0/8`` (addresses or networks) or ``none``; ValueError if bad."""
    if text.strip().lower() == NO_EXEMPT:
        return ()
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or network") from None
    return tuple(networks)


# The names that mean "this machine" without asking a resolver.
LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) reaches only this machine.

    A name counts only if every address it resolves to is loopback; an empty
    host, a wildcard (``0.0.0.0``, ``::``) or a name that does not resolve never does.
    """
    host = host.strip().strip("[]")
    if not host:
        return False
    literal = literal_loopback(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(address.split("%", 1)[0]).is_loopback for address in addresses)


def check_exposure(http_host: str, api_token: str) -> None:
    """ConfigurationError when the API would be reachable from elsewhere without a token."""
    if api_token or is_loopback(http_host):
        return
    shown = http_host or "all interfaces"
    raise ConfigurationError(
        f"the HTTP API would listen on {shown}, which is not a loopback address, without "
        "an API token: anyone who reaches it could queue messages for every client. Set "
        "--api-token (NIKI_API_TOKEN), or keep --http-host on 127.0.0.1 or ::1")


def literal_loopback(host: str) -> Optional[bool]:
    """Whether ``host`` is a loopback name or address as written; None when it is some
    other name (only a resolver could tell)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None


Address = Tuple[str, int]


def parse_peers(text: str) -> List[Address]:
    """``host:port,host:port`` -> addresses; ConfigurationError when malformed."""
    peers: List[Address] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigurationError(f"peer {item!r} is not host:port")
        peers.append((host.strip("[]"), int(port)))
    return peers
