"""``--workers 2``: two server processes on one client port, under a supervisor.

Real processes on free ports, on both databases: connections land on both
workers, messages reach clients on either, a worker killed with SIGKILL is
restarted and its clients lose nothing, SIGTERM stops everything with status 0,
and start-up errors still fail at once with the single server's status.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Tuple

import messaging_server

from .helpers import RawClient, ServerProcess, numeric_id, query, wait_until

CLIENTS = 16  # connections spread by the kernel: all on one worker has odds of 2 ** -15
STARTED_RE = re.compile(r" supervisor started worker (w\d+) \(pid (\d+)\)")


def worker_pids(server: ServerProcess) -> Dict[str, int]:
    """Each worker's latest pid, from the supervisor's log."""
    return {tag: int(pid) for tag, pid in STARTED_RE.findall(server.log)}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def connect_clients(server: ServerProcess, count: int) -> List[Tuple[RawClient, str]]:
    clients = []
    for _ in range(count):
        client = server.connect()
        clients.append((client, client.handshake()))
    return clients


def owners(db_url: str, credentials: List[str]) -> Dict[str, int]:
    """credential -> the pid of the server that owns it (None: nobody)."""
    rows = query(db_url, "SELECT c.id, s.pid FROM clients c LEFT JOIN servers s "
                 "ON s.id = c.owner_server_id")
    by_id = {int(cid): pid for cid, pid in rows}
    return {cred: by_id.get(numeric_id(cred)) for cred in credentials}


def to(credential: str) -> str:
    return f"to {credential}"


def test_two_workers_share_the_port_and_deliver(db_url: str) -> None:
    """Connections land on both workers (each its own servers row); a message queued for a
    client on either arrives; SIGTERM stops the supervisor and both workers with status 0."""
    server = ServerProcess(db_url, workers=2).start()
    clients: List[Tuple[RawClient, str]] = []
    try:
        pids = worker_pids(server)
        assert sorted(pids) == ["w0", "w1"] and len(server.event_ports) == 2
        assert len(set(server.event_ports.values())) == 2  # each its own wake-up port
        servers = query(db_url, "SELECT pid, port, event_port FROM servers ORDER BY pid")
        assert sorted(int(pid) for pid, _, _ in servers) == sorted(pids.values())
        assert {int(port) for _, port, _ in servers} == {server.port}
        clients = connect_clients(server, CLIENTS)
        held = owners(db_url, [cred for _, cred in clients])
        assert set(held.values()) == set(pids.values()), held  # both workers got clients
        for _client, credential in clients:
            assert messaging_server.enqueue(credential, to(credential), db=db_url) is True
        for client, credential in clients:
            assert client.read_line() == f"MESSAGE: {to(credential)}"
    finally:
        for client, _ in clients:
            client.close()
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.log
    assert not any(alive(pid) for pid in worker_pids(server).values())
    assert "supervisor all workers stopped" in server.log
    assert " stopped with " not in server.log and "Traceback" not in server.log, server.log
    assert query(db_url, "SELECT id FROM servers") == []


def test_a_killed_worker_is_restarted_and_its_clients_lose_nothing(db_url: str) -> None:
    """kill -9 of a worker: its row and ownership go at once, it is started again (a new
    pid, the same wake-up port), and its clients, reconnecting, get all that was queued.
    SIGINT then stops everything with status 0."""
    with ServerProcess(db_url, workers=2) as server:
        before = worker_pids(server)
        clients = connect_clients(server, CLIENTS)
        victim = before["w1"]
        credentials = [cred for _, cred in clients]
        on_victim = [c for c, pid in owners(db_url, credentials).items() if pid == victim]
        assert on_victim, "no connection landed on w1"
        os.kill(victim, signal.SIGKILL)
        for client, credential in clients:
            if credential in on_victim:
                assert client.wait_closed(5) == []
                client.close()
        # Queued while the worker is dead or restarting: the reconnect must bring all of it.
        for credential in on_victim:
            for n in range(3):
                assert messaging_server.enqueue(credential, f"{n} for {credential}", db=db_url)
        wait_until(lambda: worker_pids(server)["w1"] != victim, 10, "w1 to be restarted")
        wait_until(lambda: server.log.count(" w1 listening on ") == 2, 10, "w1 to listen again")
        assert re.search(r" supervisor worker w1 \(pid \d+\) died \(killed by SIGKILL\)", server.log)
        assert not any(pid == victim for pid in owners(db_url, credentials).values())
        rows = query(db_url, "SELECT pid FROM servers")
        assert sorted(int(pid) for (pid,) in rows) == sorted(worker_pids(server).values())
        again = re.findall(r" w1 listening on .* port (\d+) \(wake-ups, UDP\)", server.log)
        assert again[0] == again[1]  # the same wake-up address
        for credential in on_victim:
            with server.connect() as client:
                assert client.handshake(credential) == credential
                assert client.read_lines(3) == [f"MESSAGE: {n} for {credential}" for n in range(3)]
        for client, credential in clients:  # the survivors' connections were never touched
            if credential not in on_victim:
                assert messaging_server.enqueue(credential, "still here", db=db_url)
                assert client.read_line() == "MESSAGE: still here"
                client.close()
        assert server.stop(signal.SIGINT) == 0  # Ctrl-C, as SIGTERM in the test above
    assert "supervisor received SIGINT: stopping the workers" in server.log
    assert "Traceback" not in server.log, server.log


def test_start_up_errors_fail_fast_with_the_single_server_status(sqlite_url: str) -> None:
    """A client port that is taken: status 1 and the usual message, no worker started.
    A TLS file that cannot be read: the first worker fails, the others are stopped, the
    supervisor exits with its status 1 and its message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "messaging_server", "--workers", "2",
                               "-p", str(port), "--db", sqlite_url], env=env,
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert (f"messaging_server: cannot listen: cannot bind the client port (TCP), port {port}: "
            "Address already in use") in done.stderr, done.stderr
    assert "started worker" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "messaging_server", "--workers", "2", "-p", "0",
                           "--db", sqlite_url, "--tls-cert", "/nonexistent.pem"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "messaging_server: cannot use TLS certificate '/nonexistent.pem'" in done.stderr
    assert "started worker" not in done.stderr  # found before any worker (or the database)
    assert "Traceback" not in done.stderr, done.stderr
