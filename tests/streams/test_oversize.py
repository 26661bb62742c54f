"""Records larger than some limit on the way (ours, the producer's, the broker's, a topic's):
dead-lettered within what the dead-letter topic takes, and the stream goes on. Real broker."""
from __future__ import annotations

import hashlib
import json

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError

from core import dead_letter
from streams.producer import BehaviorProducer
from core.records import BehaviorEvent, ClosedPartition, Item, decode
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics, dlq
from tests.kafka_io import read_topic

pytestmark = pytest.mark.kafka
T0 = 1_000_000_000.0
BROKER_MAX = 4 * 1024 * 1024  # message.max.bytes of ops/local_kafka.py


def behavior(eid: str, user: str = "u1", item: str = "i1", ts: float = T0) -> BehaviorEvent:
    return BehaviorEvent(event_id=eid, user_id=user, item_id=item, action="rate", ts=ts, value=4.0)


def padded(eid: str, size: int) -> bytes:
    """A behaviour record of exactly `size` bytes, its `attrs` holding one long string."""
    data = json.loads(behavior(eid).encode())
    data["attrs"] = {"note": ""}
    data["attrs"]["note"] = "x" * (size - len(json.dumps(data).encode()))
    raw = json.dumps(data).encode()
    assert len(raw) == size
    return raw


def set_topic_max(settings, logical: str, max_bytes: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topic(logical),
                                            configs={"max.message.bytes": str(max_bytes)})])
    finally:
        admin.close()


def headers_of(record) -> dict[str, str]:
    return dead_letter.header_dict(record.headers)


def test_records_up_to_the_broker_limit_are_dead_lettered_bounded_and_the_stream_goes_on(
        settings, start_worker):
    """A 2 MB record (over the producer's 1 MB default) and one at the broker's own limit used
    to stop the worker at every start: their dead letter copied all the bytes."""
    settings = settings.replace(max_events=2)
    create_topics(settings, log=lambda m: None)
    big = padded("big", 2 * 1000 * 1000)
    at_limit = padded("at-limit", BROKER_MAX - 1024)  # record overhead and key fit the rest
    with BehaviorProducer(settings, max_request_size=2 * BROKER_MAX) as producer:
        producer.send_raw(BEHAVIORS, b"u1", big).get(60)
        producer.send_raw(BEHAVIORS, b"u1", at_limit).get(60)
    with BehaviorProducer(settings, max_request_size=2 * BROKER_MAX, retries=0,
                          enable_idempotence=False) as producer:
        with pytest.raises(KafkaError):  # just over it: the broker itself refuses
            producer.send_raw(BEHAVIORS, b"u1", padded("over", BROKER_MAX + 1)).get(60)
    with BehaviorProducer(settings) as producer:
        for i in range(4):
            producer.send(behavior(f"e{i}", ts=T0 + i))
    worker = start_worker(settings)
    worker.wait_metric("liber_events_in_total", 6)

    dead = read_topic(settings, dlq(BEHAVIORS), expect=2)
    assert len(dead) == 2
    by_offset = {int(headers_of(r)[dead_letter.SOURCE_OFFSET]): r for r in dead}
    for offset, original in ((0, big), (1, at_limit)):
        record, headers = by_offset[offset], headers_of(by_offset[offset])
        assert headers[dead_letter.REASON] == "oversize"
        assert record.value == original[:dead_letter.MAX_VALUE]
        assert headers[dead_letter.ORIGINAL_LENGTH] == str(len(original))
        assert headers[dead_letter.ORIGINAL_SHA256] == hashlib.sha256(original).hexdigest()
        assert headers[dead_letter.TRUNCATED] == "1"
    closed = [decode(ClosedPartition, r.value, key=r.key)
              for r in read_topic(settings, PARTITIONS_CLOSED, expect=2)]
    assert sorted((p.seq, [e.event_id for e in p.events]) for p in closed) == [
        (0, ["e0", "e1"]), (1, ["e2", "e3"])]
    assert worker.metric("liber_events_processed_total", outcome="accepted") == 4
    assert worker.proc.poll() is None


def test_topics_that_accept_less_than_the_producer_get_headers_only_dead_letters(
        settings, start_worker):
    """The dead-letter topic takes less than a bounded dead letter, and partitions.closed less
    than a long partition: each record that Kafka refuses is set aside by a smaller dead letter
    with its coordinates, length and sha256, and the stream goes on."""
    settings = settings.replace(max_events=2)
    create_topics(settings, log=lambda m: None)
    set_topic_max(settings, dlq(BEHAVIORS), 16 * 1024)
    set_topic_max(settings, PARTITIONS_CLOSED, 3 * 1024)
    oversize = padded("oversize", 100 * 1024)  # > max_payload_bytes, its letter > 16 KiB
    long_title = "L" * 2000
    with BehaviorProducer(settings) as producer:
        producer.send_item(Item("long", long_title, {"genres": ["Drama"]}))
        producer.send_item(Item("i1", "Heat (1995)", {"genres": ["Action"]}))
    worker = start_worker(settings)
    worker.wait_metric("liber_items_loaded_total", 2)
    with BehaviorProducer(settings) as producer:
        producer.send_raw(BEHAVIORS, b"u1", oversize)
        for i, item in enumerate(["long"] * 4 + ["i1"] * 2):  # 2 long partitions, 1 short
            producer.send(behavior(f"e{i}", item=item, ts=T0 + i))
    worker.wait_metric("liber_events_in_total", 7)
    worker.wait_metric("liber_send_failed_total", 3)

    dead = read_topic(settings, dlq(BEHAVIORS), expect=1)
    assert len(dead) == 1
    headers = headers_of(dead[0])
    assert dead[0].value == b"" and dead[0].key is None
    assert headers[dead_letter.REASON] == "oversize"
    assert headers[dead_letter.SOURCE_OFFSET] == "0"
    assert headers[dead_letter.ORIGINAL_LENGTH] == str(len(oversize))
    assert headers[dead_letter.ORIGINAL_SHA256] == hashlib.sha256(oversize).hexdigest()
    assert "MessageSizeTooLarge" in headers["liber.send.error"] or \
        "RecordTooLarge" in headers["liber.send.error"]

    closed = [decode(ClosedPartition, r.value, key=r.key)
              for r in read_topic(settings, PARTITIONS_CLOSED, expect=1)]
    assert [[e.event_id for e in p.events] for p in closed] == [["e4", "e5"]]
    parked = read_topic(settings, dlq(PARTITIONS_CLOSED), expect=2)
    assert len(parked) == 2
    parts = sorted((decode(ClosedPartition, r.value, key=r.key) for r in parked),
                   key=lambda p: p.seq)
    assert [[e.event_id for e in p.events] for p in parts] == [["e0", "e1"], ["e2", "e3"]]
    assert all(headers_of(r)[dead_letter.REASON] == "send_failed" for r in parked)
    assert {headers_of(r)[dead_letter.SOURCE_TOPIC] for r in parked} == {
        settings.topic(BEHAVIORS)}
    assert parts[0].events[0].text == f"{long_title} [Drama]"
    assert worker.metric("liber_send_failed_total", fallback="headers") == 1
    assert worker.metric("liber_send_failed_total", fallback="cut") == 2
    assert worker.metric("liber_events_processed_total", outcome="accepted") == 6
    assert worker.proc.poll() is None
