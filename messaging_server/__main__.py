"""``python -m messaging_server``: parse the settings and run a server.

``python -m messaging_server admin ...`` runs the administration tool instead
(the same as ``niki-admin ...``), so that a host with only the package and no
console scripts on its PATH still has it.  ``--print-config`` prints the
effective settings and exits without opening the database or any port.

Exit status: 0 after SIGINT or SIGTERM (or --print-config), 2 for a bad
option, environment variable, config file or database URL, 1 when the
database, the ports or the TLS files are unusable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, List, Optional

from .errors import NikiError
from .logs import LOGGER, configure_logging
from .settings import describe_effective, effective_settings
from .storage import describe_url, open_storage

EXIT_OK, EXIT_ERROR, EXIT_BAD_SETTINGS = 0, 1, 2
ADMIN_COMMAND = "admin"
PROG = "messaging_server"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [ADMIN_COMMAND]:
        return _run_admin(argv[1:])
    try:
        effective = effective_settings(argv)
    except NikiError as exc:  # logging is not set up yet: its format is one of the settings
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if effective.print_config:
        sys.stdout.write(describe_effective(effective))
        return EXIT_OK
    settings = effective.settings
    configure_logging(settings.verbose, settings.log_format)
    # This process's own enqueueing (the HTTP API) reads NIKI_PEERS / NIKI_MAX_PENDING; a
    # value from the file is one the environment left unset or empty, so it goes in as is.
    os.environ.update(effective.enqueue_environ())
    fail = _reporter(settings.log_format)
    from .server import run

    try:
        storage = open_storage(settings.db, pool_size=settings.pool_size, create=True)
        logging.getLogger(LOGGER).info("database %s", describe_url(settings.db))
        storage.create_schema()
    except NikiError as exc:
        return fail(EXIT_BAD_SETTINGS if isinstance(exc, ValueError) else EXIT_ERROR, str(exc))
    try:
        run(settings, storage)
    except OSError as exc:  # the port is taken, or not ours to bind
        return fail(EXIT_ERROR, f"cannot listen: {exc}")
    except NikiError as exc:  # the database went away while starting
        return fail(EXIT_ERROR, str(exc))
    finally:
        storage.close()
    return EXIT_OK


def _reporter(log_format: str) -> Callable[[int, str], int]:
    """How a fatal error is reported: a plain line as always, or a log record in JSON mode
    (where every line on stderr must be JSON)."""
    def fail(status: int, message: str) -> int:
        if log_format == "json":
            logging.getLogger(LOGGER).error(message)
        else:
            print(f"{PROG}: {message}", file=sys.stderr)
        return status
    return fail


def _run_admin(argv: List[str]) -> int:
    try:
        from .admin import main as admin_main
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.admin":
            raise
        print(f"{PROG}: the admin tool is not part of this installation", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    return admin_main(argv)


if __name__ == "__main__":
    sys.exit(main())
