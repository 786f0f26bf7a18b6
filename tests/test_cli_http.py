"""``niki-enqueue --url``: publishing through a server's HTTP API, as a real subprocess
against a real server, with neither the database nor UDP; and HttpEnqueuer's errors."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from messaging_server import AccessDenied, BodyRejected, HttpEnqueuer, StorageUnavailable, UnknownClient
from messaging_server.client.sdk import Client
from tests.helpers import ServerProcess, numeric_id
from tests.private_mariadb import free_port
from tests.test_cli import bodies, run_cli, summary

TOKEN = "s3cret-token-for-the-test"


@pytest.fixture
def server(sqlite_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(sqlite_url, "--advertise-host", "127.0.0.1") as proc:
        yield proc


def test_one_message_stdin_and_file_through_the_api(server: ServerProcess, tmp_path) -> None:
    url = f"http://127.0.0.1:{server.http_port}"
    with Client("127.0.0.1", server.port) as client:
        cid = numeric_id(str(client.client_id))
        # No NIKI_DB, no peers: the server queues and wakes.
        result = run_cli(str(cid), "hello over http", "--url", url)
        assert (result.status, result.stdout) == (0, f"queued for client {cid}\n"), result.stderr
        assert client.receive(timeout=10) == "hello over http"
        again = run_cli(str(cid), "hello over http", extra_env={"NIKI_URL": url})
        assert again.status == 3 and "duplicate" in again.one_error_line()
        lines = run_cli(str(cid), "-", "--url", url, "--json", stdin=b"one\ntwo\n\xff\n")
        assert lines.status == 2, lines.stderr  # the worst: one line is not UTF-8
        assert [json.loads(line)["status"] for line in lines.stdout.splitlines()[:3]] == \
            ["queued", "queued", "rejected"]
        assert [client.receive(timeout=10) for _ in range(2)] == ["one", "two"]
        batch = tmp_path / "batch.jsonl"
        batch.write_text("".join(json.dumps({"client_id": cid, "body": f"bulk {n}"}) + "\n"
                                 for n in range(250)) +
                         json.dumps({"client_id": 999_999, "body": "nobody"}) + "\n")
        bulk = run_cli("--file", str(batch), "--url", url)
        assert bulk.status == 1, bulk.stderr  # one line refused
        assert summary(bulk, "stderr") == {"queued": 250, "duplicate": 0, "rejected": 1}
        assert [client.receive(timeout=10) for _ in range(250)] == [f"bulk {n}" for n in range(250)]
    assert bodies(server.db_url, cid)[:1] == []  # all delivered
    assert run_cli(str(cid + 1000), "x", "--url", url).status == 2  # unknown client


def test_a_token_is_taken_from_the_environment(sqlite_url: str) -> None:
    with ServerProcess(sqlite_url, "--api-token", TOKEN) as server, \
            Client("127.0.0.1", server.port) as client:
        url = f"http://127.0.0.1:{server.http_port}"
        cid = str(numeric_id(str(client.client_id)))
        refused = run_cli(cid, "no token", "--url", url)
        assert refused.status == 1 and "NIKI_API_TOKEN" in refused.one_error_line()
        assert TOKEN not in refused.stderr
        ok = run_cli(cid, "with token", "--url", url, extra_env={"NIKI_API_TOKEN": TOKEN})
        assert ok.status == 0, ok.stderr
        assert client.receive(timeout=10) == "with token"
        with HttpEnqueuer(url) as enq, pytest.raises(AccessDenied):
            enq.enqueue(int(cid), "x")


def test_no_server_and_bad_urls_are_clear_errors(tmp_path) -> None:
    port = free_port()
    down = run_cli("1", "hello", "--url", f"http://127.0.0.1:{port}")
    assert down.status == 1
    assert f"cannot reach the server's HTTP API at http://127.0.0.1:{port}" in down.one_error_line()
    with ServerProcess(f"sqlite:///{tmp_path}/niki.sqlite3") as server:  # the client port is not HTTP
        wrong = run_cli("1", "hello", "--url", f"http://127.0.0.1:{server.port}")
        assert wrong.status == 1 and "does not answer HTTP" in wrong.one_error_line()
    for bad in ("ftp://x", "http://", "http://host:99999"):
        result = run_cli("1", "hello", "--url", bad)
        assert result.status == 2, (bad, result.stderr)
    both = run_cli("1", "hello", "--url", "http://127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/x")
    assert both.status == 2 and "--url" in both.one_error_line()


def test_http_enqueuer_keeps_the_library_errors(server: ServerProcess) -> None:
    with HttpEnqueuer(f"http://127.0.0.1:{server.http_port}") as enq, \
            Client("127.0.0.1", server.port) as client:
        cid = numeric_id(str(client.client_id))
        first = enq.submit(cid, "a")
        assert isinstance(first, int) and enq.submit(cid, "a") is None
        results = enq.enqueue_many([(cid, "b"), (cid, "b"), (999_999, "c"), (cid, "")])
        assert results[:2] == [True, False]
        assert isinstance(results[2], UnknownClient) and isinstance(results[3], BodyRejected)
        with pytest.raises(UnknownClient):
            enq.enqueue(999_999, "nobody")
        assert [client.receive(timeout=10) for _ in range(2)] == ["a", "b"]
    server.stop()
    with HttpEnqueuer(f"http://127.0.0.1:{server.http_port}") as enq, pytest.raises(StorageUnavailable):
        enq.enqueue(1, "the server is gone")
