"""Consumer lag of LIBER's consumer groups, read from Kafka itself.

Lag is read from the broker (committed offsets of a group against the partitions' end offsets),
not from the consumer's memory, so every process can report the lag of every LIBER group: the
lag of a crashed LLM worker is still visible on the stream worker's /metrics, which a consumer
reporting only its own position could not do. Dashboards take `max by (group, topic, partition)`
over the processes.

Per group, topic and partition:
- lag in records: end offset minus committed offset (minus the first offset if the group never
  committed);
- seconds behind: now minus the timestamp of the last processed record (the one just before the
  committed offset), 0 when nothing is waiting; a group that processed nothing yet is behind by
  the age of its oldest waiting record.

A background thread (`start_exporter`) refreshes a snapshot every `lag_interval_s`; the
Prometheus collector turns it into gauges at scrape time, computing "now minus timestamp" then.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily

from core.topics import BEHAVIORS, ITEMS, PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS

log = logging.getLogger("liber.lag")
WARN_AFTER_FAILURES = 3
REFRESH_ERRORS = Counter("liber_lag_refresh_errors_total",
                         "Lag refreshes that failed (Kafka unreachable, group coordinator moving)")


def pipeline_groups(settings) -> dict[str, list[str]]:
    """Consumer group -> the topics it consumes, for every LIBER process."""
    t = settings.topic
    return {settings.app_id: [t(BEHAVIORS), t(ITEMS)],
            f"{settings.app_id}-llm": [t(PARTITIONS_CLOSED)],
            f"{settings.app_id}-fusion": [t(SUMMARIES), t(PARTITIONS_CLOSED)]}


def output_topics(settings) -> list[str]:
    """Topics whose end offsets are exported too (production rate; 'no vectors produced')."""
    return [settings.topic(name) for name in (PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS)]


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed on this partition
    end: int
    lag: int
    since_ts: float | None  # the timestamp "seconds behind" counts from (epoch seconds)

    def seconds_behind(self, now: float) -> float:
        if self.lag == 0 or self.since_ts is None:
            return 0.0
        return max(0.0, now - self.since_ts)


class LagReader:
    """Reads committed offsets, end offsets and record timestamps with its own Kafka clients
    (no consumer group of its own, so it never joins or disturbs the groups it watches)."""

    def __init__(self, settings, client_id: str | None = None):
        from core.kafka import make_admin, make_consumer
        client_id = client_id or f"{settings.app_id}-lag"
        self.admin = make_admin(settings, client_id=client_id)
        self.consumer = make_consumer(settings, client_id=client_id, enable_auto_commit=False,
                                      allow_auto_create_topics=False, fetch_max_wait_ms=100,
                                      max_poll_records=1, auto_offset_reset="none")
        self._timestamps: dict[tuple, float] = {}

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()

    def partitions(self, topics) -> list:
        from kafka import TopicPartition
        return [TopicPartition(topic, p) for topic in sorted(set(topics))
                for p in sorted(self.consumer.partitions_for_topic(topic) or ())]

    def end_offsets(self, topics) -> dict:
        tps = self.partitions(topics)
        return self.consumer.end_offsets(tps) if tps else {}

    def committed(self, group: str) -> dict:
        """{TopicPartition: offset} committed by `group` (empty for an unknown group)."""
        answer = self.admin.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in answer.items() if meta.offset >= 0}

    def read(self, groups: dict[str, list[str]]) -> list[PartitionLag]:
        tps = self.partitions(t for topics in groups.values() for t in topics)
        if not tps:
            return []
        ends = self.consumer.end_offsets(tps)
        starts = self.consumer.beginning_offsets(tps)
        rows, wanted = [], set()
        for group, topics in groups.items():
            committed = self.committed(group)
            for tp in tps:
                if tp.topic not in topics:
                    continue
                done = committed.get(tp)
                position = max(done if done is not None else starts[tp], starts[tp])
                lag = max(0, ends[tp] - position)
                since = None
                if lag:
                    # the last processed record, or (nothing processed) the oldest waiting one
                    at = done - 1 if done is not None and done > starts[tp] else position
                    wanted.add((tp, at))
                    since = self.timestamp(tp, at)
                rows.append(PartitionLag(group, tp.topic, tp.partition, done, ends[tp], lag, since))
        self._timestamps = {k: v for k, v in self._timestamps.items() if k in wanted}
        return rows

    def timestamp(self, tp, offset: int, timeout_s: float = 2.0) -> float | None:
        """Timestamp (epoch seconds) of the record at `offset`, or of the next one where
        compaction removed it (a newer time: seconds behind errs low, not high); None if not
        fetched in time. Cached: offsets do not change their records."""
        key = (tp, offset)
        if key in self._timestamps:
            return self._timestamps[key]
        self.consumer.assign([tp])
        self.consumer.seek(tp, offset)
        found = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self.consumer.poll(timeout_ms=100).get(tp)
            if records:
                found = records[0].timestamp / 1000.0
                break
        if found is not None:  # a timeout is retried at the next refresh
            self._timestamps[key] = found
        return found


class LagCollector:
    """Prometheus view of the latest snapshot (registered once, at import)."""

    def __init__(self):
        self.rows: list[PartitionLag] = []
        self.ends: dict = {}

    def update(self, rows: list[PartitionLag], ends: dict) -> None:
        self.rows, self.ends = rows, ends  # swapped whole: a scrape sees one snapshot

    def collect(self):
        rows, ends, now = self.rows, self.ends, time.time()
        labels = ["group", "topic", "partition"]
        records = GaugeMetricFamily("liber_consumer_lag_records",
                                    "Records waiting for the group: end offset minus committed", labels=labels)
        seconds = GaugeMetricFamily("liber_consumer_lag_seconds",
                                    "Now minus the timestamp of the group's last processed record "
                                    "(0 when nothing waits)", labels=labels)
        committed = GaugeMetricFamily("liber_consumer_committed_offset",
                                      "Offset committed by the group (absent if never committed)",
                                      labels=labels)
        for row in rows:
            values = [row.group, row.topic, str(row.partition)]
            records.add_metric(values, row.lag)
            seconds.add_metric(values, round(row.seconds_behind(now), 3))
            if row.committed is not None:
                committed.add_metric(values, row.committed)
        end = GaugeMetricFamily("liber_topic_end_offset",
                                "End offset (next offset to be written) of a LIBER topic partition",
                                labels=["topic", "partition"])
        for tp, offset in sorted(ends.items()):
            end.add_metric([tp.topic, str(tp.partition)], offset)
        yield from (records, seconds, committed, end)


COLLECTOR = LagCollector()
REGISTRY.register(COLLECTOR)


class LagExporter(threading.Thread):
    """Refreshes COLLECTOR from Kafka every `interval_s` seconds until stopped."""

    def __init__(self, settings, groups: dict[str, list[str]] | None = None,
                 topics: list[str] | None = None, interval_s: float | None = None,
                 collector: LagCollector = COLLECTOR):
        super().__init__(name="liber-lag", daemon=True)
        self.settings = settings
        self.groups = groups or pipeline_groups(settings)
        self.topics = sorted({t for ts in self.groups.values() for t in ts} |
                             set(topics if topics is not None else output_topics(settings)))
        self.interval_s = interval_s or settings.lag_interval_s
        self.collector = collector
        self._halt = threading.Event()
        self._reader: LagReader | None = None
        self._failures = 0

    def refresh(self) -> None:
        if self._reader is None:
            self._reader = LagReader(self.settings)
        rows = self._reader.read(self.groups)
        ends = self._reader.end_offsets(self.topics)
        self.collector.update(rows, ends)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.refresh()
                if self._failures >= WARN_AFTER_FAILURES:
                    log.info("lag refresh works again")
                self._failures = 0
            except Exception as exc:  # noqa: BLE001 - a monitor must outlive Kafka hiccups
                REFRESH_ERRORS.inc()
                self._failures += 1
                # A new group's coordinator takes a moment to appear: warn only when it lasts,
                # and once per outage.
                if self._failures == WARN_AFTER_FAILURES:
                    log.warning("lag refresh failed %d times (retrying every %gs): %r",
                                self._failures, self.interval_s, exc)
                self._drop_reader()
            self._halt.wait(self.interval_s)
        self._drop_reader()

    def _drop_reader(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:  # noqa: BLE001
                pass
            self._reader = None

    def stop(self) -> None:
        self._halt.set()


_exporter: LagExporter | None = None


def start_exporter(settings) -> LagExporter:
    """The process's lag exporter thread (one per process; later calls return it)."""
    global _exporter
    if _exporter is None:
        _exporter = LagExporter(settings)
        _exporter.start()
    return _exporter
