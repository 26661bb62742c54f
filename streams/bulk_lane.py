"""The bulk lane: records of `behaviors` from the consumer's fetches to the UBSP task in
batches, without a Faust event, channel queue or stream iteration per record.

Faust stays the application: group membership, rebalancing, table recovery, standbys and
commits are Faust's; only the delivery differs (streams/faust_compat.py: BulkConsumer hands
each fetched partition's records to `put`). What the lane keeps of Faust's delivery:
- generations: records fetched before a rebalance are dropped when taken (when the rebalance
  ends Faust's recovery seeks back to the committed offsets, so they come again);
- flow control: no batch is taken while Faust's flow is stopped (a rebalance or a table
  recovery), and the fetcher waits while `max_pending` records wait here (backpressure);
- in flight: a taken batch counts among the consumer's unacked messages, so a rebalance or a
  shutdown waits for it as for a stream's events, then commits what it acked;
- acks: `ack(batch)` acks each partition's offsets in one step once the batch is durable;
- copies: a record handed out before in this run (same partition and offset) is acked with
  its batch, never processed again (see faust_compat.Batch).
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from ops import metrics
from streams.faust_compat import InFlight, ack_range


class LaneEvent:
    """One record as the agent and the outbox read it: `message` is aiokafka's record
    (topic, partition, offset, key, value, headers). Weak-referenceable: Faust's tables
    take it as the current event (faust_compat.file_under)."""
    __slots__ = ("message", "__weakref__")

    def __init__(self, message):
        self.message = message


@dataclass
class LaneBatch:
    events: list = field(default_factory=list)
    copies: int = 0
    ranges: dict = field(default_factory=dict)  # tp -> [first offset, last offset] to ack
    in_flight: InFlight | None = None


class BulkLane:
    """Args:
        topics: the topic names delivered here (full names, with the prefix).
        max_pending: records waiting here at most before the fetcher waits.
    """

    def __init__(self, topics: set[str], max_pending: int):
        self.topics, self.max_pending = frozenset(topics), max_pending
        self._fetched: deque = deque()  # (generation, tp, records)
        self._pending = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()  # a batch's worth is waiting
        self._want = max_pending
        self._room = asyncio.Event()
        self._room.set()
        self._newest: dict = {}  # tp -> (generation, highest offset handed out in it)
        self.consumer = None

    # --- the fetcher's side (faust_compat.BulkConsumer) --------------------------------------
    async def put(self, consumer, tp, records: list, generation: int) -> None:
        self.consumer = consumer
        while self._pending >= self.max_pending:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
            if not consumer.flow_active or consumer.should_stop:
                return  # a rebalance began: these are fetched again once it ends
        self._fetched.append((generation, tp, records))
        self._pending += len(records)
        metrics.RECORDS_IN.counts[tp.topic] += len(records)
        self._arrived.set()
        if self._pending >= self._want:
            self._full.set()

    # --- the UBSP task's side ----------------------------------------------------------------
    async def batches(self, app, max_events: int, wait_s: float = 0.05):
        """Batches of up to `max_events` records, cut when the first is `wait_s` old."""
        self._want = max_events
        while True:
            await self._arrived.wait()
            if self._pending < max_events:  # let the fetcher add to it, for wait_s at most
                try:
                    await asyncio.wait_for(self._full.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
            consumer = self.consumer
            while not consumer.flow_active:  # rebalance or recovery: wait, then re-check
                await asyncio.sleep(0.05)
            batch = self._take(app.consumer_generation_id, max_events)
            if batch.events or batch.ranges:
                batch.in_flight = InFlight(consumer)
                yield batch

    def _take(self, generation: int, max_events: int) -> LaneBatch:
        batch = LaneBatch()
        room = max_events
        while self._fetched and room > 0:
            fetched_in, tp, records = self._fetched[0]
            if len(records) > room:  # split: the rest stays first in line
                head, tail = records[:room], records[room:]
                self._fetched[0] = (fetched_in, tp, tail)
            else:
                head = records
                self._fetched.popleft()
            self._pending -= len(head)
            if fetched_in != generation:
                continue  # fetched before a rebalance: dropped (see the module's docstring)
            # offsets handed out before in this generation: copies (a rebalance seeks back)
            seen_in, newest = self._newest.get(tp, (generation, -1))
            if seen_in != generation:
                newest = -1
            if head[0].offset > newest:  # the common case: no copies, offsets ascend
                batch.events.extend(map(LaneEvent, head))
            else:
                for record in head:
                    if record.offset <= newest:
                        batch.copies += 1
                    else:
                        batch.events.append(LaneEvent(record))
            # acked from the offset after the last one handed out: offsets between two fetches
            # hold no record of ours (control records), and Faust commits only up to a gap
            first = head[0].offset if newest < 0 else min(head[0].offset, newest + 1)
            self._newest[tp] = (generation, max(newest, head[-1].offset))
            span = batch.ranges.get(tp)
            batch.ranges[tp] = [first if span is None else span[0], head[-1].offset]
            room -= len(head)
        if not self._fetched:
            self._arrived.clear()
        if self._pending < self._want:
            self._full.clear()
        if self._pending < self.max_pending:
            self._room.set()
        return batch

    def ack(self, batch: LaneBatch) -> None:
        """The batch is durable: its offsets are acked (Faust commits them)."""
        consumer = self.consumer
        for tp, (first, last) in batch.ranges.items():
            ack_range(consumer, tp, first, last)
        if batch.in_flight is not None:
            batch.in_flight.done(consumer)
