"""UBSP drift rule: close the cache when the new item moves away from the cache's interest.

Each item has a text vector (all-MiniLM-L6-v2 over the prompt text `Title (Year) [Genre|...]`,
unit length). The cache centroid is the mean of its items' vectors, normalised; the new item
*drifts* when

    drift_distance = 1 - cos(centroid, new item) > threshold

and the cache already holds at least `min_events` events (a minimum partition size, so a
cache of one or two items never closes on noise). Like `max_gap`, a drift close happens
*before* the new event: the drifting item starts the next cache. Items without a vector
(unknown text) never trigger or weigh on the rule. A threshold <= 0 disables the rule.

Pure functions plus a small vector cache; no Kafka. Vectors are stored as 384 float16 values,
little endian (768 bytes), so they fit a RocksDB value or a Faust GlobalTable entry keyed by
the item id's UTF-8 bytes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Callable

import numpy as np

DIM = 384
_F16 = np.dtype("<f2")
VALUE_BYTES = DIM * _F16.itemsize


def encode_vector(vector: np.ndarray) -> bytes:
    """A vector as its compact stored value (float16, little endian)."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape[0] != DIM:
        raise ValueError(f"vector has {vector.shape[0]} values, expected {DIM}")
    return vector.astype(_F16).tobytes()


def decode_vector(value: bytes) -> np.ndarray:
    """Stored value -> float32 vector (a copy, safe to keep)."""
    if len(value) != VALUE_BYTES:
        raise ValueError(f"stored vector has {len(value)} bytes, expected {VALUE_BYTES}")
    return np.frombuffer(value, dtype=_F16).astype(np.float32)


def drift_distance(cache_vectors: np.ndarray, new_vector: np.ndarray) -> float:
    """1 - cosine between the normalised centroid of `cache_vectors` [n, d] and `new_vector`.

    0 means the same direction, 1 orthogonal, up to 2 opposite. An empty cache (or a zero
    centroid) has no direction: distance 0, so it never closes anything.
    """
    cache_vectors = np.asarray(cache_vectors, dtype=np.float32)
    new_vector = np.asarray(new_vector, dtype=np.float32).reshape(-1)
    if cache_vectors.ndim != 2 or cache_vectors.shape[0] == 0:
        return 0.0
    centroid = cache_vectors.sum(axis=0)
    c_norm = float(np.linalg.norm(centroid))
    v_norm = float(np.linalg.norm(new_vector))
    if c_norm == 0.0 or v_norm == 0.0:
        return 0.0
    return 1.0 - float(centroid @ new_vector) / (c_norm * v_norm)


class ItemVectors:
    """item_id -> unit text vector, filled in batches from item text.

    `store` is any mutable mapping of item-id bytes to stored values (a dict, a rocksdict Rdict,
    a Faust GlobalTable with raw bytes values); decoded float32 vectors are also kept in process
    (3,883 MovieLens-1M movies take 6 MB), so the hot path does one dict lookup per item.
    A vector written to `store` by another process is picked up on first use; a changed text
    for a known item must go through `put_texts(..., replace=True)` (or `forget`).
    """

    def __init__(self, store: MutableMapping | None = None, encoder=None):
        self.store = {} if store is None else store
        self._encoder = encoder
        self._rows: dict[str, np.ndarray] = {}

    @property
    def encoder(self):
        if self._encoder is None:
            from models.text_encoder import TextEncoder
            self._encoder = TextEncoder()
        return self._encoder

    def get(self, item_id: str) -> np.ndarray | None:
        row = self._rows.get(item_id)
        if row is None:
            value = self.store.get(item_id.encode("utf-8"))
            if value is None:
                return None
            row = self._rows[item_id] = decode_vector(bytes(value))
        return row

    def __contains__(self, item_id: str) -> bool:
        return self.get(item_id) is not None

    def __len__(self) -> int:
        return len(self._rows)

    def forget(self, item_id: str) -> None:
        self._rows.pop(item_id, None)

    def put_vector(self, item_id: str, vector: np.ndarray) -> None:
        value = encode_vector(vector)
        self.store[item_id.encode("utf-8")] = value
        # Keep what a reader of the store gets (float16-rounded), so every process agrees.
        self._rows[item_id] = decode_vector(value)

    def put_texts(self, texts: Mapping[str, str] | Iterable[tuple[str, str]], *,
                  batch_size: int = 256, replace: bool = False) -> int:
        """Encode the texts of items without a vector (all of them with `replace`) in batches;
        returns how many were encoded."""
        pairs = texts.items() if isinstance(texts, Mapping) else texts
        todo = [(item_id, text) for item_id, text in pairs
                if replace or self.get(item_id) is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            matrix = self.encoder.encode([text for _, text in chunk], batch_size=64)
            for (item_id, _), vector in zip(chunk, matrix):
                self.put_vector(item_id, vector)
        return len(todo)

    def matrix(self, item_ids: Iterable[str]) -> np.ndarray:
        """Stacked vectors of the items that have one ([k, 384], k <= len(item_ids))."""
        rows = [row for row in map(self.get, item_ids) if row is not None]
        return np.stack(rows) if rows else np.empty((0, DIM), dtype=np.float32)


def should_close_for_drift(cache_item_ids: list[str], new_item_id: str, vectors: ItemVectors,
                           threshold: float, min_events: int) -> bool:
    """True when the open cache (its items' ids) must close before `new_item_id` joins it."""
    if threshold <= 0 or len(cache_item_ids) < min_events:
        return False
    new = vectors.get(new_item_id)
    if new is None:
        return False
    cache = vectors.matrix(cache_item_ids)
    if cache.shape[0] == 0:
        return False
    return drift_distance(cache, new) > threshold


def drift_check(vectors: ItemVectors, threshold: float,
                min_events: int) -> Callable[[list[str], str], bool] | None:
    """The rule as the callable `partitioner.add_event(..., drift=)` takes; None when disabled."""
    if threshold <= 0:
        return None

    def check(cache_item_ids: list[str], new_item_id: str) -> bool:
        return should_close_for_drift(cache_item_ids, new_item_id, vectors, threshold, min_events)

    return check
