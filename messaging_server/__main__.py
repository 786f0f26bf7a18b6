"""``python -m messaging_server``: parse the settings and run a server.

``python -m messaging_server admin ...`` runs the administration tool instead
(the same as ``niki-admin ...``), so that a host with only the package and no
console scripts on its PATH still has it.  ``--print-config`` prints the
effective settings and exits without opening the database or any port.

Exit status: 0 after SIGINT or SIGTERM (or --print-config), 2 for a bad
option, environment variable, config file or database URL, 1 when the
database, the ports or the TLS files are unusable.

With ``--workers`` above 1 this process is the supervisor of that many server
processes (see workers.py); each is started as ``python -m messaging_server
worker I READY_FD SUPERVISOR_PID ...``, an internal form nobody else should use.
The statuses above hold for the whole: a worker that cannot start stops the
others, and the supervisor exits with its status.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from messaging_server.config.settings import (
    DEFAULT_DB,
    DEFAULT_DB_PATH,
    ServerSettings,
    configured_peers,
    default_workers,
    describe_effective,
    effective_settings,
)
from messaging_server.errors import NikiError
from messaging_server.server.logs import LOGGER, configure_logging
from messaging_server.server.workers import (
    WORKER_COMMAND,
    Supervisor,
    die_with_supervisor,
    plan_ports,
    report_ready,
)
from messaging_server.storage import describe_url, open_storage

EXIT_OK, EXIT_ERROR, EXIT_BAD_SETTINGS = 0, 1, 2
ADMIN_COMMAND = "admin"
PROG = "messaging_server"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [ADMIN_COMMAND]:
        return _run_admin(argv[1:])
    worker: Optional[Tuple[int, int, int]] = None  # index, ready pipe, supervisor's pid
    if argv[:1] == [WORKER_COMMAND]:
        worker, argv = (int(argv[1]), int(argv[2]), int(argv[3])), argv[4:]
    try:
        effective = effective_settings(argv)
    except NikiError as exc:  # logging is not set up yet: its format is one of the settings
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if effective.print_config:
        sys.stdout.write(describe_effective(effective))
        return EXIT_OK
    settings = effective.settings
    # `kill -USR1 <pid>` (a worker's or the supervisor's) writes every thread's stack to
    # the log (stderr): how to see where a stuck server waits, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    count = 1 if worker is not None else settings.workers or default_workers(settings.db)
    tag = f"w{worker[0]}" if worker is not None else "supervisor" if count > 1 else ""
    configure_logging(settings.verbose, settings.log_format, tag=tag)
    if worker is not None:
        die_with_supervisor(worker[2])
    # This process's own enqueueing (the HTTP API) reads NIKI_PEERS / NIKI_MAX_PENDING; a
    # value from the file is one the environment left unset or empty, so it goes in as is.
    os.environ.update(effective.enqueue_environ())
    fail = _reporter(settings.log_format)
    from messaging_server.server.core import run
    from messaging_server.server.tls import server_context

    if settings.tls_cert:  # unusable files are found before anything is created
        try:
            server_context(settings.tls_cert, settings.tls_key)
        except NikiError as exc:
            return fail(EXIT_ERROR, str(exc))
    try:
        if settings.db == DEFAULT_DB:  # the per-user data directory: made on first use
            _make_data_dir(os.path.dirname(DEFAULT_DB_PATH))
        storage = open_storage(settings.db, pool_size=settings.pool_size, create=True)
        logging.getLogger(LOGGER).info("database %s", describe_url(settings.db))
        if worker is None:  # a worker's supervisor has done it
            storage.create_schema()
    except NikiError as exc:
        return fail(EXIT_BAD_SETTINGS if isinstance(exc, ValueError) else EXIT_ERROR, str(exc))
    if count > 1:
        storage.close()
        return _supervise(settings, argv, count, fail)
    ready = None if worker is None else worker[1]
    try:
        run(settings, storage, reuse_port=worker is not None,
            on_ready=None if ready is None else lambda server: report_ready(ready, server.server_id))
    except OSError as exc:  # the port is taken, or not ours to bind
        return fail(EXIT_ERROR, f"cannot listen: {exc}")
    except NikiError as exc:  # the database went away while starting
        return fail(EXIT_ERROR, str(exc))
    finally:
        storage.close()
    return EXIT_OK


def _make_data_dir(path: str) -> None:
    """Create the default database's directory, readable by its user only."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise NikiError(f"cannot create the data directory {path} for the default "
                                 f"database: {exc.strerror or exc} (choose another with --db)") from None


def _supervise(settings: ServerSettings, argv: List[str], count: int,
               fail: Callable[[int, str], int]) -> int:
    """Run ``count`` worker processes on the client port until SIGINT or SIGTERM."""
    try:
        ports = plan_ports(settings, count)
    except OSError as exc:  # the port is taken, or not ours to bind
        return fail(EXIT_ERROR, f"cannot listen: {exc}")
    _check_peers(ports.events)
    logging.getLogger(LOGGER).info("starting %d workers (--workers %s)", count,
                                   settings.workers or "default for this machine and database")
    return Supervisor(settings, argv, count, ports).run()


def _check_peers(event_ports: Sequence[int]) -> None:
    """Warn when broadcast mode (NIKI_PEERS) leaves a worker's wake-up port out: that
    worker's clients would get their messages at the next sweep instead of at once."""
    try:
        peers = configured_peers()
    except NikiError:
        return  # the HTTP API's Enqueuer reports it
    if not peers:
        return
    listed = {port for _, port in peers}
    missing = [f"w{index} (port {port})" for index, port in enumerate(event_ports)
               if port not in listed]
    if missing:
        logging.getLogger(LOGGER).warning(
            "broadcast mode: NIKI_PEERS does not name the wake-up port of %s; messages for "
            "their clients wait for a sweep. List every worker's port, or use routed mode "
            "(no NIKI_PEERS)", ", ".join(missing))


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
        from messaging_server.tools.admin import main as admin_main
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.admin":
            raise
        print(f"{PROG}: the admin tool is not part of this installation", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    return admin_main(argv)


if __name__ == "__main__":
    sys.exit(main())
