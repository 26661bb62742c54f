"""Shared fixtures: one real Kafka broker for the session; each test gets its own topics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core.settings import Settings
from ops.local_kafka import LocalKafka, free_port
from ops.metrics import scrape


# The LLM configuration tests run unless they name another: the same on every machine (the
# default `auto` picks vLLM and bfloat16 where it can; tests/llm_workers/backends/test_base.py).
TEST_LLM = dict(llm_backend="transformers", llm_dtype="float32", llm_batch_size=8)


def base_settings(**overrides) -> Settings:
    """Settings from defaults (plus LIBER_HOME only), so a developer's env cannot leak in."""
    env = {k: v for k, v in os.environ.items() if k == "LIBER_HOME"}
    return Settings.load(env=env, **{**TEST_LLM, **overrides})


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    broker = LocalKafka(base_settings().home, tmp_path_factory.mktemp("kafka"), port=free_port())
    broker.start(log=lambda m: None)
    yield broker
    broker.stop(log=lambda m: None)


@pytest.fixture(scope="session")
def sasl_kafka(tmp_path_factory):
    """A second broker whose only listener takes SASL/PLAIN users `admin` and `liber`
    (passwords `admin-pw`, `liber-pw`)."""
    broker = LocalKafka(base_settings().home, tmp_path_factory.mktemp("sasl-kafka"),
                        port=free_port(), sasl_users={"admin": "admin-pw", "liber": "liber-pw"})
    broker.start(log=lambda m: None)
    yield broker
    broker.stop(log=lambda m: None)


@pytest.fixture
def settings(kafka, tmp_path) -> Settings:
    """Isolated by topic prefix, consumer group and state directory."""
    tag = uuid.uuid4().hex[:8]
    return base_settings(bootstrap_servers=kafka.bootstrap, topic_prefix=f"t{tag}.",
                         app_id=f"liber-test-{tag}", state_dir=str(tmp_path / "state"),
                         topic_partitions=2, log_level="WARNING",
                         drift_threshold=0.0)  # drift needs the text encoder: tests opt in


class WorkerProcess:
    """`liber worker` in a child process with its own metrics port."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "worker"):
        self.port = free_port()
        self.settings = settings.replace(metrics_port=self.port)
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "liber.cli", command], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples matching the labels (0 when absent)."""
        return scrape(f"http://127.0.0.1:{self.port}/metrics", name, **labels)

    def wait_metric(self, name: str, at_least: float, timeout: float = 60, **labels) -> float:
        deadline = time.monotonic() + timeout
        value = -1.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.tail()}")
            try:
                value = self.metric(name, **labels)
            except OSError:
                value = -1.0
            if value >= at_least:
                return value
            time.sleep(0.3)
        raise AssertionError(f"{name}{labels}={value}, wanted >= {at_least}\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_worker(tmp_path):
    workers: list[WorkerProcess] = []

    def start(settings: Settings, command: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{command}-{len(workers)}.log", command)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
