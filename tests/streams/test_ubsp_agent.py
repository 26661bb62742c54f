"""The UBSP agent's per-batch logic driven with plain dicts and recording functions: no Faust,
no Kafka. States are written back between batches as the table stores them (JSON), so rows
come back as lists the way they do from RocksDB."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest

from core.kafka import key_partition
from core.records import BehaviorEvent, ClosedPartition, decode
from streams import ubsp
from streams.ubsp_agent import REPLAYED, UbspAgent

T0 = 1_000_000_000.0
# every cache closes by the gap rule here (min_gap_events=1; the floor: test_ubsp.py)
RULES = ubsp.CloseRules(max_events=5, max_gap_s=100.0, max_span_s=1000.0, max_lateness_s=50.0,
                        dedup_window=8, min_gap_events=1)


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class Event:  # what Faust's stream yields: the agent reads only `message`
    message: Message


def raw(eid: str, user: str, item: str, ts: float) -> bytes:
    return BehaviorEvent(event_id=eid, user_id=user, item_id=item, action="rate", ts=ts,
                         value=4.0).encode()


@dataclass
class Harness:
    rules: ubsp.CloseRules = RULES
    partitions: int = 2
    states: dict = field(default_factory=dict)  # the `ubsp-state` table: key -> stored JSON
    titles: dict = field(default_factory=lambda: {b"i1": b"Heat (1995) [Action|Crime]"})
    sent: list = field(default_factory=list)  # (key, ClosedPartition, event)
    dead: list = field(default_factory=list)  # (event, reason, detail)
    offsets: dict = field(default_factory=dict)

    def __post_init__(self):
        self.agent = UbspAgent(
            self.states, self.titles,
            send=lambda key, value, event: self.sent.append(
                (key, decode(ClosedPartition, value, key=key), event)),
            dead_letter=lambda event, reason, detail: self.dead.append((event, reason, detail)),
            rules=self.rules, clock=lambda: T0 + 3600, max_payload_bytes=64 * 1024,
            max_future_s=60.0, partitions=self.partitions)

    def event(self, eid: str, user: str, ts: float, item: str = "i1", *, partition: int = 0,
              value: bytes | None = None, key: bytes | None = None) -> Event:
        offset = self.offsets[partition] = self.offsets.get(partition, -1) + 1
        return Event(Message("behaviors", partition, offset,
                             user.encode() if key is None else key,
                             raw(eid, user, item, ts) if value is None else value))

    def run(self, *events: Event) -> dict:
        """One batch, then the touched states written as the table stores them."""
        touched = self.agent.process(list(events))
        for key, (state, _) in touched.items():
            self.states[key] = json.loads(json.dumps(state))
        return touched

    def closed(self) -> list[tuple[str, int, str, list[str]]]:
        return [(p.user_id, p.seq, p.reason, [e.event_id for e in p.events])
                for _, p, _ in self.sent]


def cache(state: dict) -> list[str]:
    """The event ids of a stored state's open cache (rows as stored: JSON lists)."""
    return [row.event_id for row in ubsp.as_rows(state["events"])]


def test_a_gap_closes_the_cache_before_the_event_with_item_texts_joined():
    h = Harness()
    h.run(h.event("a", "u1", T0), h.event("b", "u1", T0 + 50, item="i9"))
    assert h.sent == []
    h.run(h.event("c", "u1", T0 + 151))  # 101 s after b: more than max_gap_s
    assert h.closed() == [("u1", 0, "max_gap", ["a", "b"])]
    key, part, event = h.sent[0]
    assert key == b"u1" and event.message.offset == 2  # sent for the record that closed it
    assert [e.text for e in part.events] == ["Heat (1995) [Action|Crime]", "item i9"]
    assert (part.start_ts, part.end_ts) == (T0, T0 + 50)
    stored = h.states[b"u1"]
    assert cache(stored) == ["c"] and stored["seq"] == 1 and stored["offset"] == 2
    assert stored["events"] == [["c", "i1", "rate", T0 + 151, 4.0]]  # JSON rows, as before


def test_a_duplicate_event_id_is_counted_once():
    h = Harness()
    h.run(h.event("a", "u1", T0), h.event("b", "u1", T0 + 1))
    again = h.event("a", "u1", T0)  # a producer retry: same id, new offset
    touched = {}
    assert h.agent.apply_one(again, T0, touched) == ubsp.DUPLICATE
    assert touched == {}  # nothing to write for it
    h.run(h.event("a", "u1", T0 + 2))
    assert cache(h.states[b"u1"]) == ["a", "b"] and h.dead == [] and h.sent == []


def test_a_record_redelivered_after_a_crash_is_skipped_by_its_offset():
    h = Harness()
    first = h.event("a", "u1", T0)
    h.run(first)
    assert h.agent.apply_one(first, T0, {}) == REPLAYED
    assert cache(h.states[b"u1"]) == ["a"]


def test_a_late_event_is_dead_lettered_a_less_late_one_joins_in_time_order():
    h = Harness()
    h.run(h.event("a", "u1", T0 + 100), h.event("b", "u1", T0 + 200))
    late = h.event("late", "u1", T0 + 140)  # 60 s before the newest: over max_lateness_s
    h.run(late, h.event("c", "u1", T0 + 160))
    assert [(e, reason) for e, reason, _ in h.dead] == [(late, "late")]
    assert "max_lateness_s=50.0" in h.dead[0][2]
    h.run(h.event("d", "u1", T0 + 400))  # a gap: the cache closes, sorted by event time
    assert h.closed() == [("u1", 0, "max_gap", ["a", "c", "b"])]


@pytest.mark.parametrize("value, key, reason", [
    (b"{not json", b"u1", "malformed_json"),
    (raw("x", "u1", "i1", T0), b"someone-else", "key_mismatch"),
    (raw("x", "u1", "i1", T0 + 86_400), b"u1", "future_timestamp"),  # clock is T0 + 1 h
])
def test_an_invalid_record_is_dead_lettered_with_its_reason(value, key, reason):
    h = Harness()
    bad = h.event("x", "u1", T0, value=value, key=key)
    good = h.event("g", "u2", T0)
    touched = h.run(bad, good)
    assert [(e, r) for e, r, _ in h.dead] == [(bad, reason)]
    assert list(touched) == [b"u2"] and h.sent == []  # the batch goes on without it


def test_a_quiet_user_is_closed_once_event_time_moves_on_on_its_partition():
    h = Harness()
    h.run(h.event("q0", "quiet", T0), h.event("q1", "quiet", T0 + 10),
          h.event("b0", "busy", T0 + 20))
    assert h.sent == []
    touched = h.run(h.event("b1", "busy", T0 + 90), h.event("b2", "busy", T0 + 150))
    # 140 s after quiet's last event: swept, though quiet sent nothing in this batch
    assert h.closed() == [("quiet", 0, "max_gap", ["q0", "q1"])]
    assert h.sent[0][2].message.offset == 4  # for the batch's last record of the partition
    assert b"quiet" in touched and h.states[b"quiet"]["events"] == []
    assert h.states[b"quiet"]["seq"] == 1


def test_a_quiet_cache_below_the_gap_floor_waits_until_its_span_ends():
    h = Harness(rules=replace(RULES, min_gap_events=3))
    h.run(h.event("q0", "quiet", T0), h.event("q1", "quiet", T0 + 10))
    h.run(h.event("b0", "busy", T0 + 500))  # past quiet's gap: two events wait
    assert h.sent == []
    h.run(h.event("b1", "busy", T0 + 1001))  # past its span: closed
    assert ("quiet", 0, "max_span", ["q0", "q1"]) in h.closed()


def test_event_time_of_another_partition_sweeps_nobody():
    h = Harness()
    h.run(h.event("q0", "quiet", T0, partition=0))
    h.run(h.event("o0", "other", T0 + 500, partition=1))
    assert h.sent == []


def test_stored_open_caches_are_indexed_and_swept_after_a_rebalance():
    """A state recovered from the changelog (rows as JSON lists), of a user who never sends
    again, is closed once its partition's event time moves past the gap."""
    h = Harness()
    part = key_partition(b"gone", h.partitions)
    h.states[b"gone"] = {"seq": 3, "events": [["g0", "i1", "rate", T0, 4.0]], "recent": ["g0"],
                         "watermark": T0, "offset": 7}
    h.agent.reindex_if_moved(generation=1, settled=False)  # mid-rebalance: not yet
    assert h.agent.open_caches() == 0
    h.agent.reindex_if_moved(generation=1, settled=True)
    assert h.agent.open_caches() == 1
    h.run(h.event("n0", "new", T0 + 500, partition=part))
    assert h.closed() == [("gone", 3, "max_gap", ["g0"])]
    assert h.sent[0][1].events[0].text == "Heat (1995) [Action|Crime]"


def test_item_texts_keep_found_titles_until_a_changelog_record_replaces_them():
    from streams.item_texts import ItemTexts
    table = {b"i1": b"Heat (1995)"}
    texts = ItemTexts(table)
    assert (texts.text_of("i2"), texts.known_text("i2")) == ("item i2", None)
    table[b"i2"] = b"Babe (1995)"
    assert texts.text_of("i2") == "Babe (1995)"  # a miss is not kept
    assert texts.text_of("i1") == "Heat (1995)"
    table[b"i1"] = b"Heat (1995, director's cut)"
    assert texts.text_of("i1") == "Heat (1995)"  # kept in memory
    texts.forget_keys([b"i1"])
    assert texts.known_text("i1") == "Heat (1995, director's cut)"


def test_a_batch_reads_the_states_of_the_batch_still_being_written():
    """The worker processes a batch while the one before is made durable: the next batch reads
    the held states (not the older table rows), as copies, so the write in flight keeps its own
    batch's state; a newer held state stays when the older write ends."""
    h = Harness()
    first = h.agent.process([h.event("a", "u1", T0)])
    h.agent.hold(first)                       # on its way to the table; the table is empty
    second = h.agent.process([h.event("b", "u1", T0 + 10)])
    held = first[b"u1"][0]
    assert [e.event_id for e in held["events"]] == ["a"]          # untouched by batch two
    assert [e.event_id for e in second[b"u1"][0]["events"]] == ["a", "b"]
    h.agent.hold(second)
    h.agent.written(first)                    # the first write ends: the newer state stays
    assert h.agent.unwritten[b"u1"] is second[b"u1"][0]
    h.agent.written(second)
    assert h.agent.unwritten == {}


def test_a_closed_partition_has_the_bytes_of_its_record_encoded():
    """The agent builds the record's JSON from its rows: the same bytes as
    records.ClosedPartition.encode_within (a republished partition must be byte-identical)."""
    values = []
    h = Harness()
    h.agent._send = lambda key, value, event: values.append((key, value))
    h.run(h.event("a", "u1", T0), h.event("b", "u1", T0 + 50, item="i9"))
    h.run(h.event("c", "u1", T0 + 151))
    [(key, value)] = values
    record = decode(ClosedPartition, value, key=key)
    assert record.encode_within(64 * 1024) == value
