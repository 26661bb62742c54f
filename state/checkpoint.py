"""The checkpoint protocol: how a worker gets from processed input records to committed offsets
without losing an output, and without one bad record stopping it.

The steps, in the order a checkpoint takes them:

1. Write state. What a record leaves behind locally goes into one atomic RocksDB write before
   any output it implies is sent: after a crash the record comes back, is found done, and the
   stored bytes are sent again (at least once, never a different output). The caller's store
   does this (llm_workers/state.py `Store.finish`, fusion/state.py `FusionStore.write`).
2. Send. Outputs and dead letters go through `Outbox.send` / `Outbox.dead_letter`, each tagged
   with the coordinates of the input record it stands for: (TopicPartition, offset, key, value).
3. Make the sends durable. `Outbox.settle()` (`Checkpoint.make_durable`) waits on every send's
   future. What a refused send leads to is `follow_up()`, which does no I/O:
   a. a retriable error: the same record again, SEND_TRIES sends in all;
   b. an output still refused: a dead letter of its input record takes its place (reason
      `send_failed`, bytes bounded by core.dead_letter, coordinates in headers);
   c. a dead letter refused: sent once more without the record's bytes (the headers still
      name the coordinates, so an operator finds the record in its source topic);
   d. then nothing: logged with the coordinates and counted `lost`.
   Nothing raises: the worker commits and goes on (a crash would only replay the record, and
   fail it, forever).
4. Commit. Only now the input offsets: per partition, below the oldest record not yet finished
   (`Offsets`), of partitions still assigned, and only those that moved since our last commit
   (`Checkpoint.committable`, then `Checkpoint.commit`).
5. Checkpoint the outputs' positions. What only a restore reads (the LLM worker's offsets of
   its own `summaries`, which its restore may skip) is written after the commit: lost in a
   crash, it only makes the next restore read more.

A revocation (`Checkpoint.revoke`) is steps 3 and 4 cut short: the rebalance listener may run
on the consumer's network thread, so it flushes the producer (the next owner restores from our
outputs, so they must be there), commits asynchronously, and only when no send failed (a failed
one needs step 3's follow-ups: its record is left to the next owner), then forgets the
partitions.

Who sequences what:

- LLM worker (llm_workers/service.py): 1 when a partition is done, 2 when its summary or dead
  letter is ready, 3-5 every COMMIT_INTERVAL_S in `LLMWorker.commit`.
- Fusion worker (fusion/worker.py): per micro-batch 1, 2, 3, 4 in `FusionWorker.process`; every
  record of a batch is finished when the batch ends, so step 4 commits after each partition's
  last record. Its restore checkpoint is part of step 1's write: no step 5.
- Stream worker (streams/app.py `checkpoint`, Faust, asyncio). Its state is a changelog-backed
  table: writing state is itself a send, so that a restore sees the state at once. Outputs go
  first (a state saying "produced" must not exist before the outputs), so it runs 2, 3, 1, 3, 4:
  2 = `streams.outbox.Outbox.send` / `.dead_letter`, each `Outgoing` with its source;
  3 = `await Outbox.make_durable()`: each send's future awaited, a refused one led through
      `follow_up()` here (`Outbox.write_anyway`); where nothing at all can be written it stops
      the worker instead of counting the record lost (no offset is committed past it);
  1 = `user_state[key] = state` (TrackedTable appends the changelog sends to the same list),
      then 3 again: a changelog record Kafka refuses stops the worker (no dead letter can
      stand in for state);
  4 = `await ack_all(stream, batch)`: Faust commits below the oldest unacked event, which is
      what `Offsets.committable` computes here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from core import dead_letter, logs

SEND_TRIES = 3  # sends of one record after a retriable failure (the client retries inside each)
SEND_FAILED = "send_failed"  # the reason of a dead letter standing in for an output
SETTLE_TIMEOUT_S = 30.0
REVOKE_FLUSH_S = 30.0


@dataclass(eq=False)
class Send:
    """One record handed to the producer, and what came of it."""
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list
    source: tuple | None = None  # (TopicPartition, offset, raw key, raw value) it stands for
    letter: tuple | None = None  # (reason, detail) when this is a dead letter
    info: object = None          # the caller's, handed back with the metadata
    tries: int = 1
    future: object = None
    error: Exception | None = None

    def failed(self) -> bool:
        return self.error is not None or (self.future is not None and self.future.failed())


def dead_letter_send(topic_dlq: str, tp, offset: int, key, value, reason: str, detail: str, *,
                     limit: int = dead_letter.MAX_VALUE, tries: int = 1) -> Send:
    """The dead letter of an input record: at most `limit` of its bytes, its coordinates in
    headers; with `limit=0` neither key nor value (the key may be what is too large)."""
    source = (tp, offset, key, value)
    kept, headers = dead_letter.letter(value, reason, detail, topic=tp.topic,
                                       partition=tp.partition, offset=offset, limit=limit)
    if limit == 0:
        key, kept = None, b""
    return Send(topic_dlq, key, kept, headers, source=source, letter=(reason, detail),
                tries=tries)


def follow_up(out: Send, exc: Exception, topic_dlq, *, name: str | None = None,
              retriable: bool | None = None) -> tuple[str, Send | None]:
    """Step 3's answer to a refused send: (outcome, the send to make next or None).

    Args:
        out: the send that failed.
        exc: its error.
        topic_dlq: where a dead letter of its input record goes.
        name: the topic as the dead letter's detail names it (default `out.topic`).
        retriable: whether `exc` is worth sending the same record again (default: Kafka's
            `retriable` flag on it); at most SEND_TRIES sends in all either way.
    """
    if retriable is None:
        retriable = getattr(exc, "retriable", False)
    if retriable and out.tries < SEND_TRIES:
        return "retried", Send(out.topic, out.key, out.value, out.headers, out.source,
                               out.letter, out.info, out.tries + 1)
    if out.letter is None and out.source is not None:
        return "dead_lettered", dead_letter_send(topic_dlq, *out.source, SEND_FAILED,
                                                 f"{name or out.topic}: {exc!r}")
    if out.letter is not None and out.value:
        return "resent_without_value", dead_letter_send(topic_dlq, *out.source, *out.letter,
                                                        limit=0, tries=out.tries)
    return "lost", None


class Outbox:
    """A kafka-python producer's sends (step 2), made durable before the input offsets behind
    them are committed (step 3, `settle`).

    Args:
        producer: a KafkaProducer.
        topic_dlq: the dead-letter topic of the input.
        failures: a Prometheus counter labelled (topic, outcome), one per follow-up.
        logger: where failed sends are logged.
        prefix: the topic prefix, left out of metric labels and dead-letter details.
    """

    def __init__(self, producer, topic_dlq: str, failures, *, logger, prefix: str = ""):
        self.producer, self.topic_dlq, self.failures = producer, topic_dlq, failures
        self.log, self.prefix = logger, prefix
        self.pending: list[Send] = []

    def __bool__(self) -> bool:
        return bool(self.pending)

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers=None, *,
             source=None, letter=None, info=None, tries: int = 1) -> Send:
        return self.submit(Send(topic, key, value, headers or [], source, letter, info, tries))

    def dead_letter(self, tp, offset: int, key, value, reason: str, detail: str, *,
                    limit: int = dead_letter.MAX_VALUE, tries: int = 1) -> Send:
        return self.submit(dead_letter_send(self.topic_dlq, tp, offset, key, value, reason,
                                            detail, limit=limit, tries=tries))

    def submit(self, out: Send) -> Send:
        try:
            out.future = self.producer.send(out.topic, key=out.key, value=out.value,
                                            headers=out.headers)
        except KafkaError as exc:  # over our client's max_request_size; metadata timeout
            out.error = exc
        self.pending.append(out)
        return out

    def failed(self) -> bool:
        return any(out.failed() for out in self.pending)

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> list[tuple[Send, object]]:
        """Wait for every send (and the retries and dead letters failures lead to); returns
        the sends that succeeded with their RecordMetadata."""
        done = []
        while self.pending:
            try:
                self.producer.flush(timeout_s)
            except KafkaError:  # a flush timeout: each future below says what it means
                pass
            sends, self.pending = self.pending, []
            for out in sends:
                try:
                    if out.error is not None:
                        raise out.error
                    done.append((out, out.future.get(timeout=timeout_s)))
                except KafkaError as exc:
                    self._failed(out, exc)
        return done

    def _failed(self, out: Send, exc: KafkaError) -> None:
        topic = out.topic[len(self.prefix):] if out.topic.startswith(self.prefix) else out.topic
        tp, offset = (out.source[0], out.source[1]) if out.source else (None, None)
        where = dict(source_topic=getattr(tp, "topic", None),
                     partition=getattr(tp, "partition", None), offset=offset)
        outcome, nxt = follow_up(out, exc, self.topic_dlq, name=topic)
        if nxt is not None:
            self.submit(nxt)
        self.failures.labels(topic=topic, outcome=outcome).inc()
        logs.event(self.log, "send_failed", logging.ERROR if outcome == "lost" else
                   logging.WARNING, topic=out.topic, outcome=outcome, error=repr(exc)[:300],
                   **where)


class Offsets:
    """Input offsets that are safe to commit: below the oldest record not yet done."""

    def __init__(self):
        self._pending: dict[object, set[int]] = {}
        self._next: dict[object, int] = {}

    def received(self, tp, offset: int) -> None:
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def tracks(self, tp) -> bool:
        return tp in self._next

    def done(self, tp, offset: int) -> None:
        self._pending.get(tp, set()).discard(offset)

    def committable(self, tps=None) -> dict:
        out = {}
        for tp, nxt in self._next.items():
            if tps is None or tp in tps:
                pending = self._pending.get(tp)
                out[tp] = min(pending) if pending else nxt
        return out

    def forget(self, tps) -> None:
        for tp in tps:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)


class Checkpoint:
    """Steps 3 and 4 (and a revocation's) for one kafka-python consumer and its Outbox; steps 1
    and 5 write the caller's store, so the caller takes them, in the order above.

    Args:
        consumer: the KafkaConsumer whose offsets are committed.
        outbox: the Outbox of every send made on behalf of the consumer's records.
        offsets: the tracker of unfinished records (a fresh one by default).
    """

    def __init__(self, consumer, outbox: Outbox, offsets: Offsets | None = None):
        self.consumer, self.outbox = consumer, outbox
        self.offsets = Offsets() if offsets is None else offsets
        self.committed: dict = {}  # TopicPartition -> offset we last committed

    def make_durable(self, timeout_s: float = SETTLE_TIMEOUT_S) -> list[tuple[Send, object]]:
        """Step 3: every send durable, or followed up; returns the durable ones with their
        RecordMetadata."""
        return self.outbox.settle(timeout_s)

    def committable(self, tps=None, assigned=None) -> dict:
        """Step 4's offsets, without I/O: below the oldest unfinished record of each tracked
        partition (of `tps` when given), of `assigned` ones when given, and only those that
        moved since our last commit."""
        return {tp: off for tp, off in self.offsets.committable(tps).items()
                if (assigned is None or tp in assigned) and self.committed.get(tp) != off}

    def commit(self, offsets: dict) -> list[tuple[Send, object]]:
        """Step 4: commit `offsets` (TopicPartition -> next offset), synchronously. It never runs
        ahead of step 3: sends still pending are made durable first, and returned as
        `make_durable` returns them (nothing, when the caller took step 3 itself)."""
        done = self.make_durable() if self.outbox else []
        if offsets:
            self.consumer.commit(_metadata(offsets))
            self.committed.update(offsets)
        return done

    def revoke(self, revoked: set, *, callback=None, flush_s: float = REVOKE_FLUSH_S) -> None:
        """Steps 3 and 4 for partitions being revoked, without blocking on the consumer: flush,
        commit asynchronously unless a send failed, forget the partitions.

        Args:
            revoked: the partitions taken away.
            callback: kafka-python's commit_async callback, (offsets, response).
            flush_s: how long the producer flush may take.
        """
        self.outbox.producer.flush(flush_s)  # the next owner restores from our outputs
        offsets = self.committable(revoked)
        if offsets and not self.outbox.failed():
            self.consumer.commit_async(_metadata(offsets), callback=callback)
        self.forget(revoked)

    def forget(self, tps) -> None:
        self.offsets.forget(tps)
        for tp in tps:
            self.committed.pop(tp, None)


def _metadata(offsets: dict) -> dict:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
