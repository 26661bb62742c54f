"""The ranker's interest cache against the real broker and a real RocksDB directory."""
from __future__ import annotations

import time

import numpy as np
import pytest

from state.interest_cache import InterestCache
from streams.producer import BehaviorProducer
from core.records import InterestVector
from core.topics import USER_INTERESTS, create_topics

pytestmark = pytest.mark.kafka


def vector(user: str, version: int, values, *, model="m1", collective=False) -> InterestVector:
    values = tuple(float(v) for v in values)
    return InterestVector(user, version, values, len(values), model, 1.7e9 + version, 1.0e9,
                          collective=collective, cluster="Drama" if collective else "")


def send(settings, *records) -> None:
    with BehaviorProducer(settings) as producer:
        for record in records:
            if isinstance(record, InterestVector):
                producer.send_raw(USER_INTERESTS, record.user_id.encode(), record.encode())
            else:
                producer.send_raw(USER_INTERESTS, *record)


def test_cache_follows_updates_never_goes_back_and_resumes_after_restart(settings, tmp_path):
    create_topics(settings, log=lambda m: None)
    path = tmp_path / "cache"
    send(settings, vector("u1", -1, [9, 9], collective=True), vector("u1", 0, [1, 2]),
         vector("u2", 3, [0.1, 0.2]),
         vector("u2", 2, [5, 5]),               # older version after a newer one: ignored
         vector("u3", 0, [7, 7], model="m0"),   # another model's vector: filtered out
         (b"u4", b"{broken"), ("u5".encode(), None))
    cache = InterestCache(settings, path, model_version="m1")
    assert cache.sync(timeout_s=30) == 3  # u1 collective, u1 own, u2 v3
    version, vec = cache.get("u1")
    assert version == 0 and vec.dtype == np.float32 and vec.tolist() == [1.0, 2.0]
    assert cache.get("u2")[0] == 3 and np.allclose(cache.get("u2")[1], [0.1, 0.2])
    assert cache.get("u3") is None and cache.get("nobody") is None
    assert cache.stats["stale"] == 1 and cache.stats["invalid"] == 1
    assert cache.stats["other_model"] == 1 and len(cache) == 2
    # a collective stand-in after the own vector never replaces it
    send(settings, vector("u1", -1, [3, 3], collective=True), vector("u1", 1, [4, 5]))
    cache.start()  # the background thread follows the topic
    deadline = time.monotonic() + 30
    while cache.get("u1")[0] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache.get("u1")[0] == 1 and cache.stats["stale"] == 2
    cache.close()

    # Restart: the stored offsets resume after what was applied; nothing is read twice.
    cache = InterestCache(settings, path, model_version="m1")
    try:
        cache.sync(timeout_s=30)
        entry = cache.entry("u1")
        assert entry.version == 1 and entry.vector.tolist() == [4.0, 5.0] and not entry.collective
        before = dict(cache.stats)
        send(settings, vector("u2", 4, [0.5, 0.25]))
        assert cache.sync(timeout_s=30) == 1
        assert cache.get("u2")[0] == 4
        assert cache.stats["applied"] == before["applied"] + 1
    finally:
        cache.close()
    # a fresh cache on the same directory reads nothing again: all offsets were stored
    cache = InterestCache(settings, path, model_version="m1")
    try:
        assert cache.sync(timeout_s=30) == 0 and cache.stats["applied"] == 0
        assert cache.get("u2")[0] == 4 and cache.get("u1")[0] == 1
        send(settings, (b"u2", None))  # a tombstone removes the user
        assert cache.sync(timeout_s=30) == 1 and cache.get("u2") is None and len(cache) == 1
    finally:
        cache.close()


# The local broker's message.max.bytes is 4 MiB (ops/local_kafka.py): a record that size (less
# the batch's own bytes) is what the broker accepts and our 1 MB clients would never send.
AT_BROKER_LIMIT = 4 * 1024 * 1024 - 512


def test_oversize_and_malformed_records_are_counted_skipped_and_never_stop_the_cache(
        settings, tmp_path, caplog):
    create_topics(settings, log=lambda m: None)
    good = vector("u1", 0, [1, 2])
    with BehaviorProducer(settings, max_request_size=8 * 1024 * 1024) as producer:
        for key, value in ((b"u1", b"x" * AT_BROKER_LIMIT),  # accepted by the broker
                           (b"u1", b'{"schema": "interest-vector/1", "vector": "nope"}'),
                           (b"u1", b"[1, 2]"), (b"\xff\xfe", good.encode()),
                           (b"u1", good.encode())):
            producer.send_raw(USER_INTERESTS, key, value)
    with InterestCache(settings, tmp_path / "cache") as cache:
        assert cache.sync(timeout_s=60) == 1
        assert cache.get("u1")[0] == 0 and cache.stats["invalid"] == 4
        assert any("oversize" in r.getMessage() for r in caplog.records)
        # the background thread goes on after bad records too
        send(settings, (b"u1", b"{broken"), vector("u1", 1, [3, 4]))
        cache.start()
        deadline = time.monotonic() + 30
        while cache.get("u1")[0] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cache.get("u1")[0] == 1 and cache.stats["invalid"] == 5


def test_a_cache_reopened_under_another_model_drops_the_old_models_vectors(settings, tmp_path):
    create_topics(settings, log=lambda m: None)
    path = tmp_path / "cache"
    send(settings, vector("u1", 2, [1, 1], model="m0"), vector("u2", 1, [2, 2], model="m1"))
    with InterestCache(settings, path, model_version="m0") as cache:
        cache.sync(timeout_s=30)
        assert cache.get("u1")[0] == 2 and cache.get("u2") is None
    with InterestCache(settings, path, model_version="m1") as cache:
        cache.sync(timeout_s=30)
        assert cache.get("u1") is None  # m0's vector, kept by the m0 cache
        assert cache.entry("u2").model_version == "m1"  # skipped by the m0 cache: read again
        assert len(cache) == 1
    with InterestCache(settings, path, model_version="m1") as cache:  # same filter: resumes
        assert cache.sync(timeout_s=30) == 0 and cache.get("u2")[0] == 1
