"""The config file, precedence, --print-config, the admin dispatch and the log formats.

Most tests call ``effective_settings(argv, environ)`` directly with an explicit
environment, so the caller's NIKI_* variables cannot leak in; the few that need
the real entry point run ``python -m messaging_server`` as a subprocess with a
clean environment.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from messaging_server.config import settings
from messaging_server.config.settings import (
    CONFIG_OPTIONS,
    ServerSettings,
    config_environ,
    effective_settings,
    server_settings,
)
from messaging_server.errors import ConfigurationError
from messaging_server.server.logs import JsonFormatter, formatter, iso_time

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "niki.example.ini"
ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# A commented-out key line of the example file: "# key = default".
EXAMPLE_KEY_LINE = re.compile(r"^# ([a-z_]+) =(.*)$")


def write(tmp_path: Path, text: str, name: str = "niki.ini") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def clean_env(**extra: str) -> Dict[str, str]:
    """The test process's environment without NIKI_* settings (NIKI_TEST_* stay)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NIKI_") or k.startswith("NIKI_TEST_")}
    env.update(extra)
    return env


def run_module(*args: str, env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "messaging_server", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def config_error(argv: List[str], environ: Optional[Dict[str, str]] = None) -> str:
    with pytest.raises(ConfigurationError) as info:
        server_settings(argv, environ or {})
    return str(info.value)


# --- precedence: command line > environment > file > default -------------------------------------

# key, option argv, env variable and text, file text, and the value each source gives.
PRECEDENCE = [
    ("port", ["--port", "1001"], "NIKI_PORT", "1002", "1003", (1001, 1002, 1003, 8000)),
    ("db", ["--db", "sqlite:///o.db"], "NIKI_DB", "sqlite:///e.db", "sqlite:///f.db",
     ("sqlite:///o.db", "sqlite:///e.db", "sqlite:///f.db", settings.DEFAULT_DB)),
    ("legacy_ids", ["--legacy-ids"], "NIKI_LEGACY_IDS", "no", "yes", (True, False, True, False)),
    ("log_format", ["--log-format", "json"], "NIKI_LOG_FORMAT", "plain", "json",
     ("json", "plain", "json", "plain")),
    ("sweep_interval", ["--sweep-interval", "0.5"], "NIKI_SWEEP_INTERVAL", "0.25", "4",
     (0.5, 0.25, 4.0, 2.0)),
]


@pytest.mark.parametrize("in_option,in_env,in_file", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("key,argv,env,env_text,file_text,expected", PRECEDENCE,
                         ids=[case[0] for case in PRECEDENCE])
def test_precedence(tmp_path, key, argv, env, env_text, file_text, expected,
                    in_option, in_env, in_file):
    path = write(tmp_path, f"[niki]\n# a comment\n{key} = {file_text}\n")
    effective = effective_settings((argv if in_option else []) + (["--config", path] if in_file else []),
                                   {env: env_text} if in_env else {})
    if in_option:
        value, source = expected[0], f"option {argv[0]}"
    elif in_env:
        value, source = expected[1], f"environment {env}"
    elif in_file:
        value, source = expected[2], f"file {path}, line 3"
    else:
        value, source = expected[3], "default"
    assert getattr(effective.settings, key) == value
    assert effective.values[key] == value
    assert effective.sources[key] == source


def test_niki_config_names_the_file_and_config_option_wins(tmp_path):
    first = write(tmp_path, "[niki]\nport = 1111\n", "first.ini")
    second = write(tmp_path, "[niki]\nport = 2222\n", "second.ini")
    assert server_settings([], {"NIKI_CONFIG": first}).port == 1111
    assert server_settings(["--config", second], {"NIKI_CONFIG": first}).port == 2222
    # --config "" switches NIKI_CONFIG's file off.
    assert server_settings(["--config", ""], {"NIKI_CONFIG": first}).port == settings.DEFAULT_PORT


def test_empty_environment_variable_lets_the_file_through(tmp_path):
    path = write(tmp_path, "[niki]\nport = 1003\n")
    assert server_settings(["--config", path], {"NIKI_PORT": "  "}).port == 1003


def test_keys_take_dashes_underscores_and_any_case(tmp_path):
    path = write(tmp_path, "[niki]\nEvent-Port = 9101\nmax_connections-per_address = 3\n"
                           "Legacy-IDs = TRUE\nverbose: 1\nhost =\n")
    effective = effective_settings(["--config", path], {})
    assert effective.settings.event_port == 9101
    assert effective.settings.max_connections_per_address == 3
    assert effective.settings.legacy_ids is True
    assert effective.settings.verbose is True
    assert effective.settings.host == "" and effective.sources["host"] == "default"  # empty: unset


def test_values_are_literal(tmp_path):
    """No % interpolation: a percent-encoded password stays as written."""
    path = write(tmp_path, "[niki]\ndb = mysql://niki:p%40ss%25@db.example.com/niki\n")
    assert server_settings(["--config", path], {}).db == "mysql://niki:p%40ss%25@db.example.com/niki"


def test_every_server_setting_has_a_key():
    """Each ServerSettings field but the internal batch size can be set in the file."""
    fields = {field.name for field in dataclasses.fields(ServerSettings)} - {"delivery_batch"}
    keys = [option.key for option in CONFIG_OPTIONS]
    assert len(keys) == len(set(keys))
    assert fields == set(keys) - {"peers", "max_pending"}


# --- config_environ: the file for the other command-line tools --------------------------------------

def test_config_environ_fills_only_what_the_environment_lacks(tmp_path):
    path = write(tmp_path, "[niki]\ndb = sqlite:///file.db\npeers = 127.0.0.1:9001\n"
                           "port = 8100\nlegacy-ids = on\nverbose = off\nhost =\n")
    environ = {"NIKI_DB": "sqlite:///env.db", "NIKI_PORT": "", "HOME": "/home/niki"}
    merged = config_environ(path, environ)
    assert merged == {"NIKI_DB": "sqlite:///env.db", "NIKI_PORT": "8100", "HOME": "/home/niki",
                      "NIKI_PEERS": "127.0.0.1:9001", "NIKI_LEGACY_IDS": "true",
                      "NIKI_VERBOSE": "false"}
    assert environ["NIKI_PORT"] == ""  # the caller's mapping is left alone
    # What the tools read through the environment now sees the file.
    assert settings.default_db(config_environ(path, {})) == "sqlite:///file.db"
    assert settings.configured_peers(merged) == [("127.0.0.1", 9001)]
    assert server_settings([], merged).legacy_ids is True


def test_config_environ_uses_niki_config_when_no_path(tmp_path):
    path = write(tmp_path, "[niki]\ndb = sqlite:///file.db\n")
    assert config_environ(None, {"NIKI_CONFIG": path})["NIKI_DB"] == "sqlite:///file.db"
    assert config_environ(None, {"X": "1"}) == {"X": "1"}


def test_config_environ_rejects_a_bad_file(tmp_path):
    path = write(tmp_path, "[niki]\nport = high\n")
    with pytest.raises(ConfigurationError, match=r"niki\.ini: line 2: port = high"):
        config_environ(path, {})


# --- errors: file, line, key and reason --------------------------------------------------------------

BAD_FILES = [
    ("[niki]\nprot = 1\n", ["line 2: unknown key 'prot' in [niki]", "did you mean 'port'?"]),
    ("[server]\nport = 1\n", ["line 1: unknown section [server]", "[niki]"]),
    ("[niki]\n[DEFAULT]\nport = 1\n", ["line 2: unknown section [DEFAULT]"]),
    ("[niki]\n\nport = eighty\n", ["line 3: port = eighty: 'eighty' is not a port number"]),
    ("[niki]\nport = 70000\n", ["line 2: port = 70000: 70000 is not a port number"]),
    ("[niki]\nport = 8000  # clients\n", ["line 2: port = 8000  # clients:",
                                          "comments go on a line of their own"]),
    ("port = 1\n[niki]\n", ["line 1: 'port = 1' comes before any section", "start the file with [niki]"]),
    ("[niki]\njust words\n", ["line 2: not a 'key = value' line: 'just words'"]),
    ("[niki]\nport = 1\nport = 2\n", ["line 3: port is set twice in [niki]"]),
    ("[niki]\nevent-port = 1\nevent_port = 2\n", ["line 3: event_port is set twice (also on line 2)"]),
    ("[niki]\n[niki]\n", ["line 2: section [niki] appears twice"]),
    ("[niki]\nverbose = maybe\n", ["line 2: verbose = maybe: 'maybe' is not a yes/no value"]),
    ("[niki]\npool_size = 0\n", ["line 2: pool_size = 0: must be at least 1"]),
    ("[niki]\nwrite_timeout = -1\n", ["line 2: write_timeout = -1: must be greater than 0"]),
    ("[niki]\nlog_format = xml\n", ["line 2: log_format = xml: 'xml': expected one of plain, json"]),
    ("[niki]\npeers = 127.0.0.1\n", ["line 2: peers = 127.0.0.1:"]),
    ("[niki]\nmax_pending = many\n", ["line 2: max_pending = many: 'many' is not a whole number"]),
    ("[niki]\nhost = a\n  b\n", ["line 2: host: a value must fit on one line"]),
    ("[niki]\n\ntls_key = key.pem\n", ["--tls-key needs --tls-cert", "line 3"]),
]


@pytest.mark.parametrize("text,expected", BAD_FILES, ids=[f"bad{n}" for n in range(len(BAD_FILES))])
def test_bad_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = config_error(["--config", path])
    assert path in message
    for part in expected:
        assert part in message


def test_unreadable_files(tmp_path):
    missing = str(tmp_path / "missing.ini")
    assert config_error(["--config", missing]) == f"{missing}: cannot read: No such file or directory"
    assert config_error([], {"NIKI_CONFIG": missing}).startswith(f"{missing}: cannot read")
    assert config_error(["--config", str(tmp_path)]).startswith(f"{tmp_path}: cannot read: ")
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"[niki]\nhost = \xff\n")
    assert config_error(["--config", str(binary)]) == f"{binary}: cannot read: not UTF-8 text (byte 14)"


@pytest.mark.parametrize("env,expected", [
    ({"NIKI_PORT": "http"}, "environment variable NIKI_PORT='http': 'http' is not a port number"),
    ({"NIKI_POOL_SIZE": "0"}, "environment variable NIKI_POOL_SIZE='0': must be at least 1"),
    ({"NIKI_TLS_KEY": "k.pem"}, "--tls-key needs --tls-cert (tls_key from environment NIKI_TLS_KEY)"),
])
def test_bad_environment(env, expected):
    assert config_error([], env) == expected


def test_bad_file_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "[niki]\nport = 8000\nmax-conections = 5\n")
    result = run_module("--config", path, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"messaging_server: {path}: line 3: unknown key 'max-conections' in "
                             "[niki] (did you mean 'max_connections'?)\n")
    assert not (tmp_path / "niki.sqlite3").exists()


# --- --print-config -----------------------------------------------------------------------------------

def test_print_config_sources_masking_and_round_trip(tmp_path):
    path = write(tmp_path, "[niki]\npool_size = 3\napi_token = file-token-123\nlegacy_ids = yes\n")
    env = clean_env(NIKI_DB="mysql://niki:s3cret%21@db.example.com:3306/niki",
                    NIKI_API_TOKEN="env-token-456", NIKI_HOST="")
    result = run_module("--print-config", "--config", path, "-p", "9100", "--verbose",
                        env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    for secret in ("s3cret", "file-token-123", "env-token-456"):
        assert secret not in out
    lines = out.splitlines()

    def entry(key: str) -> List[str]:
        """The comment above ``key``'s line, and the line."""
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
        return lines[index - 1:index + 1]

    assert entry("port") == ["# from option --port", "port = 9100"]
    assert entry("verbose") == ["# from option --verbose", "verbose = true"]
    assert entry("db") == ["# from environment NIKI_DB", "db = mysql://niki:***@db.example.com:3306/niki"]
    assert entry("api_token") == ["# from environment NIKI_API_TOKEN", "api_token = ***"]
    assert entry("pool_size") == [f"# from file {path}, line 2", "pool_size = 3"]
    assert entry("legacy_ids") == [f"# from file {path}, line 4", "legacy_ids = true"]
    assert entry("sweep_interval") == ["# from default", "sweep_interval = 2.0"]
    assert entry("event_port") == ["# from default: port + 1", "event_port ="]
    assert entry("host") == ["# from default: all interfaces", "host ="]
    assert f"# config file: {path}" in lines
    assert not (tmp_path / "niki.sqlite3").exists()  # nothing was started or created

    # The output is itself a config file giving the same settings (secrets aside).
    printed = write(tmp_path, out, "printed.ini")
    again = effective_settings(["--config", printed], {})
    original = effective_settings(["--config", path, "-p", "9100", "--verbose"],
                                  {"NIKI_DB": "mysql://niki:***@db.example.com:3306/niki",
                                   "NIKI_API_TOKEN": "***"})
    assert again.settings == original.settings
    assert set(again.values) == {option.key for option in CONFIG_OPTIONS}


def test_print_config_defaults_only(tmp_path):
    result = run_module("--print-config", env=clean_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# config file: none" in result.stdout
    assert "api_token =\n" in result.stdout  # nothing to mask
    assert f"db = {settings.DEFAULT_DB}\n" in result.stdout
    key_lines = [line for line in result.stdout.splitlines() if re.match(r"^[a-z_]+ =", line)]
    assert len(key_lines) == len(CONFIG_OPTIONS)


# --- the example file cannot drift ---------------------------------------------------------------------

def test_example_file_parses_as_shipped():
    effective = effective_settings(["--config", str(EXAMPLE)], {})
    assert set(effective.sources.values()) == {"default"}  # every key is commented out


def test_example_file_lists_every_key_with_its_default(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = [m.group(1) for m in map(EXAMPLE_KEY_LINE.match, text.splitlines()) if m]
    assert sorted(keys) == sorted(option.key for option in CONFIG_OPTIONS)  # each once
    uncommented = "\n".join(EXAMPLE_KEY_LINE.sub(r"\1 =\2", line) for line in text.splitlines())
    effective = effective_settings(["--config", write(tmp_path, uncommented)], {})
    # The default database is under the user's home, different on every machine: the
    # example shows a system path instead, and says what the default is.
    assert effective.values["db"] == "sqlite:////var/lib/niki/niki.sqlite3"
    assert "~/.local/share/niki/niki.sqlite3" in text
    values = {**effective.values, "db": settings.DEFAULT_DB}
    assert values == {option.key: option.default for option in CONFIG_OPTIONS}
    assert dataclasses.replace(effective.settings, db=settings.DEFAULT_DB) == ServerSettings()
    set_keys = {key for key, source in effective.sources.items() if source.startswith("file ")}
    assert set_keys == {option.key for option in CONFIG_OPTIONS
                        if option.default not in (None, "")}


# --- python -m messaging_server admin ... ----------------------------------------------------------------

def test_admin_is_dispatched(monkeypatch):
    from messaging_server import __main__ as entry

    calls: List[List[str]] = []
    admin = types.ModuleType("messaging_server.tools.admin")
    admin.main = lambda argv=None: calls.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "messaging_server.tools.admin", admin)
    assert entry.main(["admin", "client", "5", "--db", "sqlite:///x.db"]) == 7
    assert calls == [["client", "5", "--db", "sqlite:///x.db"]]


# --- log formats -------------------------------------------------------------------------------------------

def record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("messaging_server.server.delivery", logging.WARNING, __file__, 1, message,
                             args, exc_info)


def test_json_formatter():
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        failing = record("client %s: %s", 5, "two\nlines ✓", exc_info=sys.exc_info())
    line = JsonFormatter().format(failing)
    assert "\n" not in line and line.isascii()
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "exception"}
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "messaging_server.server.delivery"
    assert entry["message"] == "client 5: two\nlines ✓"
    assert "RuntimeError: disk on fire" in entry["exception"]
    assert ISO_MS_UTC.match(entry["time"])
    assert "exception" not in json.loads(JsonFormatter().format(record("plain")))


def test_iso_time_is_utc_with_milliseconds():
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"
    assert iso_time(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"


def test_plain_format_is_unchanged():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("plain"))
    handler.handle(record("listening on %s", "all interfaces"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING listening on all interfaces\n",
                        stream.getvalue())


def test_json_mode_logs_warnings_and_thread_crashes_as_json(tmp_path):
    code = ("import threading, warnings\n"
            "from messaging_server.server.logs import configure_logging\n"
            "configure_logging(False, 'json')\n"
            "warnings.warn('old knob')\n"
            "thread = threading.Thread(target=lambda: 1 / 0, name='worker')\n"
            "thread.start(); thread.join()\n")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["level"] for e in entries] == ["WARNING", "ERROR"]
    assert "old knob" in entries[0]["message"]
    assert entries[1]["message"] == "uncaught exception in thread worker"
    assert "ZeroDivisionError" in entries[1]["exception"]
