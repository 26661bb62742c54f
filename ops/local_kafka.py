"""A real single-node Apache Kafka broker (KRaft) for tests and the demo.

The broker is assembled from Maven Central (ops/kafka/pom.xml, resolved once into the cache),
run with the machine's Java on loopback, its data in a given directory, and stopped by the
PID it wrote, never by process name.
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class LocalKafka:
    """One broker+controller process. `start()` returns once it answers metadata requests."""
    home: Path
    data_dir: Path
    port: int = 9092
    controller_port: int = 0
    heap: str = "768m"
    sasl_users: dict[str, str] | None = None  # user -> password enables a SASL/PLAIN listener

    def __post_init__(self):
        self.home, self.data_dir = Path(self.home), Path(self.data_dir)

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
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={listeners}",
            f"advertised.listeners={listeners.split(',')[0]}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocol_map}",
            f"log.dirs={logs}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
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
        fetch_jars(self.home, log=log)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.data_dir / "kraft-logs" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                      "-c", str(config), "--ignore-formatted"),
                           check=True, stdout=subprocess.DEVNULL)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(self._java("kafka.Kafka", str(config)), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        log(f"kafka {KAFKA_VERSION}: starting pid {proc.pid} on {self.bootstrap}, data {self.data_dir}")
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

    def healthy(self) -> bool:
        """The broker answers a metadata request (not just an open port)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError
        opts = {}
        if self.sasl_users:
            user, password = next(iter(self.sasl_users.items()))
            opts = dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                        sasl_plain_username=user, sasl_plain_password=password)
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000,
                                     **opts)
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


def _reap(pid: int) -> None:
    """Collect the exit status if the broker is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # not our child: its parent reaps it
        pass


if __name__ == "__main__":  # pragma: no cover - thin script entry for ops/kafka.sh
    from liber.settings import Settings
    settings = Settings.load()
    broker = LocalKafka(settings.home, Path(settings.home) / "broker", port=9092)
    {"start": broker.start, "stop": broker.stop}[sys.argv[1]]()
