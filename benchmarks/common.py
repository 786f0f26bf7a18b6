"""Helpers both sides of the benchmark suite share: processes, /proc, sockets, checks.

Kept free of Niki and MQTT specifics so that both systems are measured with the
same clock, the same connection pipeline and the same delivery check.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import selectors
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

now = time.perf_counter

# Linux: let connect() pick the source port, so that bind((ip, 0)) does not use
# up the ephemeral range per address before the destination is known.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class BenchError(Exception):
    """A scenario could not be measured (a process failed, a handshake was refused...)."""


def free_port() -> int:
    """A TCP port nobody listens on right now (small race, fine on a test box)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> Tuple[int, int]:
    """Raise the soft open-file limit to the hard one: 10,000 sockets need it.

    Child processes (the servers) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants: a server started with ``--workers`` above 1 is a
    supervisor whose worker processes do the work, and their memory and CPU count."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def proc_status(pid: Optional[int]) -> Dict[str, float]:
    """Resident memory (KB) and thread count of a process and its descendants, summed,
    from /proc/PID/status."""
    if not pid:
        return {}
    total: Dict[str, float] = {}
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss, threads = float(fields["VmRSS"].split()[0]), float(fields["Threads"])
        except (OSError, KeyError, ValueError):
            if member == pid:
                return {}
            continue  # a child that just ended
        total["rss_kb"] = total.get("rss_kb", 0.0) + rss
        total["threads"] = total.get("threads", 0.0) + threads
    return total


def cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """User + system CPU seconds a process and its descendants have used (all threads)."""
    if not pid:
        return None
    total = None
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            seconds = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            if member == pid:
                return None
            continue
        total = seconds if total is None else total + seconds
    return total


def find_pid(command_name: str) -> Optional[int]:
    """The first process whose /proc/PID/comm is ``command_name`` (to watch MariaDB's CPU)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == command_name:
                        return int(entry)
            except OSError:
                continue
    return None


def system_busy_seconds() -> float:
    """CPU seconds all processes of the machine used (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use of the processes involved over one measurement, in % of one core.

    Tells which side limits a figure: a server near 100 % (one Python process
    mostly holds one core because of the GIL), the suite itself (the load
    generator and readers), or the database.  ``other``: everything else on
    the machine (other people's jobs on a shared box disturb the figures).
    """

    def __init__(self, pids: Dict[str, Optional[int]]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._start: Dict[str, Optional[float]] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = now()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._start["suite"] = usage.ru_utime + usage.ru_stime
        self._start["_all"] = system_busy_seconds()

    def stop(self) -> Dict[str, float]:
        """% of one core per process since start()."""
        wall = max(now() - self._t0, 1e-6)
        out: Dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            if before is not None and after is not None:
                out[name] = round(100.0 * (after - before) / wall, 1)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        suite_s = usage.ru_utime + usage.ru_stime - (self._start["suite"] or 0.0)
        out["suite"] = round(100.0 * suite_s / wall, 1)
        everything = 100.0 * (system_busy_seconds() - (self._start["_all"] or 0)) / wall
        out["other"] = round(max(0.0, everything - sum(out.values())), 1)
        return out


def other_load(own_pids: Sequence[Optional[int]], seconds: float = 1.0) -> float:
    """CPU (% of one core) used over ``seconds`` by everything but this suite and ``own_pids``."""
    meter = CpuMeter({f"p{i}": pid for i, pid in enumerate(own_pids)})
    meter.start()
    time.sleep(seconds)
    return meter.stop()["other"]


def wait_quiet(own_pids: Sequence[Optional[int]], threshold: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` % CPU.

    On a shared 2-core machine someone else's test run halves what the servers
    get; the figure measured right after is recorded with each run.
    """
    deadline = time.monotonic() + max_wait
    while True:
        load = other_load(own_pids)
        if load < threshold or time.monotonic() >= deadline:
            return load


def wait_for_log(path: str, pattern: Callable[[str], Optional[object]], proc: subprocess.Popen,
                 timeout: float) -> object:
    """Poll a log file until ``pattern`` matches a line; BenchError if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    found = pattern(line)
                    if found is not None:
                        return found
        except OSError:
            pass
        if proc.poll() is not None:
            raise BenchError(f"process exited with status {proc.returncode} before it was ready; "
                             f"log {path}")
        time.sleep(0.05)
    raise BenchError(f"process not ready within {timeout:.0f} s; log {path}")


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 30.0) -> Optional[int]:
    """SIGTERM, wait, SIGKILL if needed: both servers go away even after an error."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def source_addresses(count: int) -> List[str]:
    """127.0.0.2 ... 127.0.0.(count+1): spreads connections over source addresses.

    Three runs of 10,000 connections to one port from one address would need
    more (address, port) pairs than the ephemeral range while TIME_WAIT holds them.
    """
    return [f"127.0.0.{2 + i}" for i in range(max(1, min(count, 250)))]


def nonblocking_connect(host: str, port: int, source: Optional[str]) -> socket.socket:
    """A non-blocking TCP socket with connect() started from ``source`` (if given)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    except OSError:
        sock.close()
        raise
    return sock


class Handshake:
    """One connection's handshake, driven by :func:`open_connections`.

    ``first()`` is what to send once connected; ``feed(buf)`` consumes received
    bytes from ``buf`` and returns bytes to send, or sets ``done``/raises BenchError.
    """

    done = False
    result: str = ""

    def first(self) -> bytes:
        return b""

    def feed(self, buf: bytearray) -> bytes:
        raise NotImplementedError


@dataclass
class Opened:
    """Connections that finished their handshake, in the order they were started."""

    socks: List[socket.socket] = field(default_factory=list)
    results: List[str] = field(default_factory=list)
    leftovers: List[bytes] = field(default_factory=list)
    failures: Dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    done_times: List[float] = field(default_factory=list)  # seconds from start, per success
    gave_up: str = ""

    def rates_by_step(self, step: int) -> List[float]:
        """Handshakes/s over each successive ``step`` successes: shows a rate that collapses."""
        out = []
        for end in range(step, len(self.done_times) + 1, step):
            start_t = self.done_times[end - step - 1] if end > step else 0.0
            span = self.done_times[end - 1] - start_t
            out.append(round(step / span, 1) if span > 0 else 0.0)
        return out

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.socks = []


def open_connections(host: str, port: int, handshakes: Sequence[Handshake], window: int,
                     timeout: float, sources: Optional[Sequence[str]] = None,
                     budget: Optional[float] = None, give_up_after: int = 0) -> Opened:
    """Connect and handshake ``len(handshakes)`` clients, at most ``window`` in flight.

    One selector drives non-blocking sockets, so the rate measured is the
    server's (and the kernel's), not that of client threads.  Each handshake
    has its own deadline; failures are counted by reason, never raised.
    No new handshake starts after ``budget`` seconds, nor after
    ``give_up_after`` failures in a row (a server that stopped answering would
    otherwise cost ``timeout`` per remaining client / ``window``).
    """
    sel = selectors.DefaultSelector()
    res = Opened()
    done: List[Tuple[int, socket.socket, str, bytes]] = []
    inflight: Dict[int, Dict] = {}
    started = 0
    count = len(handshakes)
    t0 = now()
    failed_in_a_row = 0

    def fail(state: Dict, why: str) -> None:
        nonlocal failed_in_a_row
        failed_in_a_row += 1
        res.failures[why] = res.failures.get(why, 0) + 1
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(state["sock"])
        state["sock"].close()
        inflight.pop(state["idx"], None)

    try:
        while started < count or inflight:
            if started < count and not res.gave_up:
                if budget is not None and now() - t0 > budget:
                    res.gave_up = f"stopped after {budget:.0f} s with {started} of {count} started"
                elif give_up_after and failed_in_a_row >= give_up_after:
                    res.gave_up = f"stopped after {failed_in_a_row} failures in a row"
                if res.gave_up:
                    count = started
            while started < count and len(inflight) < window:
                idx = started
                started += 1
                source = sources[idx % len(sources)] if sources else None
                try:
                    sock = nonblocking_connect(host, port, source)
                except OSError as exc:
                    why = "connect:" + errno.errorcode.get(exc.errno or 0, str(exc))
                    res.failures[why] = res.failures.get(why, 0) + 1
                    continue
                state = {"sock": sock, "hs": handshakes[idx], "buf": bytearray(), "t": now(),
                         "idx": idx, "connected": False}
                inflight[idx] = state
                sel.register(sock, selectors.EVENT_WRITE, state)
            for key, _mask in sel.select(timeout=0.2):
                state = key.data
                sock = state["sock"]
                if state["idx"] not in inflight:
                    continue
                if not state["connected"]:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(state, "connect:" + errno.errorcode.get(err, str(err)))
                        continue
                    state["connected"] = True
                    sel.modify(sock, selectors.EVENT_READ, state)
                    first = state["hs"].first()
                    if first:
                        sock.sendall(first)  # tiny: fits the empty send buffer
                    continue
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(state, "recv:" + errno.errorcode.get(exc.errno or 0, str(exc)))
                    continue
                if not chunk:
                    fail(state, "closed by server during handshake")
                    continue
                state["buf"] += chunk
                hs: Handshake = state["hs"]
                try:
                    reply = hs.feed(state["buf"])
                except BenchError as exc:
                    fail(state, str(exc)[:80])
                    continue
                if reply:
                    sock.sendall(reply)
                if hs.done:
                    failed_in_a_row = 0
                    res.done_times.append(now() - t0)
                    sel.unregister(sock)
                    inflight.pop(state["idx"])
                    done.append((state["idx"], sock, hs.result, bytes(state["buf"])))
            t = now()
            for state in list(inflight.values()):
                if t - state["t"] > timeout:
                    fail(state, "handshake timeout")
    finally:
        for state in list(inflight.values()):
            fail(state, "aborted")
        sel.close()
    res.elapsed = now() - t0
    done.sort(key=lambda item: item[0])
    res.socks = [item[1] for item in done]
    res.results = [item[2] for item in done]
    res.leftovers = [item[3] for item in done]
    return res


def check_delivery(expected: Sequence[Sequence[bytes]], received: Sequence[Sequence[bytes]]
                   ) -> Dict[str, int]:
    """Lost, duplicated, unexpected and out-of-order messages, per client then summed.

    Every body is unique, so a body seen twice is a duplicate and a body
    earlier in the queueing order than one already seen is out of order.
    """
    lost = dup = unexpected = order = 0
    for want, got in zip(expected, received):
        position = {body: k for k, body in enumerate(want)}
        seen = set()
        last = -1
        for body in got:
            k = position.get(body)
            if k is None:
                unexpected += 1
            elif body in seen:
                dup += 1
            else:
                seen.add(body)
                if k < last:
                    order += 1
                last = max(last, k)
        lost += len(want) - len(seen)
    return {"lost": lost, "duplicated": dup, "unexpected": unexpected, "out_of_order": order}


def check_ok(check: Dict[str, int]) -> bool:
    return not any(check.get(k) for k in ("lost", "duplicated", "unexpected", "out_of_order"))


def check_text(check: Dict[str, int]) -> str:
    verdict = "OK" if check_ok(check) else "FAILED"
    return (f"{verdict}: lost={check.get('lost', 0)} duplicated={check.get('duplicated', 0)} "
            f"out_of_order={check.get('out_of_order', 0)} unexpected={check.get('unexpected', 0)}")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (as the conformance kit computes it)."""
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
