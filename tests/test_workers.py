"""--workers without processes: the default count, the port plan, the log tag."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from messaging_server.config.settings import ServerSettings, default_workers, server_settings
from messaging_server.server.logs import formatter
from messaging_server.server.workers import plan_ports


def test_default_is_one_per_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_workers("sqlite:///x.sqlite3") == cores
    assert default_workers("mysql://root@127.0.0.1/niki") == cores


def test_option_environment_and_file(tmp_path) -> None:
    assert server_settings([], environ={}).workers is None
    assert server_settings(["--workers", "3"], environ={}).workers == 3
    assert server_settings([], environ={"NIKI_WORKERS": "2"}).workers == 2
    path = tmp_path / "niki.ini"
    path.write_text("[niki]\nworkers = 4\n")
    assert server_settings(["--config", str(path)], environ={}).workers == 4
    with pytest.raises(SystemExit):
        server_settings(["--workers", "0"], environ={})


def test_port_plan_resolves_port_zero_to_distinct_ports() -> None:
    ports = plan_ports(ServerSettings(host="127.0.0.1", port=0), 3)  # the HTTP API by default
    assert ports.client > 0
    assert len(set(ports.events)) == 3 and 0 not in ports.events
    assert len(set(ports.http)) == 3 and 0 not in ports.http and None not in ports.http


def test_port_plan_without_the_http_api() -> None:
    ports = plan_ports(ServerSettings(host="127.0.0.1", port=0, http_port=0), 2)
    assert list(ports.http) == [None, None]


def test_the_http_port_follows_the_client_port() -> None:
    assert ServerSettings(port=8000).resolved_http_port == 8002
    assert ServerSettings(port=8000, http_port=9000).resolved_http_port == 9000
    assert ServerSettings(port=8000, http_port=0).resolved_http_port is None
    assert ServerSettings(port=0).resolved_http_port == 0  # a free one


def test_port_plan_counts_from_the_given_ports() -> None:
    with socket.socket() as probe:  # a free client port whose neighbours are likely free too
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if port > 65000:
        pytest.skip("no room above the free port")
    try:
        ports = plan_ports(ServerSettings(host="127.0.0.1", port=port, http_port=port + 10), 2)
    except OSError:
        pytest.skip("a neighbouring port is in use")
    assert ports.client == port
    assert list(ports.events) == [port + 1, port + 2]
    assert list(ports.http) == [port + 10, port + 11]


def test_port_plan_fails_on_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            plan_ports(ServerSettings(host="127.0.0.1", port=taken.getsockname()[1], event_port=0), 2)


def test_log_lines_name_the_process() -> None:
    record = logging.LogRecord("messaging_server", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    assert formatter("plain", "w1").format(record).endswith(" INFO w1 hello you")
    assert formatter("plain").format(record).endswith(" INFO hello you")
    assert json.loads(formatter("json", "supervisor").format(record))["process"] == "supervisor"
    assert "process" not in json.loads(formatter("json").format(record))
