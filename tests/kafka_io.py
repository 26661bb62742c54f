"""Test helpers that read topics back from the real broker."""
from __future__ import annotations

import time

from kafka import TopicPartition

from core.kafka import make_consumer
from core.settings import Settings


def read_topic(settings: Settings, logical: str, *, expect: int | None = None,
               timeout: float = 60.0, idle: float = 2.0, settle: float = 0.5) -> list:
    """All records of a topic from the beginning: until `expect` arrived and then `settle`
    seconds pass without a new one (so an exact count sees extra records), or `idle` seconds
    pass without a new one (when `expect` is None), or `timeout`. Unlike core.kafka.read_to_end
    it waits for records still being written (a worker's output)."""
    name = settings.topic(logical)
    consumer = make_consumer(settings, enable_auto_commit=False, consumer_timeout_ms=200,
                             isolation_level="read_committed")
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(name)
            if partitions is None:
                time.sleep(0.2)
        if partitions is None:
            return []
        consumer.assign([TopicPartition(name, p) for p in partitions])
        consumer.seek_to_beginning()
        records, last_new = [], time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
                last_new = time.monotonic()
            if expect is not None and len(records) >= expect and \
                    time.monotonic() - last_new > settle:
                break
            if expect is None and time.monotonic() - last_new > idle:
                break
        return records
    finally:
        consumer.close()
