"""What one agent of the stream worker has sent and Kafka may not have acknowledged yet, and
waiting until it has: outputs and dead letters (`Outgoing`, each with what it takes to write it
again or set it aside) and the changelog records of the tables the agent writes (futures that
streams.faust_compat.TrackedSends appends to the same list).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka import TopicPartition

from core import dead_letter, logs
from core.topics import PARTITIONS_CLOSED
from ops import metrics
from state.checkpoint import SEND_FAILED, Send, follow_up

log = logging.getLogger("liber.stream")
SEND_ERROR = "liber.send.error"  # header: why the record in this dead letter's place failed
# follow_up's outcomes as liber_send_failed_total's `fallback` label names them
FALLBACKS = {"dead_lettered": "cut", "resent_without_value": "headers"}
# Faust's default; raised when max_payload_bytes asks more, since a closed partition may be
# as large as max_payload_bytes (records.ClosedPartition.encode_within).
PRODUCER_MAX_REQUEST = 1_000_000


def producer_max_request(settings) -> int:
    """What our producer accepts: a closed partition of max_payload_bytes plus key and headers."""
    return max(PRODUCER_MAX_REQUEST, settings.max_payload_bytes + 64 * 1024)


def record_size(key: bytes | None, value: bytes | None, headers) -> int:
    """The size aiokafka checks against max_request_size (it raises, synchronously, above it)."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or [])


class TooLargeForProducer(MessageSizeTooLargeError):
    """Refused before sending: larger than our producer's max_request_size."""


@dataclass
class Outgoing:
    """An output or dead letter sent for one input record, with what it takes to write it
    again or set it aside (see Outbox.make_durable)."""
    future: asyncio.Future
    topic: object  # a faust Topic
    key: bytes | None
    value: bytes | None
    headers: list
    source: tuple[str, int, int]  # the input record's topic, partition and offset
    fallback: object  # the faust Topic where a dead letter takes its place
    original: bytes | None  # the bytes a fallback dead letter describes
    letter: tuple[str, str] | None = None  # (reason, detail) when this is a dead letter


class Outbox:
    """The records one agent sent. `pending` is shared with the tables the agent writes.

    Args:
        name: the agent's input topic (logical name), the `topic` label of its dead letters.
        dlq: the faust Topic its input records are dead-lettered to.
        crash: `app.crash`, awaited before the worker stops on a record Kafka takes no
            trace of.
        max_request: our producer's max_request_size.
    """

    def __init__(self, name: str, dlq, crash: Callable[[BaseException], Awaitable[None]],
                 max_request: int):
        self.name, self.dlq, self._crash, self.max_request = name, dlq, crash, max_request
        self.pending: list = []

    def send(self, topic, key, value, headers, event, fallback, original,
             letter=None) -> None:
        """Queue a record; one our producer would refuse is not handed to Faust's producer
        buffer (aiokafka raises there, which would stop the buffer): it fails at once and
        make_durable sets it aside."""
        if key is None and value is None:
            value = b""  # aiokafka needs one of them (a dead letter of a bare tombstone)
        size = record_size(key, value, headers)
        if size > self.max_request:
            future = asyncio.get_event_loop().create_future()
            future.set_exception(TooLargeForProducer(
                f"{size} bytes > the producer's max_request_size={self.max_request}"))
        else:
            future = topic.send_soon(key=key, value=value, headers=headers)
        msg = event.message
        self.pending.append(Outgoing(future, topic, key, value, headers or [],
                                     (msg.topic, msg.partition, msg.offset), fallback, original,
                                     letter))

    def dead_letter(self, event, reason: str, detail: str) -> None:
        """Dead-letter an input record of this agent with its reason."""
        msg = event.message
        metrics.DEAD_LETTERED.labels(topic=self.name, reason=reason).inc()
        logs.dead_letter(log, source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                         reason=reason, detail=detail)
        value, headers = dead_letter.letter(msg.value, reason, detail, topic=msg.topic,
                                            partition=msg.partition, offset=msg.offset)
        self.send(self.dlq, msg.key, value, headers, event, self.dlq, msg.value,
                  (reason, detail))

    async def make_durable(self) -> None:
        """Wait until Kafka has acknowledged every record sent so far. Each send's own future
        is awaited: Faust's flush gives up after 0.1 s, and its buffer looks empty while the
        last record taken from it is still on its way into the Kafka client. An output or dead
        letter that fails goes to `write_anyway`: one record Kafka refuses must not stop the
        worker at every start. A failed changelog record stops the worker (offsets past it
        are never committed; a restart redoes the batch)."""
        pending = self.pending
        taken = pending[:]
        for entry in taken:
            future = entry.future if isinstance(entry, Outgoing) else entry
            if not future.done():
                # Waited one by one, not gathered: when a record's ack comes, those sent with
                # it in the same request are done too, so this costs one wake-up per request
                # where a gather ran a callback per record.
                await asyncio.wait((future,))
            result = asyncio.CancelledError() if future.cancelled() else future.exception()
            if result is None:
                continue
            if isinstance(entry, Outgoing):
                await self.write_anyway(entry, result)
            else:
                log.error("a changelog record could not be written to Kafka: %r; stopping",
                          result)
                await self._crash(result)
                raise result
        del pending[:len(taken)]

    async def write_now(self, topic, key, value, headers) -> None:
        if key is None and value is None:
            value = b""
        size = record_size(key, value, headers)
        if size > self.max_request:
            raise TooLargeForProducer(
                f"{size} bytes > the producer's max_request_size={self.max_request}")
        await topic.send_soon(key=key, value=value, headers=headers)

    async def write_anyway(self, out: Outgoing, error: BaseException) -> None:
        """Write an output or dead letter Kafka did not acknowledge, or set it aside: step 3's
        follow-ups of the checkpoint protocol (state.checkpoint.follow_up), awaited here.

        The record is written once more on its own whatever the error (the broker refuses a
        whole batch when one record in it is too large), and again while the error is
        retriable (SEND_TRIES writes in all, with a short backoff). Then, or at once when it is
        larger than our producer accepts, a dead letter takes its place in `out.fallback` (the
        source topic's dead-letter topic; partitions.closed.dlq for a closed partition), with
        reason `send_failed` for an output or the dead letter's own reason, and the error in
        the `liber.send.error` header:
        1. cut: the record's bytes bounded by core.dead_letter (skipped for a dead letter,
           which already was);
        2. headers only: no key, an empty value; the reason, the input record's coordinates
           and the length and sha256 of the bytes remain, so the record is found in its source
           topic.
        Each step is logged with the input record's coordinates and counted in
        liber_send_failed_total{topic, fallback}; then the worker goes on. Only when even 2.
        fails (Kafka takes nothing) does it stop, before the batch is acked: nothing is
        committed past the record, and a restart redoes the batch."""
        name = out.topic.get_topic_name()
        src_topic, partition, offset = out.source
        send = Send(out.topic, out.key, out.value, out.headers, letter=out.letter,
                    source=(TopicPartition(src_topic, partition), offset, out.key, out.original))
        fallback = None  # the dead letter in the record's place, once there is one
        while True:
            worth_again = not isinstance(error, TooLargeForProducer) and (
                send.tries == 1 or getattr(error, "retriable", False)
                or isinstance(error, asyncio.TimeoutError))
            outcome, nxt = follow_up(send, error, out.fallback, name=name,
                                     retriable=worth_again)
            if nxt is None:
                break
            if outcome == "retried":
                log.warning("write to %s for %s@%d:%d failed (%r): retrying",
                            send.topic.get_topic_name(), src_topic, partition, offset, error)
                await asyncio.sleep(0.2 * 2 ** send.tries)
            else:
                fallback = FALLBACKS[outcome]
                nxt.headers.append((SEND_ERROR, repr(error)[:dead_letter.MAX_DETAIL].encode()))
                log.error("%s for %s@%d:%d could not be written to %s: %r; a dead letter (%s) "
                          "takes its place", "dead letter" if out.letter else "output",
                          src_topic, partition, offset, name, error, fallback)
            try:
                await self.write_now(nxt.topic, nxt.key, nxt.value, nxt.headers)
            except Exception as exc:  # noqa: BLE001 - any refusal leads to the next step
                error, send = exc, nxt
                continue
            if fallback is not None:
                metrics.SEND_FAILED.labels(topic=name, fallback=fallback).inc()
                if out.letter is None:
                    metrics.DEAD_LETTERED.labels(topic=PARTITIONS_CLOSED,
                                                 reason=SEND_FAILED).inc()
            return
        metrics.SEND_FAILED.labels(topic=name, fallback="none").inc()
        log.error("no dead letter for %s@%d:%d could be written (%r): stopping", src_topic,
                  partition, offset, error)
        await self._crash(error)
        raise error
