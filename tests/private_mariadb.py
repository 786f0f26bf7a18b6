"""A MariaDB server of the test's own, for tests that need a database to stop or die.

A test may stop only a server it started.  ``PrivateMariaDB`` runs ``mariadbd`` on a
free port of 127.0.0.1 with its data directory and socket in a temporary directory,
and stops, kills or restarts only that process, by its PID; the machine's MariaDB is
never touched.  Root connects with an empty password over TCP, as on the machine's
server, so ``url`` works wherever ``NIKI_TEST_MYSQL_URL`` would.

``mariadb-install-db`` takes about 0.8 s (4 s on a busy machine); ``template_datadir``
runs it once per cache directory (once per test session, shared by the xdist workers)
and each instance copies the result (0.1 s), then starts in about 0.2 s.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import pymysql

# /usr/sbin is not on every user's PATH; Debian puts mariadbd there.
MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db")
# mariadb-install-db takes 0.8 s on an idle machine, 4 s on a busy one.
INSTALL_TIMEOUT = 120.0
# Starting takes about 0.2 s here (crash recovery after a kill -9 a little more); the
# deadline leaves room for a loaded machine running the suite on two workers.
START_TIMEOUT = 30.0
# A graceful shutdown of a small, idle server takes well under a second.
STOP_TIMEOUT = 30.0
# The smallest sizes that keep a start fast and the memory low (the defaults, 128 MiB
# of buffer pool and a 96 MiB redo log, make every copied data directory 114 MiB).
SIZE_OPTIONS = ("--innodb-buffer-pool-size=16M", "--innodb-log-file-size=4M")
TEMPLATE_NAME = "mariadb-template"


def missing_tools() -> Optional[str]:
    """Why a private MariaDB cannot be started here, or None when it can."""
    missing = [name for name, path in (("mariadbd", MARIADBD), ("mariadb-install-db", INSTALL_DB))
               if path is None]
    return f"{' and '.join(missing)} not found (Debian: apt-get install mariadb-server)" if missing else None


def _user_options() -> List[str]:
    """mariadbd refuses to run as root unless told to; as anyone else it runs as them."""
    return ["--user=root"] if os.geteuid() == 0 else []


def template_datadir(cache_root: Path) -> Path:
    """An initialised data directory under ``cache_root``, created by the first caller.

    xdist workers share ``cache_root``: a file lock makes the others wait for the first
    one's install instead of running their own, and the install goes to a staging
    directory renamed into place, so an interrupted one leaves no half-made template.
    """
    target = cache_root / TEMPLATE_NAME
    with open(cache_root / f"{TEMPLATE_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _install(target)
    return target


def _install(target: Path) -> None:
    if INSTALL_DB is None:
        raise RuntimeError(missing_tools())
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMPLATE_NAME}.", dir=target.parent))
    try:
        datadir = staging / "data"
        result = subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", *_user_options(), *SIZE_OPTIONS],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        datadir.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateMariaDB:
    """``mariadbd`` in a temporary directory on a free port; use as a context manager.

    ``stop()`` shuts it down gracefully (SIGTERM to its PID), ``kill()`` sends SIGKILL,
    ``start()`` brings it back on the same port and data directory; ``close()`` (or
    leaving the ``with`` block) kills it if still running and removes the directory.
    """

    def __init__(self, template: Path, database: str = "niki_test") -> None:
        self.template = template
        self.database = database
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.workdir: Optional[Path] = None

    @property
    def url(self) -> str:
        """A URL to ``database`` on this server (the code under test creates it)."""
        return f"mysql://root@127.0.0.1:{self.port}/{self.database}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def error_log(self) -> str:
        assert self.workdir is not None
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connect(self, timeout: float = 1.0) -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               connect_timeout=timeout, autocommit=True)

    def _answers(self) -> bool:
        try:
            self.connect().close()
            return True
        except pymysql.err.MySQLError:
            return False

    def start(self) -> PrivateMariaDB:
        """Start the server (the first time: copy the template to a new directory, pick
        a port) and return once it answers; fail with its error log if it exits or does
        not answer within START_TIMEOUT."""
        assert not self.running, "already running"
        assert MARIADBD is not None, missing_tools()
        if self.workdir is None:
            # Under /tmp, not pytest's deeper tmp_path: a socket path is limited to 107 bytes.
            self.workdir = Path(tempfile.mkdtemp(prefix="niki-mariadb-"))
            shutil.copytree(self.template, self.workdir / "data", symlinks=True)
            self.port = free_port()
        cmd = [MARIADBD, "--no-defaults", f"--datadir={self.workdir / 'data'}", f"--port={self.port}",
               f"--socket={self.workdir / 's.sock'}", "--bind-address=127.0.0.1",
               f"--pid-file={self.workdir / 'mariadbd.pid'}", f"--log-error={self.workdir / 'error.log'}",
               *_user_options(), *SIZE_OPTIONS]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}:\n{self.error_log}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mariadbd did not answer within {START_TIMEOUT} s:\n{self.error_log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM to the PID we started); returns once it has exited."""
        self._signal(signal.SIGTERM, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the server dies with no shutdown at all, as in a crash."""
        self._signal(signal.SIGKILL, STOP_TIMEOUT)

    def _signal(self, sig: int, timeout: float) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise RuntimeError(f"mariadbd did not exit within {timeout} s of {sig!r}:\n"
                               f"{self.error_log}") from None

    def close(self) -> None:
        """Stop the server if it runs (killed: its data is thrown away) and remove its directory."""
        self.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PrivateMariaDB:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()
