"""The UBSP agent's work on one batch of behaviour records, without Faust or Kafka.

Each record is validated and applied to its user's state (streams.ubsp); partitions it closes
are encoded with their item texts and sent; invalid records are dead-lettered with their
reason; then users who went quiet on the partitions the batch advanced are swept. The caller
(streams/app.py) writes the touched states and acks the batch once the sends are durable.

An event is what the bulk lane yields (streams/bulk_lane.LaneEvent) or a Faust stream would:
an object whose `message` has `topic`, `partition`, `offset`, `key` and `value` (the raw
record bytes).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Callable

from core.kafka import key_partition
from core.behavior_decoder import decode_behavior
from core.records import ClosedPartition, InvalidRecord, check_time
from ops import metrics
from streams import ubsp
from streams.item_texts import ItemTexts
from streams.quiet_users import QuietUsers

log = logging.getLogger("liber.stream")
REPLAYED = "replayed"
PARTITION_SCHEMA = ClosedPartition.schema_id()
PROCESSING_ERROR = "processing_error"

# user key -> (the user's new state, an event of that user in the batch)
Touched = dict[bytes, tuple[ubsp.UserState, object]]


class UbspAgent:
    """Args:
        states: user key bytes -> state dict (the `ubsp-state` table); only read here.
        texts: item texts for the partitions' events: an ItemTexts, or the mapping of item id
            bytes to text bytes (the `item-text` table) to wrap in one.
        send: `send(key, value, event)` queues a closed partition's record (`key` the user id
            bytes, `value` its records.ClosedPartition bytes) for the input record `event`.
        dead_letter: `dead_letter(event, reason, detail)` dead-letters an input record.
        rules: the close rules.
        drift: the drift rule (`ubsp.add_event`'s `drift`), None when disabled.
        clock: seconds since the epoch, for the far-future timestamp check.
        max_payload_bytes, max_future_s: record limits (settings).
        partitions: partitions of the behaviours topic.
    """

    def __init__(self, states: Mapping[bytes, dict], texts: ItemTexts | Mapping[bytes, bytes],
                 send: Callable[[bytes, bytes, object], None],
                 dead_letter: Callable[[object, str, str], None], rules: ubsp.CloseRules,
                 drift: Callable[[list[str], str], bool] | None = None,
                 clock: Callable[[], float] = time.time, *, max_payload_bytes: int,
                 max_future_s: float, partitions: int):
        self.states, self.rules, self.drift, self.clock = states, rules, drift, clock
        # shared with the drift rule and the items agent in the worker (one cache of titles)
        self.texts = texts if isinstance(texts, ItemTexts) else ItemTexts(texts)
        self._send, self._dead_letter = send, dead_letter
        self.max_payload_bytes, self.max_future_s, self.partitions = (
            max_payload_bytes, max_future_s, partitions)
        self.quiet = QuietUsers(rules)
        self._indexed = None  # the consumer generation the quiet index was built for
        # states of batches whose checkpoint is still under way (not in `states` yet): the
        # next batch reads them from here, each as a copy, so a write keeps its own batch's
        self.unwritten: dict[bytes, ubsp.UserState] = {}

    # --- one batch ------------------------------------------------------------------------
    def process(self, batch: list) -> Touched:
        """Apply a batch and sweep quiet users; returns the states to write (once each)."""
        touched = self.apply_batch(batch)
        self.sweep_quiet(batch, touched)
        metrics.OPEN_CACHES.set(self.open_caches())
        return touched

    def apply_batch(self, batch: list) -> Touched:
        """Apply a batch of events; returns {user key: (new state, an event of that user)}
        so each touched user's state is written once per batch, not once per event."""
        now = self.clock()
        touched: Touched = {}
        processed = {ubsp.ACCEPTED: 0, ubsp.DUPLICATE: 0, REPLAYED: 0}
        for event in batch:
            try:
                outcome = self.apply_one(event, now, touched)
            except InvalidRecord as exc:
                self._dead_letter(event, exc.reason, exc.detail)
                continue
            except Exception as exc:  # a bug must not stop the agent: park the record
                log.exception("processing failed")
                self._dead_letter(event, PROCESSING_ERROR, repr(exc))
                continue
            processed[outcome] += 1
        metrics.EVENTS_IN.inc(len(batch))
        for outcome, n in processed.items():
            metrics.EVENTS_PROCESSED.labels(outcome=outcome).inc(n)
        return touched

    def state_of(self, key: bytes, touched: Touched) -> ubsp.UserState | None:
        """The user's state as this batch left it so far, else as stored (None: no state)."""
        entry = touched.get(key)
        if entry is not None:
            return entry[0]
        held = self.unwritten.get(key)
        if held is not None:
            return _copy(held)
        stored = self.states.get(key)
        return ubsp.from_stored(stored) if stored else stored

    def hold(self, touched: Touched) -> None:
        """The batch's states are on their way to the table: later batches read them here."""
        for key, (state, _) in touched.items():
            self.unwritten[key] = state

    def written(self, touched: Touched) -> None:
        """The batch's states are in the table (a later batch's newer state stays held)."""
        unwritten = self.unwritten
        for key, (state, _) in touched.items():
            if unwritten.get(key) is state:
                del unwritten[key]

    def apply_one(self, event, now: float, touched: Touched) -> str:
        """Apply one event; returns its outcome. Raises InvalidRecord for a record to
        dead-letter (a late event among them)."""
        message = event.message
        record = decode_behavior(message.value, message.key, max_bytes=self.max_payload_bytes)
        check_time(record.ts, max_future_s=self.max_future_s, now=now)
        key, offset = message.key, message.offset
        self.quiet.observe(message.partition, record.ts)
        state = self.state_of(key, touched) or ubsp.new_state()
        if offset <= state.get("offset", -1):
            return REPLAYED  # redelivered after a crash; the recovered state already has it
        # add_event works in place: keep a shallow copy so that a partition that cannot be
        # encoded leaves the user's cache as it was (only this event is dead-lettered).
        before = _copy(state)
        outcome, closed = ubsp.add_event(state, record.user_id, record.event_id, record.item_id,
                                         record.action, record.ts, record.value, self.rules,
                                         self.drift)
        if outcome == ubsp.LATE:
            raise InvalidRecord("late", f"ts={record.ts} older than the user's newest event "
                                        f"minus max_lateness_s={self.rules.max_lateness_s}")
        if outcome == ubsp.ACCEPTED:
            try:
                values = [self.encode_partition(part) for part in closed]
            except Exception:
                state.clear()
                state.update(before)
                raise
            state["offset"] = offset
            touched[key] = (state, event)
            for part, value in zip(closed, values):
                self.send_partition(part, value, event)
        return outcome

    # --- closed partitions ----------------------------------------------------------------
    def encode_partition(self, closed: ubsp.Closed) -> bytes:
        """ClosedPartition(...).encode_within(max_payload_bytes), from the rows directly."""
        text_of = self.texts.text_of
        return ClosedPartition.dict_within({
            "schema": PARTITION_SCHEMA, "user_id": closed.user_id, "seq": closed.seq,
            "events": [{"event_id": e.event_id, "item_id": e.item_id, "action": e.action,
                        "ts": e.ts, "value": e.value, "text": text_of(e.item_id)}
                       for e in closed.events],
            "start_ts": closed.start_ts, "end_ts": closed.end_ts, "reason": closed.reason},
            self.max_payload_bytes)

    def send_partition(self, closed: ubsp.Closed, value: bytes, event) -> None:
        self._send(closed.user_id.encode(), value, event)
        metrics.PARTITIONS_CLOSED.labels(rule=closed.reason).inc()

    def publish(self, closed: ubsp.Closed, event) -> None:
        self.send_partition(closed, self.encode_partition(closed), event)

    # --- quiet users ----------------------------------------------------------------------
    def sweep_quiet(self, batch: list, touched: Touched) -> None:
        """Close caches of users who went quiet on the partitions this batch advanced."""
        quiet = self.quiet
        for key, (state, event) in touched.items():
            quiet.track(event.message.partition, key, state)
        last_of_partition = {event.message.partition: event for event in batch}
        for partition, event in last_of_partition.items():
            for key in quiet.due(partition):
                state = self.state_of(key, touched)
                if state is None:
                    continue
                closed = ubsp.sweep(state, key.decode(), quiet.watermark[partition], self.rules)
                if closed:
                    self.publish(closed, event)
                    touched[key] = (state, event)
                    quiet.track(partition, key, state)

    def rebuild_quiet_index(self) -> None:
        """Index the open caches of the stored states: at the first batch after start and
        after every rebalance, so the caches of a partition taken over from another worker are
        swept too, even for users who never send again (they stayed open forever before)."""
        self.quiet.open.clear()
        for key, state in self.states.items():
            if state and state["events"]:
                self.quiet.track(key_partition(key, self.partitions), key, ubsp.from_stored(state))

    def moved(self, generation) -> bool:
        return generation != self._indexed

    def reindex_if_moved(self, generation, settled: bool) -> None:
        """Rebuild the quiet index when the consumer generation changed (partitions may have
        moved) and the assignment is settled (no rebalance or recovery under way)."""
        if generation != self._indexed and settled:
            self.rebuild_quiet_index()
            self._indexed = generation

    def open_caches(self) -> int:
        """Open caches, as the quiet index knows them."""
        return sum(map(len, self.quiet.open.values()))


def _copy(state: ubsp.UserState) -> ubsp.UserState:
    """A copy whose lists can change without changing the original's (rows are immutable);
    the state's only lists are its cache and its recent ids (ubsp.UserState)."""
    copy = state.copy()
    copy["events"], copy["recent"] = state["events"][:], state["recent"][:]
    return copy
