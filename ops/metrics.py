"""Prometheus metrics exported by the stream worker (names follow Prometheus conventions), and
the metrics every long-running process exports (`start`): records out and in by topic,
rebalances, recovery progress, state size on disk, and consumer lag (ops/lag.py)."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

EVENTS_IN = Counter("liber_events_in_total", "Behaviour records read from the input topic")
EVENTS_PROCESSED = Counter("liber_events_processed_total",
                           "Behaviour records applied to user state", ["outcome"])
DEAD_LETTERED = Counter("liber_dead_lettered_total", "Records sent to a dead-letter topic",
                        ["topic", "reason"])
PARTITIONS_CLOSED = Counter("liber_partitions_closed_total", "UBSP partitions closed", ["rule"])
SEND_FAILED = Counter(
    "liber_send_failed_total",
    "Outputs and dead letters Kafka did not take, by topic meant and what was written instead "
    "(cut: a bounded dead letter, headers: one without key and value, none: the worker stopped)",
    ["topic", "fallback"])
ITEMS_LOADED = Counter("liber_items_loaded_total", "Catalogue records stored in the items table")
ITEM_VECTORS = Gauge("liber_item_vectors", "Item text vectors the drift rule holds in this worker")
OPEN_CACHES = Gauge("liber_open_caches", "Users with a non-empty open cache on this worker")

# --- every long-running process ------------------------------------------------------------
REBALANCES = Counter("liber_rebalances_total",
                     "Consumer group rebalances (partition assignments) this process went through")
ASSIGNED_PARTITIONS = Gauge("liber_assigned_partitions",
                            "Topic partitions this stream worker owns since its last rebalance",
                            ["topic"])
RECOVERY_IN_PROGRESS = Gauge("liber_recovery_in_progress",
                             "1 while the process restores its state from a changelog")
RECOVERY_REMAINING = Gauge("liber_recovery_remaining_records",
                           "Changelog records still to restore before processing resumes")


class TopicCounts:
    """A per-topic counter cheap enough for every record (a dict add, no lock: one thread
    writes); exported as a Prometheus counter at scrape time."""

    def __init__(self, name: str, documentation: str):
        self.name, self.documentation = name, documentation
        self.counts: defaultdict[str, int] = defaultdict(int)  # hot paths may add to it directly

    def inc(self, topic: str, n: int = 1) -> None:
        self.counts[topic] += n

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=["topic"])
        for topic, count in list(self.counts.items()):
            family.add_metric([topic], count)
        yield family


RECORDS_IN = TopicCounts("liber_records_in_total", "Records consumed, by topic")
RECORDS_OUT = TopicCounts("liber_records_out_total",
                          "Records produced and acknowledged, by topic (outputs, dead letters, "
                          "changelogs)")


class StateSize:
    """Bytes on disk of each state store (RocksDB directories), measured at scrape time, at
    most every REFRESH_S: the walk runs in the scrape's thread and holds the GIL the worker's
    loop needs (about 2% of the stream worker's CPU when scraped every 0.5 s)."""
    REFRESH_S = 5.0

    def __init__(self):
        self.stores: dict[str, Path] = {}
        self._measured: dict[str, tuple[float, int]] = {}  # store -> (when, bytes)

    def collect(self):
        family = GaugeMetricFamily("liber_state_size_bytes",
                                   "Bytes on disk of a state store (RocksDB directory)",
                                   labels=["store"])
        now = time.monotonic()
        for store, path in sorted(self.stores.items()):
            when, size = self._measured.get(store, (-self.REFRESH_S, 0))
            if now - when >= self.REFRESH_S:
                size = directory_bytes(path)
                self._measured[store] = (now, size)
            family.add_metric([store], size)
        yield family


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # RocksDB removed it while we walked (compaction)
                pass
    return total


STATE_SIZE = StateSize()
for _collector in (RECORDS_IN, RECORDS_OUT, STATE_SIZE):
    REGISTRY.register(_collector)

from ops import lag  # noqa: E402  (registers the lag gauges on this registry too)


def start(settings, stores: dict[str, Path]) -> None:
    """Metrics of a long-running process: /metrics on settings.metrics_port (0: nothing), the
    size of its state `stores` {name: directory}, and the lag of LIBER's consumer groups."""
    if not settings.metrics_port:
        return
    STATE_SIZE.stores.update(stores)
    serve(settings.metrics_host, settings.metrics_port)
    lag.start_exporter(settings)


def serve(host: str, port: int) -> None:
    """Expose /metrics on host:port (0 disables)."""
    if port:
        start_http_server(port, addr=host)


def scrape(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` at a /metrics URL whose labels include `labels`."""
    import urllib.request
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total
