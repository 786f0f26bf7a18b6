"""Storage: one interface (:class:`Storage`) and its SQLite and MySQL implementations.

:func:`open_storage` turns a database URL into a storage object; nothing else
in Niki knows which database it has.

URLs::

    sqlite:///relative/path.sqlite3      sqlite:////absolute/path.sqlite3
    mysql://user:password@host:3306/dbname
    mysql://user:password@host1:3306,host2:3306,host3:3306/dbname   (a Galera cluster's nodes:
                                                                    see hosts.py)
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from messaging_server.errors import ConfigurationError
from messaging_server.storage.interface import Storage
from messaging_server.storage.records import Delivery, Queued, StoredMessage

__all__ = ["Delivery", "Queued", "Storage", "StoredMessage", "describe_url", "open_storage"]

DEFAULT_POOL_SIZE = 8


def open_storage(url: str, pool_size: int = DEFAULT_POOL_SIZE, create: bool = False) -> Storage:
    """A storage object for ``url``; ConfigurationError when the URL is malformed.

    ``create``: a SQLite file may be created (the server); otherwise it must exist.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
        if not path:
            raise ConfigurationError(f"{url!r}: expected sqlite:///path/to/file.sqlite3")
        from messaging_server.storage.sqlite import SqliteStorage

        return SqliteStorage(unquote(path), pool_size=pool_size, create=create)
    if scheme in ("mysql", "mysql+pymysql", "mariadb"):
        database = parts.path.lstrip("/")
        hostlist = parts.netloc.rpartition("@")[2]
        if not database or not hostlist:
            raise ConfigurationError(f"{describe_url(url)!r}: expected mysql://user:password@host:port/dbname")
        from messaging_server.storage.hosts import parse_hosts
        from messaging_server.storage.mysql import MysqlStorage

        return MysqlStorage(
            hosts=parse_hosts(hostlist, describe_url(url)),
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=unquote(database),
            pool_size=pool_size,
        )
    raise ConfigurationError(f"{url!r}: the database URL must start with sqlite:/// or mysql://")


def describe_url(url: str) -> str:
    """``url`` with any password masked, for logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
