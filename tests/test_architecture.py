"""The package's import directions, checked from the source (no import is executed):

* the protocol is pure: it imports nothing of the package but the credential format, and
  no socket, thread, selector or database module;
* the storage imports nothing of the package but its errors;
* the application library (enqueue, HttpEnqueuer) and the client SDK (Client,
  niki-client) never reach the server's modules, even through another module.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "messaging_server"
# The daemon: what neither an application that queues nor a client may pull in.
SERVER_MODULES = {f"messaging_server.{name}" for name in (
    "server", "connection", "commands", "delivery", "marks", "sweeper", "admission", "tls",
    "http_api", "http_server", "websocket", "activity", "workers", "metrics", "logs",
    "__main__", "admin")}
IMPURE = {"socket", "ssl", "threading", "_thread", "selectors", "select", "sqlite3", "pymysql",
          "subprocess", "asyncio"}


def module_files() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = module_files()


def direct_imports(name: str) -> Set[str]:
    """Every module ``name`` imports: the package's by full name, others by top level."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in MODULES else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m if m.startswith("messaging_server") else m.split(".")[0] for m in found}


def reach(name: str) -> Set[str]:
    """The package's modules ``name`` imports, directly or through others."""
    seen: Set[str] = set()
    todo = [name]
    while todo:
        for module in direct_imports(todo.pop()):
            if module in MODULES and module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_the_protocol_is_pure() -> None:
    assert reach("messaging_server.protocol") <= {"messaging_server.credentials"}
    for module in ("messaging_server.protocol", "messaging_server.credentials"):
        assert not direct_imports(module) & IMPURE, module


def test_the_storage_imports_only_its_errors() -> None:
    for module in [m for m in MODULES if m.startswith("messaging_server.storage")]:
        outside = {m for m in reach(module) if not m.startswith("messaging_server.storage")}
        assert outside <= {"messaging_server.errors"}, (module, outside)


@pytest.mark.parametrize("module", ["messaging_server.enqueue", "messaging_server.http_enqueuer",
                                    "messaging_server.client", "messaging_server.subscriber",
                                    "messaging_server.credential_file", "messaging_server.cli"])
def test_applications_and_clients_never_reach_the_server(module: str) -> None:
    assert not reach(module) & SERVER_MODULES, reach(module) & SERVER_MODULES


def test_the_check_sees_imports() -> None:
    """The checker itself: the server module does reach the protocol and the storage."""
    assert {"messaging_server.protocol", "messaging_server.storage"} <= reach("messaging_server.server")
