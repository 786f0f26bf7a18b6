"""niki-client's parts on their own: the back-off policy, the credential file, the
output formats, the address and option parsing, and the deferred stop on a signal.

The command line is run as a real process where its exit status matters (usage
errors, an unwritable credential file); none of these needs a server.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from messaging_server.backoff import ExponentialBackoff
from messaging_server.client.credential_file import (
    CredentialFile,
    CredentialFileError,
    default_credential_path,
)
from messaging_server.client.subscriber import (
    OutputClosed,
    OutputWriter,
    RecentIds,
    StopRequested,
    StopSignals,
    parse_address,
    utc_now,
)
from messaging_server.errors import ConfigurationError
from messaging_server.protocol.lines import Message

CREDENTIAL = "12.AbCdEfGhIjKlMnOpQrStUv_-"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


def upper_bound(low: float, high: float) -> float:
    return high


# --- back-off ---

def test_backoff_windows_double_from_the_base_up_to_the_cap() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=30.0, uniform=upper_bound)
    assert [backoff.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.failures == 9


def test_backoff_reset_starts_again_from_the_base() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=30.0, uniform=upper_bound)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_backoff_draws_from_zero_to_the_window() -> None:
    seen = []
    backoff = ExponentialBackoff(base=1.0, cap=3.0, uniform=lambda lo, hi: seen.append((lo, hi)) or lo)
    assert [backoff.next_delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert seen == [(0.0, 1.0), (0.0, 2.0), (0.0, 3.0)]


@given(base=st.floats(0.001, 10), cap=st.floats(0.001, 100), failures=st.integers(0, 10_000))
def test_backoff_delay_never_leaves_its_window(base: float, cap: float, failures: int) -> None:
    backoff = ExponentialBackoff(base=base, cap=cap)
    backoff.failures = failures  # thousands of failures in a row must not overflow
    delay = backoff.next_delay()
    assert 0.0 <= delay <= min(cap, base * 2 ** min(failures, 64))


def test_backoff_is_jittered() -> None:
    backoff = ExponentialBackoff(base=1.0, cap=1.0)
    assert len({backoff.next_delay() for _ in range(20)}) > 1


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (1, 0), (-1, 1)])
def test_backoff_rejects_non_positive_settings(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(base=base, cap=cap)


# --- the credential file ---

def test_default_path_follows_xdg_config_home(tmp_path: Path) -> None:
    path = default_credential_path("Push.Example.com", 8000, {"XDG_CONFIG_HOME": str(tmp_path)})
    assert path == tmp_path / "niki" / "credential-push.example.com-8000"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_default_path_falls_back_to_home_config(xdg: object, tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)} if xdg is None else {"HOME": str(tmp_path), "XDG_CONFIG_HOME": xdg}
    expected = tmp_path / ".config" / "niki" / "credential-localhost-9000"
    assert default_credential_path("::1", 9000, environ) == expected


def test_every_spelling_of_this_machine_is_one_host_and_a_name_makes_another_file(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    paths = {default_credential_path(host, 8000, environ)
             for host in ("localhost", "127.0.0.1", "::1", "[::1]", "LOCALHOST", "127.0.0.2")}
    assert paths == {tmp_path / "niki" / "credential-localhost-8000"}
    assert default_credential_path("push1.example.com", 8000, environ).name == \
        "credential-push1.example.com-8000"
    assert default_credential_path("localhost", 8000, environ, name="kitchen/tablet").name == \
        "credential-localhost-8000-kitchen_tablet"


def test_one_credential_file_serves_one_process(tmp_path: Path) -> None:
    first, second = CredentialFile(tmp_path / "credential"), CredentialFile(tmp_path / "credential")
    held = rf"in use by another niki-client \(pid {os.getpid()}\)"
    with first.in_use(), pytest.raises(CredentialFileError, match=held), second.in_use():
        pass
    with second.in_use():  # let go at the end of the block
        pass


def test_default_path_keeps_odd_host_characters_out_of_the_name(tmp_path: Path) -> None:
    path = default_credential_path("a/../b", 1, {"XDG_CONFIG_HOME": str(tmp_path)})
    assert path.parent == tmp_path / "niki"
    assert "/" not in path.name


def test_stored_credential_is_private_and_read_back(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        creds = CredentialFile(tmp_path / "config" / "niki" / "credential-h-1")
        creds.prepare()
        assert creds.load() is None
        creds.store(CREDENTIAL)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "config").stat().st_mode) == 0o700
    assert creds.path.read_text() == CREDENTIAL + "\n"
    assert creds.load() == CREDENTIAL


def test_store_replaces_without_leaving_temporary_files(tmp_path: Path) -> None:
    creds = CredentialFile(tmp_path / "credential")
    creds.prepare()
    creds.store(CREDENTIAL)
    creds.store("13.ZYXWVUTSRQPONMLKJIHGFEDC")
    assert creds.load() == "13.ZYXWVUTSRQPONMLKJIHGFEDC"
    assert os.listdir(tmp_path) == ["credential"]
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o600


def test_a_failed_store_keeps_the_old_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = CredentialFile(tmp_path / "credential")
    creds.store(CREDENTIAL)

    def no_rename(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(CredentialFileError, match="Permission denied"):
        creds.store("13.ZYXWVUTSRQPONMLKJIHGFEDC")
    monkeypatch.undo()
    assert creds.load() == CREDENTIAL
    assert os.listdir(tmp_path) == ["credential"]


def test_prepare_leaves_existing_directories_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    CredentialFile(tmp_path / "credential").prepare()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_prepare_fails_when_the_directory_cannot_exist(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CredentialFileError, match="a-file"):
        CredentialFile(tmp_path / "a-file" / "niki" / "credential").prepare()


@pytest.mark.parametrize("content", ["", "\n", "  \n"])
def test_an_empty_file_means_a_new_client(tmp_path: Path, content: str) -> None:
    (tmp_path / "credential").write_text(content)
    assert CredentialFile(tmp_path / "credential").load() is None


@pytest.mark.parametrize("content", ["hello", "12.", "0.abc", "12.a b", "12.a+b"])
def test_a_malformed_file_is_an_error_not_a_new_identity(tmp_path: Path, content: str) -> None:
    (tmp_path / "credential").write_text(content + "\n")
    with pytest.raises(CredentialFileError, match="does not hold a Niki credential"):
        CredentialFile(tmp_path / "credential").load()


def test_a_bare_legacy_id_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "credential").write_text("3000\n")
    assert CredentialFile(tmp_path / "credential").load() == "3000"


# --- output ---

class FlushRecorder(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed: List[bytes] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_plain_output_is_the_body_on_its_own_line_flushed() -> None:
    stream = FlushRecorder()
    writer = OutputWriter(stream)
    writer.emit(Message("  hello 🎉 ", 7), utc_now())
    writer.emit(Message("second"), utc_now())
    assert stream.getvalue() == "  hello 🎉 \nsecond\n".encode()
    assert stream.flushed == ["  hello 🎉 \n".encode(), "  hello 🎉 \nsecond\n".encode()]


def test_json_output_is_one_object_per_line() -> None:
    stream = io.BytesIO()
    writer = OutputWriter(stream, as_json=True)
    writer.emit(Message('a "quoted" body\twith a tab 🎉', 41), "2024-05-01T12:00:00.000000Z")
    writer.emit(Message("legacy"), utc_now())
    first, second = stream.getvalue().decode("utf-8").splitlines()
    assert json.loads(first) == {"id": 41, "body": 'a "quoted" body\twith a tab 🎉',
                                 "received_at": "2024-05-01T12:00:00.000000Z"}
    assert "🎉" in first  # UTF-8 as is, not \\u escapes
    record = json.loads(second)
    assert record["id"] is None and record["body"] == "legacy"
    assert ISO_UTC.match(record["received_at"])


def test_a_closed_output_is_reported() -> None:
    stream = io.BytesIO()
    stream.close()
    with pytest.raises(OutputClosed):
        OutputWriter(stream).emit(Message("x", 1), utc_now())


def test_recent_ids_forget_the_oldest_beyond_the_limit() -> None:
    ids = RecentIds(limit=3)
    for message_id in (1, 2, 3, 3, 4):
        ids.add(message_id)
    assert 1 not in ids and all(i in ids for i in (2, 3, 4))
    assert len(ids) == 3


# --- addresses ---

@pytest.mark.parametrize(("text", "expected"), [
    ("localhost", ("localhost", 8000)),
    ("push.example.com:9000", ("push.example.com", 9000)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("[::1]:8100", ("::1", 8100)),
    ("[::1]", ("::1", 8000)),
    ("::1", ("::1", 8000)),
])
def test_addresses(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":8000", "host:", "host:0", "host:65536", "host:http",
                                  "[::1", "[::1]x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(text)


# --- the stop signals ---

@pytest.fixture
def stop_signals() -> Iterator[StopSignals]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals = StopSignals()
    signals.install()
    yield signals
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_signal_stops_at_once_outside_a_deferred_section(stop_signals: StopSignals) -> None:
    with pytest.raises(StopRequested):
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_waits_for_the_deferred_section_to_finish(stop_signals: StopSignals) -> None:
    finished = []
    with pytest.raises(StopRequested), stop_signals.deferred():
        signal.raise_signal(signal.SIGINT)
        finished.append("printed and acknowledged")
    assert finished == ["printed and acknowledged"]
    assert stop_signals.received == signal.SIGINT


def test_after_settle_signals_are_only_noted(stop_signals: StopSignals) -> None:
    stop_signals.settle()
    signal.raise_signal(signal.SIGINT)
    stop_signals.check()
    assert stop_signals.received == signal.SIGINT


# --- the command line, as a process ---

def run_client(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "messaging_server.client.subscriber", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [
    [],
    ["host:99999"],
    ["host", "--count", "0"],
    ["host", "--timeout", "-1"],
    ["host", "--max-backoff", "nan"],
    ["host", "--keepalive", "x"],
    ["host", "--frobnicate"],
])
def test_usage_errors_exit_2(args: List[str]) -> None:
    done = run_client(*args)
    assert done.returncode == 2, done.stderr
    assert "usage: niki-client" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unwritable_credential_file_is_fatal_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    # Port 1 on loopback: nothing listens there, and nothing must be tried anyway.
    done = run_client("127.0.0.1:1", "--credential-file", str(tmp_path / "a-file" / "credential"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("niki-client: error: cannot write the credential file")
    assert "is not a directory" in done.stderr
    assert "cannot connect" not in done.stderr and "Traceback" not in done.stderr


def test_a_missing_cafile_is_fatal(tmp_path: Path) -> None:
    done = run_client("127.0.0.1:1", "--cafile", str(tmp_path / "nope.pem"),
                      "--credential-file", str(tmp_path / "credential"))
    assert done.returncode == 1, done.stderr
    assert "cannot load --cafile" in done.stderr and "Traceback" not in done.stderr
