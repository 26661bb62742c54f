"""The lifelong protocol's data: long histories, late samples, short and long windows.

LIBER's claim is that a ranker that can afford only a short recent window of behaviour gains
from vectors that compress the user's *whole* earlier history. So:

- Users: MovieLens users with at least `min_ratings` ratings, drawn in a seeded random order.
  Each user's history is their first `max_history` ratings (in time order): the LLM cost of a
  user grows with their partitions, and the cap keeps the heaviest users from dominating it.
- Split by user (train / validation / test, 70/15/15): no test user's behaviour, summary or
  vector trains the ranker or the fusion. Every split takes its samples from the same late part
  of each history, so the ranker is trained at the depths it is tested at.
- Samples: the ratings in the last `sample_share` of each (capped) history. For a sample at
  time t the backbone sees the last `window` ratings with ts < t (`base`), or the last
  `long_window` (`base_long`); the vectors come from every partition whose last event has
  ts < t, so they carry the history the short window does not.
- No leakage, as in the earlier protocol (models/ctr_data.py): everything a sample uses has
  ts strictly below the sample's.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from models.ctr_data import Catalog, Samples, StateTable, UserHistory, history_window


@dataclass(frozen=True)
class LifelongConfig:
    """Args:
        min_ratings: users with at least this many ratings take part.
        max_history: a user's history is cut to their first this many ratings.
        sample_share: samples are the ratings of the last share of the (cut) history.
        window: ratings the short-window ranker sees (KAR's ctr_hist_len is 10).
        long_window: ratings the long-window ranker sees.
    """
    min_ratings: int = 100
    max_history: int = 200
    sample_share: float = 0.2
    window: int = 10
    long_window: int = 200


def cut(history: UserHistory, max_history: int) -> UserHistory:
    """The user's first `max_history` ratings (partitions are cut again afterwards)."""
    n = max_history
    return UserHistory(history.user_id, history.item_ids[:n], history.ratings[:n],
                       history.ts[:n])


def sample_start(history: UserHistory, share: float) -> int:
    """Index of the first sampled rating: the last `share` of the history."""
    return len(history.ts) - max(1, int(round(len(history.ts) * share)))


def partitions_needed(history: UserHistory) -> int:
    """Partitions closed strictly before the user's last sample: all a sample can use."""
    last_ts = history.ts[-1]
    return bisect.bisect_left([p.end_ts for p in history.partitions], last_ts)


def build_samples(histories: Sequence[UserHistory], catalog: Catalog, cfg: LifelongConfig
                  ) -> Samples:
    """Samples of these users with `long_window` history columns (oldest first, left padded);
    `known` = partitions closed strictly before the sample (uncapped)."""
    width = cfg.long_window
    rows_user, rows_item, rows_label, rows_known, rows_ts, hist, hist_rating = ([] for _ in range(7))
    for u, h in enumerate(histories):
        ends = [p.end_ts for p in h.partitions]
        for n in range(sample_start(h, cfg.sample_share), len(h.ts)):
            ts = h.ts[n]
            items, rates = history_window(h, ts, catalog, width)
            hist.append(items)
            hist_rating.append(rates)
            rows_user.append(u)
            rows_item.append(catalog.index(h.item_ids[n]))
            rows_label.append(1.0 if h.ratings[n] > 3 else 0.0)
            rows_known.append(bisect.bisect_left(ends, ts))  # partitions whose last event < ts
            rows_ts.append(ts)
    return Samples.from_rows(rows_user, rows_item, rows_label, hist, hist_rating, rows_known,
                             rows_ts, [h.user_id for h in histories], width)


def with_window(samples: Samples, window: int) -> Samples:
    """The same samples with only the last `window` history columns (the most recent)."""
    return replace(samples, hist=np.ascontiguousarray(samples.hist[:, -window:]),
                   hist_rating=np.ascontiguousarray(samples.hist_rating[:, -window:]))


class AggregateTable(StateTable):
    """The cheap alternative to the LLM: each partition condensed to the rating-weighted mean
    of its items' text vectors, and the lifelong history to the same mean over every closed
    partition. The same states and lookup as `ctr_data.VectorTable`, so it goes through the
    same fusion.

    Weights are rating - 3 (liked items pull towards, disliked away; a 3 counts for nothing),
    falling back to the plain mean when every rating is a 3."""

    def __init__(self, k: int, item_vectors: dict[str, np.ndarray], dim: int):
        super().__init__(k)
        self.dim = dim
        self.item_vectors = item_vectors
        self.rows: list[np.ndarray] = []

    def _row(self, vector: np.ndarray | None) -> int:
        if vector is None:
            return 0
        self.rows.append(vector.astype(np.float32))
        return len(self.rows)

    def _mean(self, events) -> tuple | None:
        """(weighted sum, plain sum, total |weight|, count) of the events' item vectors."""
        vectors = [(self.item_vectors[e.item_id], (e.value if e.value is not None else 3.0) - 3.0)
                   for e in events if e.item_id in self.item_vectors]
        if not vectors:
            return None
        v = np.stack([x for x, _ in vectors])
        w = np.asarray([x for _, x in vectors], dtype=np.float32)
        return (w[:, None] * v).sum(0), v.sum(0), np.abs(w).sum(), len(vectors)

    @staticmethod
    def _finish(weighted, plain, total_w, count) -> np.ndarray:
        out = weighted / total_w if total_w > 0 else plain / count
        if np.linalg.norm(out) < 1e-6:     # likes and dislikes cancel out: what was rated
            out = plain / count
        norm = np.linalg.norm(out)
        return out / norm if norm > 0 else out

    def add_user(self, history: UserHistory, depth: int) -> None:
        part_rows: list[int] = []
        acc = None
        cascaded_rows = [0]
        for part in history.partitions[:depth]:
            m = self._mean(part.events)
            part_rows.append(self._row(self._finish(*m) if m else None))
            if m:
                acc = m if acc is None else tuple(a + b for a, b in zip(acc, m))
            cascaded_rows.append(self._row(self._finish(*acc)) if acc else 0)
        for known in range(depth + 1):
            parts = list(reversed(part_rows[:known]))[: self.k]
            parts += [0] * (self.k - len(parts))
            self.states[history.user_id, known] = (parts, cascaded_rows[known])

    def matrix(self) -> np.ndarray:
        out = np.zeros((len(self.rows) + 1, self.dim), dtype=np.float32)
        if self.rows:
            out[1:] = np.stack(self.rows)
        return out
