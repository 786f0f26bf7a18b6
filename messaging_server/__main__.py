"""``python -m messaging_server``: parse the settings and run a server."""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from .errors import NikiError
from .settings import server_settings
from .storage import describe_url, open_storage


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[List[str]] = None) -> int:
    from .server import run

    try:
        settings = server_settings(argv)
        configure_logging(settings.verbose)
        storage = open_storage(settings.db, pool_size=settings.pool_size, create=True)
        logging.getLogger("messaging_server").info("database %s", describe_url(settings.db))
        storage.create_schema()
    except NikiError as exc:
        print(f"messaging_server: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    try:
        run(settings, storage)
    except OSError as exc:  # the port is taken, or not ours to bind
        print(f"messaging_server: cannot listen: {exc}", file=sys.stderr)
        return 1
    except NikiError as exc:  # the database went away while starting
        print(f"messaging_server: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
