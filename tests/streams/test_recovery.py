"""Crash and scale-out: the closed partitions equal those of an uninterrupted run."""
from __future__ import annotations

import signal
import time

import pytest

from streams import movielens
from streams import ubsp
from core.records import ClosedPartition, decode
from streams.replay import rating_event, replay, select
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, create_topics
from tests.kafka_io import read_topic

pytestmark = pytest.mark.kafka
USERS = 40


def reference(settings) -> dict:
    """What one uninterrupted pass of the close rules gives: {(user, seq): event ids}, plus
    each user's last open cache at the next seq (a quiet-user sweep may close it)."""
    rules = ubsp.CloseRules.from_settings(settings)
    ratings = select(movielens.load_ratings(movielens.dataset_dir(settings.home, "ml-100k"),
                                            "ml-100k"), users=USERS)
    states, out = {}, {}
    for rating in ratings:
        ev = rating_event("ml-100k", rating)
        state = states.setdefault(ev.user_id, ubsp.new_state())
        _, closed = ubsp.add_event(state, ev.user_id, ev.event_id, ev.item_id, ev.action,
                                   ev.ts, ev.value, rules)
        for part in closed:
            out[(part.user_id, part.seq)] = [e.event_id for e in part.events]
    open_caches = {(user, st["seq"]): [e.event_id for e in sorted(st["events"], key=lambda e: e.ts)]
                   for user, st in states.items() if st["events"]}
    return out, open_caches


def assert_same(got: dict, expected: tuple) -> None:
    closed, open_caches = expected
    assert {k: got.get(k) for k in closed} == closed
    extra = {k: v for k, v in got.items() if k not in closed}
    assert all(open_caches.get(k) == v for k, v in extra.items()), "only quiet caches may close"


def closed_partitions(settings, expect: set, timeout: float = 300) -> dict:
    """Distinct closed partitions once every (user_id, seq) in `expect` is there. Waiting for a
    count is not enough: a quiet-user sweep may close extra caches first. A crash may republish
    a partition; it must then be identical (idempotent on (user_id, seq))."""
    deadline = time.monotonic() + timeout
    while True:
        seen: dict = {}
        for record in read_topic(settings, PARTITIONS_CLOSED, idle=2.0, timeout=60):
            part = decode(ClosedPartition, record.value, key=record.key)
            ids = [e.event_id for e in part.events]
            assert seen.setdefault((part.user_id, part.seq), ids) == ids, "a different partition"
        if expect <= seen.keys() or time.monotonic() > deadline:
            return seen
        time.sleep(1)


def committed_offsets(settings) -> int:
    """Behaviour records the worker's group has committed (what a restart does not redo)."""
    from kafka import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(settings.app_id).get(settings.app_id, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items()
               if tp.topic == settings.topic(BEHAVIORS) and meta.offset > 0)


@pytest.fixture
def crash_settings(settings):
    settings = settings.replace(max_events=5, batch_size=100)
    create_topics(settings, log=lambda m: None)
    return settings


def test_kill_9_mid_replay_then_restart_gives_the_uninterrupted_result(crash_settings, start_worker):
    settings = crash_settings
    produced = replay(settings, "ml-100k", users=USERS, items=False, progress=False,
                      log=lambda m: None)
    expected = reference(settings)
    first = start_worker(settings)
    first.wait_metric("liber_events_in_total", produced.events // 3)
    first.stop(signal.SIGKILL)
    committed = committed_offsets(settings)
    assert committed < produced.events, "the kill came after the replay was fully processed"
    second = start_worker(settings)  # same state directory and consumer group
    assert_same(closed_partitions(settings, set(expected[0])), expected)
    second.wait_metric("liber_events_in_total", produced.events - committed,  # the rest redone
                       timeout=300)
    assert second.proc.poll() is None


def test_two_workers_one_killed_the_other_takes_over(crash_settings, start_worker, tmp_path):
    settings = crash_settings
    a = start_worker(settings.replace(state_dir=str(tmp_path / "a")))
    b = start_worker(settings.replace(state_dir=str(tmp_path / "b")))
    # Replay only once the group is settled with both members: otherwise `a` may finish every
    # event before `b` is given a partition, and there is nothing to take over.
    behaviors = settings.topic(BEHAVIORS)
    for worker in (a, b):
        worker.wait_metric("liber_assigned_partitions", 1, timeout=180, topic=behaviors)
    produced = replay(settings, "ml-100k", users=USERS, items=False, progress=False,
                      log=lambda m: None)
    expected = reference(settings)
    b.wait_metric("liber_events_in_total", 1)  # b owns partitions and has processed some
    a.wait_metric("liber_events_in_total", 1)
    done_by_b = b.metric("liber_events_in_total")
    b.stop(signal.SIGKILL)
    # a recovers b's partitions' state from the changelog and finishes them
    assert_same(closed_partitions(settings, set(expected[0])), expected)
    a.wait_metric("liber_events_in_total", produced.events - done_by_b)  # all b left undone
    assert a.proc.poll() is None and produced.events > 0
