"""Close the caches of users who went quiet, in event time.

`max_gap` and `max_span` are checked when a user's next event arrives; a user who never sends
another event would keep an open cache forever. Event time still advances on the user's stream
partition through other users' events, so each partition keeps a watermark (the newest event
time seen there) and an index of its users with open caches; once the watermark has moved far
enough, those caches are closed by the same rules (`streams.ubsp.sweep`).
"""
from __future__ import annotations

from collections import defaultdict

from streams.ubsp import CloseRules, UserState


class QuietUsers:
    def __init__(self, rules: CloseRules, sweep_every_s: float = 60.0):
        self.rules = rules
        self.sweep_every_s = sweep_every_s
        # partition -> user key -> (first, last event time, events) of the open cache
        self.open: dict[int, dict[bytes, tuple[float, float, int]]] = defaultdict(dict)
        self.watermark: dict[int, float] = {}
        self._swept_at: dict[int, float] = {}

    def observe(self, partition: int, ts: float) -> None:
        if ts > self.watermark.get(partition, float("-inf")):
            self.watermark[partition] = ts

    def track(self, partition: int, key: bytes, state: UserState) -> None:
        """Record whether this user has an open cache (first and last event time). Its rows
        must be EventRows (`ubsp.from_stored` for a state read from storage)."""
        events = state["events"]
        if events:
            times = [e.ts for e in events]
            self.open[partition][key] = (min(times), max(times), len(times))
        else:
            self.open[partition].pop(key, None)

    def due(self, partition: int) -> list[bytes]:
        """Users of this partition whose cache a time rule closes at the current watermark
        (checked at most once per `sweep_every_s` of event time)."""
        now = self.watermark.get(partition)
        if now is None or now - self._swept_at.get(partition, float("-inf")) < self.sweep_every_s:
            return []
        self._swept_at[partition] = now
        rules = self.rules
        return [key for key, (first, last, n) in self.open[partition].items()
                if rules.gap_due(last, n, now) or now - first > rules.max_span_s]
