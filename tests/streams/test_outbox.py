"""streams/outbox.py: what the stream worker writes in place of a record Kafka refuses, without
Faust or a broker (topics that refuse what they are told to)."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from prometheus_client import REGISTRY

from core import dead_letter
from ops import metrics  # noqa: F401  (registers liber_send_failed_total)
from streams.outbox import SEND_ERROR, Outbox, Outgoing, TooLargeForProducer


class Topic:
    """A faust Topic's `send_soon`, refusing the first `refuse` writes with `error`."""

    def __init__(self, name: str, refuse: int = 0, error: Exception | None = None):
        self.name, self.refuse, self.error, self.written = name, refuse, error, []

    def get_topic_name(self) -> str:
        return self.name

    def send_soon(self, key, value, headers):
        future = asyncio.get_event_loop().create_future()
        if self.refuse:
            self.refuse -= 1
            future.set_exception(self.error)
        else:
            self.written.append((key, value, dict(headers)))
            future.set_result(None)
        return future


def outgoing(out: Topic, dlq: Topic, letter=None) -> Outgoing:
    original = b"x" * (dead_letter.MAX_VALUE + 10)
    return Outgoing(None, out, b"u1", b"the output", [], ("t.behaviors", 1, 42), dlq, original,
                    letter)


def crashes() -> list:
    seen = []

    async def crash(exc):
        seen.append(exc)
    return seen, crash


def failed(fallback: str) -> float:
    return REGISTRY.get_sample_value("liber_send_failed_total",
                                     {"topic": "t.out", "fallback": fallback}) or 0.0


def run(coro):
    return asyncio.run(coro)


def test_a_batch_refusal_is_written_again_on_its_own():
    out, dlq = Topic("t.out"), Topic("d")  # the batch it was sent in was refused
    seen, crash = crashes()
    box = Outbox("behaviors", dlq, crash, max_request=10**6)
    run(box.write_anyway(outgoing(out, dlq), MessageSizeTooLargeError("whole batch")))
    assert out.written == [(b"u1", b"the output", {})] and dlq.written == [] and not seen


def test_a_refused_output_becomes_a_cut_dead_letter_then_a_headers_only_one():
    error = MessageSizeTooLargeError("too large for the topic")
    out, dlq = Topic("t.out", refuse=5, error=error), Topic("d", refuse=2, error=error)
    seen, crash = crashes()
    box = Outbox("behaviors", dlq, crash, max_request=10**6)
    cut, headers = failed("cut"), failed("headers")
    run(box.write_anyway(outgoing(out, dlq), error))
    assert out.written == [] and not seen
    [(key, value, hdrs)] = dlq.written
    assert key is None and value == b""                       # headers only: no key, no value
    assert hdrs[dead_letter.REASON] == b"send_failed"
    assert hdrs[dead_letter.SOURCE_OFFSET] == b"42" and SEND_ERROR in hdrs
    assert int(hdrs[dead_letter.ORIGINAL_LENGTH]) == dead_letter.MAX_VALUE + 10
    assert (failed("cut"), failed("headers")) == (cut, headers + 1)


def test_a_cut_dead_letter_written_on_its_retry_is_counted_as_cut():
    error = KafkaTimeoutError("slow broker")
    out, dlq = Topic("t.out", refuse=5, error=error), Topic("d", refuse=1, error=error)
    seen, crash = crashes()
    box = Outbox("behaviors", dlq, crash, max_request=10**6)
    cut = failed("cut")
    run(box.write_anyway(outgoing(out, dlq), error))
    [(key, value, hdrs)] = dlq.written
    assert key == b"u1" and len(value) == dead_letter.MAX_VALUE   # the bytes, bounded
    assert failed("cut") == cut + 1 and not seen


def test_too_large_for_our_producer_goes_straight_to_the_dead_letter():
    out, dlq = Topic("t.out"), Topic("d")
    seen, crash = crashes()
    box = Outbox("behaviors", dlq, crash, max_request=10**6)
    run(box.write_anyway(outgoing(out, dlq), TooLargeForProducer("2 MB")))
    assert out.written == [] and len(dlq.written) == 1 and not seen


def test_when_kafka_takes_nothing_the_worker_stops():
    error = MessageSizeTooLargeError("refused")
    out, dlq = Topic("t.out", refuse=9, error=error), Topic("d", refuse=9, error=error)
    seen, crash = crashes()
    box = Outbox("behaviors", dlq, crash, max_request=10**6)
    with pytest.raises(MessageSizeTooLargeError):
        run(box.write_anyway(outgoing(out, dlq), error))
    assert seen and out.written == [] and dlq.written == []
