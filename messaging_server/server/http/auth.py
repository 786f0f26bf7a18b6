"""Who may use the HTTP API: the bearer token, and where the API may listen without one.

The HTTP API queues messages for any client and reads every receipt, so it
is as powerful as the database credentials.  Without ``--api-token`` it is
only allowed on a loopback address, where only this machine can reach it;
with a token, every request but ``/healthz`` must carry it.

Two browser-borne attacks reach a loopback API from a web page the operator
visits: a cross-site form post and DNS rebinding.  The first is stopped by
the API's ``Content-Type: application/json`` requirement (a browser must ask
before sending that cross-site, and the API never says yes); the second by
:func:`loopback_host_header`, which turns away a request whose ``Host`` is
not this machine when no token protects the API.

No I/O beyond name resolution: the API server asks, this module answers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Optional

from messaging_server.config.addresses import literal_loopback

SCHEME = "Bearer"
class BearerToken:
    """Checks ``Authorization: Bearer <token>`` headers against the configured token."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode("utf-8")

    @property
    def required(self) -> bool:
        return bool(self._expected)

    def accepts(self, authorization: Optional[str]) -> bool:
        """True when no token is configured, or the header carries exactly it.

        Compared in constant time, so that the response time does not tell
        how much of a guess was right.
        """
        if not self._expected:
            return True
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        # Header values arrive decoded as Latin-1: these are the bytes sent.
        raw = presented.strip().encode("latin-1", errors="replace")
        if scheme.lower() == "basic":
            # A browser opening the status page asks for a user name and password: the
            # token is the password (any user name).
            try:
                raw = base64.b64decode(raw, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != SCHEME.lower():
            return False
        return hmac.compare_digest(raw, self._expected)


def loopback_host_header(host_header: Optional[str]) -> bool:
    """True when a ``Host`` header names this machine (or is absent, as in HTTP/1.0).

    Only the literal loopback names and addresses count; no resolver is asked,
    since a rebinding attacker controls what its own name resolves to.
    """
    if host_header is None:
        return True
    host = host_header.strip()
    if host.startswith("["):  # [::1]:8080
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # 127.0.0.1:8080, localhost:8080
        host = host.partition(":")[0]
    return bool(literal_loopback(host))


def cross_site(origin: Optional[str], host_header: Optional[str],
               fetch_site: Optional[str]) -> bool:
    """True when a browser says the request comes from a page of another site: an
    ``Origin`` that is not this API's own (``http(s)://`` + its Host), or
    ``Sec-Fetch-Site: cross-site``.  A page may send a text body cross-site without asking
    first (no preflight), and a browser on the server's machine reaches its loopback API,
    so such requests are refused whatever they carry.  Programs (curl, SDKs) send
    neither header."""
    if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
        return True
    if origin is None:
        return False
    own = (host_header or "").strip().lower()
    return origin.strip().lower() not in (f"http://{own}", f"https://{own}")
