"""produce -> stream worker -> partitions.closed / behaviors.dlq, through the real broker."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from core.dead_letter import ORIGINAL_SHA256, REASON, SOURCE_TOPIC
from core.kafka import key_partition
from streams.producer import BehaviorProducer
from core.records import BehaviorEvent, ClosedPartition, Item, decode
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics, dlq
from tests.kafka_io import read_topic

pytestmark = pytest.mark.kafka
T0 = 1_000_000_000.0


def event(eid: str, user: str, item: str, ts: float, **kw) -> BehaviorEvent:
    return BehaviorEvent(event_id=eid, user_id=user, item_id=item, action="rate", ts=ts,
                         value=4.0, **kw)


def good(user: str = "u9") -> dict:
    return {"schema": "behavior/1", "event_id": "bad", "user_id": user, "item_id": "i1",
            "action": "rate", "ts": T0, "value": 1.0}


def as_bytes(data: dict) -> bytes:
    return json.dumps(data).encode()


# (description, key, value, expected reason)
BAD_INPUT = [
    ("truncated json", b"u9", as_bytes(good())[:-7], "malformed_json"),
    ("invalid utf-8", b"u9", b'{"user_id": "\xff\xfe"}', "invalid_utf8"),
    ("wrong type", b"u9", as_bytes({**good(), "ts": "yesterday"}), "wrong_type"),
    ("missing user_id", b"u9", as_bytes({k: v for k, v in good().items() if k != "user_id"}),
     "missing_field"),
    ("unknown action", b"u9", as_bytes({**good(), "action": "teleport"}), "unknown_action"),
    ("negative ts", b"u9", as_bytes({**good(), "ts": -5}), "negative_timestamp"),
    ("far-future ts", b"u9", as_bytes({**good(), "ts": 4_102_444_800.0}), "future_timestamp"),
    ("oversize", b"u9", as_bytes({**good(), "attrs": {"x": "y" * 200}, "pad": "z" * 70_000}),
     "oversize"),
    ("no key", None, as_bytes(good()), "missing_key"),
    ("key mismatch", b"someone-else", as_bytes({**good(), "event_id": "km"}), "key_mismatch"),
    ("schema from the future", b"u9", as_bytes({**good(), "schema": "behavior/99"}),
     "schema_version"),
    ("NaN value", b"u9", as_bytes(good()).replace(b'"value": 1.0', b'"value": NaN'),
     "invalid_value"),
    ("not an object", b"u9", b"[1, 2, 3]", "wrong_type"),
    ("empty value", b"u9", b"", "empty_value"),
    ("control characters", b"u9", as_bytes({**good(), "item_id": "i\x00\x07"}), "invalid_value"),
]


def test_roundtrip_closes_partitions_and_dead_letters_bad_input(settings, start_worker):
    settings = settings.replace(max_events=3, max_gap_s=3600.0, min_gap_events=1)
    create_topics(settings, log=lambda m: None)
    worker = start_worker(settings)
    with BehaviorProducer(settings) as producer:
        producer.send_item(Item("i1", "Heat (1995)", {"genres": ["Action", "Crime"]}))
        producer.send_item(Item("i2", "Babe (1995)", {"genres": ["Children's", "Comedy"]}))
        producer.send_raw("items", b"i3", b"{not json")
    worker.wait_metric("liber_items_loaded_total", 2)

    good_events = [event(f"a{i}", "u1", "i1" if i % 2 else "i2", T0 + 60 * i) for i in range(7)]
    good_events += [event("b0", "u2", "i1", T0), event("b1", "u2", "i2", T0 + 60),
                    event("b2", "u2", "i1", T0 + 60 + 7200)]  # gap > max_gap closes [b0, b1]
    with BehaviorProducer(settings) as producer:
        for ev in good_events:
            producer.send(ev)
        producer.send(good_events[0])  # a producer retry: same event id again
        for _, key, value, _ in BAD_INPUT:
            producer.send_raw(BEHAVIORS, key, value)
    total = len(good_events) + 1 + len(BAD_INPUT)
    worker.wait_metric("liber_events_in_total", total)

    # u2's late events move event time on u1's stream partition past u1's gap: u1's last
    # cache [a6] is then closed as quiet (see streams/quiet_users.py).
    shared = len({key_partition(u, 2) for u in (b"u1", b"u2")}) == 1
    assert shared, "the test expects u1 and u2 on one partition of two"
    closed = [decode(ClosedPartition, r.value, key=r.key)
              for r in read_topic(settings, PARTITIONS_CLOSED, expect=4)]
    by_key = {(p.user_id, p.seq): p for p in closed}
    assert sorted(by_key) == [("u1", 0), ("u1", 1), ("u1", 2), ("u2", 0)]
    assert [e.event_id for e in by_key["u1", 2].events] == ["a6"]
    assert by_key["u1", 2].reason == "max_gap"
    assert [e.event_id for e in by_key["u1", 0].events] == ["a0", "a1", "a2"]
    assert [e.event_id for e in by_key["u1", 1].events] == ["a3", "a4", "a5"]
    assert by_key["u1", 0].reason == "max_events"
    assert [e.event_id for e in by_key["u2", 0].events] == ["b0", "b1"]
    assert by_key["u2", 0].reason == "max_gap"
    assert by_key["u1", 0].events[1].text == "Heat (1995) [Action|Crime]"

    dead = read_topic(settings, dlq(BEHAVIORS), expect=len(BAD_INPUT))
    assert len(dead) == len(BAD_INPUT)
    reasons = {}  # by the original's sha256: a dead letter keeps at most MAX_VALUE bytes
    for record in dead:
        headers = dict(record.headers)
        assert headers[SOURCE_TOPIC].decode() == settings.topic(BEHAVIORS)
        reasons[headers[ORIGINAL_SHA256].decode()] = headers[REASON].decode()
    assert len({value for _, _, value, _ in BAD_INPUT}) == len(BAD_INPUT)
    for description, _, value, reason in BAD_INPUT:
        assert reasons.get(hashlib.sha256(value).hexdigest()) == reason, description

    item_dead = read_topic(settings, dlq("items"), expect=1)
    assert [dict(r.headers)[REASON] for r in item_dead] == [b"malformed_json"]

    processed = worker.metric("liber_events_processed_total")
    dead_lettered = worker.metric("liber_dead_lettered_total", topic="behaviors")
    assert worker.metric("liber_events_in_total") == processed + dead_lettered == total
    assert worker.metric("liber_events_processed_total", outcome="duplicate") == 1
    assert worker.proc.poll() is None, "the worker must keep running after bad input"


def test_quiet_user_cache_closes_when_event_time_moves_on(settings, start_worker):
    """'quiet' and 'busy' share a stream partition; only 'busy' keeps sending events."""
    assert len({key_partition(u, 2) for u in (b"quiet", b"busy")}) == 1
    settings = settings.replace(max_events=50, max_gap_s=600.0, min_gap_events=1)
    create_topics(settings, log=lambda m: None)
    worker = start_worker(settings)
    with BehaviorProducer(settings) as producer:
        producer.send(event("q0", "quiet", "i1", T0))
        producer.send(event("q1", "quiet", "i2", T0 + 10))
        for i in range(30):  # 'busy' alone moves event time 30 minutes on
            producer.send(event(f"b{i}", "busy", "i1", T0 + 60 * i))
    worker.wait_metric("liber_events_in_total", 32)
    closed = [decode(ClosedPartition, r.value, key=r.key)
              for r in read_topic(settings, PARTITIONS_CLOSED, expect=1)]
    assert [(p.user_id, p.seq, p.reason, [e.event_id for e in p.events]) for p in closed] == [
        ("quiet", 0, "max_gap", ["q0", "q1"])]


def test_every_worker_of_a_group_joins_every_title(settings, start_worker, tmp_path):
    """The item-text table is global: with two workers, each consumes half of `items`, yet a
    user on either worker gets the titles of items loaded by the other one (as a partitioned
    table, each worker only knew its own half and wrote placeholders for the rest). A changed
    title reaches both workers too, though each keeps the titles it joined in memory."""
    def partition(key: str) -> int:
        return key_partition(key.encode(), settings.topic_partitions)

    items = [f"m{i}" for i in range(12)]
    users = ["alice", "bob", "carol", "dave", "erin", "frank"]
    assert {partition(i) for i in items} == {partition(u) for u in users} == {0, 1}
    settings = settings.replace(max_events=len(items), drift_threshold=0.0)
    create_topics(settings, log=lambda m: None)
    workers = [start_worker(settings.replace(state_dir=str(tmp_path / name))) for name in "ab"]
    for worker in workers:  # a settled group: each worker owns one partition of each topic
        worker.wait_metric("liber_assigned_partitions", 1, timeout=180,
                           topic=settings.topic(BEHAVIORS))
    with BehaviorProducer(settings) as producer:
        for item in items:
            producer.send_item(Item(item, f"Film {item} (1999)", {"genres": ["Drama"]}))
    def loaded(count: int) -> None:
        deadline = time.monotonic() + 60
        while sum(w.metric("liber_items_loaded_total") or 0 for w in workers) < count:
            assert time.monotonic() < deadline, "the items were not loaded"
            time.sleep(0.2)
        time.sleep(3)  # each worker follows the other's half of the table as a standby

    def round_of_events(first: int, expect: int, t0: float) -> list:
        with BehaviorProducer(settings) as producer:
            for u, user in enumerate(users):
                for i, item in enumerate(items):
                    producer.send(event(f"{user}-{first + i}", user, item, t0 + 60 * i + u))
        closed = [decode(ClosedPartition, r.value, key=r.key)
                  for r in read_topic(settings, PARTITIONS_CLOSED, expect=expect)]
        return [p for p in closed if p.events[0].event_id.endswith(f"-{first}")]

    loaded(len(items))
    closed = round_of_events(0, len(users), T0)
    assert sorted(p.user_id for p in closed) == sorted(users)
    for part in closed:
        assert [e.text for e in part.events] == [f"Film {i} (1999) [Drama]" for i in items]

    with BehaviorProducer(settings) as producer:  # new titles, while both hold the old ones
        for item in items:
            producer.send_item(Item(item, f"Film {item} (2000)", {"genres": ["Crime"]}))
    loaded(2 * len(items))
    closed = round_of_events(len(items), 2 * len(users), T0 + 3600)
    assert sorted(p.user_id for p in closed) == sorted(users)
    for part in closed:
        assert [e.text for e in part.events] == [f"Film {i} (2000) [Crime]" for i in items]


def write_changelog(settings, table: str, key: bytes, value: bytes) -> None:
    """A record in a table's changelog topic, as a worker recovers it at start."""
    from streams.backfill import _admin, changelog_topic, ensure_changelog, key_partition
    topic = changelog_topic(settings, table)
    admin = _admin(settings)
    try:
        ensure_changelog(settings, admin, topic, settings.topic_partitions)
    finally:
        admin.close()
    with BehaviorProducer(settings) as producer:
        producer._producer.send(topic, key=key, value=value,
                                partition=key_partition(key, settings.topic_partitions)).get(30)


def rewind_group(settings, logical: str) -> None:
    """Commit offset 0 for the (stopped) worker's group on a topic: the next start replays it."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=settings.app_id, enable_auto_commit=False)
    try:
        name = settings.topic(logical)
        consumer.commit({TopicPartition(name, p): OffsetAndMetadata(0, "", -1)
                         for p in consumer.partitions_for_topic(name)})
    finally:
        consumer.close()


def test_a_partition_that_cannot_be_encoded_rolls_back_and_a_replay_is_skipped(
        settings, start_worker):
    """An item text that cannot be read (invalid UTF-8 in the table) fails the encoding of the
    partition it closes: that event is dead-lettered as processing_error and the user's cache
    is left as it was. Rewound to the start, a worker skips what its state already has."""
    settings = settings.replace(max_events=2)
    create_topics(settings, log=lambda m: None)
    write_changelog(settings, "item-text", b"bad", b"\xff\xfe not utf-8")
    worker = start_worker(settings)
    with BehaviorProducer(settings) as producer:
        producer.send_item(Item("i1", "Heat (1995)", {"genres": ["Action"]}))
    worker.wait_metric("liber_items_loaded_total", 1)
    with BehaviorProducer(settings) as producer:
        producer.send(event("e0", "u1", "i1", T0))
        producer.send(event("e1", "u1", "bad", T0 + 60))
    worker.wait_metric("liber_dead_lettered_total", 1, reason="processing_error")
    with BehaviorProducer(settings) as producer:
        producer.send_item(Item("bad", "Babe (1995)", {"genres": ["Comedy"]}))
    worker.wait_metric("liber_items_loaded_total", 2)
    with BehaviorProducer(settings) as producer:
        producer.send(event("e2", "u1", "bad", T0 + 120))
    worker.wait_metric("liber_events_in_total", 3)

    closed = [decode(ClosedPartition, r.value, key=r.key)
              for r in read_topic(settings, PARTITIONS_CLOSED, expect=1)]
    assert [([e.event_id for e in p.events], [e.text for e in p.events]) for p in closed] == [
        (["e0", "e2"], ["Heat (1995) [Action]", "Babe (1995) [Comedy]"])]
    dead = read_topic(settings, dlq(BEHAVIORS), expect=1)
    assert [dict(r.headers)[REASON] for r in dead] == [b"processing_error"]
    assert b"UnicodeDecodeError" in dict(dead[0].headers)["liber.error.detail"]
    assert json.loads(dead[0].value)["event_id"] == "e1"
    assert worker.metric("liber_events_processed_total", outcome="accepted") == 2
    assert worker.stop() == 0

    rewind_group(settings, BEHAVIORS)
    again = start_worker(settings)  # same state directory, same group
    again.wait_metric("liber_events_processed_total", 3, outcome="replayed")
    assert again.metric("liber_events_processed_total", outcome="accepted") == 0
    assert again.metric("liber_dead_lettered_total") == 0
    assert len(read_topic(settings, PARTITIONS_CLOSED, expect=1)) == 1
    assert len(read_topic(settings, dlq(BEHAVIORS), expect=1)) == 1
    assert again.proc.poll() is None


def test_an_agent_that_crashes_stops_the_worker_non_zero(settings, start_worker):
    """A user state that is not a state (a corrupt changelog record) fails the quiet-user
    index outside every per-record guard: the worker must exit non-zero for its supervisor,
    not live on without its agent."""
    create_topics(settings, log=lambda m: None)
    write_changelog(settings, "ubsp-state", b"u1", b"5")
    worker = start_worker(settings.replace(log_level="INFO"))
    with BehaviorProducer(settings) as producer:
        producer.send(event("e0", "u2", "i1", T0))
    try:
        code = worker.proc.wait(120)
    except Exception:
        raise AssertionError(f"the worker lived on without its agent: {worker.tail()}") from None
    assert code != 0
    assert "agent ubsp crashed" in worker.tail(20000)
