"""``--workers N``: N server processes on one client port, and the supervisor that runs them.

One Python process serves handshakes on one core (the GIL).  With N above 1,
``python -m messaging_server`` becomes a small supervisor that starts N worker
processes.  Each worker is a complete server in the cluster sense (its own
``servers`` row, its own clients, its own wake-up port), exactly as if N servers
shared the database; they differ from separate servers only in sharing the
client port: each binds it with ``SO_REUSEPORT`` and the kernel spreads new
connections over their listening sockets.

Ports, for worker i (0-based):

* clients: the one ``--port`` for all (TLS, if set, on it as always);
* wake-ups (UDP): the event port + i (the event port defaults to the client
  port + 1; 0, or client port 0 without ``--event-port``: a free port each);
* HTTP API (unless ``--http-port 0``): the HTTP port + i (a free port each when the
  client port is 0).  Each worker's API is complete (any worker can queue for any
  client) and its ``/metrics`` and ``/healthz`` describe that worker: scrape every
  worker.

The supervisor checks the ports (binding each, without ``SO_REUSEPORT``, so that
a port someone else holds fails here with the usual message and status 1),
resolves port 0 to a real port, lets go, and starts each worker as
``python -m messaging_server worker I READY_FD SUPERVISOR_PID <the same
arguments> -p PORT --event-port E --http-port H --workers 1``.  A fresh
interpreter (not ``fork``: the supervisor may hold threads and a database pool;
not ``multiprocessing``: nothing needs pickling, and ``ps`` shows what each
process is) that resolves the same settings from the same command line,
environment and config file, with its ports fixed.  The worker writes its
server id to the READY_FD pipe once it is registered and listening.

The supervisor has one thread.  It waits for every worker to be ready; one that
exits before (a port taken meanwhile, the database gone) stops them all and the
supervisor exits with that worker's status, as a single server would.  Later, a
worker that dies is restarted after a back-off (0.5 s, doubling to 30 s; back to
0.5 s once a worker has run a minute), and its ``servers`` row is deleted at once
so that its clients, which reconnect to the other workers, are not held by a
dead owner (its restart, at the same wake-up address, would delete it anyway).
SIGTERM or SIGINT: each worker gets SIGTERM and shuts down as a single server
does; the supervisor exits 0 once all have exited.  Workers ask the kernel for
SIGTERM should the supervisor die (``PR_SET_PDEATHSIG``), so none is orphaned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from messaging_server.backoff import ExponentialBackoff
from messaging_server.config.settings import ServerSettings
from messaging_server.errors import NikiError, port_error

log = logging.getLogger("messaging_server")

WORKER_COMMAND = "worker"
READY_FD = "READY_FD"  # in a worker's command line until the pipe exists
# A worker that dies is restarted after this, doubling per death in a row up to the cap.
RESTART_BASE_S, RESTART_CAP_S = 0.5, 30.0
# A worker that ran this long before dying starts the back-off afresh.
STABLE_S = 60.0
# How often the supervisor looks at its workers between signals.
POLL_S = 0.2
# How long the workers have to shut down before they are killed.
STOP_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Ports:
    """Where the workers listen: the shared client port and each worker's own ports."""

    client: int
    events: Sequence[int]
    http: Sequence[Optional[int]]


def plan_ports(settings: ServerSettings, count: int) -> Ports:
    """Bind every port the workers will use once (port 0: a free one), then let go.

    Raises OSError for a port that is taken (or out of range), before any worker starts.
    """
    base_event = settings.resolved_event_port
    probes: List[socket.socket] = []
    try:
        client = _probe(probes, socket.SOCK_STREAM, settings.host, settings.port, dual=True,
                        what="client port (TCP)")
        events = [_probe(probes, socket.SOCK_DGRAM, settings.host,
                         base_event + i if base_event else 0, dual=True,
                         what=f"wake-up port (UDP) of worker {i}") for i in range(count)]
        http: List[Optional[int]] = [None] * count
        base_http = settings.resolved_http_port
        if base_http is not None:
            http = [_probe(probes, socket.SOCK_STREAM, settings.http_host,
                           base_http + i if base_http else 0, dual=False,
                           what=f"HTTP API port (TCP) of worker {i}") for i in range(count)]
        return Ports(client, events, http)
    finally:
        for probe in probes:  # all open until the end: no two free ports alike
            probe.close()


def _probe(probes: List[socket.socket], kind: int, host: str, port: int, dual: bool,
           what: str) -> int:
    """Bind ``host``:``port`` as the server will (dual-stack for "" where ``dual``); its port."""
    if port > 65535:
        raise OSError(f"port {port} is out of range (a worker's port is the base port + its index)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if dual and not host and socket.has_dualstack_ipv6():
        family, host = socket.AF_INET6, "::"
    sock = socket.socket(family, kind)
    probes.append(sock)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise port_error(exc, what, host, port) from exc
    return sock.getsockname()[1]


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    command: List[str]  # with READY_FD where the pipe's descriptor goes
    proc: Optional[subprocess.Popen] = None
    ready_fd: Optional[int] = None  # the read end of its ready pipe, until it reported
    ready: bool = False
    server_id: int = 0
    started: float = 0.0
    restart_at: Optional[float] = None
    backoff: ExponentialBackoff = field(default_factory=lambda: ExponentialBackoff(
        RESTART_BASE_S, RESTART_CAP_S, uniform=lambda _low, high: high))

    @property
    def name(self) -> str:
        return f"w{self.index}"

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        command = [str(write_fd) if arg == READY_FD else arg for arg in self.command]
        try:
            self.proc = subprocess.Popen(command, pass_fds=(write_fd,), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.ready_fd, self.ready, self.server_id = read_fd, False, 0
        self.started, self.restart_at = time.monotonic(), None
        log.info("started worker %s (pid %d)", self.name, self.proc.pid)

    def read_ready(self) -> None:
        """Take the worker's "ready" line (its server id) if it has written it."""
        if self.ready_fd is None:
            return
        try:
            data = os.read(self.ready_fd, 64)
        except BlockingIOError:
            return
        if data.strip().isdigit():
            self.server_id, self.ready = int(data), True
        self.close_pipe()  # the line, or end of file: nothing more will come

    def close_pipe(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


def describe_status(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit status {status}"


class Supervisor:
    """Starts the workers, restarts those that die, stops them all on SIGTERM or SIGINT."""

    def __init__(self, settings: ServerSettings, argv: Sequence[str], count: int,
                 ports: Ports) -> None:
        self.settings = settings
        self.ports = ports
        self.stopping: Optional[int] = None  # the signal that asked us to stop
        self.workers = []
        for index in range(count):
            command = [sys.executable, "-m", "messaging_server", WORKER_COMMAND, str(index),
                       READY_FD, str(os.getpid()), *argv, "-p", str(ports.client),
                       "--event-port", str(ports.events[index]), "--workers", "1"]
            command += ["--http-port", str(ports.http[index] or 0)]  # 0: no API
            self.workers.append(Worker(index, command))
        self._wake_r, self._wake_w = os.pipe()  # a signal's write wakes the wait at once
        os.set_blocking(self._wake_w, False)

    def run(self) -> int:
        """Serve until a signal; the exit status (a worker's, if one could not start)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = self._start_all()
            if failed is not None:
                return failed
            log.info("%d workers serving clients on port %d", len(self.workers),
                     self.ports.client)
            self._watch()
            return 0
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = signum
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _wait(self, timeout: float) -> None:
        """Sleep until a ready line, a signal or ``timeout``."""
        fds = [self._wake_r] + [w.ready_fd for w in self.workers if w.ready_fd is not None]
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(fds, [], [], timeout)
            if self._wake_r in readable:
                os.read(self._wake_r, 64)
        for worker in self.workers:
            worker.read_ready()

    def _start_all(self) -> Optional[int]:
        """Start every worker and wait until each is ready; a status if one could not start."""
        for worker in self.workers:
            worker.start()
        while self.stopping is None:
            for worker in self.workers:
                assert worker.proc is not None
                status = worker.proc.poll()
                if status is not None and not worker.ready:
                    log.error("worker %s could not start (%s): stopping", worker.name,
                              describe_status(status))
                    return status if status > 0 else 1
            if all(worker.ready for worker in self.workers):
                return None
            self._wait(POLL_S)
        return 0

    def _watch(self) -> None:
        while self.stopping is None:
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._restart(worker)
                    continue
                assert worker.proc is not None
                status = worker.proc.poll()
                if status is not None:
                    self._died(worker, status, now)
            self._wait(POLL_S)
        log.info("received %s: stopping the workers", signal.Signals(self.stopping).name)

    def _restart(self, worker: Worker) -> None:
        try:
            worker.start()
        except OSError as exc:
            delay = worker.backoff.next_delay()
            log.error("cannot start worker %s: %s; trying again in %.1f s", worker.name, exc, delay)
            worker.restart_at = time.monotonic() + delay

    def _died(self, worker: Worker, status: int, now: float) -> None:
        worker.read_ready()
        worker.close_pipe()
        if now - worker.started >= STABLE_S:
            worker.backoff.reset()
        delay = worker.backoff.next_delay()
        assert worker.proc is not None
        log.error("worker %s (pid %d) died (%s); restarting it in %.1f s", worker.name,
                  worker.proc.pid, describe_status(status), delay)
        worker.restart_at = now + delay
        if worker.server_id:
            self._forget(worker.server_id)

    def _forget(self, server_id: int) -> None:
        """Delete a dead worker's servers row, freeing its clients and their leases."""
        from messaging_server.storage import open_storage

        try:
            storage = open_storage(self.settings.db, pool_size=1)
            try:
                storage.unregister_server(server_id)
            finally:
                storage.close()
            log.info("forgot server %d (a dead worker's) and its clients' ownership", server_id)
        except NikiError as exc:  # its restart, at the same wake-up address, forgets it anyway
            log.warning("could not forget server %d now (its restart will): %s", server_id, exc)

    def _stop_all(self) -> None:
        """SIGTERM every running worker; wait for each (SIGKILL after STOP_TIMEOUT_S)."""
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for worker in running:
            assert worker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in running:
            assert worker.proc is not None
            try:
                status = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %s did not stop within %g s: killing it", worker.name,
                          STOP_TIMEOUT_S)
                worker.proc.kill()
                status = worker.proc.wait()
            if status != 0:
                log.warning("worker %s stopped with %s", worker.name, describe_status(status))
        for worker in self.workers:
            worker.close_pipe()
        if running:
            log.info("all workers stopped")


def die_with_supervisor(supervisor_pid: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies; if it already has, stop now."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def report_ready(ready_fd: int, server_id: int) -> None:
    """Tell the supervisor this worker is registered and listening."""
    try:
        os.write(ready_fd, f"{server_id}\n".encode())
    finally:
        os.close(ready_fd)
