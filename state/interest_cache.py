"""Ranker-side client: follow the compacted `user-interests` topic into a local RocksDB cache.

    cache = InterestCache(settings)          # opens STATE_DIR/interest-cache, resumes its offsets
    cache.start()                            # background thread follows the topic
    hit = cache.get("42")                    # -> (version, float32 vector) or None
    cache.close()

Or without a thread: `cache.sync()` reads up to the topic's current end, `cache.poll()` takes
what is waiting. Every partition of the topic is read (no consumer group: each ranker replica
keeps the whole table). A record is applied only when its version is higher than the cached
one, so the cache never goes back (a collective stand-in, version -1, never replaces a user's
own vector); a tombstone (no value) deletes the user. Values and the next offset of each
partition are written in one RocksDB batch, so a restarted cache resumes exactly where it
stopped. `model_version=` keeps only vectors of one model (a ranker trained with it must not
read another model's vectors); the filter is stored with the cache, and a directory reopened
under another filter is emptied and read again from the beginning (its entries and offsets were
chosen by the old one). Records that do not parse (malformed, oversize, anything the decoder
raises on) are skipped, logged and counted: one record never stops the cache.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from kafka import TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from core.kafka import make_consumer
from core.settings import Settings
from core.records import InterestVector, InvalidRecord, decode
from core.topics import USER_INTERESTS

log = logging.getLogger("liber.interest_cache")
_HEAD = struct.Struct("<I")  # length of the JSON header that precedes the float32 values
_FILTER = b"f\x00model_version"  # the model_version filter the entries were chosen under


class CachedInterest(NamedTuple):
    """Everything the cache holds of one user (`get` returns only version and vector)."""
    version: int
    vector: np.ndarray
    model_version: str
    collective: bool
    cluster: str
    produced_at: float
    event_watermark: float


def _pack(record: InterestVector) -> bytes:
    head = json.dumps({"version": record.version, "model_version": record.model_version,
                       "collective": record.collective, "cluster": record.cluster,
                       "produced_at": record.produced_at,
                       "event_watermark": record.event_watermark}).encode()
    return _HEAD.pack(len(head)) + head + np.asarray(record.vector, dtype="<f4").tobytes()


def _unpack(raw: bytes) -> CachedInterest:
    (size,) = _HEAD.unpack_from(raw)
    head = json.loads(raw[_HEAD.size:_HEAD.size + size])
    vector = np.frombuffer(raw, dtype="<f4", offset=_HEAD.size + size).astype(np.float32)
    return CachedInterest(vector=vector, **head)


class InterestCache:
    def __init__(self, settings: Settings, path: str | Path | None = None, *,
                 model_version: str | None = None):
        self.s = settings
        self.model_version = model_version
        self.topic = settings.topic(USER_INTERESTS)
        path = Path(path or settings.state_path / "interest-cache")
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)
        self.stats = {"applied": 0, "stale": 0, "invalid": 0, "other_model": 0, "deleted": 0}
        self._check_filter(path)
        self._consumer = make_consumer(settings, enable_auto_commit=False,
                                       client_id=f"{settings.app_id}-interest-cache")
        self._partitions: list[TopicPartition] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the consumer is used by one thread at a time
        self._assign()

    # --- reads (any thread) ---------------------------------------------------------------------
    def get(self, user_id: str) -> tuple[int, np.ndarray] | None:
        """The user's newest cached (version, float32 vector), or None."""
        entry = self.entry(user_id)
        return None if entry is None else (entry.version, entry.vector)

    def entry(self, user_id: str) -> CachedInterest | None:
        raw = self._db.get(b"v\x00" + user_id.encode())
        return None if raw is None else _unpack(raw)

    def __len__(self) -> int:
        return sum(1 for key in self._db.keys(from_key=b"v\x00") if key.startswith(b"v\x00"))

    def _check_filter(self, path: Path) -> None:
        wanted = json.dumps(self.model_version).encode()
        stored = self._db.get(_FILTER)
        if stored == wanted:
            return
        keys = [k for k in self._db.keys() if k != _FILTER]
        if keys:
            log.warning("interest cache %s: kept under model_version=%s, opened with %s: "
                        "emptied, reading %s again", path,
                        stored.decode() if stored else "unknown", wanted.decode(), self.topic)
            batch = WriteBatch(raw_mode=True)
            for key in keys:
                batch.delete(key)
            self._db.write(batch)
        self._db[_FILTER] = wanted

    # --- following the topic -----------------------------------------------------------------
    def _assign(self) -> None:
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        new = [TopicPartition(self.topic, p) for p in sorted(parts)
               if TopicPartition(self.topic, p) not in self._partitions]
        if not new:
            return
        self._partitions += new
        self._consumer.assign(self._partitions)
        for tp in new:
            stored = self._db.get(b"o\x00" + str(tp.partition).encode())
            if stored is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, int(stored))

    def poll(self, timeout_s: float = 0.2) -> int:
        """Apply the records waiting (up to one fetch); returns how many changed the cache."""
        with self._lock:
            if not self._partitions:
                self._assign()
                if not self._partitions:
                    time.sleep(timeout_s)
                    return 0
            polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
            return self._apply(polled)

    def sync(self, timeout_s: float = 60.0) -> int:
        """Read until every partition reaches the end it had when called; returns changes."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._assign()
            ends = self._consumer.end_offsets(self._partitions) if self._partitions else {}
        changed = 0
        while any(self._position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: not caught up in {timeout_s}s")
            changed += self.poll(0.2)
        return changed

    def _position(self, tp: TopicPartition) -> int:
        with self._lock:
            return self._consumer.position(tp)

    def _apply(self, polled: dict) -> int:
        batch, changed = WriteBatch(raw_mode=True), 0
        pending: dict[bytes, bytes | None] = {}  # this batch's values (the db sees them at write)
        for tp, records in polled.items():
            for rec in records:
                try:
                    changed += self._apply_one(batch, pending, rec)
                except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the cache
                    self.stats["invalid"] += 1
                    log.warning("%s[%d]@%d skipped: %r", rec.topic, rec.partition, rec.offset,
                                exc)
            batch.put(b"o\x00" + str(tp.partition).encode(), str(records[-1].offset + 1).encode())
        if batch.len():
            self._db.write(batch)
        return changed

    def _apply_one(self, batch: WriteBatch, pending: dict, rec) -> int:
        if rec.key is None:
            self.stats["invalid"] += 1
            log.warning("%s[%d]@%d skipped: no key", rec.topic, rec.partition, rec.offset)
            return 0
        key = b"v\x00" + rec.key
        if rec.value is None:  # tombstone: the user was removed upstream
            known = (pending[key] if key in pending else self._db.get(key)) is not None
            batch.delete(key)
            pending[key] = None
            self.stats["deleted"] += known
            return int(known)
        try:
            record = decode(InterestVector, rec.value, key=rec.key,
                            max_bytes=self.s.max_payload_bytes)
        except InvalidRecord as exc:
            self.stats["invalid"] += 1
            log.warning("%s[%d]@%d skipped: %s: %s", rec.topic, rec.partition, rec.offset,
                        exc.reason, exc.detail[:200])
            return 0
        if self.model_version is not None and record.model_version != self.model_version:
            self.stats["other_model"] += 1
            return 0
        current = pending[key] if key in pending else self._db.get(key)
        if current is not None and _unpack(current).version >= record.version:
            self.stats["stale"] += 1  # never go back to an older (or the same) version
            return 0
        pending[key] = value = _pack(record)
        batch.put(key, value)
        self.stats["applied"] += 1
        return 1

    # --- background thread -------------------------------------------------------------------
    def start(self) -> "InterestCache":
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="interest-cache", daemon=True)
            self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(0.5)
            except Exception:  # noqa: BLE001 - a ranker's cache keeps serving what it has
                log.exception("interest cache: poll failed; retrying")
                time.sleep(1.0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            self._consumer.close()
        self._db.close()

    def __enter__(self) -> "InterestCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
