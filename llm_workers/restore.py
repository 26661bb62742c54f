"""Bring the worker's RocksDB state up to date from the `summaries` topic on assignment.

The `summaries` topic doubles as the changelog of the cascade: each record carries the user's
seq and new cascaded summary. When this worker is given a partition of `partitions.closed`,
another worker may have summarised some of its users meanwhile (a rebalance), so the matching
partition of `summaries` is read from the last applied offset to its end and every newer
(user, seq) is applied. Our own summaries are applied again harmlessly (seq not newer).

Both topics are keyed by user id with Kafka's default partitioner, so with equal partition
counts partition p of one holds the users of partition p of the other. With unequal counts all
partitions are read and records are kept when murmur2(key) lands in an assigned partition;
checkpoints are then not kept (each catch-up reads everything).
"""
from __future__ import annotations

import logging
import time

from kafka import TopicPartition

from core.kafka import key_partition, make_consumer
from core.records import InvalidRecord, Summary, decode
from core.topics import SUMMARIES
from llm_workers import metrics
from llm_workers.state import Store

log = logging.getLogger("liber.llm")


def catch_up(settings, store: Store, assigned: list[int], closed_partitions: int,
             timeout_s: float = 120.0) -> int:
    """Apply newer summaries of the users of `assigned` partitions; returns users updated."""
    if not assigned:
        return 0
    name = settings.topic(SUMMARIES)
    consumer = make_consumer(settings, client_id=f"{settings.app_id}-llm-restore",
                             enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(name) or set()
        same = len(partitions) == closed_partitions
        wanted = sorted(p for p in partitions if p in assigned) if same else sorted(partitions)
        tps = [TopicPartition(name, p) for p in wanted]
        if not tps:
            return 0
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        for tp in tps:
            start = store.restore_offset(tp.partition) if same else 0
            consumer.seek(tp, min(start, ends[tp]))
        keep = set(assigned)
        applied, read, started = 0, 0, time.monotonic()
        deadline = started + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"restore from {name} did not finish in {timeout_s}s")
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    read += 1
                    if not same and (rec.key is None or
                                     key_partition(rec.key, closed_partitions) not in keep):
                        continue
                    try:
                        summary = decode(Summary, rec.value, key=rec.key,
                                         max_bytes=settings.max_payload_bytes)
                    except InvalidRecord:
                        continue
                    if store.restore(summary.user_id, summary.seq, rec.value,
                                     summary.cascaded_summary):
                        applied += 1
        if same:
            store.put_restore_offsets({tp.partition: ends[tp] for tp in tps})
        metrics.RESTORED.inc(applied)
        log.info("restore from %s partitions %s: %d records read, %d users updated in %.1fs",
                 name, wanted, read, applied, time.monotonic() - started)
        return applied
    finally:
        consumer.close()
