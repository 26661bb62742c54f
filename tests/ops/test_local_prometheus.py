"""A real Prometheus scrapes a running stream worker; PromQL through its HTTP API sees the
consumer lag of a known backlog, and the worker's structured start line hides secrets."""
from __future__ import annotations

import json
import time

import pytest

from ops.local_prometheus import LocalPrometheus
from streams.producer import BehaviorProducer
from core.records import BehaviorEvent
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics

pytestmark = pytest.mark.kafka
T0 = 1_000_000_000.0


def wait_for(prom: LocalPrometheus, promql: str, want: float, timeout: float = 90) -> float | None:
    """Poll the query until it returns `want` (or time runs out); returns the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = prom.value(promql)
        if value == want:
            break
        time.sleep(0.5)
    return value


@pytest.fixture
def prometheus(tmp_path):
    started: list[LocalPrometheus] = []

    def start(targets: dict[str, list[str]]) -> LocalPrometheus:
        prom = LocalPrometheus(tmp_path / "prometheus", targets).start()
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


def test_prometheus_sees_the_lag_of_a_known_backlog(settings, start_worker, prometheus):
    # 22 events of one user, max_events=5: exactly 4 closed partitions and 2 events in the open
    # cache; no LLM worker runs, so the LLM group's backlog on partitions.closed is 4 records.
    settings = settings.replace(max_events=5, max_gap_s=86400.0, lag_interval_s=0.5, log_level="INFO",
                                sasl_password="s3cret-pw")
    create_topics(settings, log=lambda m: None)
    worker = start_worker(settings)
    prom = prometheus({"liber-stream-worker": [f"127.0.0.1:{worker.port}"]})
    with BehaviorProducer(settings) as producer:
        for i in range(22):
            producer.send(BehaviorEvent(event_id=f"e{i}", user_id="u1", item_id=f"i{i}",
                                        action="rate", ts=T0 + 60 * i, value=4.0))
    worker.wait_metric("liber_partitions_closed_total", 4)

    llm, stream = f'group="{settings.app_id}-llm"', f'group="{settings.app_id}"'
    behaviors = f'topic="{settings.topic(BEHAVIORS)}"'
    closed = f'topic="{settings.topic(PARTITIONS_CLOSED)}"'
    assert wait_for(prom, f"sum(liber_consumer_lag_records{{{llm},{closed}}})", 4) == 4, worker.tail()
    assert wait_for(prom, f"sum(liber_consumer_committed_offset{{{stream},{behaviors}}})", 22) == 22
    assert prom.value(f"sum(liber_consumer_lag_records{{{stream},{behaviors}}})") == 0
    # nothing processed by the LLM group yet: behind by the age of its oldest waiting record
    assert prom.value(f"max(liber_consumer_lag_seconds{{{llm}}})") > 0
    assert prom.value(f"max(liber_consumer_lag_seconds{{{stream},{behaviors}}})") == 0
    # the worker's own counters through the same scrape
    assert wait_for(prom, f"sum(liber_records_out_total{{{closed}}})", 4) == 4
    assert prom.value(f"sum(liber_topic_end_offset{{{closed}}})") == 4
    assert prom.value("sum(liber_events_in_total)") == 22
    assert prom.value(f"sum(liber_records_in_total{{{behaviors}}})") == 22
    assert prom.value("liber_rebalances_total") >= 1
    assert prom.value('liber_state_size_bytes{store="stream"}') > 0
    assert prom.value("liber_open_caches") == 1
    assert set(prom.targets_up().values()) == {"up"}

    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines()
             if line.startswith("{")]
    (start,) = [line for line in lines if line.get("event") == "start"]
    assert start["role"] == "stream-worker" and start["config"]["app_id"] == settings.app_id
    assert start["config"]["sasl_password"] == "***"
    assert "s3cret-pw" not in worker.log_path.read_text()
    assert any(line.get("event") == "rebalance" for line in lines)
