"""Behaviour records at the stream's rate: a strict msgspec fast path for the common record, and
the full validator (`records.decode`) for every record the fast path does not accept.

The fast path accepts only what the full validator accepts too (strict JSON types, ids that are
printable and not blank, a known action, a non-negative time, the key equal to `user_id`,
at most FAST_MAX_BYTES so that deep nesting and Python's integer digit limit cannot differ);
whatever it refuses is decoded again by the full validator, so an invalid record is
dead-lettered with exactly the reason it always had. tests/core/test_behavior_decoder.py
holds the two paths to the same answers.
"""
from __future__ import annotations

import math

import msgspec

from core.records import ACTIONS, MAX_ID_LEN, BehaviorEvent, decode

FAST_MAX_BYTES = 1024  # ML-1M's records are about 150 bytes
_SCHEMA = BehaviorEvent.schema_id()


class FastBehavior(msgspec.Struct, kw_only=True, gc=False):
    """A behaviour record as the fast path reads it (the fields of records.BehaviorEvent)."""
    schema: str = _SCHEMA
    event_id: str
    user_id: str
    item_id: str
    action: str
    ts: float
    value: float | None = None
    attrs: dict[str, str] = {}


_decoder = msgspec.json.Decoder(FastBehavior)


def _good_ids(user_id: str, event_id: str, item_id: str) -> bool:
    """Each id is 1 to MAX_ID_LEN characters, printable and not blank. isprintable() is False
    for every control character and lone surrogate (and for tabs and newlines, which the full
    validator allows: those records take the full path); one call checks all three."""
    return (0 < len(user_id) <= MAX_ID_LEN and 0 < len(event_id) <= MAX_ID_LEN
            and 0 < len(item_id) <= MAX_ID_LEN and (user_id + event_id + item_id).isprintable()
            and not (user_id.isspace() or event_id.isspace() or item_id.isspace()))


def _fast(raw: bytes, key: bytes | None) -> FastBehavior | None:
    try:
        r = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if r.schema != _SCHEMA or r.action not in ACTIONS or not 0 <= r.ts < math.inf:
        return None
    if r.value is not None and not math.isfinite(r.value):
        return None
    if not _good_ids(r.user_id, r.event_id, r.item_id):
        return None
    if key != r.user_id.encode("utf-8"):
        return None
    attrs = r.attrs
    if attrs and (len(attrs) > 32 or any(len(v) > MAX_ID_LEN for v in attrs.values())):
        return None
    return r


def decode_behavior(raw: bytes | None, key: bytes | None, *,
                    max_bytes: int) -> FastBehavior | BehaviorEvent:
    """One `behaviors` record; raises InvalidRecord as records.decode does."""
    if raw and len(raw) <= min(max_bytes, FAST_MAX_BYTES):
        record = _fast(raw, key)
        if record is not None:
            return record
    return decode(BehaviorEvent, raw, key=key, max_bytes=max_bytes)

