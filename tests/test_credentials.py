"""messaging_server.protocol.credentials on its own: parsing, the accept rule, secrets and their hash.

Pure functions, no I/O: every rule the server applies to an id line is pinned
here once, so the end-to-end tests only need to show that the server uses them.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from typing import Optional

import pytest

from messaging_server.protocol.credentials import (
    MAX_SECRET_CHARS,
    SECRET_BYTES,
    Credential,
    accepts,
    hash_secret,
    new_secret,
    parse_credential,
    redact,
)
from messaging_server.protocol.lines import MAX_CLIENT_ID

SECRET_RE = re.compile(r"[A-Za-z0-9_-]{24}")
A_SECRET = "MdufLjyIAtCe6pLYshv_KtXR"


def short(value: object) -> str:
    """Readable test ids for long parameters."""
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:20]}...({len(text)} chars)"


# --- parse_credential -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Credential(1)),
        ("42", Credential(42)),
        ("0042", Credential(42)),  # leading zeros allowed, as for bare ids
        (str(MAX_CLIENT_ID), Credential(MAX_CLIENT_ID)),
        (f"42.{A_SECRET}", Credential(42, A_SECRET)),
        ("42.a", Credential(42, "a")),  # any length from 1: only the server's hash says "right"
        ("42.-_", Credential(42, "-_")),
        ("42." + "z" * MAX_SECRET_CHARS, Credential(42, "z" * MAX_SECRET_CHARS)),
        (f"{MAX_CLIENT_ID}.x", Credential(MAX_CLIENT_ID, "x")),
    ],
    ids=short,
)
def test_parse_accepts(text: str, expected: Credential) -> None:
    assert parse_credential(text, MAX_CLIENT_ID) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", ".", "42.", ".abc", "42..abc", "42.a.b", "42.a b", " 42.abc", "42.abc ", "42.abc\n",
        "42.ab+c", "42.ab/c", "42.abc=", "42.ab%27", "42.ab'c", "42.\u00e9", "42.\uff41",
        "42." + "a" * (MAX_SECRET_CHARS + 1), "42." + "a" * 200,
        "0", "0.abc", "-1", "-1.abc", "+1.abc", "1e3.abc", "abc", "abc.def", "NONE", "NONE.abc",
        "\u0664\u0662.abc",  # ARABIC-INDIC digits: isdigit() is True, but not ASCII
        "\uff14\uff12",  # FULLWIDTH 42
        str(MAX_CLIENT_ID + 1), f"{MAX_CLIENT_ID + 1}.abc",
        "1; DROP TABLE clients; --", "1' OR '1'='1", "1.x' OR '1'='1", "1.' UNION SELECT 1 --",
    ],
    ids=short,
)
def test_parse_rejects(text: str) -> None:
    assert parse_credential(text, MAX_CLIENT_ID) is None


def test_parse_respects_max_client_id() -> None:
    assert parse_credential("10.abc", 10) == Credential(10, "abc")
    assert parse_credential("11.abc", 10) is None
    assert parse_credential("11", 10) is None


# --- Credential -------------------------------------------------------------------


def test_str_of_credential() -> None:
    assert str(Credential(42)) == "42"
    assert str(Credential(42, A_SECRET)) == f"42.{A_SECRET}"
    assert str(Credential(MAX_CLIENT_ID, "x")) == f"{MAX_CLIENT_ID}.x"


def test_str_round_trips_through_parse() -> None:
    """What the server sends after SET_CLIENT_ID: parses back to the same credential."""
    for client_id in (1, 7, 3000, MAX_CLIENT_ID):
        for secret in (None, new_secret(), new_secret()):
            credential = Credential(client_id, secret)
            assert parse_credential(str(credential), MAX_CLIENT_ID) == credential


# --- new_secret -------------------------------------------------------------------


def test_secret_shape() -> None:
    """24 URL-safe characters (easy to paste into telnet, no dot), decoding to 18 random bytes."""
    assert SECRET_BYTES * 8 >= 128
    for _ in range(200):
        secret = new_secret()
        assert SECRET_RE.fullmatch(secret), secret
        assert "." not in secret
        assert len(base64.urlsafe_b64decode(secret)) == SECRET_BYTES
        assert parse_credential(f"5.{secret}", MAX_CLIENT_ID) == Credential(5, secret)


def test_secrets_are_random() -> None:
    """Never repeated, and every position takes many values: not a counter, a clock or a constant."""
    secrets = [new_secret() for _ in range(2000)]
    assert len(set(secrets)) == len(secrets)
    for position in range(24):
        values = Counter(s[position] for s in secrets)
        # 2000 draws from 64 symbols: each position shows nearly all of them, none dominates.
        assert len(values) >= 48, (position, values)
        assert values.most_common(1)[0][1] < 120, (position, values.most_common(3))


# --- hash_secret ------------------------------------------------------------------


def test_hash_secret_is_sha256() -> None:
    digest = hash_secret(A_SECRET)
    assert digest == hashlib.sha256(A_SECRET.encode("ascii")).digest()
    assert isinstance(digest, bytes) and len(digest) == 32
    assert A_SECRET.encode() not in digest
    assert hash_secret(A_SECRET) == digest  # deterministic: the stored hash can be checked
    assert hash_secret(A_SECRET[:-1] + "Y") != digest
    assert hash_secret(A_SECRET.lower()) != digest  # secrets are case-sensitive


# --- accepts ----------------------------------------------------------------------

RIGHT = hash_secret(A_SECRET)


@pytest.mark.parametrize(
    ("presented", "stored", "legacy", "expected"),
    [
        # Default: only the right secret.
        (A_SECRET, RIGHT, False, True),
        ("wrong", RIGHT, False, False),
        (A_SECRET.lower(), RIGHT, False, False),
        (A_SECRET + "x", RIGHT, False, False),
        (A_SECRET[:-1], RIGHT, False, False),
        (None, RIGHT, False, False),  # a bare id for a client with a secret
        (None, None, False, False),  # a bare id for a client without one (legacy or older Niki)
        ("anything", None, False, False),  # a secret for a client that has none
        # --legacy-ids: bare ids for everyone, any secret for a client without one,
        # but never a wrong secret for a client that has one.
        (A_SECRET, RIGHT, True, True),
        ("wrong", RIGHT, True, False),
        (A_SECRET.lower(), RIGHT, True, False),
        (None, RIGHT, True, True),
        (None, None, True, True),
        ("anything", None, True, True),
    ],
    ids=short,
)
def test_accepts_truth_table(presented: Optional[str], stored: Optional[bytes], legacy: bool,
                             expected: bool) -> None:
    assert accepts(presented, stored, legacy) is expected


def test_accepts_a_fresh_secret_against_its_own_hash_only() -> None:
    mine, other = new_secret(), new_secret()
    assert accepts(mine, hash_secret(mine), legacy_ids=False) is True
    assert accepts(other, hash_secret(mine), legacy_ids=False) is False
    assert accepts(other, hash_secret(mine), legacy_ids=True) is False


@pytest.mark.parametrize("text, shown", [
    ("5.abcdefghijklmnopqrstuvwx", "5.***"),
    ("5.abcdefghijklmnopqrstuvwx'", "5.***"),
    ("\ufeff5.secret", "\ufeff5.***"),
    ("42", "42"),
    ("NONE", "NONE"),
    (".secret", ".***"),
])
def test_redact_hides_everything_after_the_first_dot(text: str, shown: str) -> None:
    assert redact(text) == shown
