"""`liber backfill`: Parquet histories into UBSP state and partitions.closed, then streaming."""
from __future__ import annotations

import json
import math
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streams import backfill, drift, movielens
from streams import ubsp
from core.dead_letter import REASON
from streams.producer import BehaviorProducer
from core.records import ClosedPartition, PartitionEvent, decode
from streams.replay import movie_item, rating_event, select
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics, dlq
from tests.conftest import base_settings
from tests.kafka_io import read_topic

USERS = 8


# --- pure parts -----------------------------------------------------------------------------------
def test_partition_value_is_exactly_the_record_encoding():
    part = ubsp.Closed("u1", 3, [["e1", "i1", "rate", 10.0, 4.0],
                                        ["e2", "i2", "click", 11.5, None]], "max_events")
    texts = {"i1": "Amélie (2001) [Comedy|Romance]"}
    text_of = lambda i: texts.get(i, f"item {i}")  # noqa: E731
    record = ClosedPartition("u1", 3, tuple(PartitionEvent(*e, text_of(e.item_id)) for e in part.events),
                             10.0, 11.5, "max_events")
    assert backfill.partition_value(part, text_of) == record.encode()
    assert decode(ClosedPartition, record.encode(), key=b"u1") == record


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=backfill.SCHEMA)


def row(eid, user="u1", item="i1", ts=100.0, action="rate", value=1.0) -> dict:
    return {"event_id": eid, "user_id": user, "item_id": item, "action": action, "ts": ts,
            "value": value}


def test_invalid_rows_get_the_workers_reasons(tmp_path):
    rows = [row("ok"), row(None), row("a", user=""), row("b", action="teleport"),
            row("c", ts=-1.0), row("d", ts=4_102_444_800.0), row("e", value=math.nan),
            row("f", item="x" * 300), row("g", user="u\x07"), row("h", ts=math.inf),
            row("i", value=None)]
    reasons = backfill.reject_reasons(table(rows), now=1_700_000_000.0, max_future_s=86400).to_pylist()
    assert reasons == [None, "missing_field", "invalid_value", "unknown_action",
                       "negative_timestamp", "future_timestamp", "invalid_value", "oversize",
                       "invalid_value", "invalid_value", None]


def test_read_events_casts_integer_columns(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"event_id": ["e1"], "user_id": [7], "item_id": [42], "action": ["rate"],
                             "ts": [100], "value": [3], "extra": ["ignored"]}), path)
    got = backfill.read_events(path)
    assert got.schema.names == backfill.SCHEMA.names
    assert got.to_pylist() == [row("e1", user="7", item="42", ts=100.0, value=3.0)]
    pq.write_table(pa.table({"event_id": ["e1"]}), path)
    with pytest.raises(backfill.BackfillRefused, match="columns"):
        backfill.read_events(path)


def test_histories_are_sorted_per_user_and_duplicates_counted_once():
    rules = ubsp.CloseRules(max_events=3, max_gap_s=50.0, max_span_s=1e9)
    rows = [row("b", ts=20), row("x1", user="u2", ts=5), row("a", ts=10), row("c", ts=20),
            row("a", ts=10), row("d", ts=200), row("x2", user="u2", ts=6),
            row("c", ts=999)]  # same id later: the file is one history, still a duplicate
    closed, result = [], backfill.BackfillResult()
    states = backfill.partition_histories(table(rows), rules, None, closed.append, result)
    # u1 by ts, ties in file order: a(10) b(20) c(20) -> max_events; d(200) stays open
    assert [(p.user_id, p.seq, [e.event_id for e in p.events], p.reason) for p in closed] == [
        ("u1", 0, ["a", "b", "c"], "max_events")]
    assert result.accepted == 6 and result.duplicates == 2 and result.partitions == 1
    assert states["u1"]["backfill_until"] == 200.0
    assert [e.event_id for e in states["u1"]["events"]] == ["d"]
    assert states["u2"]["backfill_until"] == 6.0 and states["u2"]["seq"] == 0
    assert states["u1"]["recent"] == ["a", "b", "c", "d"]


def test_changelog_topic_is_the_worker_tables_changelog():
    from streams.app import create_app
    settings = base_settings(app_id="bf-name-check")
    table = create_app(settings).liber_tables["user_state"]
    assert table.name == backfill.STATE_TABLE and table.use_partitioner
    assert table.changelog_topic.get_topic_name() == backfill.changelog_topic(settings) \
        == "bf-name-check-ubsp-state-changelog"


# key_partition (now core.kafka's, still importable from streams.backfill): tests/core/test_kafka.py


def test_write_parquet_from_movielens(tmp_path):
    home = base_settings().home
    ratings = select(movielens.load_ratings(movielens.dataset_dir(home, "ml-100k"), "ml-100k"),
                     users=3)
    cut = ratings[len(ratings) // 2].ts
    path = tmp_path / "h.parquet"
    n = backfill.write_parquet("ml-100k", path, cut, home=home, users=3)
    got = backfill.read_events(path)
    assert n == got.num_rows == sum(r.ts <= cut for r in ratings)
    first = rating_event("ml-100k", ratings[0])
    assert got.to_pylist()[0] == row(first.event_id, first.user_id, first.item_id, first.ts,
                                      "rate", first.value)


# --- on the real broker ---------------------------------------------------------------------------------
def history(settings):
    return select(movielens.load_ratings(movielens.dataset_dir(settings.home, "ml-100k"),
                                         "ml-100k"), users=USERS)


def pure_run(settings, ratings) -> tuple[dict, dict]:
    """The partitioner alone over the whole history: closed {(user, seq): ids}, open caches."""
    rules = ubsp.CloseRules.from_settings(settings)
    states, closed = {}, {}
    for rating in ratings:
        ev = rating_event("ml-100k", rating)
        state = states.setdefault(ev.user_id, ubsp.new_state())
        for part in ubsp.add_event(state, ev.user_id, ev.event_id, ev.item_id, ev.action,
                                   ev.ts, ev.value, rules)[1]:
            closed[(part.user_id, part.seq)] = [e.event_id for e in part.events]
    open_caches = {(u, s["seq"]): [e.event_id for e in s["events"]]
                   for u, s in states.items() if s["events"]}
    return closed, open_caches


def closed_on_topic(settings, at_least: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = {}
        for record in read_topic(settings, PARTITIONS_CLOSED, idle=1.5, timeout=60):
            part = decode(ClosedPartition, record.value, key=record.key)
            ids = [e.event_id for e in part.events]
            assert seen.setdefault((part.user_id, part.seq), ids) == ids, "two different partitions"
            seen[("text", part.user_id, part.seq)] = [e.text for e in part.events]
        n = sum(1 for k in seen if k[0] != "text")
        if n >= at_least or time.monotonic() > deadline:
            return {k: v for k, v in seen.items() if k[0] != "text"}, \
                   {k[1:]: v for k, v in seen.items() if k[0] == "text"}
        time.sleep(1)


def assert_same_partitions(got: dict, expected: dict, open_caches: dict) -> None:
    """Equal to the pure run; a time sweep may also have closed a final open cache, no more."""
    missing = {k: v for k, v in expected.items() if got.get(k) != v}
    extra = {k: v for k, v in got.items() if k not in expected and open_caches.get(k) != v}
    assert not missing and not extra, (missing, extra)


@pytest.fixture
def bf(settings, tmp_path):
    """Topics, the ML-100K catalogue in `items`, and a backfill file of the first part of the
    first USERS users' histories (cut at the median timestamp)."""
    settings = settings.replace(max_events=8, drift_threshold=0.0)
    create_topics(settings, log=lambda m: None)
    data_dir = movielens.dataset_dir(settings.home, "ml-100k")
    with BehaviorProducer(settings) as producer:
        for movie in movielens.load_items(data_dir, "ml-100k"):
            producer.send_item(movie_item(movie))
    ratings = history(settings)
    cut = sorted(r.ts for r in ratings)[len(ratings) // 2]
    path = tmp_path / "history.parquet"
    backfill.write_parquet("ml-100k", path, cut, home=settings.home, users=USERS)
    return settings, ratings, cut, path


@pytest.mark.kafka
def test_backfill_then_stream_equals_one_pass_over_the_whole_history(bf, start_worker):
    settings, ratings, cut, path = bf
    result = backfill.run(settings, path, log_fn=lambda m: None)
    before = [r for r in ratings if r.ts <= cut]
    after = [r for r in ratings if r.ts > cut]
    assert result.accepted == len(before) and result.users == USERS and not result.rejected
    assert result.items_with_text == 1682 and result.states_written == USERS

    # Each user's state sits in the table's changelog, with the backfill watermark.
    changelog = read_topic(settings.replace(topic_prefix=""), backfill.changelog_topic(settings),
                           expect=USERS)
    states = {r.key.decode(): (r.partition, json.loads(r.value)) for r in changelog}
    assert len(changelog) == len(states) == USERS
    for user, (_, state) in states.items():
        assert state["backfill_until"] == max(r.ts for r in before if r.user_id == user)
        assert set(state) >= {"seq", "events", "recent", "watermark"}

    expected, open_caches = pure_run(settings, ratings)
    with BehaviorProducer(settings) as producer:
        sent = [(r.user_id, producer.send(rating_event("ml-100k", r))) for r in after]
    # ... in the partition the same user key has in `behaviors` (murmur2), as Faust expects.
    for user, future in sent:
        assert states[user][0] == future.get(timeout=30).partition
    worker = start_worker(settings)
    worker.wait_metric("liber_events_processed_total", len(after), timeout=120, outcome="accepted")

    got, texts = closed_on_topic(settings, len(expected))
    assert_same_partitions(got, expected, open_caches)
    assert 0 < result.partitions < len(expected)  # both sides closed some
    # The backfill joined the item text from `items` (what the worker joins depends on whether
    # its items agent got there first: the catalogue text or `item <id>`).
    data_dir = movielens.dataset_dir(settings.home, "ml-100k")
    catalogue = {m.item_id: movie_item(m).text() for m in movielens.load_items(data_dir, "ml-100k")}
    item_of = {rating_event("ml-100k", r).event_id: r.item_id for r in ratings}
    backfilled = {(user, seq) for user, (_, state) in states.items() for seq in range(state["seq"])}
    assert len(backfilled) == result.partitions
    for key, ids in got.items():
        if key in backfilled:
            assert texts[key] == [catalogue[item_of[i]] for i in ids]
        else:
            assert all(t in (catalogue[item_of[i]], f"item {item_of[i]}")
                       for t, i in zip(texts[key], ids))

    # A running worker (live member) and, after it, its committed offsets block a new backfill.
    with pytest.raises(backfill.BackfillRefused, match="live member|committed offsets"):
        backfill.run(settings, path, log_fn=lambda m: None)
    worker.stop()
    with pytest.raises(backfill.BackfillRefused, match="committed offsets"):
        backfill.run(settings, path, log_fn=lambda m: None)


@pytest.mark.kafka
def test_replaying_the_backfilled_history_counts_duplicates(bf, start_worker):
    settings, ratings, cut, path = bf
    backfill.run(settings, path, log_fn=lambda m: None)
    expected, open_caches = pure_run(settings, ratings)
    with BehaviorProducer(settings) as producer:  # the whole history again, from the start
        for rating in ratings:
            producer.send(rating_event("ml-100k", rating))
    worker = start_worker(settings)
    worker.wait_metric("liber_events_processed_total", len(ratings), timeout=120)
    before = sum(r.ts <= cut for r in ratings)
    assert worker.metric("liber_events_processed_total", outcome="duplicate") == before
    assert worker.metric("liber_dead_lettered_total", topic="behaviors") == 0
    got, _ = closed_on_topic(settings, len(expected))
    assert_same_partitions(got, expected, open_caches)


@pytest.mark.kafka
def test_bad_rows_are_dead_lettered_not_dropped(settings, tmp_path):
    settings = settings.replace(drift_threshold=0.0)
    create_topics(settings, log=lambda m: None)
    path = tmp_path / "bad.parquet"
    pq.write_table(table([row("ok", ts=1000.0), row("bad", action="teleport"), row("neg", ts=-5.0)]),
                   path)
    result = backfill.run(settings, path, items=False, log_fn=lambda m: None)
    assert result.accepted == 1 and result.rejected == {"unknown_action": 1, "negative_timestamp": 1}
    dead = read_topic(settings, dlq(BEHAVIORS), expect=2)
    got = {json.loads(r.value)["event_id"]: dict(r.headers)[REASON].decode() for r in dead}
    assert got == {"bad": "unknown_action", "neg": "negative_timestamp"}


@pytest.mark.kafka
def test_backfill_with_drift_then_stream(bf, start_worker):
    """Drift on: the backfill's vectors reach the worker through the item-vectors changelog, so
    both sides decide on the same bytes; the union equals one pass with the same vectors."""
    settings, ratings, cut, path = bf
    settings = settings.replace(drift_threshold=base_settings().drift_threshold)
    result = backfill.run(settings, path, log_fn=lambda m: None)
    assert result.drift and result.vectors_encoded > 0
    after = [r for r in ratings if r.ts > cut]
    # The catalogue first: an item whose text the worker does not know yet has no vector, so
    # it neither weighs on nor triggers the rule (a different, equally valid, decision).
    worker = start_worker(settings)
    worker.wait_metric("liber_items_loaded_total", 1682, timeout=300)
    with BehaviorProducer(settings) as producer:
        for rating in after:
            producer.send(rating_event("ml-100k", rating))
    worker.wait_metric("liber_events_processed_total", len(after), timeout=300, outcome="accepted")
    # Every vector either side used is now in the changelog: replay one pass with them.
    items = {r.item_id for r in ratings}
    vectors_topic = backfill.changelog_topic(settings, drift.ITEM_VECTORS_TABLE)
    deadline = time.monotonic() + 120
    while True:
        store = backfill.read_compacted(settings, vectors_topic)
        if items <= {k.decode() for k in store} or time.monotonic() > deadline:
            break
        time.sleep(2)
    vectors = drift.ItemVectors(store, encoder=RefuseToEncode())
    rule = drift.DriftRule.from_settings(settings, vectors)
    rules = ubsp.CloseRules.from_settings(settings)
    states, expected = {}, {}
    for rating in ratings:
        ev = rating_event("ml-100k", rating)
        state = states.setdefault(ev.user_id, ubsp.new_state())
        for part in ubsp.add_event(state, ev.user_id, ev.event_id, ev.item_id, ev.action,
                                   ev.ts, ev.value, rules, drift=rule)[1]:
            expected[(part.user_id, part.seq)] = ([e.event_id for e in part.events], part.reason)
    reasons = {reason for _, reason in expected.values()}
    assert "drift" in reasons, reasons
    open_caches = {(u, s["seq"]): [e.event_id for e in s["events"]]
                   for u, s in states.items() if s["events"]}
    got, _ = closed_on_topic(settings, len(expected))
    assert_same_partitions(got, {k: ids for k, (ids, _) in expected.items()}, open_caches)


class RefuseToEncode:
    def encode(self, texts, batch_size=64):
        raise AssertionError(f"vector missing from the changelog for {texts}")
