"""Group commit on a real SQLite file: shared transactions, isolated failures, results after commit."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any, Dict, List

import pytest

from messaging_server.errors import StorageUnavailable
from messaging_server.storage import open_storage
from messaging_server.storage.group_commit import GroupCommit
from messaging_server.storage.sql import Tx
from messaging_server.storage.sqlite import SqliteStorage
from tests.helpers import wait_until


@pytest.fixture
def sqlite_storage(tmp_path) -> SqliteStorage:
    storage = open_storage(f"sqlite:///{tmp_path}/group.sqlite3", create=True)
    assert isinstance(storage, SqliteStorage)
    storage.create_schema()
    with storage.transaction() as tx:
        tx.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    yield storage
    storage.close()


def committed_notes(storage: SqliteStorage) -> List[str]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(storage.path) as other:
        return [row[0] for row in other.execute("SELECT text FROM notes ORDER BY id")]


def note(text: str, fail: bool = False):
    def operation(tx: Tx) -> int:
        tx.execute("INSERT INTO notes (text) VALUES (%s)", (text,))
        if fail:
            raise ValueError(f"{text} fails after writing")
        return tx.lastrowid
    return operation


def run_held_group(storage: SqliteStorage, operations: Dict[str, Any]) -> Dict[str, Any]:
    """Hold one group open while ``operations`` queue behind it, then let them run as the next
    group.  Returns each operation's result or exception."""
    group = GroupCommit(storage.transaction)
    entered, release = threading.Event(), threading.Event()

    def holder(tx: Tx) -> None:
        entered.set()
        release.wait(10)

    outcomes: Dict[str, Any] = {}

    def call(name: str, operation) -> None:
        try:
            outcomes[name] = group.run(operation)
        except Exception as exc:  # recorded for the test to inspect
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("holder", holder))]
    threads[0].start()
    assert entered.wait(5), "the holder leads the first group"
    for name, operation in operations.items():
        threads.append(threading.Thread(target=call, args=(name, operation)))
        threads[-1].start()
    wait_until(lambda: group.waiting() == len(operations), timeout=10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert group.groups == 2, "the queued operations ran as one group"
    assert group.operations == len(operations) + 1
    return outcomes


def test_queued_operations_share_one_transaction(sqlite_storage):
    names = [f"n{i}" for i in range(20)]
    outcomes = run_held_group(sqlite_storage, {name: note(name) for name in names})
    assert sorted(committed_notes(sqlite_storage)) == sorted(names)
    ids = [outcomes[name] for name in names]
    assert len(set(ids)) == 20 and all(isinstance(i, int) for i in ids)


def test_a_failing_operation_is_rolled_back_alone(sqlite_storage):
    operations = {"a": note("a"), "bad": note("bad", fail=True), "b": note("b")}
    outcomes = run_held_group(sqlite_storage, operations)
    assert isinstance(outcomes["bad"], ValueError)
    assert sorted(committed_notes(sqlite_storage)) == ["a", "b"]


def test_a_driver_error_in_a_group_stays_with_its_operation(sqlite_storage):
    def broken(tx: Tx) -> None:
        tx.execute("INSERT INTO no_such_table VALUES (1)")

    outcomes = run_held_group(sqlite_storage, {"a": note("a"), "broken": broken})
    assert isinstance(outcomes["broken"], sqlite3.OperationalError)
    assert committed_notes(sqlite_storage) == ["a"]


def test_alone_an_operation_commits_or_rolls_back_whole(sqlite_storage):
    group = GroupCommit(sqlite_storage.transaction)
    assert isinstance(group.run(note("alone")), int)
    with pytest.raises(ValueError):
        group.run(note("undone", fail=True))
    assert committed_notes(sqlite_storage) == ["alone"]
    assert (group.groups, group.operations) == (2, 2)


def test_result_is_returned_only_once_committed(sqlite_storage):
    """Every caller, leader or not, finds its row committed when run() returns."""
    group = GroupCommit(sqlite_storage.transaction)
    seen: List[bool] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(25):
            text = f"w{n}-{i}"
            group.run(note(text))
            with lock:
                seen.append(text in committed_notes(sqlite_storage))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(seen) == 200 and all(seen)
    assert len(committed_notes(sqlite_storage)) == 200


def test_storage_maps_driver_errors_to_storage_unavailable(sqlite_storage):
    with pytest.raises(StorageUnavailable):
        sqlite_storage._write(lambda tx: tx.execute("SELECT * FROM no_such_table"))


def test_concurrent_handshake_writes_are_grouped_and_correct(sqlite_storage):
    """new_client and claim_client from many threads: unique ids, sessions counted exactly."""
    ids: List[int] = []
    lock = threading.Lock()

    def connect_many() -> None:
        for _ in range(30):
            claim = sqlite_storage.new_client(1, b"h" * 32)
            again = sqlite_storage.claim_client(claim.client_id, 1, accept=lambda stored: stored == b"h" * 32)
            assert again is not None and again.session == 2
            sqlite_storage.release_client(claim.client_id, again.session, 1)
            with lock:
                ids.append(claim.client_id)

    threads = [threading.Thread(target=connect_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(ids) == len(set(ids)) == 240
    with sqlite3.connect(sqlite_storage.path) as other:
        rows = other.execute("SELECT COUNT(*), SUM(session), COUNT(owner_server_id) FROM clients").fetchone()
    assert rows == (240, 480, 0)
