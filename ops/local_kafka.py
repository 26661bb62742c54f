"""Real Apache Kafka brokers (KRaft) for tests, the demo, benchmarks and chaos runs.

The broker is assembled from Maven Central (ops/kafka/pom.xml, resolved once into the cache),
run with the machine's Java on loopback, its data in a given directory, and stopped by the
PID it wrote, never by process name. `LocalKafka` is one combined broker+controller node;
`LocalKafkaCluster` is N of them sharing one `controller.quorum.voters`.

A broker (and any child started with `popen_bound`) does not outlive the process that
started it: it gets SIGKILL when that process dies, however it dies (Linux
PR_SET_PDEATHSIG). SIGTERM unwinds the starting command's `finally`s like Ctrl-C does, and a
`Scratch` directory is removed by a small reaper process if its owner is killed outright.
Only the operator's broker (`liber kafka start`, data in HOME/broker) is detached.
"""
from __future__ import annotations

import base64
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from core.kafka import make_admin
from core.settings import Settings

KAFKA_VERSION = "3.9.1"
HERE = Path(__file__).resolve().parent / "kafka"


def jars_dir(home: str | os.PathLike) -> Path:
    return Path(home) / f"kafka-{KAFKA_VERSION}" / "libs"


def fetch_jars(home: str | os.PathLike, log=print) -> Path:
    """Resolve the broker's jars with Maven once; later calls reuse the cache."""
    libs = jars_dir(home)
    stamp = libs / ".complete"
    if stamp.exists():
        log(f"kafka {KAFKA_VERSION}: jars cached in {libs}")
        return libs
    if not shutil.which("mvn") or not shutil.which("java"):
        raise RuntimeError("Kafka needs `java` (17+) and `mvn` on PATH")
    log(f"kafka {KAFKA_VERSION}: resolving jars from Maven Central into {libs} ...")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["mvn", "-q", "-B", "-f", str(HERE / "pom.xml"), "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
                    f"-Dkafka.version={KAFKA_VERSION}"], check=True)
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    stamp.write_text(KAFKA_VERSION)
    log(f"kafka {KAFKA_VERSION}: {len(list(libs.glob('*.jar')))} jars ready")
    return libs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- services die with the command that started them --------------------------------------
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL):
    """A `preexec_fn`: the child gets `sig` when its parent dies. Linux ties this to the
    thread that forked, so start long-lived children from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not after

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def popen_bound(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` of a child that cannot outlive this process."""
    kwargs.setdefault("preexec_fn", die_with_parent())
    return subprocess.Popen(cmd, **kwargs)


def run_bound(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` of a child that cannot outlive this process."""
    kwargs.setdefault("preexec_fn", die_with_parent())
    return subprocess.run(cmd, **kwargs)


def _exit_on_sigterm(signum, frame):
    # A second SIGTERM must not cut the clean-up short (a no-op, not SIG_IGN: children
    # started during the clean-up must not inherit an ignored SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: None)
    raise SystemExit(128 + signum)


def unwind_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in the main thread, so the `finally`s that stop services
    and remove directories run (Python's default ends the process without them). A handler
    someone else installed is left alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


_REAPER = r"""
import os, shutil, signal, sys, time
path = sys.argv[1]
if sys.stdin.buffer.read() == b"keep":  # EOF: the owner closed the pipe, or died
    sys.exit(0)
def ours(pid):  # a live process whose command line names the directory
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return path.encode() in f.read()
    except OSError:
        return False
pids = []
for root, _, files in os.walk(path):
    if "broker.pid" in files:
        try:
            pids.append(int(open(os.path.join(root, "broker.pid")).read().strip()))
        except (OSError, ValueError):
            pass
for pid in pids:
    if ours(pid):
        os.kill(pid, signal.SIGKILL)
deadline = time.monotonic() + 30
while any(ours(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.2)
for _ in range(5):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
        break
    time.sleep(1)
"""


class Scratch:
    """A temporary directory that goes when its command ends: `close()` removes it (or keeps
    it), and if the owner is killed before that, a reaper process stops the brokers under it
    and removes it. The reaper waits for EOF on a pipe whose write end only the owner holds."""

    def __init__(self, prefix: str):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        read, self._write = os.pipe()  # both ends non-inheritable: no other child keeps it open
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _REAPER, str(self.path)], stdin=read,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(read)

    def close(self, keep: bool = False) -> None:
        if self._write is None:
            return
        if keep:
            os.write(self._write, b"keep")
        else:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._write)
        self._write = None
        try:
            self._reaper.wait(30)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LocalKafka:
    """One broker+controller process. `start()` returns once it answers metadata requests."""
    home: Path
    data_dir: Path
    port: int = 9092
    controller_port: int = 0
    heap: str = "768m"
    sasl_users: dict[str, str] | None = None  # user -> password enables a SASL/PLAIN listener
    node_id: int = 1
    voters: str = ""  # controller.quorum.voters of a cluster; "" = this node alone
    cluster_id: str = ""  # one id for all nodes of a cluster ("" = a new one)
    replication: int = 1  # internal topics' and default replication factor
    min_insync: int = 1
    # None: only the operator's broker (data in HOME/broker, `liber kafka start`) outlives
    # the process that started it
    detached: bool | None = None

    def __post_init__(self):
        self.home, self.data_dir = Path(self.home), Path(self.data_dir)
        if self.detached is None:
            self.detached = self.data_dir.resolve() == (self.home / "broker").resolve()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _java(self, main: str, *args: str) -> list[str]:
        cmd = ["java", f"-Xmx{self.heap}", "-Xss1m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
               f"-Dlog4j.configuration=file:{HERE / 'log4j.properties'}",
               "-cp", str(jars_dir(self.home) / "*"), main, *args]
        return cmd

    def _write_config(self) -> Path:
        self.controller_port = self.controller_port or free_port()
        logs = self.data_dir / "kraft-logs"
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        protocol_map = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        extra = []
        if self.sasl_users:
            listeners = listeners.replace("PLAINTEXT://", "SASL_PLAINTEXT://", 1)
            protocol_map = "CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
            users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl_users.items())
            admin, password = next(iter(self.sasl_users.items()))
            extra = [
                "sasl.enabled.mechanisms=PLAIN",
                "sasl.mechanism.inter.broker.protocol=PLAIN",
                "inter.broker.listener.name=SASL_PLAINTEXT",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config="
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{admin}" password="{password}" {users};',
            ]
        props = [
            "process.roles=broker,controller",
            f"node.id={self.node_id}",
            "controller.quorum.voters="
            f"{self.voters or f'{self.node_id}@127.0.0.1:{self.controller_port}'}",
            f"listeners={listeners}",
            f"advertised.listeners={listeners.split(',')[0]}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocol_map}",
            f"log.dirs={logs}",
            "num.partitions=4",
            f"offsets.topic.replication.factor={self.replication}",
            "offsets.topic.num.partitions=8",
            f"transaction.state.log.replication.factor={self.replication}",
            f"transaction.state.log.min.isr={self.min_insync}",
            f"default.replication.factor={self.replication}",
            f"min.insync.replicas={self.min_insync}",
            "unclean.leader.election.enable=false",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "log.retention.hours=-1",
            "log.segment.bytes=268435456",
            "log.cleaner.dedupe.buffer.size=16777216",
            "message.max.bytes=4194304",
            *extra,
        ]
        path = self.data_dir / "server.properties"
        path.write_text("\n".join(props) + "\n")
        return path

    def start(self, timeout: float = 90.0, log=print) -> "LocalKafka":
        if self.running():
            log(f"kafka already running (pid {self.pid_file.read_text().strip()}) on {self.bootstrap}")
            return self
        self.launch(log=log)
        return self.wait_healthy(timeout, log=log)

    def launch(self, log=print) -> None:
        """Format the data directory once and start the process; does not wait for it (the
        nodes of a cluster only become healthy together)."""
        fetch_jars(self.home, log=log)
        if not self.detached:
            unwind_on_sigterm()
        run = subprocess.run if self.detached else run_bound
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.data_dir / "kraft-logs" / "meta.properties").exists():
            cluster_id = self.cluster_id or \
                base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                           "-c", str(config), "--ignore-formatted"),
                check=True, stdout=subprocess.DEVNULL)
        popen = subprocess.Popen if self.detached else popen_bound
        with open(self.log_file, "ab") as out:
            self._proc = popen(self._java("kafka.Kafka", str(config)), stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
        self.pid_file.write_text(str(self._proc.pid))
        log(f"kafka {KAFKA_VERSION}: starting node {self.node_id} pid {self._proc.pid} on "
            f"{self.bootstrap}, data {self.data_dir}")

    def wait_healthy(self, timeout: float = 90.0, log=print) -> "LocalKafka":
        proc = self._proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kafka exited with {proc.returncode}; see {self.log_file}")
            if self.healthy():
                log(f"kafka {KAFKA_VERSION}: healthy after {timeout - (deadline - time.monotonic()):.1f}s")
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"kafka not healthy after {timeout}s; see {self.log_file}")

    def client_settings(self) -> Settings:
        """Settings of a client of this broker (its first SASL user, if it has SASL users)."""
        if not self.sasl_users:
            return Settings(bootstrap_servers=self.bootstrap)
        user, password = next(iter(self.sasl_users.items()))
        return Settings(bootstrap_servers=self.bootstrap, security_protocol="SASL_PLAINTEXT",
                        sasl_mechanism="PLAIN", sasl_username=user, sasl_password=password)

    def healthy(self) -> bool:
        """The broker answers a metadata request (not just an open port)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        from kafka.errors import KafkaError
        try:
            admin = make_admin(self.client_settings(), request_timeout_ms=3000)
            try:
                admin.describe_cluster()
                return True
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError):
            return False

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A recycled PID must not be mistaken for our broker: check its command line.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"kafka.Kafka" in cmdline and str(self.data_dir).encode() in cmdline

    def kill(self, log=print) -> None:
        """SIGKILL (a crash, for fault drills): no controlled shutdown."""
        pid = self.pid()
        if pid is not None and self.running():
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
            log(f"kafka node {self.node_id} pid {pid} killed")
        self.pid_file.unlink(missing_ok=True)

    def terminate(self) -> None:
        """SIGTERM without waiting (a cluster stops all its nodes at once)."""
        pid = self.pid()
        if pid is not None and self.running():
            os.kill(pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0, log=print) -> None:
        """SIGTERM the recorded PID (controlled shutdown), SIGKILL if it hangs."""
        pid = self.pid()
        if pid is None or not self.running():
            self.pid_file.unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            time.sleep(0.2)
        if self.running():
            log(f"kafka pid {pid} did not stop in {timeout}s; killing")
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        log(f"kafka pid {pid} stopped")


@dataclass
class LocalKafkaCluster:
    """`size` combined broker+controller nodes on loopback: one cluster id, one
    `controller.quorum.voters`, each node its own ports and data directory (root/node-N).
    Topics default to replication `size` and `min.insync.replicas` `min_insync`."""
    home: Path
    root: Path
    size: int = 3
    heap: str = "384m"
    min_insync: int = 2
    nodes: list[LocalKafka] = field(default_factory=list)

    def __post_init__(self):
        self.home, self.root = Path(self.home), Path(self.root)
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.nodes = [LocalKafka(self.home, self.root / f"node-{i + 1}", port=p,
                                 controller_port=c, heap=self.heap, node_id=i + 1, voters=voters,
                                 cluster_id=cluster_id, replication=self.size,
                                 min_insync=min(self.min_insync, self.size), detached=False)
                      for i, (p, c) in enumerate(ports)]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    def start(self, timeout: float = 120.0, log=print) -> "LocalKafkaCluster":
        """Start every node, then wait until each answers and all brokers are registered."""
        for node in self.nodes:
            if not node.running():
                node.launch(log=log)
        try:
            for node in self.nodes:
                if getattr(node, "_proc", None) is not None:
                    node.wait_healthy(timeout, log=log)
            self.wait_brokers(self.size, timeout)
        except BaseException:
            self.stop(log=log)
            raise
        return self

    def restart(self, node_id: int, timeout: float = 120.0, log=print) -> None:
        """Start a stopped or killed node on its data directory; wait until all partitions
        are fully replicated again."""
        node = self.node(node_id)
        node.launch(log=log)
        node.wait_healthy(timeout, log=log)
        self.wait_brokers(self.size, timeout)
        self.wait_in_sync(timeout)

    def stop(self, timeout: float = 30.0, log=print) -> None:
        # All at once: stopped one by one, the last nodes wait for a controller quorum that
        # has already gone.
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.stop(timeout, log=log)

    def _admin(self, bootstrap: str | None = None):
        return make_admin(Settings(bootstrap_servers=bootstrap or self.bootstrap),
                          request_timeout_ms=5000)

    def _poll(self, what: str, probe, timeout: float):
        """probe() until it returns something true; KafkaError/OSError count as not yet."""
        from kafka.errors import KafkaError
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = probe()
                if value:
                    return value
            except (KafkaError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kafka cluster: {what} not reached after {timeout}s")
            time.sleep(0.5)

    def wait_brokers(self, count: int, timeout: float = 120.0) -> None:
        def registered():
            admin = self._admin()
            try:
                return len(admin.describe_cluster()["brokers"]) >= count
            finally:
                admin.close()
        self._poll(f"{count} brokers registered", registered, timeout)

    def partitions(self, topics: list[str] | None = None, via: int | None = None) -> list[dict]:
        """Every partition of `topics` (default: all) as {topic, partition, leader, replicas,
        isr}, as a running node sees it, or node `via` (the one its admin client bootstraps
        from). Without `via` each running node is asked in turn: while a node is down, an
        admin client bootstrapped from all of them may pick the dead one."""
        if via:
            return self._describe(self.node(via).bootstrap, topics)
        from kafka.errors import KafkaError
        error: Exception = KafkaError("no node running")
        for node in [n for n in self.nodes if n.running()] or self.nodes:
            try:
                return self._describe(node.bootstrap, topics)
            except (KafkaError, OSError) as exc:
                error = exc
        raise error

    def _describe(self, bootstrap: str, topics: list[str] | None) -> list[dict]:
        admin = self._admin(bootstrap)
        try:
            return [{"topic": t["name"], "partition": p["partition_index"],
                     "leader": p["leader_id"], "replicas": p["replica_nodes"],
                     "isr": p["isr_nodes"]}
                    for t in admin.describe_topics(topics) for p in t["partitions"]]
        finally:
            admin.close()

    def leaders(self, topics: list[str] | None = None) -> dict[int, int]:
        """node id -> partitions it leads (-1: partitions without a leader)."""
        counts: dict[int, int] = {}
        for p in self.partitions(topics):
            counts[p["leader"]] = counts.get(p["leader"], 0) + 1
        return counts

    def wait_in_sync(self, timeout: float = 120.0) -> None:
        """Every partition has all its replicas in its ISR (a restarted node caught up), as
        every node sees it: a node's metadata may lag the others', and a later describe may
        be answered by any of them."""
        self._poll("all replicas in sync", lambda: all(
            len(p["isr"]) == len(p["replicas"]) and p["leader"] >= 0
            for node in self.nodes for p in self.partitions(via=node.node_id)), timeout)

    def active_controller(self, timeout: float = 60.0) -> int:
        """Node id of the active KRaft controller (the metadata quorum's leader)."""
        def leader():
            admin = self._admin()
            try:
                quorum = admin.describe_metadata_quorum()
            finally:
                admin.close()
            parts = [p for t in quorum.get("topics", []) for p in t.get("partitions", [])]
            ids = [p.get("leader_id", -1) for p in parts]
            return ids[0] if ids and ids[0] > 0 else None
        return self._poll("a metadata quorum leader", leader, timeout)


def _reap(pid: int) -> None:
    """Collect the exit status if the broker is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # not our child: its parent reaps it
        pass


if __name__ == "__main__":  # pragma: no cover - thin script entry for ops/kafka.sh
    settings = Settings.load()
    broker = LocalKafka(settings.home, Path(settings.home) / "broker", port=9092, detached=True)
    {"start": broker.start, "stop": broker.stop}[sys.argv[1]]()
