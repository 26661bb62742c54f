"""`liber status` against the real broker and a real metrics endpoint: lag per partition, rates
over the window, totals, the tail of partitions.closed; an unreachable endpoint is reported and
the rest still shown."""
from __future__ import annotations

import re

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily

from liber.cli import main
from ops.local_kafka import free_port
from core.records import ClosedPartition, PartitionEvent
from core.topics import PARTITIONS_CLOSED, create_topics

pytestmark = pytest.mark.kafka
T0 = 1_000_000_000.0


class GrowingEvents:
    """liber_events_in_total that grows by 10 at each scrape: a known rate over the window."""

    def __init__(self):
        self.value = 0

    def collect(self):
        self.value += 10
        family = CounterMetricFamily("liber_events_in", "events", labels=[])
        family.add_metric([], self.value)
        yield family


def closed(seq: int, reason: str) -> bytes:
    events = tuple(PartitionEvent(f"e{seq}-{i}", f"i{i}", "rate", T0 + 60 * i, 4.0, f"Title {i}")
                   for i in range(3))
    return ClosedPartition("u1", seq, events, T0, T0 + 120, reason).encode()


def test_status_shows_lag_rates_cost_and_recent_closes(settings, capsys):
    create_topics(settings, [PARTITIONS_CLOSED], log=lambda m: None)
    topic = settings.topic(PARTITIONS_CLOSED)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for seq, reason in enumerate(["max_events", "max_gap", "drift"]):
        producer.send(topic, key=b"u1", value=closed(seq, reason), partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=f"{settings.app_id}-llm", enable_auto_commit=False)
    consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(1, "", -1)})  # seq 0 summarised
    consumer.close()

    registry = CollectorRegistry()
    registry.register(GrowingEvents())
    Counter("liber_llm_cost_total", "cost", registry=registry).inc(1.5)
    Counter("liber_partitions_closed_total", "closed", ["rule"], registry=registry).labels("max_gap").inc(7)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    dead = f"http://127.0.0.1:{free_port()}/metrics"

    env_settings = settings.to_env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_settings.items():
            mp.setenv(key, value)
        assert main(["status", "--metrics", f"http://127.0.0.1:{port}/metrics", "--metrics", dead,
                     "--window", "0.5", "--closes", "2"]) == 0
    out = capsys.readouterr().out

    row = re.search(rf"{settings.app_id}-llm\s+{re.escape(topic)}\s+0\s+1\s+3\s+2\s+([\d.]+)s", out)
    assert row, out
    assert float(row.group(1)) > 0  # behind by the age of the last summarised record
    assert re.search(rf"{settings.app_id}-llm\s+{re.escape(topic)}\s+1\s+-\s+0\s+0\s+0.0s", out), out
    assert "events in: 20.0/s" in out  # +10 between two scrapes 0.5 s apart
    assert "LLM cost: 1.5" in out and "partitions closed max_gap: 7" in out
    assert f"{dead}: unreachable" in out
    closes = [line for line in out.splitlines() if "user u1 seq" in line]
    assert [c.split("user u1 ")[1].split(":")[0] for c in closes] == ["seq 2", "seq 1"]
    assert "3 events, drift" in closes[0]
