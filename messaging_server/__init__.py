"""Niki: a durable push-messaging server.

App backends queue short messages with :func:`enqueue`; clients holding a TCP
connection to a server receive them at once, or as soon as they reconnect.

    >>> import messaging_server
    >>> messaging_server.enqueue(3000, "hello client")   # doctest: +SKIP
    True
"""

from messaging_server.errors import (
    AccessDenied,
    BodyRejected,
    ConfigurationError,
    NikiError,
    QueueFull,
    StorageError,
    StorageFault,
    StorageUnavailable,
    UnknownClient,
)
from messaging_server.producer.enqueuer import Enqueuer, enqueue, enqueue_many
from messaging_server.producer.http import HttpEnqueuer
from messaging_server.version import __version__

__all__ = [
    "AccessDenied",
    "BodyRejected",
    "ConfigurationError",
    "Enqueuer",
    "HttpEnqueuer",
    "NikiError",
    "QueueFull",
    "StorageError",
    "StorageFault",
    "StorageUnavailable",
    "UnknownClient",
    "__version__",
    "enqueue",
    "enqueue_many",
]
