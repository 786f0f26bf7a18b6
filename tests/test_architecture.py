"""The package's layout and import directions, checked from the source (no import is run).

The sub-packages name the programs: ``protocol`` (pure), ``storage``, ``server`` (the
daemon, with ``server.http``), ``producer`` (the application side), ``client`` (the SDK
and niki-client), ``tools`` (niki-enqueue, niki-admin) and ``config``.  The directions:

* the protocol imports nothing of the package but itself, and no socket, thread,
  selector or database module;
* the storage imports nothing of the package but its errors;
* the configuration never reaches the server;
* the application library, the client SDK and the tools never reach the server's
  modules, even through another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "messaging_server"
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


def under(prefix: str) -> Set[str]:
    return {m for m in MODULES if m == prefix or m.startswith(prefix + ".")}


SERVER = under("messaging_server.server")


def test_the_sub_packages_name_the_programs() -> None:
    top = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert {"protocol", "storage", "server", "producer", "client", "tools", "config"} <= top
    assert under("messaging_server.server.http")


def test_the_protocol_is_pure() -> None:
    for module in under("messaging_server.protocol"):
        assert reach(module) <= under("messaging_server.protocol"), module
        assert not direct_imports(module) & IMPURE, module


def test_the_storage_imports_only_its_errors() -> None:
    for module in under("messaging_server.storage"):
        outside = reach(module) - under("messaging_server.storage")
        assert outside <= {"messaging_server.errors"}, (module, outside)


@pytest.mark.parametrize("prefix", ["messaging_server.config", "messaging_server.producer",
                                    "messaging_server.client", "messaging_server.tools"])
def test_none_of_them_reaches_the_server(prefix: str) -> None:
    for module in under(prefix):
        assert not reach(module) & SERVER, (module, reach(module) & SERVER)


def test_the_check_sees_imports() -> None:
    """The checker itself: the server does reach the protocol and the storage."""
    assert {"messaging_server.protocol.lines", "messaging_server.storage"} <= \
        reach("messaging_server.server.core")


def test_an_application_loads_none_of_the_servers_libraries() -> None:
    """Importing the public API (and the client SDK) loads neither the server's libraries
    (prometheus-client, wsproto) nor the tools' (tqdm), nor a database driver before a
    database is opened."""
    probe = ("import sys, messaging_server\n"
             "from messaging_server import enqueue, Enqueuer, HttpEnqueuer\n"
             "from messaging_server.client import Client\n"
             "print(sorted(m for m in ('prometheus_client', 'tqdm', 'wsproto', 'pymysql')"
             " if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
