"""The Faust app of the stream worker: topics, RocksDB tables and the two agents (items and
UBSP), wired to the logic that does their work.

Records are read as raw bytes and validated by `core.records`, so a bad record is
dead-lettered with its reason instead of crashing Faust's deserializer. `behaviors`, the hot
topic, reaches the UBSP task through the bulk lane (streams/bulk_lane.py: per-partition
batches from the consumer's fetches, no Faust event per record); `items` takes Faust's agent
path. The UBSP work is streams.ubsp_agent.UbspAgent; what it sends waits in a
streams.outbox.Outbox until Kafka has it; what this module needs of Faust's internals is in
streams.faust_compat.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time

import faust

from core.records import InvalidRecord, Item, decode
from core.settings import Settings
from core.topics import BEHAVIORS, ITEMS, PARTITIONS_CLOSED, dlq
from ops import metrics
from streams import drift as drift_rule
from streams import store_memory
from streams.bulk_lane import BulkLane, LaneBatch
from streams.faust_compat import (GLOBAL_TABLE, QuietMonitor, TrackedGlobalTable, TrackedTable,
                                  ack_all, batches, check_version, consumer_generation,
                                  file_under, filed_under, settled, use_bulk_lane)
from streams.item_texts import ItemTexts
from streams.outbox import Outbox, producer_max_request
from streams.ubsp import CloseRules
from streams.ubsp_agent import PROCESSING_ERROR, UbspAgent

log = logging.getLogger("liber.stream")


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


# Bytes per partition and fetch: 8 MiB (about 50,000 behaviour records). A fetch is sent when
# the one before has been read, and with Faust's 1 MiB the lane waited for fetches half of the
# time (26,000 events/s against 53,000 on 300,000 ML-1M events, drift off).
FETCH_BYTES_PER_PARTITION = 8 * 1024 * 1024


def consuming_options(settings: Settings) -> dict:
    """How the worker's Faust app reads: shared with benchmarks/faust_floor.py, whose agent must
    pay exactly the worker's per-event costs to be its floor."""
    return dict(topic_partitions=settings.topic_partitions, consumer_auto_offset_reset="earliest",
                web_enabled=False, stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
                consumer_max_fetch_size=FETCH_BYTES_PER_PARTITION,
                Monitor=QuietMonitor, **faust_broker_options(settings))


def stops_worker(app: faust.App, fun):
    """An agent or task that fails outside its per-record guards stops the whole worker,
    non-zero, so a supervisor restarts it: Faust alone logs the error and lives on without
    it."""
    @functools.wraps(fun)
    async def agent(*args):
        try:
            await fun(*args)
        except Exception as exc:
            log.exception("agent %s crashed: stopping the worker", fun.__name__)
            await app.crash(exc)
            raise
    return agent


async def checkpoint(lane: BulkLane, batch: LaneBatch, touched: dict, partitioner: UbspAgent,
                     user_state, outbox: Outbox) -> None:
    """Make one batch of the UBSP task durable, in this order; a crash between two steps
    re-produces the batch's outputs, identically, and never loses them:

    1. outputs durable: closed partitions and dead letters, before the state that says they
       were produced;
    2. state durable: each touched user's state written once, and its changelog records
       acknowledged by Kafka;
    3. offsets: the batch acked, only now (Faust commits acked offsets only).
    """
    await outbox.make_durable()  # 1.
    with file_under() as file:  # 2.
        for key, (state, event) in touched.items():
            file(event)  # filed under this user's partition
            user_state[key] = state
    partitioner.written(touched)
    await outbox.make_durable()
    lane.ack(batch)  # 3.


def create_app(settings: Settings) -> faust.App:
    check_version()
    lane = BulkLane({settings.topic(BEHAVIORS)}, max_pending=max(50_000, 4 * settings.batch_size))
    app = faust.App(
        settings.app_id,
        store="rocksdb://",
        datadir=str(settings.state_path / settings.app_id),
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        # Batch outgoing changelog and output records instead of one request per record.
        # Each batch waits for its records' acks (Outbox.make_durable), so a long linger would
        # only add to every batch's wait.
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=producer_max_request(settings),
        **consuming_options(settings),
    )
    use_bulk_lane(app, lane)
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
               partitions=settings.topic_partitions)
    behaviors = app.topic(settings.topic(BEHAVIORS), **raw)
    items = app.topic(settings.topic(ITEMS), **raw)
    closed_topic = app.topic(settings.topic(PARTITIONS_CLOSED), **raw)
    dlqs = {name: app.topic(settings.topic(dlq(name)), **raw)
            for name in (BEHAVIORS, ITEMS, PARTITIONS_CLOSED)}
    max_request = producer_max_request(settings)
    # Per agent (by input topic), the records it sent (outputs, dead letters, changelogs).
    outboxes = {name: Outbox(name, dlqs[name], app.crash, max_request)
                for name in (BEHAVIORS, ITEMS)}

    def table(cls, name: str, written_by: str, **kwargs):
        created = app.tables.add(cls(app, name=name, beacon=app.tables.beacon,
                                     partitions=settings.topic_partitions,
                                     options=store_memory.table_options(), **kwargs))
        created.sent = outboxes[written_by].pending
        return created

    # Item text for prompts, replicated to every worker (a global table fed by the items agent).
    global_table = dict(GLOBAL_TABLE, key_type=bytes, value_type=bytes)
    item_text = table(TrackedGlobalTable, "item-text", ITEMS, **global_table)
    # Per-user UBSP state; `use_partitioner` keeps the changelog partition equal to the
    # behaviours partition of the same user key (both use Kafka's murmur2 partitioner).
    user_state = table(TrackedTable, "ubsp-state", BEHAVIORS, use_partitioner=True,
                       key_type=bytes)  # values: JSON dicts (streams.ubsp.UserState)
    rules = CloseRules.from_settings(settings)
    # Item embeddings for the drift rule, shared by all workers like the item text.
    item_vectors = table(TrackedGlobalTable, drift_rule.ITEM_VECTORS_TABLE, ITEMS, **global_table)
    vectors = drift_rule.ItemVectors(drift_rule.Overlay(item_vectors))
    texts = ItemTexts(item_text)
    item_text.on_applied = texts.forget_keys
    drift = drift_rule.DriftRule.from_settings(settings, vectors, text_of=texts.known_text)

    behaviors_out, items_out = outboxes[BEHAVIORS], outboxes[ITEMS]

    def send_closed(key: bytes, value: bytes, event) -> None:
        behaviors_out.send(closed_topic, key, value, None, event, dlqs[PARTITIONS_CLOSED], value)

    partitioner = UbspAgent(user_state, texts, send_closed, behaviors_out.dead_letter, rules,
                            drift, time.time, max_payload_bytes=settings.max_payload_bytes,
                            max_future_s=settings.max_future_s,
                            partitions=settings.topic_partitions)

    def item_of(event) -> tuple[Item, str] | None:
        """The item of a record and its prompt text; None when it was dead-lettered."""
        try:
            item = decode(Item, event.message.value, key=event.message.key,
                          max_bytes=settings.max_payload_bytes)
            return item, item.text()
        except InvalidRecord as exc:
            items_out.dead_letter(event, exc.reason, exc.detail)
        except Exception as exc:  # a bug must not stop the catalogue: park the record
            log.exception("item processing failed")
            items_out.dead_letter(event, PROCESSING_ERROR, repr(exc))
        return None

    @app.agent(items)
    @functools.partial(stops_worker, app)
    async def load_items(stream):
        async for batch in batches(stream, 256):
            good = []
            for event in batch:
                parsed = item_of(event)
                if parsed is not None:
                    good.append((event, *parsed))
            with filed_under(stream) as file:
                for event, item, text in good:  # titles first: behaviours processed meanwhile see them
                    file(event)
                    item_text[item.item_id.encode()] = text.encode("utf-8")
                    texts.forget(item.item_id)
                    metrics.ITEMS_LOADED.inc()
            if drift is not None:  # batched encodes of new or changed titles, off the loop
                await vectors.put_texts_off_loop({item.item_id: text for _, item, text in good})
                metrics.ITEM_VECTORS.set(len(vectors))
                with filed_under(stream) as file:
                    for event, item, _ in good:
                        file(event)
                        key = item.item_id.encode()
                        value = vectors.store.get(key)
                        if value is not None and item_vectors.get(key) != value:
                            item_vectors[key] = value
            await items_out.make_durable()
            await ack_all(stream, batch)

    app.topics.add(behaviors)  # subscribed as an agent's topic is; delivered to the lane
    durable = stops_worker(app, checkpoint)

    @app.task
    @functools.partial(stops_worker, app)
    async def ubsp():
        # A batch is processed while the one before is made durable (its checkpoint waits on
        # Kafka's acks); its states are read from partitioner.unwritten until they are in the
        # table. At most one checkpoint is under way, so they complete in batch order.
        writing = None
        async for batch in lane.batches(app, settings.batch_size):
            generation = consumer_generation(app)
            if partitioner.moved(generation) and writing is not None:
                await writing  # the quiet index is built from the table: all of it there
            # partitions may have moved: index the open caches of what we own now
            partitioner.reindex_if_moved(generation, settled(app))
            touched = partitioner.process(batch.events)
            partitioner.hold(touched)
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(durable(
                lane, batch, touched, partitioner, user_state, behaviors_out))

    app.liber_tables = {"user_state": user_state, "item_text": item_text,
                        "item_vectors": item_vectors}
    app.liber_ubsp = partitioner
    return app
