"""A throwaway Prometheus on 127.0.0.1 (Debian's `prometheus` binary, installed by ops/setup.sh):
its own config and data directory, a short scrape interval, stopped by its PID. Used by the tests
to scrape real workers and run PromQL through the HTTP API."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from ops.local_kafka import free_port


class PrometheusError(RuntimeError):
    pass


def binary(name: str = "prometheus") -> str:
    path = shutil.which(name)
    if not path:
        raise PrometheusError(f"{name} not on PATH: run ops/setup.sh (installs Debian's prometheus)")
    return path


class LocalPrometheus:
    def __init__(self, work_dir: Path, targets: dict[str, list[str]], scrape_interval: str = "1s",
                 rule_files: list[str] | None = None):
        """`targets`: job name -> ["host:port", ...] scraped at /metrics."""
        self.work_dir = Path(work_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": list(rule_files or []),
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(hosts)}]}
                               for job, hosts in targets.items()],
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "LocalPrometheus":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        self.log_path = self.work_dir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary(), f"--config.file={config}", f"--storage.tsdb.path={self.work_dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready in {timeout}s: {self.tail()}")

    def query(self, promql: str) -> list[dict]:
        """Instant query; the `result` vector ([{metric: {...}, value: [ts, "v"]}, ...])."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.load(urllib.request.urlopen(url, timeout=10))
        if body.get("status") != "success":
            raise PrometheusError(f"{promql}: {body}")
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a scalar-like query (None when the result is empty)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql}: {len(result)} series, wanted one")
        return float(result[0]["value"][1])

    def targets_up(self) -> dict[str, str]:
        body = json.load(urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10))
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
