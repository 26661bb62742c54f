"""The Faust app of the stream worker: topics, RocksDB tables and the UBSP agent.

Records are read as raw bytes and validated by `core.records`, so a bad record is
dead-lettered with its reason instead of crashing Faust's deserializer.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import faust
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.sensors.monitor import Monitor
from kafka.partitioner.default import murmur2

from core import logs
from core.settings import Settings
from ops import metrics
from core import dead_letter
from streams import ubsp
from streams import drift as drift_rule
from streams import store_memory
from streams.quiet_users import QuietUsers
from core.records import (BehaviorEvent, ClosedPartition, InvalidRecord, Item, PartitionEvent,
                             decode)
from core.topics import BEHAVIORS, ITEMS, PARTITIONS_CLOSED, dlq

log = logging.getLogger("liber.stream")
REPLAYED = "replayed"
PROCESSING_ERROR = "processing_error"
SEND_FAILED_REASON = "send_failed"
SEND_ERROR = "liber.send.error"  # header: why the record in this dead letter's place failed
SEND_ATTEMPTS = 3  # writes of one output or dead letter before a fallback takes its place
# Faust's default; raised when max_payload_bytes asks more, since a closed partition may be
# as large as max_payload_bytes (records.ClosedPartition.encode_within).
PRODUCER_MAX_REQUEST = 1_000_000


def producer_max_request(settings: Settings) -> int:
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
    again or set it aside (see make_durable in create_app)."""
    future: asyncio.Future
    topic: faust.topics.Topic
    key: bytes | None
    value: bytes | None
    headers: list
    source: tuple[str, int, int]  # the input record's topic, partition and offset
    fallback: faust.topics.Topic  # where a dead letter takes its place
    original: bytes | None  # the bytes a fallback dead letter describes
    letter: tuple[str, str] | None = None  # (reason, detail) when this is a dead letter


def faust_broker_options(settings: Settings) -> dict:
    """Broker URL list and credentials in Faust's spelling."""
    opts: dict = {"broker": [f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(",")]}
    if settings.security_protocol.startswith("SASL"):
        opts["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=_ssl_context(settings) if settings.security_protocol == "SASL_SSL" else None)
    elif settings.security_protocol == "SSL":
        opts["broker_credentials"] = faust.SSLCredentials(_ssl_context(settings))
    return opts


def _ssl_context(settings: Settings):
    import ssl
    return ssl.create_default_context(cafile=settings.ssl_cafile or None)


class QuietMonitor(Monitor):
    """Faust's Monitor without its per-record bookkeeping (counts and timings kept for Faust's
    web views, which the worker does not run): a few percent of every event. Our own
    metrics come from ops.faust_ops.OpsSensor."""

    def on_message_in(self, tp, offset, message) -> None:
        pass

    def on_stream_event_in(self, tp, offset, stream, event):
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass

    def on_message_out(self, tp, offset, message) -> None:
        pass

    def on_table_get(self, table, key) -> None:
        pass

    def on_table_set(self, table, key, value) -> None:
        pass


class Batch(list):
    """Events to process, plus `copies`: records Faust delivered a second time in this run
    (same partition and offset as one already handed out). Copies are only acked, with the
    batch, since an ack for an offset must not come before its first delivery is durable."""
    copies: list


async def batches(stream, max_size: int, wait_s: float = 0.05):
    """Batches of up to `max_size` events, cut when the batch is `wait_s` old. Acks
    are left to the caller, who acks once the batch's effects are durable.

    Faust's `take_events` is not used: after an await it files the stream's *current* event
    into its buffer, which can swap one event for another. Nor is the stream's input queue
    left to Faust's flow control: when a table recovery ends, Faust seeks to the committed
    offsets, resumes fetching and only then clears every stream queue; records fetched in
    that window were thrown away and never fetched again (the "one event missing under load"
    defect; Faust's commit even steps over a one-record gap). Records of an older consumer
    generation are still skipped by the stream itself; records fetched twice in one
    generation come back as `Batch.copies`."""
    stream.enable_acks = False
    stream.app.flow_control._queues.discard(stream.channel.queue)  # never clear our input
    # The pump fills `pending`; the batch loop wakes once per batch (first event, full, or
    # stream ended), not once per event: a wake-up per event cost more than Faust's own path.
    pending: list = []
    arrived, full, room = asyncio.Event(), asyncio.Event(), asyncio.Event()
    room.set()
    newest: dict = {}  # topic partition -> highest offset handed out in this run

    async def pump() -> None:
        async for event in stream.events():
            while len(pending) >= max_size:  # backpressure: wait until the batch is taken
                room.clear()
                await room.wait()
            pending.append(event)
            arrived.set()
            if len(pending) >= max_size:
                full.set()

    def take() -> Batch:
        batch = Batch()
        batch.copies = []
        for event in pending:
            message = event.message
            if message.offset <= newest.get(message.tp, -1):
                batch.copies.append(event)
            else:
                newest[message.tp] = message.offset
                batch.append(event)
        pending.clear()
        arrived.clear()
        full.clear()
        room.set()
        return batch

    async def first_of(*waits) -> None:
        """Until one of the events is set or the pump ends (its error re-raised here)."""
        waiters = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait({*waiters, pumping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if pumping.done():
            pumping.result()  # the stream failed: re-raise

    pumping = asyncio.ensure_future(pump())
    try:
        while True:
            if not pending:
                await first_of(arrived.wait())
                if not pending:
                    return  # the stream ended
            if len(pending) < max_size and not pumping.done():
                # Let the batch fill until it is `wait_s` old.
                try:
                    await asyncio.wait_for(first_of(full.wait()), wait_s)
                except asyncio.TimeoutError:
                    pass
            batch = take()
            if batch.copies:
                log.info("%d records delivered again by Faust in this run: skipped",
                         len(batch.copies))
            yield batch
    finally:
        pumping.cancel()


async def ack_all(stream, batch: Batch) -> None:
    for event in batch:
        await stream.ack(event)
    for event in batch.copies:
        await stream.ack(event)


class TrackedSends:
    """A table whose changelog records can be waited for: each FutureMessage it sends is
    appended to `sent` (a list shared with the agent, see `make_durable`)."""
    sent: list | None = None

    def send_changelog(self, *args, **kwargs):
        fut = super().send_changelog(*args, **kwargs)
        if self.sent is not None:
            self.sent.append(fut)
        return fut


class TrackedTable(TrackedSends, faust.Table):
    pass


class TrackedGlobalTable(TrackedSends, faust.GlobalTable):
    """`on_applied(keys)`: called with the keys of changelog records applied to the local store,
    among them other workers' writes, which never pass through this worker's agent."""
    on_applied = None

    def apply_changelog_batch(self, batch) -> None:
        batch = list(batch)
        super().apply_changelog_batch(batch)
        if self.on_applied is not None:
            self.on_applied([event.message.key for event in batch])


def consuming_options(settings: Settings) -> dict:
    """How the worker's Faust app reads: shared with benchmarks/faust_floor.py, whose agent must
    pay exactly the worker's per-event costs to be its floor."""
    return dict(topic_partitions=settings.topic_partitions, consumer_auto_offset_reset="earliest",
                web_enabled=False, stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
                Monitor=QuietMonitor, **faust_broker_options(settings))


def create_app(settings: Settings) -> faust.App:
    app = faust.App(
        settings.app_id,
        store="rocksdb://",
        datadir=str(settings.state_path / settings.app_id),
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        # Batch outgoing changelog and output records instead of one request per record.
        # Each batch waits for its records' acks (make_durable), so a long linger would only
        # add to every batch's wait.
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=producer_max_request(settings),
        **consuming_options(settings),
    )
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
               partitions=settings.topic_partitions)
    behaviors = app.topic(settings.topic(BEHAVIORS), **raw)
    items = app.topic(settings.topic(ITEMS), **raw)
    closed_topic = app.topic(settings.topic(PARTITIONS_CLOSED), **raw)
    dlqs = {name: app.topic(settings.topic(dlq(name)), **raw)
            for name in (BEHAVIORS, ITEMS, PARTITIONS_CLOSED)}
    max_request = producer_max_request(settings)

    # Per agent (by input topic), the records it sent (outputs, dead letters, changelogs)
    # that Kafka may not have acknowledged yet: see make_durable.
    sent: dict[str, list] = {BEHAVIORS: [], ITEMS: []}

    def table(cls, name: str, written_by: str, **kwargs):
        created = app.tables.add(cls(app, name=name, beacon=app.tables.beacon,
                                     partitions=settings.topic_partitions,
                                     options=store_memory.table_options(), **kwargs))
        created.sent = sent[written_by]
        return created

    # Item text for prompts, replicated to every worker (a global table fed by the items agent).
    # `is_global` is what makes a table global in Faust (app.GlobalTable passes it; the class
    # alone does not): reads then search every partition's store and every worker recovers
    # and follows all changelog partitions. Without it a read looked only in the store of the
    # current event's partition: titles of items in the other partitions came out as
    # placeholders, differently before and after a restart (the kill -9 conflict of the reliability tests), and a
    # second worker never saw the first one's items. Buffers of 1: Faust files the changelog
    # partitions of a global table as actives, whose records wait in a 1,000-record recovery
    # buffer, so another worker's updates would otherwise stay invisible after recovery.
    global_table = dict(is_global=True, recovery_buffer_size=1, standby_buffer_size=1,
                        key_type=bytes, value_type=bytes)
    item_text = table(TrackedGlobalTable, "item-text", ITEMS, **global_table)
    # Per-user UBSP state; `use_partitioner` keeps the changelog partition equal to the
    # behaviours partition of the same user key (both use Kafka's murmur2 partitioner).
    user_state = table(TrackedTable, "ubsp-state", BEHAVIORS, use_partitioner=True,
                       key_type=bytes)  # values: JSON dicts (see streams.ubsp)
    rules = ubsp.CloseRules.from_settings(settings)
    quiet = QuietUsers(rules)
    # Item embeddings for the drift rule, shared by all workers like the item text.
    item_vectors = table(TrackedGlobalTable, drift_rule.ITEM_VECTORS_TABLE, ITEMS, **global_table)
    vectors = drift_rule.ItemVectors(drift_rule.Overlay(item_vectors))

    def send(name: str, topic, key, value, headers, event, fallback, original,
             letter=None) -> None:
        """Queue a record; one our producer would refuse is not handed to Faust's producer
        buffer (aiokafka raises there, which would stop the buffer): it fails at once and
        make_durable sets it aside."""
        if key is None and value is None:
            value = b""  # aiokafka needs one of them (a dead letter of a bare tombstone)
        size = record_size(key, value, headers)
        if size > max_request:
            future = asyncio.get_event_loop().create_future()
            future.set_exception(TooLargeForProducer(
                f"{size} bytes > the producer's max_request_size={max_request}"))
        else:
            future = topic.send_soon(key=key, value=value, headers=headers)
        msg = event.message
        sent[name].append(Outgoing(future, topic, key, value, headers or [],
                                   (msg.topic, msg.partition, msg.offset), fallback, original,
                                   letter))

    def dead_letter_send(name: str, event, reason: str, detail: str) -> None:
        msg = event.message
        metrics.DEAD_LETTERED.labels(topic=name, reason=reason).inc()
        logs.dead_letter(log, source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                         reason=reason, detail=detail)
        value, headers = dead_letter.letter(msg.value, reason, detail, topic=msg.topic,
                                            partition=msg.partition, offset=msg.offset)
        send(name, dlqs[name], msg.key, value, headers, event, dlqs[name], msg.value,
             (reason, detail))

    # Global-table reads probe every RocksDB partition; titles almost never change, so keep
    # the ones found in memory (bounded by the catalogue size).
    text_cache: dict[str, str] = {}
    missing: set[str] = set()

    def text_of(item_id: str) -> str:
        text = text_cache.get(item_id)
        if text is None:
            stored = item_text.get(item_id.encode())
            if stored is None:
                if item_id not in missing and len(missing) < 100:  # once per item, bounded
                    missing.add(item_id)
                    log.warning("item %s has no text in the item-text table: placeholder "
                                "used", item_id)
                return f"item {item_id}"  # not (yet) in the catalogue: do not cache the miss
            text = text_cache[item_id] = stored.decode("utf-8")
        return text

    def forget_texts(keys) -> None:
        """A title written by any worker replaces the one kept in memory (every worker keeps
        its own cache; the items agent of only one of them sees the new record)."""
        for key in keys:
            if isinstance(key, (bytes, bytearray)):
                text_cache.pop(key.decode("utf-8", "replace"), None)

    item_text.on_applied = forget_texts

    def known_text(item_id: str) -> str | None:
        text = text_of(item_id)
        return None if text == f"item {item_id}" else text

    drift = drift_rule.DriftRule.from_settings(settings, vectors, text_of=known_text)

    def encode_partition(closed: ubsp.Closed) -> bytes:
        events = [PartitionEvent(event_id, item_id, action, ts, value, text_of(item_id))
                  for event_id, item_id, action, ts, value in closed.events]
        return ClosedPartition(closed.user_id, closed.seq, tuple(events), closed.start_ts,
                               closed.end_ts, closed.reason).encode_within(
                                   settings.max_payload_bytes)

    def send_partition(closed: ubsp.Closed, value: bytes, event) -> None:
        send(BEHAVIORS, closed_topic, closed.user_id.encode(), value, None, event,
             dlqs[PARTITIONS_CLOSED], value)
        metrics.PARTITIONS_CLOSED.labels(rule=closed.reason).inc()

    def publish(closed: ubsp.Closed, event) -> None:
        send_partition(closed, encode_partition(closed), event)

    def stops_worker(fun):
        """An agent that fails outside its per-record guards stops the whole worker, non-zero,
        so a supervisor restarts it: Faust alone logs the error and lives on without it."""
        @functools.wraps(fun)
        async def agent(stream):
            try:
                await fun(stream)
            except Exception as exc:
                log.exception("agent %s crashed: stopping the worker", fun.__name__)
                await app.crash(exc)
                raise
        return agent

    def item_of(event) -> tuple[Item, str] | None:
        """The item of a record and its prompt text; None when it was dead-lettered."""
        try:
            item = decode(Item, event.message.value, key=event.message.key,
                          max_bytes=settings.max_payload_bytes)
            return item, item.text()
        except InvalidRecord as exc:
            dead_letter_send(ITEMS, event, exc.reason, exc.detail)
        except Exception as exc:  # a bug must not stop the catalogue: park the record
            log.exception("item processing failed")
            dead_letter_send(ITEMS, event, PROCESSING_ERROR, repr(exc))
        return None

    @app.agent(items)
    @stops_worker
    async def load_items(stream):
        async for batch in batches(stream, 256):
            good = []
            for event in batch:
                parsed = item_of(event)
                if parsed is not None:
                    good.append((event, *parsed))
            pending = stream.current_event
            for event, item, text in good:  # titles first: behaviours processed meanwhile see them
                stream._set_current_event(event)
                item_text[item.item_id.encode()] = text.encode("utf-8")
                text_cache.pop(item.item_id, None)
                metrics.ITEMS_LOADED.inc()
            stream._set_current_event(pending)
            if drift is not None:  # batched encodes of new or changed titles, off the loop
                await vectors.put_texts_off_loop({item.item_id: text for _, item, text in good})
                pending = stream.current_event
                for event, item, _ in good:
                    stream._set_current_event(event)
                    key = item.item_id.encode()
                    value = vectors.store.get(key)
                    if value is not None and item_vectors.get(key) != value:
                        item_vectors[key] = value
                stream._set_current_event(pending)
            await make_durable(sent[ITEMS])
            await ack_all(stream, batch)

    def apply_batch(batch) -> dict:
        """Apply a batch of events; returns {user key: (new state, an event of that user)}
        so each touched user's state is written once per batch, not once per event."""
        now = time.time()
        touched: dict[bytes, tuple[dict, object]] = {}
        processed = {ubsp.ACCEPTED: 0, ubsp.DUPLICATE: 0, REPLAYED: 0}
        for event in batch:
            try:
                outcome = apply_one(event, now, touched)
            except InvalidRecord as exc:
                dead_letter_send(BEHAVIORS, event, exc.reason, exc.detail)
                continue
            except Exception as exc:  # a bug must not stop the agent: park the record
                log.exception("processing failed")
                dead_letter_send(BEHAVIORS, event, PROCESSING_ERROR, repr(exc))
                continue
            processed[outcome] += 1
        metrics.EVENTS_IN.inc(len(batch))
        for outcome, count in processed.items():
            metrics.EVENTS_PROCESSED.labels(outcome=outcome).inc(count)
        return touched

    def apply_one(event, now: float, touched: dict) -> str:
        record = decode(BehaviorEvent, event.message.value, key=event.message.key,
                        max_bytes=settings.max_payload_bytes)
        record.check_time(max_future_s=settings.max_future_s, now=now)
        key, offset = event.message.key, event.message.offset
        quiet.observe(event.message.partition, record.ts)
        entry = touched.get(key)
        state = entry[0] if entry else (user_state.get(key) or ubsp.new_state())
        if offset <= state.get("offset", -1):
            return REPLAYED  # redelivered after a crash; the recovered state already has it
        # add_event works in place: keep a shallow copy so that a partition that cannot be
        # encoded leaves the user's cache as it was (only this event is dead-lettered).
        before = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
        outcome, closed = ubsp.add_event(state, record.user_id, record.event_id,
                                                record.item_id, record.action, record.ts,
                                                record.value, rules, drift)
        if outcome == ubsp.LATE:
            raise InvalidRecord("late", f"ts={record.ts} older than the user's newest event "
                                        f"minus max_lateness_s={rules.max_lateness_s}")
        if outcome == ubsp.ACCEPTED:
            try:
                values = [encode_partition(part) for part in closed]
            except Exception:
                state.clear()
                state.update(before)
                raise
            state["offset"] = offset
            touched[key] = (state, event)
            for part, value in zip(closed, values):
                send_partition(part, value, event)
        return outcome

    async def make_durable(pending: list) -> None:
        """Wait until Kafka has acknowledged every record sent so far. Each send's own future
        is awaited: Faust's flush gives up after 0.1 s, and its buffer looks empty while the
        last record taken from it is still on its way into the Kafka client. An output or dead
        letter that fails goes to `write_anyway`: one record Kafka refuses must not stop the
        worker at every start. A failed changelog record stops the worker (offsets past it
        are never committed; a restart redoes the batch)."""
        taken = pending[:]
        results = await asyncio.gather(
            *(p.future if isinstance(p, Outgoing) else p for p in taken), return_exceptions=True)
        for entry, result in zip(taken, results):
            if not isinstance(result, BaseException):
                continue
            if isinstance(entry, Outgoing):
                await write_anyway(entry, result)
            else:
                log.error("a changelog record could not be written to Kafka: %r; stopping",
                          result)
                await app.crash(result)
                raise result
        del pending[:len(taken)]

    async def write_now(topic, key, value, headers) -> None:
        if key is None and value is None:
            value = b""
        size = record_size(key, value, headers)
        if size > max_request:
            raise TooLargeForProducer(
                f"{size} bytes > the producer's max_request_size={max_request}")
        await topic.send_soon(key=key, value=value, headers=headers)

    async def write_anyway(out: Outgoing, error: BaseException) -> None:
        """Write an output or dead letter Kafka did not acknowledge, or set it aside.

        The record is written once more on its own (the broker refuses a whole batch when one
        record in it is too large), and again while the error is retriable (SEND_ATTEMPTS
        writes in all, with a short backoff). Then, or at once when it is larger than our
        producer accepts, a dead letter takes the record's place, in the source topic's
        dead-letter topic (partitions.closed.dlq for a closed partition), with reason
        `send_failed` for an output or the dead letter's own reason, and the error in the
        `liber.send.error` header:
        1. cut: the record's bytes bounded by dead_letter.letter() (skipped for a dead letter,
           which already was);
        2. headers only: no key, an empty value; the reason, the input record's coordinates and the
           length and sha256 of the bytes remain, so the record is found in its source topic.
        Each step is logged with the input record's coordinates and counted in
        liber_send_failed_total{topic, fallback}; then the worker goes on. Only when even 2.
        fails (Kafka takes nothing) does it stop, before the batch is acked: nothing is
        committed past the record, and a restart redoes the batch."""
        name = out.topic.get_topic_name()
        src_topic, partition, offset = out.source
        for attempt in range(1, SEND_ATTEMPTS):
            if isinstance(error, TooLargeForProducer) or attempt > 1 and not (
                    getattr(error, "retriable", False) or isinstance(error, asyncio.TimeoutError)):
                break  # the first retry is always made: the broker refuses whole batches
            log.warning("write to %s for %s@%d:%d failed (%r): retrying", name, src_topic,
                        partition, offset, error)
            await asyncio.sleep(0.2 * 2 ** attempt)
            try:
                return await write_now(out.topic, out.key, out.value, out.headers)
            except Exception as exc:
                error = exc
        reason, detail = out.letter or (SEND_FAILED_REASON, f"not written to {name}")
        steps = [("headers", 0)] if out.letter else [("cut", dead_letter.MAX_VALUE), ("headers", 0)]
        for fallback, limit in steps:
            value, headers = dead_letter.letter(out.original, reason, detail, topic=src_topic,
                                                partition=partition, offset=offset, limit=limit)
            headers.append((SEND_ERROR, repr(error)[:dead_letter.MAX_DETAIL].encode()))
            key = out.key if limit else None
            log.error("%s for %s@%d:%d could not be written to %s: %r; a dead letter (%s) "
                      "takes its place", "dead letter" if out.letter else "output", src_topic,
                      partition, offset, name, error, fallback)
            try:
                await write_now(out.fallback, key, value, headers)
            except Exception as exc:
                error = exc
                continue
            metrics.SEND_FAILED.labels(topic=name, fallback=fallback).inc()
            if out.letter is None:
                metrics.DEAD_LETTERED.labels(topic=PARTITIONS_CLOSED,
                                             reason=SEND_FAILED_REASON).inc()
            return
        metrics.SEND_FAILED.labels(topic=name, fallback="none").inc()
        log.error("no dead letter for %s@%d:%d could be written (%r): stopping", src_topic,
                  partition, offset, error)
        await app.crash(error)
        raise error

    def sweep_quiet(batch, touched: dict) -> None:
        """Close caches of users who went quiet on the partitions this batch advanced."""
        for key, (state, event) in touched.items():
            quiet.track(event.message.partition, key, state)
        last_of_partition = {event.message.partition: event for event in batch}
        for partition, event in last_of_partition.items():
            for key in quiet.due(partition):
                state = touched[key][0] if key in touched else user_state.get(key)
                if state is None:
                    continue
                closed = ubsp.sweep(state, key.decode(), quiet.watermark[partition], rules)
                if closed:
                    publish(closed, event)
                    touched[key] = (state, event)
                    quiet.track(partition, key, state)

    def rebuild_quiet_index() -> None:
        """Index the open caches of the recovered table: at the first batch after start and
        after every rebalance, so the caches of a partition taken over from another worker are
        swept too, even for users who never send again (they stayed open forever before)."""
        quiet.open.clear()
        for key, state in user_state.items():
            if state and state["events"]:
                partition = (murmur2(key) & 0x7FFFFFFF) % settings.topic_partitions
                quiet.track(partition, key, state)

    @app.agent(behaviors)
    @stops_worker
    async def ubsp(stream):
        indexed = None  # the consumer generation the quiet index was built for
        async for batch in batches(stream, settings.batch_size):
            generation = app.consumer_generation_id
            if generation != indexed and not (app.rebalancing or app.in_recovery):
                rebuild_quiet_index()  # partitions may have moved: index what we own now
                indexed = generation
            touched = apply_batch(batch)
            sweep_quiet(batch, touched)
            metrics.OPEN_CACHES.set(sum(map(len, quiet.open.values())))  # as the quiet index knows
            # Outputs (closed partitions, dead letters) are durable before the state that says
            # they were produced, and the state before the batch is acked (offsets commit only
            # after acks). A crash in between re-produces outputs, identically: never loses them.
            await make_durable(sent[BEHAVIORS])
            pending = stream.current_event
            for key, (state, event) in touched.items():
                # Faust's RocksDB store files a write under the *current* event's partition:
                # make it an event of this user, not the last one of the batch.
                stream._set_current_event(event)
                user_state[key] = state
            stream._set_current_event(pending)
            await make_durable(sent[BEHAVIORS])
            await ack_all(stream, batch)  # offsets may be committed only now

    app.liber_tables = {"user_state": user_state, "item_text": item_text,
                        "item_vectors": item_vectors}
    return app
