"""The wake-up datagrams' codec, pure: bytes in, ids or a carried message out, and back.

Two kinds, both ASCII-framed::

    NIKI1 <id>[,<id>…]
    NIKI2 <tag> <client id> <session> <message id> <previous id> <queued ms>\n<body>

``NIKI1`` names client ids only: a lost, forged or repeated one can cause nothing worse
than a delivery check.  ``NIKI2`` *carries* one message, signed: ``tag`` is an
HMAC-SHA256 (first 16 bytes, hex) of everything after it, under the database's wake-up
key.  The transport (sending, receiving, coalescing) is ``messaging_server.wakeup``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Iterable, List, Optional

from messaging_server.protocol.lines import parse_client_id

MAGIC = b"NIKI1 "
CARRY_MAGIC = b"NIKI2 "
TAG_HEX = 32  # the HMAC's first 16 bytes, in hex
# Keep every datagram under the smallest common path MTU so it is never
# fragmented (a lost fragment loses the whole datagram).
MAX_DATAGRAM = 1200


def encode(client_ids: Iterable[int]) -> List[bytes]:
    """Datagrams naming ``client_ids``, each at most MAX_DATAGRAM bytes."""
    datagrams: List[bytes] = []
    current = bytearray(MAGIC)
    for client_id in client_ids:
        item = str(int(client_id)).encode("ascii")
        extra = len(item) + (0 if len(current) == len(MAGIC) else 1)
        if len(current) + extra > MAX_DATAGRAM:
            datagrams.append(bytes(current))
            current = bytearray(MAGIC)
            extra = len(item)
        if len(current) > len(MAGIC):
            current += b","
        current += item
    if len(current) > len(MAGIC):
        datagrams.append(bytes(current))
    return datagrams


def decode(datagram: bytes) -> List[int]:
    """The client ids in ``datagram``; ValueError when it is not a wake-up."""
    if not datagram.startswith(MAGIC) or len(datagram) > MAX_DATAGRAM:
        raise ValueError("not a wake-up datagram")
    ids: List[int] = []
    for item in datagram[len(MAGIC):].split(b","):
        client_id = parse_client_id(item.decode("ascii", errors="replace"))
        if client_id is None or not item.isdigit():
            raise ValueError(f"bad client id {item!r} in wake-up datagram")
        ids.append(client_id)
    return ids


@dataclass(frozen=True)
class Carried:
    """A message carried by a wake-up, as its owner server needs it to write it."""

    client_id: int
    session: int  # the client's session when the message was stored
    message_id: int
    previous: int  # the client's newest pending message before it; 0: none
    queued_at: float  # the producer's clock when it sent the wake-up (for latency)
    body: str


def _tag(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()[:TAG_HEX].encode("ascii")


def encode_carried(key: bytes, message: Carried) -> Optional[bytes]:
    """The signed datagram carrying ``message``; None when it would pass MAX_DATAGRAM."""
    head = (f"{message.client_id} {message.session} {message.message_id} {message.previous} "
            f"{int(message.queued_at * 1000)}").encode("ascii")
    payload = head + b"\n" + message.body.encode("utf-8")
    if len(CARRY_MAGIC) + TAG_HEX + 1 + len(payload) > MAX_DATAGRAM:
        return None
    return CARRY_MAGIC + _tag(key, payload) + b" " + payload


def decode_carried(key: Optional[bytes], datagram: bytes) -> Carried:
    """The message ``datagram`` carries; ValueError when it is malformed or not signed
    with ``key`` (None: this server accepts no carried messages)."""
    if not datagram.startswith(CARRY_MAGIC) or len(datagram) > MAX_DATAGRAM:
        raise ValueError("not a carried wake-up")
    if key is None:
        raise ValueError("carried wake-up, but no wake-up key is known here")
    start = len(CARRY_MAGIC)
    tag, payload = datagram[start:start + TAG_HEX], datagram[start + TAG_HEX + 1:]
    if datagram[start + TAG_HEX:start + TAG_HEX + 1] != b" " or \
            not hmac.compare_digest(tag, _tag(key, payload)):
        raise ValueError("carried wake-up with a wrong signature")
    head, newline, body = payload.partition(b"\n")
    fields = head.split(b" ")
    if not newline or len(fields) != 5 or not all(f.isdigit() and len(f) <= 20 for f in fields):
        raise ValueError("malformed carried wake-up")
    client_id, session, message_id, previous, queued_ms = (int(f) for f in fields)
    return Carried(client_id, session, message_id, previous, queued_ms / 1000,
                   body.decode("utf-8"))


