"""A client's credential kept in a file of its own, readable by its owner only.

``niki-client`` keeps the credential the server handed out here, so that the
next run is the same client.  The file is private (0600 in a 0700 directory)
and replaced atomically (a temporary file, fsync, rename, fsync of the
directory), so that a crash never leaves half a credential behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from messaging_server.errors import NikiError
from messaging_server.protocol.credentials import parse_credential
from messaging_server.protocol.lines import MAX_CLIENT_ID

CREDENTIAL_DIR_MODE = 0o700
CREDENTIAL_FILE_MODE = 0o600


class CredentialFileError(NikiError):
    """The credential file cannot be read, holds no credential, or cannot be written."""


def default_credential_path(host: str, port: int, environ: Mapping[str, str] = os.environ,
                            name: str = "") -> Path:
    """``$XDG_CONFIG_HOME/niki/credential-HOST-PORT`` (``~/.config`` when unset or relative,
    as the XDG base directory specification says), ``-NAME`` added for a named subscriber.
    Every spelling of this machine (``localhost``, ``127.0.0.1``, ``[::1]``) is one host,
    so that it is one client of its server."""
    config = environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path(environ.get("HOME") or Path.home()) / ".config"
    host = host.strip("[]").lower()
    if _loopback(host):
        host = "localhost"
    safe_host = "".join(c if c.isalnum() or c in ".-_:" else "_" for c in host)
    suffix = "".join(c if c.isalnum() or c in ".-_" else "_" for c in name)
    return base / "niki" / (f"credential-{safe_host}-{port}" + (f"-{suffix}" if suffix else ""))


def _loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CredentialFile:
    """One credential in a file of its own, readable by its owner only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def prepare(self) -> None:
        """Create the missing directories (0700) and check that the file can be written,
        before the server hands out a credential that could not be kept."""
        missing = []
        directory = self.path.parent
        while not directory.exists() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        try:
            for created in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    created.mkdir(mode=CREDENTIAL_DIR_MODE)
                os.chmod(created, CREDENTIAL_DIR_MODE)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise CredentialFileError(f"cannot create {exc.filename or self.path.parent}: "
                                      f"{exc.strerror or exc}") from exc
        if not self.path.parent.is_dir():
            raise CredentialFileError(f"cannot write the credential file {self.path}: "
                                      f"{self.path.parent} is not a directory")
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise CredentialFileError(f"cannot write the credential file {self.path}: "
                                      f"{self.path.parent} is not writable")

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the file for this process (a lock file beside it) while the block runs.
        Two subscribers on one credential take each other over forever, each
        reconnecting as the other is closed: the second refuses to start instead."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, CREDENTIAL_FILE_MODE)
        except OSError as exc:
            raise CredentialFileError(f"cannot open {lock_path}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                raise CredentialFileError(
                    f"{self.path} is in use by another niki-client (pid {holder}): two clients "
                    "on one credential would take each other over forever; give this one its "
                    "own --name (or --credential-file)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def load(self) -> Optional[str]:
        """The stored credential; None when there is none yet (no file, or an empty one)."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CredentialFileError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        if not text:
            return None
        if parse_credential(text, MAX_CLIENT_ID) is None:
            raise CredentialFileError(f"{self.path} does not hold a Niki credential (<id>.<secret>); "
                                      "remove it to register as a new client")
        return text

    def store(self, credential: str) -> None:
        """Replace the file atomically: a temporary file in the same directory, then rename."""
        directory = self.path.parent
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise CredentialFileError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                os.fchmod(handle.fileno(), CREDENTIAL_FILE_MODE)
                handle.write(credential + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise CredentialFileError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):  # make the rename itself survive a power cut
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
