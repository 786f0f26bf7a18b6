"""The Niki half of the suite: a fresh server process, raw-socket clients, B1-B4.

Clients are raw non-blocking sockets read by one selector thread (:class:`LineHub`),
not :class:`messaging_server.client.sdk.Client` objects, so that 10,000 of them fit in
one process and the reader costs little CPU next to the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from common import (
    BenchError,
    CpuMeter,
    Handshake,
    Opened,
    check_delivery,
    now,
    open_connections,
    percentile,
    proc_status,
    stop_process,
    wait_for_log,
    wait_until,
)
from mysql_counts import CountingProxy, MysqlServer, count_delta, status_delta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from messaging_server import Enqueuer, NikiError  # noqa: E402

# A single server's line, or (--workers above 1) the supervisor's once every worker listens.
LISTENING = re.compile(r"(?:INFO listening on .*? port|supervisor \d+ workers serving clients on port)"
                       r" (\d+)")
PREFIX = b"MESSAGE: "


class NikiHandshake(Handshake):
    """GET_CLIENT_ID / NONE (or a credential) / SET_CLIENT_ID: <credential>."""

    def __init__(self, credential: Optional[str] = None) -> None:
        self.answer = (credential or "NONE").encode() + b"\n"
        self.greeted = False

    def feed(self, buf: bytearray) -> bytes:
        out = b""
        while not self.done and b"\n" in buf:
            i = buf.index(b"\n")
            line = bytes(buf[:i]).rstrip(b"\r")
            del buf[:i + 1]
            if not self.greeted:
                if line != b"GET_CLIENT_ID":
                    raise BenchError(f"greeting {line[:60]!r}")
                self.greeted = True
                out += self.answer
            elif line.startswith(b"SET_CLIENT_ID: "):
                self.result = line[len(b"SET_CLIENT_ID: "):].decode()
                self.done = True
            else:
                raise BenchError(f"answer {line[:60]!r}")
        return out


def numeric_id(credential: str) -> int:
    return int(credential.split(".", 1)[0])


class LineHub:
    """One thread reading ``MESSAGE:`` lines from many connections through a selector.

    Keeps every body per connection (for the exactly-once-in-order check), the
    time of the last arrival, and optionally the arrival time of each message.
    """

    def __init__(self, socks: Sequence[socket.socket], leftovers: Sequence[bytes],
                 keep_times: bool = False) -> None:
        self.bodies: List[List[bytes]] = [[] for _ in socks]
        self.times: List[List[float]] = [[] for _ in socks]
        self.notices: List[bytes] = []
        self.closed: List[int] = []
        self.count = 0
        self.last_arrival = 0.0
        self.keep_times = keep_times
        self.target = 1
        self.cond = threading.Condition()
        self._bufs = [bytearray(b) for b in leftovers]
        self._bufs += [bytearray() for _ in range(len(socks) - len(leftovers))]
        self._sel = selectors.DefaultSelector()
        self._stop = False
        t = now()
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, i)
            self._consume(i, b"", t)
        self._thread = threading.Thread(target=self._run, name="niki-reader", daemon=True)
        self._thread.start()

    def _consume(self, i: int, chunk: bytes, t: float) -> None:
        buf = self._bufs[i]
        buf += chunk
        end = buf.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(buf[:end]).split(b"\n")
        del buf[:end + 1]
        got = 0
        bodies = self.bodies[i]
        for line in lines:
            if line.startswith(PREFIX):
                bodies.append(line[len(PREFIX):])
                got += 1
            else:
                self.notices.append(line)
        if got:
            if self.keep_times:
                self.times[i].extend([t] * got)
            self.count += got  # only this thread writes it
            self.last_arrival = t
            if self.count >= self.target:  # waking the waiter per chunk would cost a GIL hand-off
                with self.cond:
                    self.cond.notify_all()

    def _run(self) -> None:
        while not self._stop:
            for key, _mask in self._sel.select(timeout=0.1):
                try:
                    chunk = key.fileobj.recv(262144)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    self._consume(key.data, chunk, now())
                else:
                    self._sel.unregister(key.fileobj)
                    self.closed.append(key.data)

    def wait_for(self, total: int, idle_timeout: float, cap: float) -> bool:
        """Until ``total`` messages arrived (True), or nothing came for idle_timeout, or cap."""
        start = now()
        self.target = total
        with self.cond:
            last_count, last_progress = self.count, now()
            while self.count < total:
                t = now()
                if self.count != last_count:
                    last_count, last_progress = self.count, t
                if t - last_progress > idle_timeout or t - start > cap:
                    return False
                self.cond.wait(timeout=0.2)
        return True

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self._sel.close()


class NikiSide:
    """Starts one Niki server for the whole suite run and runs the scenarios against it."""

    name = "niki"
    label = "Niki"

    def __init__(self, db_kind: str, mysql: Optional[MysqlServer], tmpdir: str, nonce: str,
                 window: int, timeout: float, sources: Sequence[str], idle_timeout: float,
                 b4_budget: float, server_args: Sequence[str] = ()) -> None:
        self.db_kind = db_kind
        self.server_args = list(server_args)
        self.b4_budget = b4_budget
        self.mysql = mysql
        self.tmpdir = tmpdir
        self.nonce = nonce
        self.window = window
        self.timeout = timeout
        self.sources = list(sources)
        self.idle_timeout = idle_timeout
        self.database = f"niki_bench_{nonce}"
        self.db_url = ""
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(tmpdir, "niki.log")
        self.port = 0
        self.base_threads = 0.0
        self.enqueuer: Optional[Enqueuer] = None
        self.db_pid: Optional[int] = None
        self.created_database = False

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    # ---- processes -------------------------------------------------------

    def start(self, max_connections: int, db_pid: Optional[int]) -> None:
        """A fresh database and a server on free ports; routed wake-ups (no NIKI_PEERS)."""
        self.db_pid = db_pid
        if self.db_kind == "mysql":
            assert self.mysql is not None
            self.mysql.create_database(self.database)
            self.created_database = True
            self.db_url = self.mysql.url(self.database)
        else:
            self.db_url = "sqlite:///" + os.path.join(self.tmpdir, "niki.sqlite3")
        self.proc, self.port = start_server(self.db_url, self.log_path, max_connections,
                                            self.server_args)
        os.environ.pop("NIKI_PEERS", None)  # routed mode for the Enqueuer as for the server
        self.enqueuer = Enqueuer(db=self.db_url)
        self.settle()
        self.base_threads = proc_status(self.pid).get("threads", 0.0)

    def stop(self) -> Optional[int]:
        """Close the enqueuer, stop the server, drop the database; the server's exit status."""
        status = None
        try:
            if self.enqueuer is not None:
                self.enqueuer.close()
                self.enqueuer = None
        finally:
            try:
                status = stop_process(self.proc)
            finally:
                if self.created_database and self.mysql is not None:
                    self.mysql.drop_database(self.database)
                    self.created_database = False
        return status

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settle(self, timeout: float = 180.0) -> float:
        """Wait until the server is back to its idle thread count; seconds it took.

        Closing thousands of connections costs the server a transaction each;
        the next measurement must not pay for the previous one's disconnects.
        Gives up after ``timeout`` (the figure then equals it, and a note is printed).
        """
        t0 = now()
        base = self.base_threads or 0.0

        def idle() -> bool:
            threads = proc_status(self.pid).get("threads")
            return threads is not None and (not base or threads <= base)

        time.sleep(0.2)
        if not wait_until(idle, timeout, 0.1):
            threads = proc_status(self.pid).get("threads")
            print(f"note: Niki server still has {threads} threads (idle: {base}) after {timeout:.0f} s; "
                  f"going on", flush=True)
        return now() - t0

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter({"server": self.pid, "db": self.db_pid})

    def log_problems(self) -> List[str]:
        return scan_log(self.log_path)

    # ---- helpers ---------------------------------------------------------

    def _open(self, handshakes: Sequence[Handshake], sources: bool = True) -> Opened:
        opened = open_connections("127.0.0.1", self.port, handshakes, self.window, self.timeout,
                                  self.sources if sources else None)
        if len(opened.socks) < len(handshakes):
            failures = dict(opened.failures)
            opened.close()
            raise BenchError(f"{len(handshakes) - len(opened.socks)} of {len(handshakes)} Niki "
                             f"handshakes failed: {failures}")
        return opened

    def _enqueue(self, client: int, body: str) -> str:
        """'ok', 'duplicate' or the error's class name: never raises for a refused message."""
        assert self.enqueuer is not None
        try:
            return "ok" if self.enqueuer.enqueue(client, body) else "duplicate"
        except NikiError as exc:
            return type(exc).__name__

    # ---- scenarios -------------------------------------------------------

    def b1(self, n: int, warmup: int, run: int) -> Dict[str, Any]:
        """Latency: one connected client, each message queued and awaited in turn."""
        opened = self._open([NikiHandshake()], sources=False)
        hub = LineHub(opened.socks, opened.leftovers, keep_times=True)
        client = numeric_id(opened.results[0])
        lat: List[float] = []
        call: List[float] = []
        timeouts = 0
        errors: Dict[str, int] = {}
        expected: List[bytes] = []
        try:
            for i in range(warmup + n):
                body = f"{self.nonce}-b1-{run}-{i}"
                seen = hub.count
                t0 = now()
                result = self._enqueue(client, body)
                t1 = now()
                if result != "ok":
                    errors[result] = errors.get(result, 0) + 1
                    continue
                expected.append(body.encode())
                if not hub.wait_for(seen + 1, self.timeout, self.timeout):
                    timeouts += 1
                    continue
                if i >= warmup:
                    lat.append(hub.times[0][seen] - t0)
                    call.append(t1 - t0)
            hub.wait_for(len(expected), 1.0, 3.0)
            check = check_delivery([expected], hub.bodies)
        finally:
            hub.stop()
            opened.close()
        return latency_figures(lat, call, timeouts, errors, check)

    def b2(self, clients: int, messages: int, run: int, batch: int = 0) -> Dict[str, Any]:
        """Throughput: round-robin to connected clients, one enqueuing thread, then the check."""
        assert self.enqueuer is not None
        opened = self._open([NikiHandshake() for _ in range(clients)])
        hub = LineHub(opened.socks, opened.leftovers)
        ids = [numeric_id(c) for c in opened.results]
        tag = "b2b" if batch else "b2"
        items = [(ids[k % clients], f"{self.nonce}-{tag}-{clients}-{run}-{k}") for k in range(messages)]
        expected: List[List[bytes]] = [[] for _ in range(clients)]
        refused: Dict[str, int] = {}
        status_before = status_after = None
        others: List[str] = []
        try:
            time.sleep(0.5)  # let the server finish each connection's (empty) backlog pass
            if self.mysql is not None:
                others = self.mysql.other_sessions(self.database)
                status_before = self.mysql.global_status()
            meter = self.cpu_meter()
            meter.start()
            t0 = now()
            if batch:
                accepted = self._enqueue_batches(items, batch, refused)
            else:
                results = [self._enqueue(cid, body) for cid, body in items]
                accepted = [r == "ok" for r in results]
                for r in results:
                    if r != "ok":
                        refused[r] = refused.get(r, 0) + 1
            t_enq = now()
            for k, ((_cid, body), ok) in enumerate(zip(items, accepted)):
                if ok:
                    expected[k % clients].append(body.encode())
            total = sum(len(e) for e in expected)
            complete = hub.wait_for(total, self.idle_timeout, max(600.0, messages / 20))
            cpu = meter.stop()
            if self.mysql is not None:
                status_after = self.mysql.global_status()
                others = sorted(set(others) | set(self.mysql.other_sessions(self.database)))
            wall = hub.last_arrival - t0
            check = check_delivery(expected, hub.bodies)
            delivered = sum(len(b) for b in hub.bodies)
            figures: Dict[str, Any] = {
                "clients": clients, "messages": messages, "batch": batch,
                "rate": delivered / wall if wall > 0 else 0.0,
                "enqueue_rate": messages / (t_enq - t0),
                "wall_s": wall, "delivered": delivered, "complete": complete,
                "refused": refused, "check": check, "cpu": cpu,
                "closed_by_server": len(hub.closed), "notices": len(hub.notices),
            }
            if status_before is not None and status_after is not None:
                delta = status_delta(status_before, status_after)
                figures["db_status"] = delta
                figures["db_statements_per_message"] = delta["Questions"] / max(delivered, 1)
                figures["db_round_trips_per_message"] = (
                    (delta["Questions"] + delta["Com_admin_commands"]) / max(delivered, 1))
                figures["db_other_sessions"] = others
        finally:
            hub.stop()
            opened.close()
        figures["settle_s"] = self.settle()
        return figures

    def _enqueue_batches(self, items: List[Tuple[int, str]], size: int,
                         refused: Dict[str, int]) -> List[bool]:
        """The batch API, if the package has one: enqueue_many([(client_id, body), ...]).

        One result per item: True (queued), False (a duplicate) or the error that
        refused that item; a raised NikiError refuses the whole call.
        """
        assert self.enqueuer is not None
        accepted: List[bool] = []
        many = self.enqueuer.enqueue_many  # type: ignore[attr-defined]
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            try:
                result = many(chunk)
            except NikiError as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + len(chunk)
                accepted += [False] * len(chunk)
                continue
            if not isinstance(result, (list, tuple)) or len(result) != len(chunk):
                raise BenchError(f"enqueue_many returned {type(result).__name__}, not one result per item")
            for r in result:
                if r is not True:
                    why = "duplicate" if r is False else type(r).__name__
                    refused[why] = refused.get(why, 0) + 1
            accepted += [r is True for r in result]
        return accepted

    def b3(self, messages: int, run: int) -> Dict[str, Any]:
        """Catch-up: a backlog queued while the client is away, drained when it reconnects."""
        opened = self._open([NikiHandshake()], sources=False)
        credential = opened.results[0]
        sock = opened.socks[0]
        sock.setblocking(True)
        sock.settimeout(self.timeout)
        sock.sendall(b"DISCONNECT\n")
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        opened.close()
        client = numeric_id(credential)
        expected: List[bytes] = []
        refused: Dict[str, int] = {}
        tenth = max(1, messages // 10)
        marks: Dict[int, float] = {}
        t_enq = now()
        for i in range(messages):
            if i in (tenth, messages - tenth):
                marks[i] = now()
            body = f"{self.nonce}-b3-{run}-{i}"
            result = self._enqueue(client, body)
            if result == "ok":
                expected.append(body.encode())
            else:
                refused[result] = refused.get(result, 0) + 1
        enqueue_s = now() - t_enq
        # Does queueing slow down as the backlog grows?  First tenth against last tenth.
        t_end = t_enq + enqueue_s
        first_rate = tenth / (marks[tenth] - t_enq) if tenth in marks else 0.0
        last_start = marks.get(messages - tenth, t_end)
        last_rate = tenth / (t_end - last_start) if t_end > last_start else 0.0
        meter = self.cpu_meter()
        meter.start()
        t0 = now()
        again = self._open([NikiHandshake(credential)], sources=False)
        handshake_s = now() - t0
        hub = LineHub(again.socks, again.leftovers)
        try:
            if again.results[0] != credential:
                raise BenchError(f"reconnect with {credential} was given {again.results[0]}")
            complete = hub.wait_for(len(expected), self.idle_timeout, 600.0)
            cpu = meter.stop()
            secs = hub.last_arrival - t0
            check = check_delivery([expected], hub.bodies)
            received = len(hub.bodies[0])
        finally:
            hub.stop()
            again.close()
        return {"messages": messages, "rate": received / secs if secs > 0 else 0.0,
                "connect_to_last_s": secs, "handshake_ms": 1000 * handshake_s,
                "enqueue_rate": messages / enqueue_s, "enqueue_rate_first_tenth": first_rate,
                "enqueue_rate_last_tenth": last_rate, "received": received,
                "complete": complete, "refused": refused, "check": check, "cpu": cpu,
                "settle_s": self.settle()}

    def b4(self, clients: int, run: int) -> Dict[str, Any]:
        """Capacity: N idle clients; handshake rate, memory, threads, one last message."""
        before = proc_status(self.pid)
        meter = self.cpu_meter()
        meter.start()
        opened = open_connections("127.0.0.1", self.port, [NikiHandshake() for _ in range(clients)],
                                  self.window, self.timeout, self.sources, self.b4_budget,
                                  4 * self.window)
        cpu = meter.stop()
        try:
            ok = len(opened.socks)
            time.sleep(1.0)  # let the server settle before sampling /proc
            after = proc_status(self.pid)
            idle_cpu = idle_cpu_percent(self.pid)
            last_ms = None
            last_ok = False
            if ok:
                sock = opened.socks[-1]
                body = f"{self.nonce}-b4-{run}-last"
                t0 = now()
                result = self._enqueue(numeric_id(opened.results[-1]), body)
                got = read_message(sock, opened.leftovers[-1], self.timeout)
                last_ms = 1000 * (now() - t0)
                last_ok = result == "ok" and got == body.encode()
        finally:
            opened.close()
        return capacity_figures(clients, opened, before, after, last_ms, last_ok, cpu, idle_cpu,
                                self.settle())

    # ---- database round trips (MariaDB only) -------------------------------

    def round_trips(self, clients: int, messages: int) -> Dict[str, Any]:
        """Exact commands per message, counted by relays in front of MariaDB.

        A second server (on the same database) and a second Enqueuer connect
        through their own CountingProxy, so each side's commands are counted
        apart; the server's idle rate (heartbeat, sweeps) is measured first and
        subtracted.  Untimed: the relays add a hop.
        """
        assert self.mysql is not None
        upstream = (self.mysql.host, self.mysql.port)
        server_proxy = CountingProxy(upstream)
        enqueue_proxy = CountingProxy(upstream)
        log_path = os.path.join(self.tmpdir, "niki-counted.log")
        proc, port = start_server(self.mysql.url(self.database, server_proxy.port), log_path,
                                  clients + 100)
        enqueuer = Enqueuer(db=self.mysql.url(self.database, enqueue_proxy.port))
        opened: Optional[Opened] = None
        hub: Optional[LineHub] = None
        try:
            opened = open_connections("127.0.0.1", port, [NikiHandshake() for _ in range(clients)],
                                      self.window, self.timeout, self.sources)
            if len(opened.socks) < clients:
                raise BenchError(f"round-trip run: handshakes failed: {dict(opened.failures)}")
            hub = LineHub(opened.socks, opened.leftovers)
            ids = [numeric_id(c) for c in opened.results]
            time.sleep(1.0)
            idle_s = 6.0
            s0 = server_proxy.snapshot()
            time.sleep(idle_s)
            idle = count_delta(s0, server_proxy.snapshot())
            idle_rate = sum(idle.values()) / idle_s
            s1, e1 = server_proxy.snapshot(), enqueue_proxy.snapshot()
            t0 = now()
            for k in range(messages):
                enqueuer.enqueue(ids[k % clients], f"{self.nonce}-rt-{k}")
            hub.wait_for(messages, self.idle_timeout, 600.0)
            secs = now() - t0
            server_delta = count_delta(s1, server_proxy.snapshot())
            enqueue_delta = count_delta(e1, enqueue_proxy.snapshot())
            delivered = hub.count
            # offline: a client that connected once and left; the server is idle meanwhile
            away = open_connections("127.0.0.1", port, [NikiHandshake()], 1, self.timeout)
            away_id = numeric_id(away.results[0])
            away.socks[0].sendall(b"DISCONNECT\n")
            time.sleep(0.5)
            away.close()
            time.sleep(0.5)
            e2, s2 = enqueue_proxy.snapshot(), server_proxy.snapshot()
            g2 = self.mysql.global_status()
            t2 = now()
            for k in range(messages):
                enqueuer.enqueue(away_id, f"{self.nonce}-rt-off-{k}")
            secs_off = now() - t2
            g3 = self.mysql.global_status()
            offline_delta = count_delta(e2, enqueue_proxy.snapshot())
            offline_server = count_delta(s2, server_proxy.snapshot())
        finally:
            if hub is not None:
                hub.stop()
            if opened is not None:
                opened.close()
            enqueuer.close()
            stop_process(proc)
            server_proxy.close()
            enqueue_proxy.close()
        server_total = sum(server_delta.values()) - idle_rate * secs
        global_off = status_delta(g2, g3)
        return {
            "clients": clients, "messages": messages, "delivered": delivered,
            "server_idle_commands_per_s": idle_rate, "server_idle_commands": idle,
            "server_commands": server_delta, "enqueue_commands": enqueue_delta,
            "server_per_message": server_total / max(delivered, 1),
            "enqueue_per_message": sum(enqueue_delta.values()) / messages,
            "offline_enqueue_commands": offline_delta,
            "offline_enqueue_per_message": sum(offline_delta.values()) / messages,
            "offline_server_commands": offline_server,
            "offline_global_status": global_off,
            "offline_global_questions_per_message": global_off["Questions"] / messages,
            "offline_global_round_trips_per_message":
                (global_off["Questions"] + global_off["Com_admin_commands"]) / messages,
            "offline_seconds": secs_off,
            "log_problems": scan_log(log_path),
        }


def idle_cpu_percent(pid: Optional[int], seconds: float = 3.0) -> Optional[float]:
    """A server's CPU (% of a core) while its clients are connected and nothing happens."""
    meter = CpuMeter({"server": pid})
    meter.start()
    time.sleep(seconds)
    return meter.stop().get("server")


def start_server(db_url: str, log_path: str, max_connections: int,
                 extra: Sequence[str] = ()) -> Tuple[subprocess.Popen, int]:
    """``python -m messaging_server -p 0`` with defaults otherwise (and ``extra``, e.g.
    ``--workers 2``); its client port from its log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIKI_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "messaging_server", "-p", "0", "--db", db_url,
           "--advertise-host", "127.0.0.1", "--max-connections", str(max_connections), *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=os.path.dirname(log_path), start_new_session=True)
    try:
        found = wait_for_log(log_path, LISTENING.search, proc, 60.0)
    except BaseException:
        stop_process(proc)
        raise
    return proc, int(found.group(1))  # type: ignore[attr-defined]


def scan_log(path: str, limit: int = 20) -> List[str]:
    """Log lines at WARNING or above, and tracebacks: what looked wrong in the server."""
    problems: List[str] = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if (" WARNING " in line or " ERROR " in line or " CRITICAL " in line
                        or line.startswith("Traceback")):
                    problems.append(line.rstrip())
    except OSError:
        return []
    if len(problems) > limit:
        return [*problems[:limit], f"... and {len(problems) - limit} more such lines"]
    return problems


def read_message(sock: socket.socket, leftover: bytes, timeout: float) -> Optional[bytes]:
    """The next MESSAGE body on a blocking read of one socket, or None."""
    buf = bytearray(leftover)
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while True:
            while b"\n" in buf:
                i = buf.index(b"\n")
                line = bytes(buf[:i])
                del buf[:i + 1]
                if line.startswith(PREFIX):
                    return line[len(PREFIX):]
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None


def latency_figures(lat: List[float], call: List[float], timeouts: int, errors: Dict[str, int],
                    check: Dict[str, int]) -> Dict[str, Any]:
    """p50/p90/p99/max in ms, plus the samples for the CDF plot."""
    ms = sorted(1000 * x for x in lat)
    call_ms = sorted(1000 * x for x in call)
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": ms[-1] if ms else float("nan"),
            "mean": sum(ms) / len(ms) if ms else float("nan"),
            "call_p50": percentile(call_ms, 50), "timeouts": timeouts, "refused": errors,
            "check": check, "samples_ms": [round(x, 4) for x in ms]}


def capacity_figures(clients: int, opened: Opened, before: Dict[str, float], after: Dict[str, float],
                     last_ms: Optional[float], last_ok: bool, cpu: Dict[str, float],
                     idle_cpu: Optional[float], settle_s: Optional[float]) -> Dict[str, Any]:
    ok = len(opened.results)
    figures: Dict[str, Any] = {
        "requested": clients, "connected": ok, "failures": dict(opened.failures),
        "gave_up": opened.gave_up,
        "handshakes_per_s": ok / opened.elapsed if opened.elapsed > 0 else 0.0,
        "handshakes_per_s_by_step": opened.rates_by_step(max(100, clients // 10)),
        "handshake_s": opened.elapsed, "cpu": cpu, "idle_cpu": idle_cpu,
        "last_message_ms": last_ms, "last_message_ok": last_ok, "settle_s": settle_s,
    }
    if before and after:
        figures.update({
            "rss_before_mb": before["rss_kb"] / 1024, "rss_after_mb": after["rss_kb"] / 1024,
            "rss_delta_mb": (after["rss_kb"] - before["rss_kb"]) / 1024,
            "kb_per_client": (after["rss_kb"] - before["rss_kb"]) / max(ok, 1),
            "threads_before": before["threads"], "threads": after["threads"],
        })
    return figures


def niki_reader_capacity(clients: int = 10, per_client: int = 10000, timeout: float = 60.0
                         ) -> Dict[str, Any]:
    """Messages/s the LineHub takes from socket pairs that only send (no server).

    If a Niki rate comes close to this, the suite's reader limits it.
    """
    pairs = [socket.socketpair() for _ in range(clients)]
    hub = LineHub([b for _a, b in pairs], [])
    blob = b"".join(b"MESSAGE: bench-%012d\n" % k for k in range(per_client))

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(blob)

    try:
        t0 = now()
        senders = [threading.Thread(target=send, args=(a,), daemon=True) for a, _b in pairs]
        for sender in senders:
            sender.start()
        hub.wait_for(clients * per_client, 10.0, timeout)
        secs = hub.last_arrival - t0
        return {"clients": clients, "messages": hub.count,
                "rate": hub.count / secs if secs > 0 else 0.0}
    finally:
        hub.stop()
        for a, b in pairs:
            a.close()
            b.close()
