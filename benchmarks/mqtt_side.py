"""The MQTT half of the suite: a private Mosquitto, paho-mqtt clients, B1-B4.

Subscribers are paho-mqtt clients (MQTT 3.1.1, clean_session=False, fixed client
ids, QoS 1), driven by one selector thread through paho's external-loop calls
(:class:`PahoHub`) rather than one loop_start() thread each, so that 1,000 of them
do not turn the reader into the bottleneck.  B4's 10,000 idle connections use a
few lines of raw MQTT instead (CONNECT, SUBSCRIBE), with the same non-blocking
pipeline as Niki's handshakes: 10,000 paho objects would measure paho.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import selectors
import socket
import struct
import subprocess
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
    proc_status,
    stop_process,
    wait_for_log,
)
from niki_side import capacity_figures, idle_cpu_percent, latency_figures

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:  # the suite checks this first and says what to install
    mqtt = None  # type: ignore[assignment]
    CallbackAPIVersion = None  # type: ignore[assignment,misc]

MOSQUITTO = "/usr/sbin/mosquitto"


def new_client(client_id: str, userdata: Any = None) -> mqtt.Client:
    """A paho client with a persistent session (clean_session=False) under a fixed id."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                         userdata=userdata, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.max_queued_messages_set(0)  # unlimited: never drop on the client side
    return client


class PahoHub:
    """One thread running paho's network loop for many subscribers through a selector.

    paho reads one packet per loop_read() call (a few recv() calls each), so
    each readable socket is drained until nothing is left, and loop_write()
    flushes the PUBACKs and SUBSCRIBEs paho queued meanwhile.
    """

    def __init__(self, count: int, keep_times: bool = False) -> None:
        self.bodies: List[List[bytes]] = [[] for _ in range(count)]
        self.times: List[List[float]] = [[] for _ in range(count)]
        self.keep_times = keep_times
        self.count = 0
        self.last_arrival = 0.0
        self.subscribed = 0
        self.connected = 0
        self.session_present: List[bool] = [False] * count
        self.errors: List[str] = []
        self.target = 1
        self.cond = threading.Condition()
        self.clients: List[mqtt.Client] = []
        self._sel = selectors.DefaultSelector()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    def add(self, client: mqtt.Client, index: int, topic: Optional[str]) -> None:
        """Wire callbacks; ``topic`` None means the session already holds the subscription."""
        client.user_data_set(index)

        def on_connect(c: mqtt.Client, i: int, flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                self.errors.append(f"client {i}: CONNACK {reason}")
                return
            self.session_present[i] = bool(flags.session_present)
            if topic is not None:
                c.subscribe(topic, qos=1)
            with self.cond:
                self.connected += 1
                self.cond.notify_all()

        def on_subscribe(_c: mqtt.Client, i: int, _mid: int, codes: Any, _props: Any) -> None:
            if any(code.is_failure for code in codes):
                self.errors.append(f"client {i}: SUBACK {codes}")
            with self.cond:
                self.subscribed += 1
                self.cond.notify_all()

        def on_message(_c: mqtt.Client, i: int, message: Any) -> None:
            t = now()
            self.bodies[i].append(message.payload)
            if self.keep_times:
                self.times[i].append(t)
            self.count += 1  # only this thread writes it
            self.last_arrival = t
            if self.count >= self.target:  # waking the waiter per message would cost a GIL hand-off
                with self.cond:
                    self.cond.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        self.clients.append(client)

    def start(self) -> None:
        """Call after every client's connect(): from here on only this thread touches them."""
        for client in self.clients:
            self._sel.register(client.socket(), selectors.EVENT_READ, client)
        self._thread = threading.Thread(target=self._run, name="paho-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_misc = now()
        while not self._stop:
            for key, _mask in self._sel.select(timeout=0.1):
                client: mqtt.Client = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                for _ in range(100000):
                    rc = client.loop_read()
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        self._drop(sock, f"loop_read: {mqtt.error_string(rc)}")
                        break
                    try:
                        if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                            client.loop_read()
                            self._drop(sock, "closed by broker")
                            break
                    except BlockingIOError:
                        break
                    except OSError:
                        self._drop(sock, "socket error")
                        break
                if client.want_write():
                    client.loop_write()
            if now() - last_misc > 1.0:
                last_misc = now()
                for client in self.clients:
                    client.loop_misc()
                    if client.want_write():
                        client.loop_write()

    def _drop(self, sock: socket.socket, why: str) -> None:
        if not self._stop:
            self.errors.append(why)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def wait_subscribed(self, total: int, timeout: float) -> bool:
        deadline = now() + timeout
        with self.cond:
            while self.subscribed < total and now() < deadline:
                self.cond.wait(0.2)
        return self.subscribed >= total

    def wait_for(self, total: int, idle_timeout: float, cap: float) -> bool:
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

    def stop(self, disconnect: bool = True) -> None:
        """Stop the loop; then (on this thread, now the only user) DISCONNECT and close."""
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        for client in self.clients:
            if disconnect:
                with contextlib.suppress(Exception):  # closing anyway
                    client.disconnect()
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._sel.close()


class Publisher:
    """The application side: one paho client publishing QoS 1 under a fixed id.

    ``threaded``: paho's loop thread handles PUBACKs (pipelined publishing);
    otherwise publish() writes at once from the caller's thread and
    :meth:`wait_puback` reads the PUBACK there (one message at a time, B1).
    """

    def __init__(self, port: int, client_id: str, threaded: bool, inflight: int,
                 timeout: float) -> None:
        self.client = new_client(client_id)
        self.client.max_inflight_messages_set(inflight)
        self.threaded = threaded
        self.timeout = timeout
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        self.client.connect("127.0.0.1", port, keepalive=600)  # B4 leaves it idle for a while
        if threaded:
            self.client.loop_start()
            ok = connected.wait(timeout)
        else:
            deadline = now() + timeout
            while not connected.is_set() and now() < deadline:
                self.client.loop(0.1)
            ok = connected.is_set()
        if not ok:
            self.close()
            raise BenchError("publisher: no CONNACK from Mosquitto")

    def publish(self, topic: str, body: str) -> Any:
        return self.client.publish(topic, body, qos=1)

    def wait_puback(self, info: Any) -> bool:
        deadline = now() + self.timeout
        while not info.is_published() and now() < deadline:
            if self.threaded:
                time.sleep(0.001)
            else:
                self.client.loop(0.05)
        return bool(info.is_published())

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            if self.threaded:
                self.client.loop_stop()


# ---- raw MQTT 3.1.1, for B4's many idle connections ---------------------------


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """CONNECT, clean session 0 (persistent), no will, no credentials."""
    body = _string("MQTT") + bytes([4, 0x00]) + struct.pack("!H", keepalive) + _string(client_id)
    return bytes([0x10]) + _remaining(len(body)) + body


def subscribe_packet(mid: int, topic: str) -> bytes:
    body = struct.pack("!H", mid) + _string(topic) + bytes([1])
    return bytes([0x82]) + _remaining(len(body)) + body


class MqttHandshake(Handshake):
    """CONNECT/CONNACK then SUBSCRIBE/SUBACK (QoS 1): an idle subscriber ready for a message.

    ``topic`` None: reconnect to a persistent session that holds the subscription;
    done at CONNACK (``session_present`` tells whether the broker kept it).
    """

    def __init__(self, client_id: str, topic: Optional[str]) -> None:
        self.client_id = client_id
        self.topic = topic
        self.state = "connack"
        self.session_present = False

    def first(self) -> bytes:
        return connect_packet(self.client_id)

    def feed(self, buf: bytearray) -> bytes:
        if self.state == "connack" and len(buf) >= 4:
            if buf[0] != 0x20 or buf[3] != 0:
                raise BenchError(f"CONNACK {bytes(buf[:4])!r}")
            self.session_present = bool(buf[2] & 1)
            del buf[:4]
            if self.topic is None:
                self.result = self.client_id
                self.done = True
                return b""
            self.state = "suback"
            return subscribe_packet(1, self.topic)
        if self.state == "suback" and len(buf) >= 5:
            if buf[0] != 0x90 or buf[4] not in (0, 1):
                raise BenchError(f"SUBACK {bytes(buf[:5])!r}")
            del buf[:5]
            self.result = self.client_id
            self.done = True
        return b""


def read_publish(sock: socket.socket, leftover: bytes, timeout: float) -> Optional[bytes]:
    """The payload of the next PUBLISH on a raw socket (PUBACK sent for QoS 1), or None."""
    buf = bytearray(leftover)
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while True:
            if len(buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(buf) and i <= 4:
                    length |= (buf[i] & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not buf[i - 1] & 0x80:
                        break
                else:
                    i = -1
                if i > 0 and len(buf) >= i + length:
                    header, packet = buf[0], bytes(buf[i:i + length])
                    del buf[:i + length]
                    if header >> 4 == 3:
                        (topic_len,) = struct.unpack("!H", packet[:2])
                        rest = packet[2 + topic_len:]
                        if (header >> 1) & 3:
                            sock.sendall(bytes([0x40, 2]) + rest[:2])
                            rest = rest[2:]
                        return rest
                    continue
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None


def publish_packet(topic: str, body: str, mid: int) -> bytes:
    """PUBLISH at QoS 1 (no retain, no dup)."""
    payload = body.encode()
    rest = _string(topic) + struct.pack("!H", mid) + payload
    return bytes([0x32]) + _remaining(len(rest)) + rest


class RawMqttHub:
    """Reads PUBLISH packets from many raw MQTT connections on one selector thread.

    The cross-check for paho: it parses every packet a recv() brought and
    answers them with one write of PUBACKs, so it costs a few microseconds per
    message where paho costs tens.
    """

    def __init__(self, socks: Sequence[socket.socket], leftovers: Sequence[bytes],
                 keep_times: bool = False) -> None:
        self.socks = list(socks)
        self.bodies: List[List[bytes]] = [[] for _ in socks]
        self.times: List[List[float]] = [[] for _ in socks]
        self.keep_times = keep_times
        self.count = 0
        self.last_arrival = 0.0
        self.target = 1
        self.closed: List[int] = []
        self.errors: List[str] = []
        self.cond = threading.Condition()
        self._bufs = [bytearray(b) for b in leftovers]
        self._sel = selectors.DefaultSelector()
        self._stop = False
        t = now()
        for i, sock in enumerate(self.socks):
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, i)
            self._consume(i, b"", t)
        self._thread = threading.Thread(target=self._run, name="raw-mqtt-reader", daemon=True)
        self._thread.start()

    def _consume(self, i: int, chunk: bytes, t: float) -> None:
        buf = self._bufs[i]
        buf += chunk
        n = len(buf)
        pos = 0
        acks = bytearray()
        bodies = self.bodies[i]
        got = 0
        while n - pos >= 2:
            length, shift, j = 0, 0, pos + 1
            while j < n:
                byte = buf[j]
                j += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                break  # the length itself is incomplete
            end = j + length
            if end > n:
                break
            header = buf[pos]
            if header >> 4 == 3:  # PUBLISH
                k = j + 2 + (buf[j] << 8 | buf[j + 1])
                if (header >> 1) & 3:
                    acks += b"\x40\x02" + buf[k:k + 2]
                    k += 2
                bodies.append(bytes(buf[k:end]))
                got += 1
            pos = end
        del buf[:pos]
        if acks:
            sock = self.socks[i]
            try:
                sock.sendall(acks)
            except BlockingIOError:
                sock.setblocking(True)
                sock.sendall(acks)
                sock.setblocking(False)
        if got:
            if self.keep_times:
                self.times[i].extend([t] * got)
            self.count += got  # only this thread writes it
            self.last_arrival = t
            if self.count >= self.target:
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
                    try:
                        self._consume(key.data, chunk, now())
                    except OSError as exc:
                        self.errors.append(f"PUBACK write: {exc}")
                else:
                    self._sel.unregister(key.fileobj)
                    self.closed.append(key.data)

    def wait_for(self, total: int, idle_timeout: float, cap: float) -> bool:
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
        """Stop reading, then DISCONNECT every connection (persistent sessions stay)."""
        self._stop = True
        self._thread.join(timeout=5)
        self._sel.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.sendall(b"\xe0\x00")
            sock.close()


class RawPublisher:
    """QoS 1 publishing over one raw connection: pipelined writes, PUBACKs counted by a thread."""

    def __init__(self, port: int, client_id: str, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = b""
        while len(connack) < 4:
            data = self.sock.recv(4 - len(connack))
            if not data:
                raise BenchError("raw publisher: closed before CONNACK")
            connack += data
        if connack[0] != 0x20 or connack[3] != 0:
            raise BenchError(f"raw publisher: CONNACK {connack!r}")
        self.sock.settimeout(None)
        self.acked = 0
        self.sent = 0
        self._mid = 0
        self.cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_acks, name="raw-puback", daemon=True)
        self._reader.start()

    def _read_acks(self) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = self.sock.recv(262144)
                if not chunk:
                    return
                buf += chunk
                whole = len(buf) - len(buf) % 4  # only PUBACKs (4 bytes) come to a publisher
                if whole:
                    with self.cond:
                        self.acked += whole // 4
                        self.cond.notify_all()
                    del buf[:whole]
        except OSError:
            return

    def publish_many(self, items: Sequence[Tuple[str, str]], chunk: int = 200) -> None:
        for start in range(0, len(items), chunk):
            packets = []
            for topic, body in items[start:start + chunk]:
                self._mid = self._mid % 65535 + 1
                packets.append(publish_packet(topic, body, self._mid))
            self.sock.sendall(b"".join(packets))
            self.sent += len(packets)

    def wait_acked(self) -> bool:
        deadline = now() + max(self.timeout, self.sent / 1000)
        with self.cond:
            while self.acked < self.sent and now() < deadline:
                self.cond.wait(0.2)
        return self.acked >= self.sent

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=2)


class MqttRawSide:
    """Mosquitto again, for B2 and B3, with raw MQTT clients instead of paho.

    Only a cross-check: where paho's reader saturates the suite's core, this
    shows what Mosquitto itself delivers to a cheap reader.
    """

    name = "mqttraw"
    label = "Mosq/raw"
    families = ("B2", "B3")

    def __init__(self, broker: MqttSide) -> None:
        self.broker = broker

    @property
    def proc(self) -> Optional[subprocess.Popen]:
        return self.broker.proc

    def alive(self) -> bool:
        return self.broker.alive()

    def stop(self) -> Optional[int]:
        return None

    def log_problems(self) -> List[str]:
        return []

    def b2(self, clients: int, messages: int, run: int, batch: int = 0) -> Dict[str, Any]:
        b = self.broker
        topics = [f"nbr/{b.nonce}/b2/{clients}/{run}/{i}" for i in range(clients)]
        opened = open_connections("127.0.0.1", b.port,
                                  [MqttHandshake(f"nbr-{b.nonce}-b2-{clients}-{run}-{i}", topics[i])
                                   for i in range(clients)], b.window, b.timeout, b.sources)
        if len(opened.socks) < clients:
            opened.close()
            raise BenchError(f"raw B2: handshakes failed: {opened.failures}")
        hub = RawMqttHub(opened.socks, opened.leftovers)
        pub: Optional[RawPublisher] = None
        try:
            pub = RawPublisher(b.port, f"nbr-{b.nonce}-pub-b2-{clients}-{run}", b.timeout)
            items = [(topics[k % clients], f"{b.nonce}-b2r-{clients}-{run}-{k}") for k in range(messages)]
            expected: List[List[bytes]] = [[] for _ in range(clients)]
            for k, (_topic, body) in enumerate(items):
                expected[k % clients].append(body.encode())
            time.sleep(0.5)
            meter = b.cpu_meter()
            meter.start()
            t0 = now()
            pub.publish_many(items)
            t_pub = now()
            complete = hub.wait_for(messages, b.idle_timeout, max(600.0, messages / 20))
            cpu = meter.stop()
            refused = {} if pub.wait_acked() else {"no PUBACK": pub.sent - pub.acked}
            wall = hub.last_arrival - t0
            delivered = hub.count
            check = check_delivery(expected, hub.bodies)
        finally:
            if pub is not None:
                pub.close()
            hub.stop()
        return {"clients": clients, "messages": messages, "batch": 0,
                "rate": delivered / wall if wall > 0 else 0.0,
                "enqueue_rate": messages / (t_pub - t0), "wall_s": wall, "delivered": delivered,
                "complete": complete, "refused": refused, "check": check, "cpu": cpu,
                "client_errors": hub.errors[:5], "settle_s": b.settle()}

    def b3(self, messages: int, run: int) -> Dict[str, Any]:
        b = self.broker
        client_id = f"nbr-{b.nonce}-b3-{run}"
        topic = f"nbr/{b.nonce}/b3/{run}"
        first = open_connections("127.0.0.1", b.port, [MqttHandshake(client_id, topic)], 1, b.timeout)
        if not first.socks:
            raise BenchError(f"raw B3: subscribe failed: {first.failures}")
        first.socks[0].sendall(b"\xe0\x00")  # DISCONNECT: the session stays
        first.close()
        time.sleep(0.2)
        pub = RawPublisher(b.port, f"nbr-{b.nonce}-pub-b3-{run}", b.timeout)
        items = [(topic, f"{b.nonce}-b3r-{run}-{i}") for i in range(messages)]
        try:
            t_enq = now()
            pub.publish_many(items)
            acked = pub.wait_acked()
            enqueue_s = now() - t_enq
            refused = {} if acked else {"no PUBACK": pub.sent - pub.acked}
        finally:
            pub.close()
        meter = b.cpu_meter()
        meter.start()
        t0 = now()
        handshake = MqttHandshake(client_id, None)
        again = open_connections("127.0.0.1", b.port, [handshake], 1, b.timeout)
        if not again.socks:
            raise BenchError(f"raw B3: reconnect failed: {again.failures}")
        hub = RawMqttHub(again.socks, again.leftovers)
        try:
            complete = hub.wait_for(messages, b.idle_timeout, 600.0)
            cpu = meter.stop()
            secs = hub.last_arrival - t0
            check = check_delivery([[body.encode() for _t, body in items]], hub.bodies)
            received = hub.count
        finally:
            hub.stop()
        return {"messages": messages, "rate": received / secs if secs > 0 else 0.0,
                "connect_to_last_s": secs, "enqueue_rate": messages / enqueue_s,
                "received": received, "complete": complete, "refused": refused, "check": check,
                "cpu": cpu, "session_present": handshake.session_present, "settle_s": b.settle()}


# ---- the broker and the scenarios ---------------------------------------------


class MqttSide:
    """Starts a private Mosquitto (persistence on, in the run's temp dir) and measures it."""

    name = "mqtt"
    label = "Mosquitto"

    def __init__(self, tmpdir: str, nonce: str, window: int, timeout: float, sources: Sequence[str],
                 idle_timeout: float, inflight: int, publisher_inflight: int, b4_budget: float) -> None:
        self.tmpdir = tmpdir
        self.b4_budget = b4_budget
        self.nonce = nonce
        self.window = window
        self.timeout = timeout
        self.sources = list(sources)
        self.idle_timeout = idle_timeout
        self.inflight = inflight
        self.publisher_inflight = publisher_inflight
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log_path = os.path.join(tmpdir, "mosquitto.log")
        self.config_path = os.path.join(tmpdir, "mosquitto.conf")
        self.config = ""

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self, port: int) -> None:
        persist = os.path.join(self.tmpdir, "mosquitto") + "/"
        os.makedirs(persist, exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1",
            "persistence true",
            f"persistence_location {persist}",
            "allow_anonymous true",
            # Default 1000 would drop most of a 10,000-message backlog (B3); Niki keeps 10,000.
            "max_queued_messages 1000000",
            f"max_inflight_messages {self.inflight}",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # keep root: the temp dir is root's
        self.config = "\n".join(lines) + "\n"
        with open(self.config_path, "w") as f:
            f.write(self.config)
        self.port = port
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_log(self.log_path, lambda line: True if " running" in line else None, self.proc, 30.0)

    def stop(self) -> Optional[int]:
        return stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settle(self) -> Optional[float]:
        """Mosquitto has no per-connection threads to wind down: just a pause, not a figure."""
        time.sleep(0.5)
        return None

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter({"server": self.pid})

    def log_problems(self) -> List[str]:
        problems: List[str] = []
        try:
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    low = line.lower()
                    if "error" in low or "warning" in low or "out of memory" in low:
                        problems.append(line.rstrip())
        except OSError:
            return []
        return problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])

    def _subscribers(self, ids: Sequence[str], topics: Sequence[Optional[str]],
                     keep_times: bool = False) -> PahoHub:
        hub = PahoHub(len(ids), keep_times)
        try:
            for i, (client_id, topic) in enumerate(zip(ids, topics)):
                client = new_client(client_id)
                hub.add(client, i, topic)
                client.connect("127.0.0.1", self.port, keepalive=600)
            hub.start()
        except BaseException:
            hub.stop(disconnect=False)
            raise
        return hub

    def _publisher(self, threaded: bool, tag: str) -> Publisher:
        return Publisher(self.port, f"nb-{self.nonce}-pub-{tag}", threaded, self.publisher_inflight,
                         self.timeout)

    def b1(self, n: int, warmup: int, run: int) -> Dict[str, Any]:
        topic = f"nb/{self.nonce}/b1/{run}"
        hub = self._subscribers([f"nb-{self.nonce}-b1-{run}"], [topic], keep_times=True)
        pub: Optional[Publisher] = None
        lat: List[float] = []
        call: List[float] = []
        timeouts = 0
        errors: Dict[str, int] = {}
        expected: List[bytes] = []
        try:
            if not hub.wait_subscribed(1, self.timeout):
                raise BenchError(f"B1 subscriber not subscribed: {hub.errors}")
            pub = self._publisher(False, f"b1-{run}")
            for i in range(warmup + n):
                body = f"{self.nonce}-b1-{run}-{i}"
                seen = hub.count
                t0 = now()
                info = pub.publish(topic, body)
                t1 = now()
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    errors[mqtt.error_string(info.rc)] = errors.get(mqtt.error_string(info.rc), 0) + 1
                    continue
                expected.append(body.encode())
                arrived = hub.wait_for(seen + 1, self.timeout, self.timeout)
                if not pub.wait_puback(info):
                    errors["no PUBACK"] = errors.get("no PUBACK", 0) + 1
                if not arrived:
                    timeouts += 1
                    continue
                if i >= warmup:
                    lat.append(hub.times[0][seen] - t0)
                    call.append(t1 - t0)
            hub.wait_for(len(expected), 1.0, 3.0)
            check = check_delivery([expected], hub.bodies)
        finally:
            if pub is not None:
                pub.close()
            hub.stop()
        return latency_figures(lat, call, timeouts, errors, check)

    def b2(self, clients: int, messages: int, run: int, batch: int = 0) -> Dict[str, Any]:
        ids = [f"nb-{self.nonce}-b2-{clients}-{run}-{i}" for i in range(clients)]
        topics = [f"nb/{self.nonce}/b2/{clients}/{run}/{i}" for i in range(clients)]
        # The publisher first: paho's own loop uses select(), which fails on descriptors
        # past 1024, and a thousand subscribers would push its socket there.
        pub = self._publisher(True, f"b2-{clients}-{run}")
        try:
            hub = self._subscribers(ids, topics)
        except BaseException:
            pub.close()
            raise
        try:
            if not hub.wait_subscribed(clients, max(self.timeout, clients / 50)):
                raise BenchError(f"B2: {hub.subscribed}/{clients} subscribed; {hub.errors[:3]}")
            items = [(k % clients, f"{self.nonce}-b2-{clients}-{run}-{k}") for k in range(messages)]
            expected: List[List[bytes]] = [[] for _ in range(clients)]
            refused: Dict[str, int] = {}
            time.sleep(0.5)
            meter = self.cpu_meter()
            meter.start()
            t0 = now()
            infos = [pub.publish(topics[i], body) for i, body in items]
            t_pub = now()
            for (i, body), info in zip(items, infos):
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    expected[i].append(body.encode())
                else:
                    refused[mqtt.error_string(info.rc)] = refused.get(mqtt.error_string(info.rc), 0) + 1
            total = sum(len(e) for e in expected)
            complete = hub.wait_for(total, self.idle_timeout, max(600.0, messages / 20))
            cpu = meter.stop()
            unacked = sum(1 for info in infos if not pub.wait_puback(info))
            if unacked:
                refused["no PUBACK"] = unacked
            wall = hub.last_arrival - t0
            delivered = hub.count
            check = check_delivery(expected, hub.bodies)
            figures = {"clients": clients, "messages": messages, "batch": 0,
                       "rate": delivered / wall if wall > 0 else 0.0,
                       "enqueue_rate": messages / (t_pub - t0), "wall_s": wall,
                       "delivered": delivered, "complete": complete, "refused": refused,
                       "check": check, "cpu": cpu, "client_errors": hub.errors[:5]}
        finally:
            pub.close()
            hub.stop()
        figures["settle_s"] = self.settle()
        return figures

    def b3(self, messages: int, run: int) -> Dict[str, Any]:
        client_id = f"nb-{self.nonce}-b3-{run}"
        topic = f"nb/{self.nonce}/b3/{run}"
        first = self._subscribers([client_id], [topic])
        try:
            if not first.wait_subscribed(1, self.timeout):
                raise BenchError(f"B3 subscriber not subscribed: {first.errors}")
        finally:
            first.stop()  # DISCONNECT: the session and its subscription stay on the broker
        time.sleep(0.2)  # let the broker see the DISCONNECT before the backlog is published
        pub = self._publisher(True, f"b3-{run}")
        expected: List[bytes] = []
        refused: Dict[str, int] = {}
        try:
            t_enq = now()
            infos = []
            for i in range(messages):
                body = f"{self.nonce}-b3-{run}-{i}"
                infos.append(pub.publish(topic, body))
                expected.append(body.encode())
            unacked = sum(1 for info in infos if not pub.wait_puback(info))
            enqueue_s = now() - t_enq
            if unacked:
                refused["no PUBACK"] = unacked
        finally:
            pub.close()
        meter = self.cpu_meter()
        meter.start()
        t0 = now()
        again = self._subscribers([client_id], [None])
        try:
            complete = again.wait_for(len(expected), self.idle_timeout, 600.0)
            cpu = meter.stop()
            secs = again.last_arrival - t0
            check = check_delivery([expected], again.bodies)
            received = again.count
            session_present = again.session_present[0]
        finally:
            again.stop()
        return {"messages": messages, "rate": received / secs if secs > 0 else 0.0,
                "connect_to_last_s": secs, "enqueue_rate": messages / enqueue_s,
                "received": received, "complete": complete, "refused": refused, "check": check,
                "cpu": cpu, "session_present": session_present, "settle_s": self.settle()}

    def b4(self, clients: int, run: int) -> Dict[str, Any]:
        handshakes = [MqttHandshake(f"nb-{self.nonce}-b4-{run}-{i}", f"nb/{self.nonce}/b4/{run}/{i}")
                      for i in range(clients)]
        # The publisher first: paho's loop uses select(), which fails on descriptors past 1024.
        pub = self._publisher(False, f"b4-{run}")
        before = proc_status(self.pid)
        meter = self.cpu_meter()
        meter.start()
        opened = open_connections("127.0.0.1", self.port, handshakes, self.window, self.timeout,
                                  self.sources, self.b4_budget, 4 * self.window)
        cpu = meter.stop()
        try:
            time.sleep(1.0)
            after = proc_status(self.pid)
            idle_cpu = idle_cpu_percent(self.pid)
            last_ms = None
            last_ok = False
            if opened.socks:
                index = int(opened.results[-1].rsplit("-", 1)[1])
                body = f"{self.nonce}-b4-{run}-last"
                t0 = now()
                info = pub.publish(handshakes[index].topic, body)
                got = read_publish(opened.socks[-1], opened.leftovers[-1], self.timeout)
                last_ms = 1000 * (now() - t0)
                last_ok = got == body.encode() and pub.wait_puback(info)
        finally:
            pub.close()
            opened.close()
        return capacity_figures(clients, opened, before, after, last_ms, last_ok, cpu, idle_cpu,
                                self.settle())


# ---- what the readers alone can take ------------------------------------------


def mqtt_reader_capacity(kind: str, clients: int = 10, per_client: int = 5000,
                         timeout: float = 60.0) -> Dict[str, Any]:
    """Messages/s a reader (``paho`` or ``raw``) takes from a fake broker that only sends.

    If a B2/B3 MQTT rate comes close to this, the suite's reader, not Mosquitto,
    limits it.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(clients)
    port = listener.getsockname()[1]
    go = threading.Event()
    conns: List[socket.socket] = []

    def broker() -> None:
        for _ in range(clients):
            conn, _ = listener.accept()
            conns.append(conn)
            _read_packet(conn)  # CONNECT
            conn.sendall(bytes([0x20, 2, 0, 0]))
            sub = _read_packet(conn)
            conn.sendall(bytes([0x90, 3]) + sub[:2] + bytes([1]))
        go.wait(timeout)
        blob = b"".join(publish_packet("t", f"{k:024d}", k % 65535 + 1) for k in range(per_client))
        for conn in conns:
            threading.Thread(target=_send_and_drain, args=(conn, blob), daemon=True).start()

    threading.Thread(target=broker, daemon=True).start()
    hub: Any
    opened: Optional[Opened] = None
    if kind == "paho":
        hub = PahoHub(clients)
        for i in range(clients):
            client = new_client(f"cap-{i}")
            hub.add(client, i, "t")
            client.connect("127.0.0.1", port, keepalive=600)
        hub.start()
        hub.wait_subscribed(clients, timeout)
    else:
        opened = open_connections("127.0.0.1", port, [MqttHandshake(f"cap-{i}", "t") for i in range(clients)],
                                  1, timeout)
        hub = RawMqttHub(opened.socks, opened.leftovers)
    try:
        t0 = now()
        go.set()
        hub.wait_for(clients * per_client, 10.0, timeout)
        secs = hub.last_arrival - t0
        return {"reader": kind, "clients": clients, "messages": hub.count,
                "rate": hub.count / secs if secs > 0 else 0.0}
    finally:
        if isinstance(hub, PahoHub):
            hub.stop(disconnect=False)
        else:
            hub.stop()
        if opened is not None:
            opened.close()
        for conn in conns:
            conn.close()
        listener.close()


def _read_packet(conn: socket.socket) -> bytes:
    """One MQTT packet's variable part (after the fixed header), blocking."""
    conn.recv(1)
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    data = b""
    while len(data) < length:
        data += conn.recv(length - len(data))
    return data


def _send_and_drain(conn: socket.socket, blob: bytes) -> None:
    """Send every PUBLISH while reading (and dropping) the PUBACKs, so neither side stalls."""
    def drain() -> None:
        try:
            while conn.recv(1 << 20):
                time.sleep(0.005)  # fewer wake-ups: this thread shares the GIL with the reader
        except OSError:
            pass
    threading.Thread(target=drain, daemon=True).start()
    with contextlib.suppress(OSError):
        conn.sendall(blob)


def check_mqtt_installed() -> Tuple[bool, str]:
    if mqtt is None:
        return False, "paho-mqtt is not installed: pip install paho-mqtt matplotlib"
    if not os.path.exists(MOSQUITTO):
        return False, f"{MOSQUITTO} not found (Debian: apt-get install mosquitto)"
    return True, ""
