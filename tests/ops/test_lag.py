"""Consumer lag read from the real broker: records and seconds behind for a group with committed
offsets, for a group that never committed, and the Prometheus view of a snapshot."""
from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from ops.lag import LagCollector, LagExporter, LagReader, pipeline_groups
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics

pytestmark = pytest.mark.kafka
HOUR = 3600.0


def produce(settings, topic: str, partition: int, timestamps: list[float]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for i, ts in enumerate(timestamps):
        producer.send(topic, key=b"k", value=str(i).encode(), partition=partition,
                      timestamp_ms=int(ts * 1000))
    producer.flush()
    producer.close()


def commit(settings, group: str, offsets: dict) -> None:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=group,
                             enable_auto_commit=False)
    consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
    consumer.close()


def test_lag_in_records_and_seconds(settings):
    create_topics(settings, [BEHAVIORS, PARTITIONS_CLOSED], log=lambda m: None)
    behaviors, closed = settings.topic(BEHAVIORS), settings.topic(PARTITIONS_CLOSED)
    now = time.time()
    # partition 0: 10 records, one a minute, the newest an hour old; partition 1: 3 records
    produce(settings, behaviors, 0, [now - 2 * HOUR + 60 * i for i in range(10)])
    produce(settings, behaviors, 1, [now - HOUR] * 3)
    produce(settings, closed, 0, [now - 5 * HOUR, now - 4 * HOUR])
    # the stream group processed 6 records of partition 0 and all of partition 1
    commit(settings, settings.app_id, {TopicPartition(behaviors, 0): 6,
                                       TopicPartition(behaviors, 1): 3})

    reader = LagReader(settings)
    try:
        rows = {(r.group, r.topic, r.partition): r for r in reader.read(pipeline_groups(settings))}
    finally:
        reader.close()
    now = time.time()
    p0 = rows[(settings.app_id, behaviors, 0)]
    assert (p0.committed, p0.end, p0.lag) == (6, 10, 4)
    # behind by the age of the last processed record (offset 5, 2 h - 5 min old)
    assert p0.since_ts == pytest.approx(now - 2 * HOUR + 300, abs=60)
    assert 2 * HOUR - 300 - 60 < p0.seconds_behind(now) < 2 * HOUR - 300 + 60
    p1 = rows[(settings.app_id, behaviors, 1)]
    assert (p1.committed, p1.end, p1.lag, p1.seconds_behind(now)) == (3, 3, 0, 0.0)
    # the LLM group never committed: the whole topic waits, behind by its oldest record's age
    llm0 = rows[(f"{settings.app_id}-llm", closed, 0)]
    assert (llm0.committed, llm0.lag) == (None, 2)
    assert 5 * HOUR - 60 < llm0.seconds_behind(now) < 5 * HOUR + 60
    llm1 = rows[(f"{settings.app_id}-llm", closed, 1)]
    assert (llm1.lag, llm1.seconds_behind(now)) == (0, 0.0)
    # the fusion group reads partitions.closed too, independently of the LLM group
    assert rows[(f"{settings.app_id}-fusion", closed, 0)].lag == 2


def test_exporter_snapshot_as_prometheus_samples(settings):
    create_topics(settings, [BEHAVIORS], log=lambda m: None)
    behaviors = settings.topic(BEHAVIORS)
    produce(settings, behaviors, 1, [time.time() - 600] * 5)
    group = f"{settings.app_id}-watched"
    commit(settings, group, {TopicPartition(behaviors, 1): 2})
    collector = LagCollector()  # not registered: the process-wide one belongs to the workers
    LagExporter(settings, groups={group: [behaviors]}, topics=[behaviors],
                collector=collector).refresh()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    labels = (("group", group), ("partition", "1"), ("topic", behaviors))
    assert samples[("liber_consumer_lag_records", labels)] == 3
    assert samples[("liber_consumer_committed_offset", labels)] == 2
    assert 600 - 60 < samples[("liber_consumer_lag_seconds", labels)] < 600 + 60
    lag0 = (("group", group), ("partition", "0"), ("topic", behaviors))
    assert samples[("liber_consumer_lag_records", lag0)] == 0
    assert ("liber_consumer_committed_offset", lag0) not in samples  # never committed there
    assert samples[("liber_topic_end_offset", (("partition", "1"), ("topic", behaviors)))] == 5
