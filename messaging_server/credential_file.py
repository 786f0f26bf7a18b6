"""A client's credential kept in a file of its own, readable by its owner only.

``niki-client`` keeps the credential the server handed out here, so that the
next run is the same client.  The file is private (0600 in a 0700 directory)
and replaced atomically (a temporary file, fsync, rename, fsync of the
directory), so that a crash never leaves half a credential behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional

from .credentials import parse_credential
from .errors import NikiError
from .protocol import MAX_CLIENT_ID

CREDENTIAL_DIR_MODE = 0o700
CREDENTIAL_FILE_MODE = 0o600


class CredentialFileError(NikiError):
    """The credential file cannot be read, holds no credential, or cannot be written."""


def default_credential_path(host: str, port: int, environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CONFIG_HOME/niki/credential-HOST-PORT`` (``~/.config`` when unset or relative,
    as the XDG base directory specification says)."""
    config = environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path(environ.get("HOME") or Path.home()) / ".config"
    safe_host = "".join(c if c.isalnum() or c in ".-_:" else "_" for c in host.lower())
    return base / "niki" / f"credential-{safe_host}-{port}"


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
