"""The exceptions Niki raises to its callers.

One base class, :class:`NikiError`, and a few subclasses a caller can act on,
in the manner of PyMySQL's ``err.py``: catch ``NikiError`` for "anything went
wrong", or a subclass to react to one situation.  Driver errors (PyMySQL,
sqlite3) are mapped to these at the storage boundary and never leak out.
"""

from __future__ import annotations


class NikiError(Exception):
    """Base class of every error Niki raises on purpose."""


class UnknownClient(NikiError):
    """The client id does not name a client the server ever handed out."""


class BodyRejected(NikiError, ValueError):
    """The message cannot be queued as given: its body cannot be carried by the line
    protocol (empty, newline, too long), its ttl is out of range, or an enqueue_many
    item is not a (client_id, body[, ttl]) tuple."""


class QueueFull(NikiError):
    """The client already has the maximum number of pending messages; nothing was queued."""


class StorageError(NikiError):
    """The database failed an operation: one of the two below."""


class StorageUnavailable(StorageError):
    """The database cannot be used now (unreachable, gone away, busy, locked, read-only,
    out of space, no connection free in time): trying again later may work.

    For ``enqueue`` this means the message was not queued, except in the one
    case no client can tell apart: the reply to a COMMIT that succeeded was lost.
    """


class StorageFault(StorageError):
    """The database refused an operation, and trying again will not help: a statement it
    rejects (a bug in Niki) or a schema that does not match this version.  Nothing of the
    operation was stored.  Never retried: the HTTP API answers 500 and logs the traceback,
    niki-enqueue exits with status 5."""


class AccessDenied(StorageError):
    """A server's HTTP API refused the caller (HTTP 401 or 403: no token, a wrong one, or
    a request it serves to its own machine only).  Nothing was queued."""


class ConfigurationError(NikiError, ValueError):
    """A setting (database URL, peer list, port) is malformed."""


def port_error(exc: OSError, what: str, host: str, port: int) -> OSError:
    """A bind's ``exc`` that names the port and what it is for ("Address already in use"
    alone does not say which of a server's three ports is taken)."""
    where = f"port {port}" if host in ("", "::", "0.0.0.0") else \
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    error = OSError(f"cannot bind the {what}, {where}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


__all__ = [
    "AccessDenied",
    "BodyRejected",
    "ConfigurationError",
    "NikiError",
    "QueueFull",
    "StorageError",
    "StorageFault",
    "StorageUnavailable",
    "UnknownClient",
]
