"""`liber fusion-worker` end to end through the real broker, with a tiny real UIF artifact.

summaries / partitions.closed / collective-summaries -> fusion-worker (subprocess)
  -> user-interests / summaries.dlq
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from fusion.worker import FusionWorker
from models.artifact import InterestModel
from state.interest_cache import InterestCache
from core.activity import Activity
from core.clusters import cluster_of
from core.dead_letter import REASON
from streams.producer import BehaviorProducer
from core.records import (ClosedPartition, CollectiveSummary, InterestVector, PartitionEvent,
                             Summary, decode)
from core.topics import (COLLECTIVE_SUMMARIES, PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS,
                            create_topics, dlq)
from tests.kafka_io import read_topic
from tests.uif_artifact import tiny_artifact

pytestmark = pytest.mark.kafka
T0 = 1_000_000_000.0
CRIME = ["Heat (1995) [Action|Crime|Thriller]", "Casino (1995) [Crime|Drama]",
         "Se7en (1995) [Crime|Thriller]"]
KIDS = ["Babe (1995) [Children's|Comedy]", "Toy Story (1995) [Animation|Children's|Comedy]"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.conftest import base_settings
    return tiny_artifact(tmp_path_factory, base_settings())


@pytest.fixture(scope="module")
def model(artifact):
    model = InterestModel.load(artifact)
    model.user_vectors([(["warm-up"], "warm-up")])  # the text encoder loads on first use
    return model


def summary(user: str, seq: int) -> Summary:
    return Summary(user, seq, f"{user} partition {seq}: crime thrillers, heists",
                   f"{user} shift {seq}", f"{user} profile after {seq}: likes crime films "
                   f"and dark dramas ({seq})", 100, 30, "transformers", "smollm2", 0.5,
                   mode="cascade", end_ts=T0 + seq, closed_at=time.time())


def partition(user: str, seq: int, titles: list[str], ratings: list[float]) -> ClosedPartition:
    events = tuple(PartitionEvent(f"{user}-{seq}-{i}", f"i{i}", "rate", T0 + i, r, t)
                   for i, (t, r) in enumerate(zip(titles, ratings)))
    return ClosedPartition(user, seq, events, events[0].ts, events[-1].ts, "max_events")


def send(settings, *records) -> None:
    with BehaviorProducer(settings) as producer:
        for record in records:
            if isinstance(record, Summary):
                producer.send_raw(SUMMARIES, record.user_id.encode(), record.encode())
            elif isinstance(record, ClosedPartition):
                producer.send_raw(PARTITIONS_CLOSED, record.user_id.encode(), record.encode())
            elif isinstance(record, CollectiveSummary):
                producer.send_raw(COLLECTIVE_SUMMARIES, record.cluster.encode(), record.encode())
            else:
                producer.send_raw(*record)


def interests_until(settings, done, timeout: float = 90.0) -> list:
    """user-interests records from the beginning, read until `done(records)` holds."""
    name = settings.topic(USER_INTERESTS)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name))]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        records, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                records.extend(recs)
            if done(records):
                return records
        raise AssertionError(f"user-interests never got there; read {len(records)}: "
                             f"{[(r.key, decode(InterestVector, r.value, key=r.key).version) for r in records]}")
    finally:
        consumer.close()


def versions(records, user: str) -> list[int]:
    return [decode(InterestVector, r.value, key=r.key).version for r in records
            if r.key == user.encode()]


def has(user: str, version: int):
    return lambda records: version in versions(records, user)


def last(records, user: str) -> tuple[InterestVector, bytes]:
    rec = [r for r in records if r.key == user.encode()][-1]
    return decode(InterestVector, rec.value, key=rec.key), rec.value


def step_until(worker, done, timeout: float = 180.0) -> None:
    """Run an in-process worker's loop until `done()`."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there"
        worker.step(poll_ms=200)


def test_summaries_become_growing_versions_idempotently_across_a_restart(
        settings, start_worker, artifact, model):
    settings = settings.replace(fusion_model_dir=str(artifact), log_level="INFO")
    create_topics(settings, log=lambda m: None)
    u1 = [summary("u1", s) for s in range(3)]
    u2 = summary("u2", 0)
    mismatch = summary("u4", 0)
    send(settings, u1[0], u2, u1[1],
         u1[0],                                        # older seq redelivered: no regression
         (SUMMARIES, b"u3", b"{not json"),             # bad records: DLQ, the worker goes on
         (SUMMARIES, b"someone-else", mismatch.encode()))
    worker = start_worker(settings, "fusion-worker")
    records = interests_until(settings, lambda r: has("u1", 1)(r) and has("u2", 0)(r))
    for user in ("u1", "u2"):  # versions only grow, in topic order
        seen = versions(records, user)
        assert seen == sorted(set(seen)), seen
    v1, bytes1 = last(records, "u1")
    v2, _ = last(records, "u2")
    expected = model.user_vectors([([u1[1].partition_summary, u1[0].partition_summary],
                                    u1[1].cascaded_summary),
                                   ([u2.partition_summary], u2.cascaded_summary)])
    assert (v1.version, v1.dim, v1.model_version) == (1, model.dim, model.version)
    assert not v1.collective and v1.event_watermark == u1[1].end_ts
    assert np.allclose(v1.vector, expected[0], atol=1e-4)
    assert np.allclose(v2.vector, expected[1], atol=1e-4)
    worker.wait_metric("liber_fusion_dead_lettered_total", 2, timeout=30)
    dead = read_topic(settings, dlq(SUMMARIES), expect=2, timeout=20)
    assert sorted(dict(r.headers)[REASON] for r in dead) == [b"key_mismatch", b"malformed_json"]
    worker.wait_metric("liber_freshness_seconds_count", 2, kind="own", timeout=30)
    worker.wait_metric("liber_fusion_skipped_total", 1, reason="older", timeout=30)

    # the newest seq redelivered: the very same bytes again, nothing new
    send(settings, u1[1])
    worker.wait_metric("liber_fusion_vectors_published_total", 1, kind="republished", timeout=60)
    records = interests_until(settings, lambda r: len(versions(r, "u1")) >= 2 and
                              versions(r, "u1")[-1] == 1 and last(r, "u1")[1] == bytes1)
    assert worker.stop() == 0

    # Restart: the user's latest summaries come from RocksDB, so seq 2 fuses seq 2 and 1.
    worker = start_worker(settings, "fusion-worker")
    send(settings, u1[2])
    records = interests_until(settings, has("u1", 2))
    v1, _ = last(records, "u1")
    expected = model.user_vectors([([u1[2].partition_summary, u1[1].partition_summary],
                                    u1[2].cascaded_summary)])
    assert np.allclose(v1.vector, expected[0], atol=1e-4)
    assert versions(records, "u1")[-1] == 2 and versions(records, "u2") == [0]


def test_cold_users_get_their_clusters_collective_vector_until_their_own(
        settings, artifact, model, tmp_path):
    """In this process (the CLI path is covered above): the worker is stepped until each
    stage is reached, then the topic is read back."""
    settings = settings.replace(fusion_model_dir=str(artifact))
    create_topics(settings, log=lambda m: None)
    crime = cluster_of([Activity(t, "rate", r) for t, r in zip(CRIME, [5, 4, 5])])
    kids = cluster_of([Activity(t, "rate", r) for t, r in zip(KIDS, [5, 4])])
    assert crime != kids
    group = CollectiveSummary(crime, "People here love crime thrillers and heist films.", 3,
                              "smollm2", 1.7e9)
    send(settings, group, partition("u9", 0, CRIME, [5, 4, 5]),
         partition("u8", 0, KIDS, [5, 4]),            # its cluster has no collective summary yet
         (PARTITIONS_CLOSED, b"u7", b"garbage"))      # the LLM worker dead-letters these
    invalid = ("liber_fusion_errors_total", {"kind": "invalid_partition"})
    invalid_before = REGISTRY.get_sample_value(*invalid) or 0
    worker = FusionWorker(settings, model)
    try:
        user = lambda u: worker.store.user(u) or {}  # noqa: E731
        step_until(worker, lambda: user("u9").get("version") == -1 and user("u8")
                   and (REGISTRY.get_sample_value(*invalid) or 0) > invalid_before)
        assert REGISTRY.get_sample_value(*invalid) - invalid_before == 1
        records = interests_until(settings, has("u9", -1))
        v9, _ = last(records, "u9")
        expected = model.user_vectors([([], group.summary)])[0]
        assert v9.collective and v9.cluster == crime and v9.version == -1
        assert np.allclose(v9.vector, expected, atol=1e-4) and v9.event_watermark == T0 + 2
        assert versions(records, "u8") == [] and user("u8")["version"] is None

        # the kids cluster's collective summary arrives: its waiting member is served
        send(settings, CollectiveSummary(kids, "Families watching animated comedies.", 3,
                                         "smollm2", 1.7e9))
        step_until(worker, lambda: user("u8").get("version") == -1)
        # u9's own first summary replaces the stand-in
        send(settings, summary("u9", 0))
        step_until(worker, lambda: user("u9").get("version") == 0)
    finally:
        worker.shutdown()
    records = interests_until(settings, lambda r: has("u8", -1)(r) and has("u9", 0)(r))
    assert last(records, "u8")[0].cluster == kids and last(records, "u8")[0].collective
    assert versions(records, "u9") == [-1, 0] and not last(records, "u9")[0].collective

    # the ranker's cache follows the topic: own vector for u9, the stand-in for u8
    with InterestCache(settings, tmp_path / "cache", model_version=model.version) as cache:
        cache.sync(timeout_s=30)
        version, vector = cache.get("u9")
        assert version == 0 and np.allclose(vector, last(records, "u9")[0].vector)
        assert cache.entry("u8").collective and cache.get("u8")[0] == -1


def test_a_new_owner_replays_the_users_summaries_before_going_on(settings, artifact, model,
                                                                  tmp_path):
    """Two workers of one group, one after the other, each with its own state directory (as on
    two machines): the second rebuilds u1's latest summaries from the topic, publishing nothing
    for them, so its first vector for u1 fuses summaries it never processed itself."""
    settings = settings.replace(fusion_model_dir=str(artifact))
    create_topics(settings, log=lambda m: None)
    u1 = [summary("u1", s) for s in range(3)]
    send(settings, u1[0], u1[1])

    first = FusionWorker(settings.replace(state_dir=str(tmp_path / "a")), model)
    step_until(first, lambda: (first.store.user("u1") or {}).get("version") == 1)
    first.shutdown()
    second = FusionWorker(settings.replace(state_dir=str(tmp_path / "b")), model)
    try:
        step_until(second, lambda: (second.store.user("u1") or {}).get("seq") == 1)
        assert second.store.user("u1")["version"] is None  # replayed, not published again
        send(settings, u1[2])
        step_until(second, lambda: second.store.user("u1")["version"] == 2)
    finally:
        second.shutdown()
    records = interests_until(settings, has("u1", 2))
    seen = versions(records, "u1")
    assert seen == sorted(set(seen)) and seen[-1] == 2
    expected = model.user_vectors([([u1[2].partition_summary, u1[1].partition_summary],
                                    u1[2].cascaded_summary)])
    assert np.allclose(last(records, "u1")[0].vector, expected[0], atol=1e-4)


# The local broker's message.max.bytes is 4 MiB; our producers' max_request_size is 1 MB.
AT_BROKER_LIMIT = 4 * 1024 * 1024 - 512


class FailsOn:
    """The real model, failing for users whose cascaded summary holds `marker`."""

    def __init__(self, model, marker: str):
        self.model, self.marker = model, marker
        self.version, self.dim, self.k = model.version, model.dim, getattr(model, "k", 4)

    def user_vectors(self, inputs):
        if any(self.marker in cascaded for _, cascaded in inputs):
            raise RuntimeError(f"injected model failure on {self.marker}")
        return self.model.user_vectors(inputs)


def test_dead_letters_are_checked_bounded_and_a_model_failure_is_dead_lettered(
        settings, artifact, model):
    """summaries.dlq takes 32 KiB, less than the 64 KiB a dead letter keeps: a refused letter
    is sent again without the record's bytes, never dropped with its offset committed."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from core import dead_letter
    settings = settings.replace(fusion_model_dir=str(artifact))
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(settings.topic(dlq(SUMMARIES)), 2, 1,
                                      topic_configs={"max.message.bytes": str(32 * 1024)})])
    finally:
        admin.close()
    create_topics(settings, log=lambda m: None)
    send(settings, (SUMMARIES, b"mid", b"{" * (48 * 1024)))  # fits our client, not the DLQ
    boom = summary("boom", 0)
    boom = dataclasses.replace(boom, cascaded_summary="BOOM " + boom.cascaded_summary)
    with BehaviorProducer(settings, max_request_size=8 * 1024 * 1024) as producer:
        producer.send_raw(SUMMARIES, b"big", b"x" * AT_BROKER_LIMIT).get(timeout=30)
    send(settings, boom, summary("u1", 0))
    worker = FusionWorker(settings, FailsOn(model, "BOOM"))
    try:
        step_until(worker, lambda: (worker.store.user("u1") or {}).get("version") == 0)
    finally:
        worker.shutdown()
    letters = read_topic(settings, dlq(SUMMARIES), expect=3, timeout=30)
    assert sorted(dict(r.headers)[REASON] for r in letters) == \
        [b"fusion_failed", b"malformed_json", b"oversize"]
    for r in letters:  # the refused ones came again without their bytes, headers intact
        headers = dead_letter.header_dict(r.headers)
        if headers[REASON] != "fusion_failed":
            assert r.value == b"" and headers[dead_letter.TRUNCATED] == "1"
            assert int(headers[dead_letter.ORIGINAL_LENGTH]) in (48 * 1024, AT_BROKER_LIMIT)
    assert versions(interests_until(settings, has("u1", 0)), "boom") == []


def test_a_collective_topic_created_after_the_start_is_followed(settings, artifact, model):
    settings = settings.replace(fusion_model_dir=str(artifact))
    create_topics(settings, [SUMMARIES, PARTITIONS_CLOSED, USER_INTERESTS, dlq(SUMMARIES)],
                  log=lambda m: None)
    crime = cluster_of([Activity(t, "rate", r) for t, r in zip(CRIME, [5, 4, 5])])
    worker = FusionWorker(settings, model)
    try:
        worker.step(poll_ms=200)
        create_topics(settings, [COLLECTIVE_SUMMARIES], log=lambda m: None)
        send(settings, CollectiveSummary(crime, "People here love crime thrillers.", 3,
                                         "smollm2", 1.7e9),
             partition("u9", 0, CRIME, [5, 4, 5]))
        step_until(worker, lambda: (worker.store.user("u9") or {}).get("version") == -1,
                   timeout=60)
    finally:
        worker.shutdown()
    assert last(interests_until(settings, has("u9", -1)), "u9")[0].collective
