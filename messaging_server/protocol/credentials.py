"""Client credentials: ``<id>.<secret>``, so that knowing an id is not enough.

The seed handed out small sequential ids, and anyone who typed ``3000`` got
client 3000's messages.  Niki hands out the id, a dot and a random secret of
144 bits (:data:`SECRET_BYTES`); the database keeps only the secret's SHA-256,
and a presented secret is checked in constant time.  A fast hash is enough
here: the secret is random and long, so there is nothing to brute-force from
a stolen hash, unlike a person's password.

No I/O: the protocol parses credentials with :func:`parse_credential`, the
server decides with :func:`accepts`, storage keeps the hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Optional

# 18 random bytes: 144 bits, 24 URL-safe characters (letters, digits, ``-``, ``_``),
# easy to paste into telnet and never containing the ``.`` separator.
SECRET_BYTES = 18
# A presented secret longer than this is not one of ours; do not hash megabytes.
MAX_SECRET_CHARS = 128
SEPARATOR = "."

_SECRET_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SECRET_CHARS}}}")


@dataclass(frozen=True)
class Credential:
    """What a client presents: its numeric id and, unless it is a bare id, a secret."""

    client_id: int
    secret: Optional[str] = None

    def __str__(self) -> str:
        if self.secret is None:
            return str(self.client_id)
        return f"{self.client_id}{SEPARATOR}{self.secret}"


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def parse_credential(text: str, max_client_id: int) -> Optional[Credential]:
    """``<id>`` or ``<id>.<secret>``; None when ``text`` is neither."""
    head, dot, secret = text.partition(SEPARATOR)
    if not head.isascii() or not head.isdigit():
        return None
    client_id = int(head)
    if not 0 < client_id <= max_client_id:
        return None
    if not dot:
        return Credential(client_id)
    if not _SECRET_RE.fullmatch(secret):
        return None
    return Credential(client_id, secret)


def redact(text: str) -> str:
    """``text`` with whatever follows the first dot hidden: fit for logs and error
    messages, even when it is a real credential with a stray character."""
    head, dot, _ = text.partition(SEPARATOR)
    return f"{head}{dot}***" if dot else text


def accepts(presented: Optional[str], stored_hash: Optional[bytes], legacy_ids: bool) -> bool:
    """May a client presenting ``presented`` (None: a bare id) take this client over?

    By default only with the right secret.  With ``legacy_ids`` (closed networks,
    the seed's behaviour) a bare id is enough, and so is any secret for a client
    created without one; a wrong secret for a client that has one never is.
    """
    if presented is None or stored_hash is None:
        return legacy_ids
    return hmac.compare_digest(hash_secret(presented), stored_hash)
