"""The offline CTR protocol on MovieLens: samples, chronological features, user splits.

- Label: rating > 3 (KAR's convention).
- Users: drawn in a seeded random order among those with more than `depth` closed
  partitions, split by user into train / validation / test (no user in two splits).
- Partitions: each user's ratings in time order (ties: file order) through the real UBSP code,
  `streams.ubsp.add_event`, with the close rules (and drift rule) of the settings.
- Samples: every rating of a user after the end of the user's first partition (seq 0) and at
  most the end of partition seq `depth`: each sample has 1..depth closed partitions behind it,
  so only partitions seq 0..depth-1 need summaries.
- No leakage, by construction: for a sample at time t only behaviour with ts < t (strictly)
  is used: the history is the last `history_len` ratings with ts < t, and the partitions (thus
  summaries and vectors) are those whose last event has ts < t. A partition that closes *with*
  the sample (max_events) or holds a rating made in the same second is not used.
- Summaries of partition seq n-1 (cascade) include only partitions 0..n-1, so a vector built
  from them sees only behaviour before the sample.

The text side is kept as indices: each sample has a `state` (user, number of partitions behind
it); `VectorTable` turns states into summary-vector indices for one summary source.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from core.activity import Activity
from llm_workers.prompts import grouped
from models.layers import UNKNOWN_RATING
from models.summaries_batch import BatchPartition, SummaryText
from streams import movielens, replay
from streams import ubsp


# --- catalogue --------------------------------------------------------------------------------
@dataclass
class Catalog:
    """Item vocabulary: index 0 = padding / unknown item."""
    dataset: str
    item_index: dict[str, int]
    item_genres: np.ndarray          # [n_items + 1, G] genre indices, 0 = none
    genres: list[str]                # genre index i+1 -> name
    text: dict[str, str]             # item id -> prompt text `Title (Year) [Genres]`

    @property
    def n_items(self) -> int:
        return len(self.item_index)

    @property
    def n_genres(self) -> int:
        return len(self.genres)

    def index(self, item_id: str) -> int:
        return self.item_index.get(item_id, 0)


def load_catalog(data_dir, dataset: str) -> Catalog:
    movies = movielens.load_items(data_dir, dataset)
    genres = sorted({g for m in movies for g in m.genres})
    genre_index = {g: i + 1 for i, g in enumerate(genres)}
    width = max((len(m.genres) for m in movies), default=1) or 1
    item_genres = np.zeros((len(movies) + 1, width), dtype=np.int64)
    item_index = {}
    for i, movie in enumerate(movies, 1):
        item_index[movie.item_id] = i
        for j, g in enumerate(movie.genres):
            item_genres[i, j] = genre_index[g]
    text = {m.item_id: replay.movie_item(m).text() for m in movies}
    return Catalog(dataset, item_index, item_genres, genres, text)


# --- users and partitions ---------------------------------------------------------------------
@dataclass
class UserHistory:
    user_id: str
    item_ids: list[str]
    ratings: list[float]
    ts: list[int]
    partitions: list[ubsp.Closed] = field(default_factory=list)

    def end_ts(self) -> list[float]:
        return [p.end_ts for p in self.partitions]


def group_ratings(ratings: Sequence[movielens.Rating]) -> dict[str, UserHistory]:
    """Ratings (sorted by time, ties in file order, as movielens.load_ratings gives them)."""
    users: dict[str, UserHistory] = {}
    for r in ratings:
        h = users.get(r.user_id)
        if h is None:
            h = users[r.user_id] = UserHistory(r.user_id, [], [], [])
        h.item_ids.append(r.item_id)
        h.ratings.append(r.rating)
        h.ts.append(r.ts)
    return users


def partition_user(history: UserHistory, rules: ubsp.CloseRules, *,
                   drift: Callable[[list[str], str], bool] | None = None,
                   dataset: str = "ml") -> None:
    """Cut the user's ratings into partitions with the stream worker's UBSP code. The cache
    still open at the end is not a partition (nothing closed it yet)."""
    state = ubsp.new_state()
    history.partitions = []
    for n, (item, rating, ts) in enumerate(zip(history.item_ids, history.ratings, history.ts)):
        outcome, closed = ubsp.add_event(state, history.user_id, f"{dataset}:{history.user_id}:{n}",
                                                item, "rate", float(ts), rating, rules, drift)
        if outcome != ubsp.ACCEPTED:
            raise RuntimeError(f"user {history.user_id}: event {n} was {outcome}; ratings must "
                               "come in time order without duplicates")
        history.partitions.extend(closed)


def batch_partitions(history: UserHistory, catalog: Catalog, depth: int) -> list[BatchPartition]:
    """The user's first `depth` partitions with the item text the stream worker joins in."""
    out = []
    for part in history.partitions[:depth]:
        activities = tuple(Activity(catalog.text.get(e.item_id, f"item {e.item_id}"), e.action, e.value)
                           for e in part.events)
        out.append(BatchPartition(history.user_id, part.seq, activities, part.end_ts))
    return out


def partition_text(part: BatchPartition, max_title_chars: int = 60) -> str:
    """The partition's own item text (no LLM), grouped by rating as the prompt shows it."""
    return " ".join(grouped(part.activities, max_title_chars))


def shuffled_users(histories: dict[str, UserHistory], seed: int) -> list[str]:
    """All user ids in a seeded random order (independent of dict order)."""
    pool = sorted(histories, key=lambda u: (len(u), u))
    random.Random(seed).shuffle(pool)
    return pool


def split_users(chosen: Sequence[str], fractions: tuple[float, float] = (0.7, 0.15)
                ) -> dict[str, list[str]]:
    """Split drawn users train / validation / test (at least one each when there are 3)."""
    n = len(chosen)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, n - round(n * fractions[0]) - n_val) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": list(chosen[:n_train]), "val": list(chosen[n_train:n_train + n_val]),
            "test": list(chosen[n_train + n_val:])}


# --- samples ----------------------------------------------------------------------------------
@dataclass
class Samples:
    """CTR samples of one split, as numpy arrays (row i = one rating)."""
    user: np.ndarray          # [N] index into `users`
    item: np.ndarray          # [N] item index
    label: np.ndarray         # [N] float32 0/1
    hist: np.ndarray          # [N, L] item indices, oldest first, left padded with 0
    hist_rating: np.ndarray   # [N, L] 1..5, 0 = pad
    known: np.ndarray         # [N] partitions closed strictly before the sample
    ts: np.ndarray            # [N] sample time
    users: list[str]

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def from_rows(cls, user, item, label, hist, hist_rating, known, ts, users, width: int
                  ) -> "Samples":
        i64 = np.int64
        return cls(user=np.asarray(user, dtype=i64), item=np.asarray(item, dtype=i64),
                   label=np.asarray(label, dtype=np.float32),
                   hist=np.asarray(hist, dtype=i64).reshape(-1, width),
                   hist_rating=np.asarray(hist_rating, dtype=i64).reshape(-1, width),
                   known=np.asarray(known, dtype=i64), ts=np.asarray(ts, dtype=i64),
                   users=users)


def build_samples(histories: Sequence[UserHistory], catalog: Catalog, depth: int,
                  history_len: int = 50) -> Samples:
    """Samples of these users: ratings with 1..depth partitions closed strictly before them."""
    rows_user, rows_item, rows_label, rows_known, rows_ts = [], [], [], [], []
    hist = []
    hist_rating = []
    for u, h in enumerate(histories):
        ends = h.end_ts()
        if len(ends) < 1:
            continue
        # partitions seq 1..depth: seq 0..depth-1 (the summarised ones) lie behind them
        limit = ends[depth] if len(ends) > depth else float("inf")
        for n, (item, rating, ts) in enumerate(zip(h.item_ids, h.ratings, h.ts)):
            known = bisect.bisect_left(ends, ts)   # partitions whose last event is < ts
            if known < 1 or ts > limit:
                continue
            items, rates = history_window(h, ts, catalog, history_len)
            hist.append(items)
            hist_rating.append(rates)
            rows_user.append(u)
            rows_item.append(catalog.index(item))
            rows_label.append(1.0 if rating > 3 else 0.0)
            rows_known.append(min(known, depth))
            rows_ts.append(ts)
    return Samples.from_rows(rows_user, rows_item, rows_label, hist, hist_rating, rows_known,
                             rows_ts, [h.user_id for h in histories], history_len)


def history_window(h: UserHistory, ts: float, catalog: Catalog, width: int
                   ) -> tuple[list[int], list[int]]:
    """The last `width` ratings strictly before `ts` (item indices, ratings), oldest first,
    left padded with 0 to `width`."""
    before = bisect.bisect_left(h.ts, ts)      # ratings with ts < the sample's (sorted)
    start = max(0, before - width)
    items = [catalog.index(i) for i in h.item_ids[start:before]]
    rates = [int(r) for r in h.ratings[start:before]]
    pad = width - len(items)
    return [0] * pad + items, [0] * pad + rates


# --- summary vectors --------------------------------------------------------------------------
class StateTable:
    """Per (user, known) state: the matrix rows of the latest K partition vectors (newest
    first) and of the lifelong one, row 0 meaning none. Subclasses fill `states` and build
    the matrix."""

    def __init__(self, k: int):
        self.k = k
        self.states: dict[tuple[str, int], tuple[list[int], int]] = {}

    def lookup(self, samples: Samples) -> tuple[np.ndarray, np.ndarray]:
        """([N, K] partition-summary rows, [N] cascaded rows) for the samples (0 = none)."""
        parts = np.zeros((len(samples), self.k), dtype=np.int64)
        cascaded = np.zeros(len(samples), dtype=np.int64)
        for i, (u, known) in enumerate(zip(samples.user, samples.known)):
            p, c = self.states.get((samples.users[u], int(known)), ([0] * self.k, 0))
            parts[i], cascaded[i] = p, c
        return parts, cascaded


class VectorTable(StateTable):
    """Summary texts -> one matrix of encoder vectors (row 0 = nothing), and per (user, known)
    state the indices of the latest K partition summaries (newest first) and the cascaded one.

    `sources[user]` lists the user's summaries by seq (None where generation failed); the
    state with `known` = n uses seq n-1 ... n-K, and the cascaded summary of the newest seq
    < n that succeeded (the worker keeps the previous profile when a partition fails)."""

    def __init__(self, k: int):
        super().__init__(k)
        self.texts: list[str] = []
        self._row: dict[str, int] = {}

    def _index(self, text: str | None) -> int:
        if not text:
            return 0
        if text not in self._row:
            self.texts.append(text)
            self._row[text] = len(self.texts)
        return self._row[text]

    def add_user(self, user_id: str, summaries: Sequence[SummaryText | None], depth: int) -> None:
        for known in range(0, depth + 1):
            seen = list(summaries[:known])
            parts = [self._index(s.partition_summary) if s else 0 for s in reversed(seen)][: self.k]
            parts += [0] * (self.k - len(parts))
            cascaded = next((self._index(s.cascaded_summary) for s in reversed(seen) if s), 0)
            self.states[user_id, known] = (parts, cascaded)

    def matrix(self, encode: Callable[[list[str]], np.ndarray], dim: int) -> np.ndarray:
        out = np.zeros((len(self.texts) + 1, dim), dtype=np.float32)
        if self.texts:
            out[1:] = encode(self.texts)
        return out


def unknown_ratings(hist_rating: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Training-time dropout: hide some history ratings (UNKNOWN_RATING), so the model also
    scores histories whose ratings a ranker does not know."""
    if rate <= 0:
        return hist_rating
    hide = (rng.random(hist_rating.shape) < rate) & (hist_rating > 0)
    return np.where(hide, UNKNOWN_RATING, hist_rating)
