"""UBSP: cut one user's behaviour stream into partitions. Pure logic, no Kafka, no I/O.

A user's state is a small JSON-able dict (it lives in a RocksDB-backed Faust table), see
`UserState`:

    {"seq": next partition number, "events": open cache [[event_id, item_id, action, ts, value]],
     "recent": last event ids (duplicate filter), "watermark": max event time seen}

Event rows are `EventRow` named tuples; JSON writes a tuple as a list, so the stored state is
the same as before rows had names. A state read back from storage has plain lists: pass it
through `from_stored` before these functions read its rows by name.

Close rules, checked in this order, any one closes (the reason is recorded):
  max_gap   - the new event comes more than `max_gap_s` after the cache's last event: the cache
              closes *before* the new event, which starts the next cache. Only a cache of at
              least `min_gap_events` events: a smaller one is not worth an LLM call of its
              own (a fixed prompt and answer for one or two ratings), so it stays open and
              the user's next session joins it, until max_span or max_events closes it;
  max_span  - the new event comes more than `max_span_s` after the cache's first event: same;
  drift     - (optional) the new item's embedding is farther than a threshold from the cache
              centroid (streams/drift.py): the cache closes *before* the new event;
  max_events- after adding, the cache holds `max_events` events: it closes *with* the event.
Lateness: an event older than the user's watermark minus `max_lateness_s` is `late` (the caller
dead-letters it); a less late one joins the open cache (partitions keep events in time order).
Duplicates: an `event_id` among the last `dedup_window` ids of the user is counted once, and so
is an event at or before `backfill_until` (history already loaded by `liber backfill`).
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Callable, NamedTuple, NotRequired, TypedDict

ACCEPTED, DUPLICATE, LATE = "accepted", "duplicate", "late"


class EventRow(NamedTuple):
    """One event of an open cache or a closed partition, stored as a 5-element JSON list."""
    event_id: str
    item_id: str
    action: str
    ts: float
    value: float | None


class UserState(TypedDict):
    """The keys of a user's state (a plain dict at run time: this is its stored JSON)."""
    seq: int  # the number the next closed partition gets
    events: list[EventRow]  # the open cache, in arrival order
    recent: list[str]  # the last `dedup_window` event ids (duplicate filter)
    watermark: float | None  # the newest event time seen
    offset: NotRequired[int]  # the worker's: input offset of the last event applied
    backfill_until: NotRequired[float]  # `liber backfill`'s: events at or before are loaded


_TS = itemgetter(3)  # an EventRow's ts, at C speed (the close rules scan every cache)


def as_rows(events) -> list[EventRow]:
    """Rows as EventRows, from JSON lists or EventRows."""
    return [row if type(row) is EventRow else EventRow(*row) for row in events]


def from_stored(state: dict) -> UserState:
    """A state as storage returns it (rows as JSON lists) with its rows as EventRows, in place."""
    state["events"] = as_rows(state["events"])
    return state


@dataclass(frozen=True)
class CloseRules:
    max_events: int = 20
    max_gap_s: float = 6 * 3600.0
    max_span_s: float = 30 * 24 * 3600.0
    max_lateness_s: float = 3600.0
    dedup_window: int = 64
    min_gap_events: int = 5

    @classmethod
    def from_settings(cls, settings) -> "CloseRules":
        return cls(max_events=settings.max_events, max_gap_s=settings.max_gap_s,
                   max_span_s=settings.max_span_s, max_lateness_s=settings.max_lateness_s,
                   dedup_window=settings.dedup_window,
                   min_gap_events=settings.min_gap_events)

    def gap_closes(self, cache: list[EventRow], now: float) -> bool:
        """Whether the gap rule closes `cache` at event time `now` (a small cache waits)."""
        return bool(cache) and self.gap_due(max(map(_TS, cache)), len(cache), now)

    def gap_due(self, last: float, events: int, now: float) -> bool:
        """The gap rule for a cache known by its last event time and size (the sweep's index)."""
        return events >= self.min_gap_events and now - last > self.max_gap_s


@dataclass(frozen=True)
class Closed:
    """A partition that just closed: its events in time order."""
    user_id: str
    seq: int
    events: list[EventRow]
    reason: str

    def __post_init__(self):  # rows given as lists (read back from storage) get their names
        if not all(type(row) is EventRow for row in self.events):
            object.__setattr__(self, "events", as_rows(self.events))

    @property
    def start_ts(self) -> float:
        return self.events[0].ts

    @property
    def end_ts(self) -> float:
        return self.events[-1].ts


def new_state() -> UserState:
    return {"seq": 0, "events": [], "recent": [], "watermark": None}


def _close(user_id: str, state: UserState, reason: str) -> Closed:
    events = sorted(state["events"], key=lambda e: e.ts)  # stable: arrival order on ties
    closed = Closed(user_id, state["seq"], events, reason)
    state["seq"] += 1
    state["events"] = []
    return closed


def add_event(state: UserState, user_id: str, event_id: str, item_id: str, action: str, ts: float,
              value: float | None, rules: CloseRules,
              drift: Callable[[list[str], str], bool] | None = None) -> tuple[str, list[Closed]]:
    """Apply one event to `state` in place; returns (outcome, partitions closed by it).
    `drift(cache item ids, new item id)` says whether the new item drifts from the cache."""
    until = state.get("backfill_until")
    if until is not None and ts <= until:
        return DUPLICATE, []
    recent, cache = state["recent"], state["events"]
    # `recent` and the cache both end with the newest accepted events, so the cache's ids are
    # in `recent` unless the cache is the longer one (a dedup window below max_events)
    if event_id in recent or (len(cache) > len(recent)
                              and any(e.event_id == event_id for e in cache)):
        return DUPLICATE, []
    watermark = state["watermark"]
    if watermark is not None and ts < watermark - rules.max_lateness_s:
        return LATE, []
    closed: list[Closed] = []
    if cache:
        if rules.gap_closes(cache, ts):
            closed.append(_close(user_id, state, "max_gap"))
        elif ts - min(map(_TS, cache)) > rules.max_span_s:
            closed.append(_close(user_id, state, "max_span"))
        elif drift is not None and drift([e.item_id for e in cache], item_id):
            closed.append(_close(user_id, state, "drift"))
    state["events"].append(EventRow(event_id, item_id, action, ts, value))
    state["watermark"] = ts if watermark is None else max(watermark, ts)
    recent.append(event_id)
    if len(recent) > rules.dedup_window:
        del recent[: len(recent) - rules.dedup_window]
    if len(state["events"]) >= rules.max_events:
        closed.append(_close(user_id, state, "max_events"))
    return ACCEPTED, closed


def sweep(state: UserState, user_id: str, now_event_time: float, rules: CloseRules) -> Closed | None:
    """Close a quiet user's cache once event time has moved past its gap or span limit."""
    cache = state["events"]
    if not cache:
        return None
    if rules.gap_closes(cache, now_event_time):
        return _close(user_id, state, "max_gap")
    if now_event_time - min(map(_TS, cache)) > rules.max_span_s:
        return _close(user_id, state, "max_span")
    return None
