"""UBSP drift rule: close the cache when the new item moves away from the cache's interest.

Each item has a text vector: all-MiniLM-L6-v2 (unit length) over `vector_text(prompt text)`,
e.g. `animation, children's, comedy movie: Toy Story` for the prompt text `Toy Story (1995)
[Animation|Children's|Comedy]` that the `item-text` table holds. The cache centroid is the mean
of its items' vectors, normalised; the new item *drifts* when

    drift_distance = 1 - cos(centroid, new item) > threshold

and the cache already holds at least `min_events` events (a minimum partition size, so a
cache of one or two items never closes on noise). Like `max_gap`, a drift close happens
*before* the new event: the drifting item starts the next cache. Items without a vector
(text unknown) neither trigger the rule nor weigh on the centroid. A threshold of 0 disables it.

Default threshold 0.55, min_events 5 (settings `drift_threshold`, `drift_min_events`), measured
on MovieLens-1M with `python -m streams.drift --dataset ml-1m --thresholds 0.5,0.53,0.55,0.57,0.6`
(default count/gap/span rules, drift checked after them): the 711,229 events that meet a cache
of >= 5 events have distances p10 0.262, median 0.352, p90 0.457, p95 0.488, p99 0.546,
p99.9 0.614. A threshold near p99 is rare per check, but a cache meets up to 15 checks, so
0.55 closes 10.0% of all partitions by drift (6,405 of 63,860; 60,098 partitions without
drift); 0.5 would close 34%, 0.53 17%, 0.57 5.5%, 0.6 1.9%. For the record, on the raw prompt
text the same share needed 0.7 and ranked a horror film after five animated ones only at
p84-p99 of the distances; with `vector_text` it ranks at p99.7+ (0.58-0.63 > 0.55), while
further animated films stay at 0.17-0.31.

Vectors are stored compactly, so the store can be a RocksDB or Faust GlobalTable value keyed by
the item id's UTF-8 bytes: 384 float16 values, little endian (768 bytes), then the first 8
bytes of the SHA-1 of the text they encode (a changed title is re-encoded, an unchanged one never).
The GlobalTable's name is ITEM_VECTORS_TABLE; `liber backfill` fills its changelog so that a
worker started afterwards uses the very vectors the backfill used (bit-identical decisions).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Callable

import numpy as np

DIM = 384
ITEM_VECTORS_TABLE = "item-vectors"  # Faust GlobalTable: item id bytes -> stored vector
_F16 = np.dtype("<f2")
DIGEST_BYTES = 8
VECTOR_BYTES = DIM * _F16.itemsize
VALUE_BYTES = VECTOR_BYTES + DIGEST_BYTES


_PROMPT = re.compile(r"^(?P<title>.*?)(?:\s*\[(?P<genres>[^\[\]]*)\])?$", re.S)
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
KIND = "movie"  # the noun after the genres; the catalogue here is MovieLens


def vector_text(prompt_text: str) -> str:
    """The text an item's vector encodes, from its prompt text (records.Item.text(), what the
    `item-text` table holds): `Toy Story (1995) [Animation|Children's|Comedy]` becomes
    `animation, children's, comedy movie: Toy Story`. Genres first and the year dropped: on
    MovieLens-1M this separates genre shifts from title noise far better than the prompt text
    (a horror film after five animated ones ranks at p99.7+ of consecutive-event distances,
    against p84-p99 with the prompt text as it is)."""
    match = _PROMPT.match(prompt_text.strip())
    title = _YEAR.sub("", match.group("title")).strip() or match.group("title")
    genres = [g.strip().lower() for g in (match.group("genres") or "").split("|") if g.strip()]
    return f"{', '.join(genres)} {KIND}: {title}" if genres else title


def text_digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()[:DIGEST_BYTES]


def encode_vector(vector: np.ndarray, text: str = "") -> bytes:
    """A vector (and the digest of the text it encodes) as its compact stored value."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape[0] != DIM:
        raise ValueError(f"vector has {vector.shape[0]} values, expected {DIM}")
    return vector.astype(_F16).tobytes() + text_digest(text)


def decode_vector(value: bytes) -> np.ndarray:
    """Stored value -> float32 vector (a copy, safe to keep)."""
    if len(value) != VALUE_BYTES:
        raise ValueError(f"stored vector has {len(value)} bytes, expected {VALUE_BYTES}")
    return np.frombuffer(value, dtype=_F16, count=DIM).astype(np.float32)


def drift_distance(cache_vectors: np.ndarray, new_vector: np.ndarray) -> float:
    """1 - cosine between the normalised centroid of `cache_vectors` [n, d] and `new_vector`.

    0 means the same direction, 1 orthogonal, up to 2 opposite. An empty cache (or a zero
    centroid) has no direction: distance 0, so it never closes anything.
    """
    cache_vectors = np.asarray(cache_vectors, dtype=np.float32)
    new_vector = np.asarray(new_vector, dtype=np.float32).reshape(-1)
    if cache_vectors.ndim != 2 or cache_vectors.shape[0] == 0:
        return 0.0
    centroid = cache_vectors.sum(axis=0)  # same direction as the mean
    c_norm = float(np.linalg.norm(centroid))
    v_norm = float(np.linalg.norm(new_vector))
    if c_norm == 0.0 or v_norm == 0.0:
        return 0.0
    return 1.0 - float(centroid @ new_vector) / (c_norm * v_norm)


class Overlay(MutableMapping):
    """Reads a shared store (e.g. the `item-vectors` GlobalTable), keeps its own writes in
    process: for vectors the behaviours path encodes on demand, where writing a global table
    is not the agent's business. `local` holds those writes."""

    def __init__(self, base: Mapping):
        self.base = base
        self.local: dict[bytes, bytes] = {}

    def __getitem__(self, key: bytes) -> bytes:
        try:
            return self.local[key]
        except KeyError:
            value = self.base.get(key)
            if value is None:
                raise KeyError(key) from None
            return value

    def get(self, key, default=None):
        value = self.local.get(key)
        if value is None:
            value = self.base.get(key)
        return default if value is None else value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.local[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self.local[key]

    def __iter__(self):
        return iter({*self.local, *self.base})

    def __len__(self) -> int:
        return len({*self.local, *self.base})


class ItemVectors:
    """item_id -> unit text vector, filled in batches from item text.

    `store` is any mutable mapping of item-id bytes to stored values (a dict, a rocksdict Rdict,
    a Faust GlobalTable with raw bytes values). Decoded float32 vectors are also kept in process
    as rows of one growing matrix (3,883 MovieLens-1M movies take 6 MB), so the hot path is a
    dict lookup per item plus one gather. A vector another process writes to `store` is picked
    up on first use; one it *replaces* is seen here after `forget(item_id)` or `put_*`.
    """

    def __init__(self, store: MutableMapping | None = None, encoder=None):
        self.store = {} if store is None else store
        self._encoder = encoder
        self._index: dict[str, int] = {}
        self._matrix = np.empty((64, DIM), dtype=np.float32)
        self.encoded = 0  # texts run through the encoder by this object

    @property
    def encoder(self):
        if self._encoder is None:
            from models.text_encoder import TextEncoder
            self._encoder = TextEncoder()
        return self._encoder

    # --- lookups ------------------------------------------------------------------------
    def _row(self, item_id: str) -> int | None:
        row = self._index.get(item_id)
        if row is None:
            value = self.store.get(item_id.encode("utf-8"))
            if value is None:
                return None
            row = self._keep(item_id, decode_vector(bytes(value)))
        return row

    def _keep(self, item_id: str, vector: np.ndarray) -> int:
        row = self._index.get(item_id)
        if row is None:
            row = len(self._index)
            if row == self._matrix.shape[0]:
                grown = np.empty((2 * row, DIM), dtype=np.float32)
                grown[:row] = self._matrix
                self._matrix = grown
            self._index[item_id] = row
        self._matrix[row] = vector
        return row

    def get(self, item_id: str) -> np.ndarray | None:
        row = self._row(item_id)
        return None if row is None else self._matrix[row].copy()

    def __contains__(self, item_id: str) -> bool:
        return self._row(item_id) is not None

    def __len__(self) -> int:
        return len(self._index)

    def forget(self, item_id: str) -> None:
        """Drop the in-process copy (the store is untouched); the next lookup re-reads it."""
        row = self._index.pop(item_id, None)
        if row is not None:  # keep rows dense: move the last row into the hole
            last = len(self._index)
            if row != last:
                moved = next(k for k, v in self._index.items() if v == last)
                self._matrix[row] = self._matrix[last]
                self._index[moved] = row

    def matrix(self, item_ids: Iterable[str]) -> np.ndarray:
        """Stacked vectors of the items that have one ([k, 384], k <= len(item_ids))."""
        rows = [row for row in map(self._row, item_ids) if row is not None]
        return self._matrix.take(rows, axis=0)

    def distance(self, cache_item_ids: Iterable[str], new_item_id: str) -> float | None:
        """`drift_distance` of a new item against a cache of items; None when the new item or
        every cache item lacks a vector. The hot path of the drift rule (about 10 us)."""
        new = self._row(new_item_id)
        if new is None:
            return None
        rows = [row for row in map(self._row, cache_item_ids) if row is not None]
        if not rows:
            return None
        centroid = np.add.reduce(self._matrix.take(rows, axis=0), axis=0)
        norm = float(np.sqrt(centroid.dot(centroid)))
        vector = self._matrix[new]
        v_norm = float(np.sqrt(vector.dot(vector)))
        if norm == 0.0 or v_norm == 0.0:
            return 0.0
        return 1.0 - float(centroid.dot(vector)) / (norm * v_norm)

    # --- filling ------------------------------------------------------------------------
    def put_vector(self, item_id: str, vector: np.ndarray, text: str = "") -> bytes:
        """Store one vector; returns the stored value."""
        value = encode_vector(vector, text)
        self.store[item_id.encode("utf-8")] = value
        # Keep what a reader of the store gets (float16-rounded), so every process agrees.
        self._keep(item_id, decode_vector(value))
        return value

    def is_current(self, item_id: str, text: str) -> bool:
        """True when the stored vector of `item_id` encodes exactly `text`."""
        value = self.store.get(item_id.encode("utf-8"))
        return value is not None and bytes(value[VECTOR_BYTES:]) == text_digest(text)

    def _stale(self, texts) -> list[tuple[str, str]]:
        pairs = texts.items() if isinstance(texts, Mapping) else texts
        return [(item_id, text) for item_id, text in pairs if not self.is_current(item_id, text)]

    async def put_texts_off_loop(self, texts: Mapping[str, str], *,
                                 batch_size: int = 64) -> dict[str, bytes]:
        """`put_texts` for an event loop: the encoder runs in a worker thread, one small batch
        at a time, so the loop keeps processing events meanwhile (encoding a catalogue of
        thousands of titles took minutes of the stream worker's loop); vectors are stored on
        the loop's thread. An item stored meanwhile (by an on-demand encode) is kept as is."""
        import asyncio
        loop = asyncio.get_running_loop()
        written: dict[str, bytes] = {}
        todo = self._stale(texts)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            matrix = await loop.run_in_executor(
                None, self.encoder.encode, [vector_text(text) for _, text in chunk])
            self.encoded += len(chunk)
            for (item_id, text), vector in zip(chunk, matrix):
                if not self.is_current(item_id, text):
                    written[item_id] = self.put_vector(item_id, vector, text)
        return written

    def put_texts(self, texts: Mapping[str, str] | Iterable[tuple[str, str]], *,
                  batch_size: int = 256) -> dict[str, bytes]:
        """Encode, in batches, items by their prompt text (records.Item.text(); the encoder sees
        `vector_text` of it) where the stored vector is missing or was made from another text;
        returns {item_id: stored value} of the ones encoded."""
        todo = self._stale(texts)
        written: dict[str, bytes] = {}
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            matrix = self.encoder.encode([vector_text(text) for _, text in chunk], batch_size=64)
            self.encoded += len(chunk)
            for (item_id, text), vector in zip(chunk, matrix):
                written[item_id] = self.put_vector(item_id, vector, text)
        return written

    def ensure(self, item_ids: Iterable[str], text_of: Callable[[str], str | None]) -> int:
        """Encode (one batch) the items among `item_ids` that have no vector but whose text
        `text_of` knows; returns how many. The worker's fallback for items whose vector the
        items agent has not written yet."""
        index = self._index
        missing = [i for i in item_ids if i not in index and self._row(i) is None]
        if not missing:
            return 0
        texts = {}
        for item_id in missing:
            text = text_of(item_id)
            if text:
                texts[item_id] = text
        return len(self.put_texts(texts)) if texts else 0


def should_close_for_drift(cache_item_ids: list[str], new_item_id: str, vectors: ItemVectors,
                           threshold: float, min_events: int) -> bool:
    """True when the open cache (its items' ids) must close before `new_item_id` joins it."""
    if threshold <= 0 or len(cache_item_ids) < min_events:
        return False
    distance = vectors.distance(cache_item_ids, new_item_id)
    return distance is not None and distance > threshold


class DriftRule:
    """The rule as the callable `ubsp.add_event(..., drift=)` takes:
    `rule(cache_item_ids, new_item_id) -> bool`.

    With `text_of` (item id -> catalogue text, None when unknown), items without a vector are
    encoded on first use, so a decision never depends on whether a batch encoder got there first.
    """

    def __init__(self, vectors: ItemVectors, threshold: float, min_events: int,
                 text_of: Callable[[str], str | None] | None = None):
        self.vectors = vectors
        self.threshold = threshold
        self.min_events = min_events
        self.text_of = text_of

    @classmethod
    def from_settings(cls, settings, vectors: ItemVectors,
                      text_of: Callable[[str], str | None] | None = None) -> "DriftRule | None":
        """None when `drift_threshold` is 0 (rule disabled)."""
        if settings.drift_threshold <= 0:
            return None
        return cls(vectors, settings.drift_threshold, settings.drift_min_events, text_of)

    def __call__(self, cache_item_ids: list[str], new_item_id: str) -> bool:
        if len(cache_item_ids) < self.min_events:
            return False
        if self.text_of is not None:
            self.vectors.ensure([*cache_item_ids, new_item_id], self.text_of)
        return should_close_for_drift(cache_item_ids, new_item_id, self.vectors, self.threshold,
                                      self.min_events)


# --- measuring the threshold -------------------------------------------------------------------
def measure(dataset: str = "ml-1m", home: str | None = None, thresholds=(0.6, 0.65, 0.7, 0.75),
            min_events: int = 5, log=print) -> dict:
    """Distances of consecutive MovieLens events to their cache, and what each threshold would
    close, under the default count/gap/span rules. What the default threshold rests on."""
    import time

    from core.settings import Settings
    from streams import movielens
    from streams import ubsp
    from streams.replay import movie_item

    settings = Settings.load(home=home)
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    vectors = ItemVectors()
    start = time.monotonic()
    vectors.put_texts({m.item_id: movie_item(m).text() for m in movielens.load_items(data_dir, dataset)})
    log(f"{dataset}: {len(vectors)} item texts encoded in {time.monotonic() - start:.1f}s")
    ratings = movielens.load_ratings(data_dir, dataset)
    rules = ubsp.CloseRules.from_settings(settings)

    def run(rule) -> tuple[dict, list]:
        states: dict[str, dict] = {}
        reasons: dict[str, int] = {}
        distances = []
        for r in ratings:
            state = states.get(r.user_id) or states.setdefault(r.user_id, ubsp.new_state())
            closed = []
            cache = state["events"]
            ts = float(r.ts)
            # The proposed order in add_event: max_gap, max_span, then drift, all before adding.
            if (cache and not rules.gap_closes(cache, ts)
                    and ts - min(e.ts for e in cache) <= rules.max_span_s
                    and len(cache) >= min_events):
                distance = vectors.distance([e.item_id for e in cache], r.item_id)
                if rule is None:
                    distances.append(distance)
                elif distance is not None and distance > rule:
                    closed.append(ubsp._close(r.user_id, state, "drift"))
            _, more = ubsp.add_event(state, r.user_id, str(r.line), r.item_id, "rate", ts,
                                            r.rating, rules)
            for part in closed + more:
                reasons[part.reason] = reasons.get(part.reason, 0) + 1
        return reasons, distances

    base, distances = run(None)
    d = np.array([x for x in distances if x is not None])
    out = {"dataset": dataset, "min_events": min_events, "checked_events": int(d.size),
           "percentiles": {str(p): round(float(np.percentile(d, p)), 4)
                           for p in (10, 25, 50, 75, 90, 95, 99, 99.9)},
           "without_drift": {"closes": sum(base.values()), "by_rule": base}, "thresholds": []}
    for threshold in thresholds:
        reasons, _ = run(threshold)
        total = sum(reasons.values())
        out["thresholds"].append({"threshold": threshold, "closes": total, "by_rule": reasons,
                                  "drift_share": round(reasons.get("drift", 0) / total, 4)})
        log(f"threshold {threshold}: {out['thresholds'][-1]}")
    return out


if __name__ == "__main__":
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description="measure drift distances on MovieLens")
    parser.add_argument("--dataset", default="ml-1m", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--min-events", type=int, default=5)
    parser.add_argument("--thresholds", default="0.6,0.65,0.7,0.75")
    args = parser.parse_args()
    result = measure(args.dataset, thresholds=[float(t) for t in args.thresholds.split(",")],
                     min_events=args.min_events, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
