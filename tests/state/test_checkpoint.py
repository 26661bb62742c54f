"""The checkpoint protocol (state/checkpoint.py) with a fake producer and consumer: each step,
the follow-ups of a refused send, and the order of durability and commits."""
from __future__ import annotations

import logging

from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from kafka.structs import TopicPartition

from core import dead_letter
from state.checkpoint import SEND_TRIES, Checkpoint, Offsets, Outbox, follow_up

IN = TopicPartition("p.in", 0)
OTHER = TopicPartition("p.in", 1)
log = logging.getLogger("test.checkpoint")


class Future:
    """A kafka-python send future: unresolved until the producer flushes."""

    def __init__(self, producer, topic: str, error: Exception | None):
        self.producer, self.topic, self.error = producer, topic, error

    def failed(self) -> bool:
        return self.producer.flushed and self.error is not None

    def get(self, timeout=None):
        assert self.producer.flushed, "a future read before the flush would block"
        self.producer.events.append(("durable", self.topic))
        if self.error is not None:
            raise self.error
        return Meta(0, len(self.producer.sent))


class Meta:
    def __init__(self, partition: int, offset: int):
        self.partition, self.offset = partition, offset


class Producer:
    """Refuses the sends `refuse(topic, key, value)` returns an error for."""

    def __init__(self, events: list, refuse=lambda topic, key, value: None):
        self.events, self.refuse = events, refuse
        self.sent: list[tuple] = []
        self.flushed = False

    def send(self, topic, key=None, value=None, headers=None):
        self.flushed = False
        self.sent.append((topic, key, value, dict(headers or ())))
        self.events.append(("send", topic))
        return Future(self, topic, self.refuse(topic, key, value))

    def flush(self, timeout=None):
        self.flushed = True
        self.events.append(("flush",))


class Consumer:
    def __init__(self, events: list, assigned=(IN,)):
        self.events, self.assigned = events, set(assigned)
        self.commits: list[dict] = []

    def assignment(self):
        return set(self.assigned)

    def commit(self, offsets):
        self.commits.append({tp: m.offset for tp, m in offsets.items()})
        self.events.append(("commit",))

    def commit_async(self, offsets, callback=None):
        self.commit(offsets)


class Failures:
    def __init__(self):
        self.counts: dict[tuple, int] = {}

    def labels(self, topic, outcome):
        outer = self

        class Child:
            def inc(self):
                outer.counts[(topic, outcome)] = outer.counts.get((topic, outcome), 0) + 1
        return Child()


def outbox(events, refuse=lambda topic, key, value: None):
    failures = Failures()
    return Outbox(Producer(events, refuse), "p.in.dlq", failures, logger=log, prefix="p."), failures


def test_step_3_follows_a_refused_output_up_to_a_bounded_dead_letter():
    """Retriable -> sent again (SEND_TRIES in all); still refused -> a dead letter of the input
    with its coordinates; dead letter refused -> again without bytes; then counted lost."""
    events: list = []
    box, failures = outbox(events, lambda topic, key, value:
                           KafkaTimeoutError() if topic == "p.out" else None)
    box.send("p.out", b"u1", b"vector", source=(IN, 7, b"u1", b"input"))
    done = box.settle()

    assert [s[0] for s in box.producer.sent] == ["p.out"] * SEND_TRIES + ["p.in.dlq"]
    letter, _ = done[0]
    assert (letter.topic, letter.key, letter.value) == ("p.in.dlq", b"u1", b"input")
    headers = box.producer.sent[-1][3]
    assert headers[dead_letter.REASON] == b"send_failed"
    assert (headers[dead_letter.SOURCE_TOPIC], headers[dead_letter.SOURCE_PARTITION],
            headers[dead_letter.SOURCE_OFFSET]) == (b"p.in", b"0", b"7")
    assert failures.counts == {("out", "retried"): SEND_TRIES - 1, ("out", "dead_lettered"): 1}
    assert not box  # nothing pending: the offsets behind it may be committed

    # a dead letter refused for its size goes again with neither key nor value; then lost
    events.clear()
    box, failures = outbox(events, lambda topic, key, value:
                           MessageSizeTooLargeError() if value else None)
    box.dead_letter(IN, 8, b"k" * 10, b"x" * 100, "invalid_record", "bad json")
    done = box.settle()
    assert [(s.key, s.value) for s, _ in done] == [(None, b"")]
    assert box.producer.sent[-1][3][dead_letter.REASON] == b"invalid_record"
    assert failures.counts == {("in.dlq", "resent_without_value"): 1}

    box, failures = outbox([], lambda topic, key, value: MessageSizeTooLargeError())
    box.send("p.out", b"u1", b"v", source=(IN, 9, b"u1", b"input"))
    assert box.settle() == []  # never raises: the worker goes on
    assert failures.counts == {("out", "dead_lettered"): 1, ("in.dlq", "resent_without_value"): 1,
                               ("in.dlq", "lost"): 1}


def test_follow_up_decides_without_io():
    box, _ = outbox([])
    out = box.send("p.out", b"k", b"v", source=(IN, 1, b"k", b"raw"))
    outcome, nxt = follow_up(out, MessageSizeTooLargeError(), "p.in.dlq", name="out")
    assert outcome == "dead_lettered" and nxt.topic == "p.in.dlq" and nxt.future is None
    assert nxt.letter[0] == "send_failed" and nxt.letter[1].startswith("out: ")
    assert follow_up(nxt.__class__("p.out", b"k", b"v", []), MessageSizeTooLargeError(),
                     "p.in.dlq") == ("lost", None)  # no input to dead-letter


def test_offsets_are_committed_only_after_the_sends_are_durable():
    events: list = []
    box, _ = outbox(events)
    checkpoint = Checkpoint(Consumer(events), box)
    checkpoint.offsets.received(IN, 0)
    box.send("p.out", b"u", b"v", source=(IN, 0, b"u", b"raw"))
    checkpoint.offsets.done(IN, 0)

    checkpoint.commit(checkpoint.committable())  # step 4 asked for before step 3
    assert events == [("send", "p.out"), ("flush",), ("durable", "p.out"), ("commit",)]
    assert checkpoint.consumer.commits == [{IN: 1}]


def test_committable_stops_below_the_oldest_unfinished_record():
    events: list = []
    box, _ = outbox(events)
    checkpoint = Checkpoint(Consumer(events, assigned=[IN]), box, Offsets())
    for offset in (5, 6, 7):
        checkpoint.offsets.received(IN, offset)
    checkpoint.offsets.received(OTHER, 3)
    checkpoint.offsets.done(IN, 5)
    checkpoint.offsets.done(IN, 7)
    checkpoint.offsets.done(OTHER, 3)
    assigned = checkpoint.consumer.assignment()
    assert checkpoint.committable(assigned=assigned) == {IN: 6}  # 6 is unfinished; OTHER is gone
    checkpoint.commit(checkpoint.committable(assigned=assigned))
    assert checkpoint.committable(assigned=assigned) == {}  # nothing moved since
    checkpoint.offsets.done(IN, 6)
    assert checkpoint.committable(assigned=assigned) == {IN: 8}


def test_a_revocation_does_not_commit_past_a_failed_send():
    events: list = []
    box, _ = outbox(events, lambda topic, key, value: MessageSizeTooLargeError())
    checkpoint = Checkpoint(Consumer(events), box)
    checkpoint.offsets.received(IN, 0)
    box.send("p.out", b"u", b"v", source=(IN, 0, b"u", b"raw"))
    checkpoint.offsets.done(IN, 0)
    checkpoint.revoke({IN})
    assert checkpoint.consumer.commits == []  # the next owner redoes the record
    assert not checkpoint.offsets.tracks(IN)

    events.clear()
    box, _ = outbox(events)
    checkpoint = Checkpoint(Consumer(events), box)
    checkpoint.offsets.received(IN, 0)
    box.send("p.out", b"u", b"v", source=(IN, 0, b"u", b"raw"))
    checkpoint.offsets.done(IN, 0)
    checkpoint.revoke({IN})
    assert events[:2] == [("send", "p.out"), ("flush",)] and events[-1] == ("commit",)
    assert checkpoint.consumer.commits == [{IN: 1}]
