"""Every place the stream worker reaches into Faust (and mode, Faust's service library) beyond
its documented API, in one module pinned to the faust-streaming version it was checked against.

On an upgrade, run tests/streams/test_faust_compat.py: it names each hook below that moved or
changed, then bump PINNED_VERSION. The hooks, what they are for:

  Monitor.on_*                      QuietMonitor: no per-record bookkeeping
  Collection.send_changelog         TrackedSends: changelog sends the agent can wait for
  Collection.apply_changelog_batch  TrackedGlobalTable: other workers' writes seen
  Collection(is_global=, recovery_buffer_size=, standby_buffer_size=)  GLOBAL_TABLE
  FlowControlEvent._queues          batches: our input queue is never cleared
  Stream.enable_acks, Stream.ack    batches / ack_all: acks left to the caller
  Stream._set_current_event         filed_under: the partition a table write is filed under
  App.consumer_generation_id, .rebalancing, .in_recovery, .crash    the UBSP agent's wiring
  aiokafka Transport.Consumer, Consumer._wait_next_records, ._buffered_partitions,
  .flow_active, App.transport (setter)      BulkConsumer: bulk topics' fetches to a lane
  aiokafka Consumer._new_consumer_thread, AIOKafkaConsumerThread._consumer; aiokafka's
  GroupCoordinator.check_errors, ._coordination_task, AIOKafkaConsumer._client
                                    CoordinatorErrorsThread: a failed join is retried
  Consumer._acked, ._acked_index, ._committed_offset, ._n_acked, ._unacked_messages,
  ._waiting_for_ack                          ack_range / InFlight: the lane's acks and batches
  faust.streams._current_event               file_under: table writes outside a stream
  app.tables.recovery (in_recovery, active_remaining_total), app.assignor.assigned_actives
                                    read by ops/faust_ops.py and streams/worker.py
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import weakref
from contextlib import contextmanager

import faust
import faust.streams
from faust.sensors.monitor import Monitor
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service
from mode.utils.futures import notify

from core import logs

log = logging.getLogger("liber.stream")
PINNED_VERSION = "0.15.3"  # faust-streaming, as tests/streams/test_faust_compat.py checked it


def installed_version() -> str:
    return importlib.metadata.version("faust-streaming")


def check_version() -> bool:
    """False, with a warning, when the installed Faust is not the one the hooks were checked on."""
    installed = installed_version()
    if installed != PINNED_VERSION:
        log.warning("faust-streaming %s installed, streams/faust_compat.py was checked against "
                    "%s: run tests/streams/test_faust_compat.py", installed, PINNED_VERSION)
        return False
    return True


# --- the Monitor ----------------------------------------------------------------------------
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


QUIET_MONITOR_HOOKS = ("on_message_in", "on_stream_event_in", "on_stream_event_out",
                       "on_message_out", "on_table_get", "on_table_set")


# --- tables ---------------------------------------------------------------------------------
class TrackedSends:
    """A table whose changelog records can be waited for: each FutureMessage it sends is
    appended to `sent` (a list shared with the agent's streams.outbox.Outbox)."""
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


# Table options of a table replicated to every worker. `is_global` is what makes a table global
# in Faust (app.GlobalTable passes it; the class alone does not): reads then search every
# partition's store and every worker recovers and follows all changelog partitions. Without it
# a read looked only in the store of the current event's partition: titles of items in the
# other partitions came out as placeholders, differently before and after a restart (the
# kill -9 conflict of the reliability tests), and a second worker never saw the first one's
# items. Buffers of 1: Faust files the changelog partitions of a global table as actives,
# whose records wait in a 1,000-record recovery buffer, so another worker's updates would
# otherwise stay invisible after recovery.
GLOBAL_TABLE = dict(is_global=True, recovery_buffer_size=1, standby_buffer_size=1)


@contextmanager
def filed_under(stream):
    """`file(event)`: table writes made next are filed under `event`'s partition. Faust's
    RocksDB store files a write under the stream's *current* event, which in a batch is the
    last one read; the current event is restored afterwards."""
    pending = stream.current_event
    try:
        yield stream._set_current_event
    finally:
        stream._set_current_event(pending)


@contextmanager
def file_under():
    """`file(event)`: table writes made next are filed under `event`'s partition, outside any
    stream (the bulk lane): Faust's table and store read the partition from the context's
    current event. The context's event is restored afterwards."""
    var = faust.streams._current_event
    token = var.set(None)
    try:
        yield lambda event: var.set(weakref.ref(event))
    finally:
        var.reset(token)


# --- batches and acks -----------------------------------------------------------------------
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


# --- app state ------------------------------------------------------------------------------
def consumer_generation(app) -> int:
    """Changes at every rebalance: the agent re-indexes what it owns when it does."""
    return app.consumer_generation_id


def settled(app) -> bool:
    """Neither rebalancing nor recovering tables: the partitions owned now are final."""
    return not (app.rebalancing or app.in_recovery)


def recovery_remaining(app) -> int:
    """Changelog records table recovery has still to read (0 when none is under way)."""
    return int(app.tables.recovery.active_remaining_total())


def group_member_alive(app) -> bool | None:
    """Whether the group consumer is a live member of its group: aiokafka's coordinator has a
    running heartbeat task (it has none only while joining, at most the rebalance timeout).
    None before Faust has started its consumer. Read from another thread: attributes only."""
    thread = getattr(getattr(app, "_consumer", None), "_thread", None)
    coordinator = getattr(getattr(thread, "_consumer", None), "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_heartbeat_task"):
        return None
    task = coordinator._heartbeat_task
    return task is not None and not task.done()


# --- the bulk lane's consumer -----------------------------------------------------------------
class BulkConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, except that the records of `lane.topics` never become Faust
    messages: each fetched partition's records go to `lane.put` as one list, with the
    generation they were fetched in; every other topic takes Faust's path as before. Records
    are handed over only while Faust's flow is active and for partitions Faust reads now
    (active, not paused for recovery), as Faust's own getmany checks."""

    async def _wait_next_records(self, timeout):
        records, active = await super()._wait_next_records(timeout)
        lane = self.transport.lane
        if not records:
            return records, active
        bulk = [tp for tp in records if tp.topic in lane.topics]
        if not bulk:
            return records, active
        generation = self.app.consumer_generation_id
        for tp in bulk:
            fetched = records.pop(tp)
            if self.flow_active and not self.should_stop and (
                    active is None or tp in active or tp in self._buffered_partitions):
                await lane.put(self, tp, fetched, generation)
        return records, active

    def _new_consumer_thread(self):
        return CoordinatorErrorsThread(self, loop=self.loop, beacon=self.beacon)


# Often enough that a failed join is retried at once, seldom enough to cost nothing.
COORDINATOR_ERRORS_EVERY_S = 1.0


class CoordinatorErrorsThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, which also reads the errors aiokafka's group coordinator hands
    to its user. After a failed join or sync (any KafkaError: a coordinator that moved, an
    assignor that raised) the coordinator waits until getmany/getone reads the error, then
    joins again. Faust fetches through aiokafka's fetcher and never calls either, so the
    coordinator waited for good: no heartbeats, no rejoin, an idle worker in an empty group.
    Seen on a new three-node cluster: Faust's assignor raised KeyError for a global table's
    changelog that the leader's metadata did not list yet (the start that wedged)."""

    _stopped_logged = False

    @Service.timer(COORDINATOR_ERRORS_EVERY_S)
    async def _read_coordinator_errors(self) -> None:
        from aiokafka.errors import KafkaError
        coordinator = getattr(self._consumer, "_coordinator", None)
        task = getattr(coordinator, "_coordination_task", None)
        if task is None:
            return
        if task.done():  # the coordinator itself ended: nothing to retry, the watchdog exits
            if not (self._stopped_logged or task.cancelled() or task.exception() is None
                    or self.should_stop):
                self._stopped_logged = True
                logs.event(log, "group_coordinator_stopped", logging.ERROR,
                           error=repr(task.exception()))
            return
        try:
            coordinator.check_errors()
        except KafkaError as exc:
            # Fresh metadata before the next join (it waits for this update): a join failed
            # on a topic missing from the metadata fails again on the same metadata.
            self._consumer._client.force_metadata_update()
            logs.event(log, "group_join_failed", logging.WARNING, error=repr(exc),
                       action="join again with fresh metadata")


class BulkTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport whose consumer delivers `lane.topics` to `lane`."""
    Consumer = BulkConsumer

    def __init__(self, url, app, lane):
        super().__init__(url, app)
        self.lane = lane


def use_bulk_lane(app, lane) -> None:
    """Deliver `lane.topics` to `lane` (before the app has made its consumer). The caller
    still subscribes the topics (`app.topics.add`), as an agent would, so assignment and
    co-partitioning are unchanged."""
    app.transport = BulkTransport(app.conf.broker_consumer, app, lane)


class InFlight:
    """A lane batch being processed, counted among the consumer's unacked messages: Faust's
    rebalance and shutdown wait for it (wait_empty) as for a stream's events."""
    __slots__ = ("acked", "refcount", "__weakref__")

    def __init__(self, consumer):
        self.acked, self.refcount = False, 1
        consumer._unacked_messages.add(self)

    def done(self, consumer) -> None:
        self.acked, self.refcount = True, 0
        consumer._unacked_messages.discard(self)
        notify(consumer._waiting_for_ack)


def ack_range(consumer, tp, first: int, last: int) -> int:
    """Ack offsets first..last of `tp` as Faust's per-message ack does (Faust commits the
    acked offsets); returns how many were new."""
    committed = consumer._committed_offset[tp]
    index = consumer._acked_index[tp]
    start = first if committed is None else max(first, committed)
    new = [o for o in range(start, last + 1) if o not in index]
    if new:
        consumer._acked[tp].extend(new)
        index.update(new)
        consumer._n_acked += len(new)
    return len(new)
