"""A real server with JSON logs, and one configured by a file.

Settings are a database-independent concern, so these run on SQLite only.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import LISTENING_RE, ServerProcess, wait_until

pytestmark = pytest.mark.usefixtures("no_niki_environment")

ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_logs(sqlite_url):
    server = ServerProcess(sqlite_url, "--log-format", "json").start()
    try:
        with server.connect() as client:
            client.handshake()
        with server.connect() as client:  # a malformed id: a warning, a new client
            client.handshake("not-an-id")
        wait_until(lambda: server.log_contains("malformed client id"), message="the warning")
    finally:
        status = server.stop()
    assert status == 0, server.log
    entries = []
    for line in server.lines:
        entry = json.loads(line)  # every line on stderr is one JSON object
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert ISO_MS_UTC.match(entry["time"]), line
        entries.append(entry)
    messages = [entry["message"] for entry in entries]
    assert any(LISTENING_RE.search(message) for message in messages)
    assert {"INFO", "WARNING"} <= {entry["level"] for entry in entries}
    assert any(entry["level"] == "WARNING" and "malformed client id" in entry["message"]
               for entry in entries)
    assert messages[-1] == "stopped"
    assert all(entry["logger"].startswith("messaging_server") for entry in entries)


def test_server_reads_its_config_file(sqlite_url, tmp_path):
    """The file's values are used; the environment's NIKI_DB (set by ServerProcess) beats the file's."""
    config = tmp_path / "niki.ini"
    config.write_text("[niki]\n"
                      "# the environment's database wins over this one\n"
                      f"db = sqlite:///{tmp_path}/no/such/dir/x.sqlite3\n"
                      "legacy-ids = yes\n"
                      "log_format = json\n", encoding="utf-8")
    with ServerProcess(sqlite_url, "--config", str(config)) as server:
        with server.connect() as client:
            assert re.fullmatch(r"[1-9][0-9]*", client.handshake())  # a bare id: legacy_ids
        assert f"database {sqlite_url}" in [json.loads(line)["message"] for line in server.lines]
