"""A 3-node MariaDB Galera cluster on this one machine, for tests that need one.

Each node is a ``mariadbd`` of the test's own, as in tests/private_mariadb.py: its own
data directory and socket in one temporary directory, its own free ports (client,
group communication, IST, SST), stopped or killed only by its PID; the machine's
MariaDB is never touched.  Node 1 bootstraps the cluster (``--wsrep-new-cluster``);
the others join one after the other once it is Synced, each receiving a full copy of
the data by rsync state transfer (SST).

As root, the nodes run as the ``mysql`` user: the rsync SST script refuses to work as
root on a root-owned data directory, so the directories are chowned to it.

For a human: ``python -m tests.galera_cluster`` (from the repository's root) starts a
cluster, prints the three URLs and keeps it running until Ctrl-C (or SIGTERM to its
PID), then removes the cluster's directory; the initialised data directory it copies is
kept in /tmp/niki-galera-cache for the next start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pymysql

from tests.private_mariadb import INSTALL_DB, MARIADBD, SIZE_OPTIONS, free_port, template_datadir

# Debian's galera-4 puts the provider in /usr/lib/galera (and links it from /usr/lib).
PROVIDER_CANDIDATES = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so",
                       "/usr/lib64/galera-4/libgalera_smm.so", "/usr/lib64/galera/libgalera_smm.so")
PROVIDER = next((p for p in PROVIDER_CANDIDATES if os.path.exists(p)), None)
RSYNC = shutil.which("rsync")
SST_SCRIPT = shutil.which("wsrep_sst_rsync")
# Bootstrapping takes about a second; a join (rsync SST of a small data directory, then
# InnoDB start) a few.  The deadline leaves room for a loaded machine.
NODE_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The group-communication cache defaults to a 128 MiB preallocated file per node.
PROVIDER_OPTIONS = "gcache.size=16M"
RUN_AS = "mysql"


def galera_missing() -> Optional[str]:
    """Why a Galera cluster cannot be started here, or None when it can."""
    missing = [name for name, path in (("mariadbd", MARIADBD), ("mariadb-install-db", INSTALL_DB),
                                       ("galera-4 (libgalera_smm.so)", PROVIDER), ("rsync", RSYNC),
                                       ("wsrep_sst_rsync", SST_SCRIPT)) if path is None]
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            missing.append(f"the {RUN_AS!r} user")
    return (f"{', '.join(missing)} missing (Debian: apt-get install mariadb-server galera-4 rsync)"
            if missing else None)


def _chown_tree(path: Path, user: str) -> None:
    uid, gid = _ids(user)
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _ids(user: str) -> Tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


class GaleraNode:
    """One ``mariadbd`` of the cluster: its ports, directory and process."""

    def __init__(self, index: int, workdir: Path, ports: Dict[str, int]) -> None:
        self.index = index  # 1-based
        self.workdir = workdir
        self.port = ports["client"]
        self.gcomm_port = ports["gcomm"]
        self.ist_port = ports["ist"]
        self.sst_port = ports["sst"]
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The server's URL, no database: add ``/name`` for one."""
        return f"mysql://root@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connect(self, timeout: float = 1.0) -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               connect_timeout=timeout, read_timeout=5, autocommit=True)

    def status(self) -> Dict[str, str]:
        """The node's ``wsrep_%`` status variables; empty if it does not answer."""
        try:
            con = self.connect()
        except pymysql.err.MySQLError:
            return {}
        try:
            with con.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep_%'")
                return {str(k): str(v) for k, v in cur.fetchall()}
        except pymysql.err.MySQLError:
            return {}
        finally:
            con.close()

    def command(self, cluster_address: str, bootstrap: bool) -> List[str]:
        assert MARIADBD is not None and PROVIDER is not None
        data = self.workdir / "data"
        user = [f"--user={RUN_AS}"] if os.geteuid() == 0 else []
        return [
            MARIADBD, "--no-defaults", f"--datadir={data}", f"--port={self.port}",
            f"--socket={self.workdir / 's.sock'}", "--bind-address=127.0.0.1",
            f"--pid-file={self.workdir / 'mariadbd.pid'}", f"--log-error={self.workdir / 'error.log'}",
            *user, *SIZE_OPTIONS,
            "--wsrep-on=ON", f"--wsrep-provider={PROVIDER}",
            f"--wsrep-cluster-address={cluster_address}", "--wsrep-cluster-name=niki_test",
            "--wsrep-node-address=127.0.0.1", f"--wsrep-node-name=node{self.index}",
            f"--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port};"
            f"ist.recv_addr=127.0.0.1:{self.ist_port};{PROVIDER_OPTIONS}",
            f"--wsrep-sst-receive-address=127.0.0.1:{self.sst_port}", "--wsrep-sst-method=rsync",
            "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2", "--default-storage-engine=InnoDB",
            *(["--wsrep-new-cluster"] if bootstrap else []),
        ]

    def launch(self, cluster_address: str, bootstrap: bool) -> None:
        assert not self.running, f"node {self.index} already running"
        # The SST script is found on PATH and calls mariadbd's helpers in /usr/sbin.
        env = dict(os.environ, PATH=os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin")
        self.proc = subprocess.Popen(self.command(cluster_address, bootstrap), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.workdir, env=env)

    def signal(self, sig: int, timeout: float = STOP_TIMEOUT) -> None:
        """Send ``sig`` to the PID we started and wait for it to exit."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise RuntimeError(f"node {self.index} did not exit within {timeout} s of {sig!r}:\n"
                               f"{self.error_log[-4000:]}") from None


class GaleraCluster:
    """``size`` Galera nodes on free ports of 127.0.0.1; use as a context manager.

    On entry every node reports ``wsrep_ready=ON``, Synced, and the full cluster size;
    ``stop(i)`` / ``kill(i)`` end node ``i`` (1-based) by its PID; leaving the block
    kills what still runs and removes the directory.
    """

    def __init__(self, template: Path, size: int = 3, timeout: float = NODE_TIMEOUT) -> None:
        self.template = template
        self.size = size
        self.timeout = timeout
        self.workdir: Optional[Path] = None
        self.nodes: List[GaleraNode] = []

    @property
    def urls(self) -> List[str]:
        return [node.url for node in self.nodes]

    def node(self, index: int) -> GaleraNode:
        return self.nodes[index - 1]

    @property
    def cluster_address(self) -> str:
        return "gcomm://" + ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.nodes)

    def _ports(self) -> List[Dict[str, int]]:
        taken: set = set()
        out = []
        for _ in range(self.size):
            ports = {}
            for kind in ("client", "gcomm", "ist", "sst"):
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                ports[kind] = port
            out.append(ports)
        return out

    def start(self) -> GaleraCluster:
        """Bootstrap node 1, then join the others one by one; return once all are Synced."""
        assert MARIADBD is not None and PROVIDER is not None, galera_missing()
        # Under /tmp, not pytest's deeper tmp_path: a socket path is limited to 107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="niki-galera-"))
        self.workdir.chmod(0o755)  # the mysql user must reach its node's directory
        for i, ports in enumerate(self._ports(), start=1):
            nodedir = self.workdir / f"node{i}"
            nodedir.mkdir()
            shutil.copytree(self.template, nodedir / "data", symlinks=True)
            if os.geteuid() == 0:
                _chown_tree(nodedir, RUN_AS)
            self.nodes.append(GaleraNode(i, nodedir, ports))
        for node in self.nodes:
            node.launch(self.cluster_address, bootstrap=node.index == 1)
            self.wait_synced(node, expected_size=node.index)
        for node in self.nodes:
            self.wait_synced(node, expected_size=self.size)
        return self

    def wait_synced(self, node: GaleraNode, expected_size: Optional[int] = None) -> Dict[str, str]:
        """Wait until ``node`` is ready, Synced, in a cluster of ``expected_size``
        (default: all nodes); fail with its error log if it exits or the deadline passes."""
        expected = str(expected_size or self.size)
        deadline = time.monotonic() + self.timeout
        while True:
            status = node.status()
            if (status.get("wsrep_ready") == "ON" and status.get("wsrep_cluster_size") == expected
                    and status.get("wsrep_local_state_comment") == "Synced"):
                return status
            if not node.running:
                code = node.proc.returncode if node.proc else None
                raise RuntimeError(f"galera node {node.index} exited with {code}:\n{node.error_log[-6000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"galera node {node.index} not ready in a cluster of {expected} within "
                                   f"{self.timeout} s (status {status}):\n{node.error_log[-6000:]}")
            time.sleep(0.05)

    def stop(self, index: int) -> None:
        """Graceful shutdown of node ``index`` (SIGTERM to its PID)."""
        self.node(index).signal(signal.SIGTERM)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``: it dies as in a crash."""
        self.node(index).signal(signal.SIGKILL)

    def stop_all(self) -> None:
        """SIGTERM every running node at once, then wait for each (killed if too slow)."""
        running = [n for n in self.nodes if n.running]
        for node in running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
        for node in running:
            assert node.proc is not None
            try:
                node.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Kill every node still running (the data is thrown away) and remove the directory."""
        for node in self.nodes:
            node.signal(signal.SIGKILL)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> GaleraCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] = ()) -> int:
    """Start a cluster, print its URLs, keep it up until Ctrl-C or SIGTERM."""
    reason = galera_missing()
    if reason:
        print(f"cannot start a Galera cluster: {reason}", file=sys.stderr)
        return 2
    cache = Path(tempfile.gettempdir()) / "niki-galera-cache"
    cache.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it as Ctrl-C does
    started = time.monotonic()
    with GaleraCluster(template_datadir(cache)) as cluster:
        print(f"Galera cluster of {cluster.size} up in {time.monotonic() - started:.1f} s "
              f"(directory {cluster.workdir}):", flush=True)
        for node in cluster.nodes:
            print(f"  node {node.index}: {node.url}  (pid {node.pid})", flush=True)
        print("Ctrl-C to stop and remove it.", flush=True)
        try:
            while all(n.running for n in cluster.nodes):
                time.sleep(0.5)
            print("a node exited; stopping the cluster", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            cluster.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
