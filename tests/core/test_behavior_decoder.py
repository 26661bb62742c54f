"""The batch lane's decoder gives the full validator's answer on every record: the same fields
for a valid one, the same dead-letter reason for an invalid one."""
from __future__ import annotations

import json
import random

import pytest

from core import behavior_decoder
from core.records import BehaviorEvent, InvalidRecord, decode

FIELDS = ("event_id", "user_id", "item_id", "action", "ts", "value", "attrs")
BASE = {"schema": "behavior/1", "event_id": "ml-1m:1:1193", "user_id": "1", "item_id": "1193",
        "action": "rate", "ts": 978300760.0, "value": 5.0, "attrs": {}}
# values a service might send for any field: each is tried in every field
ODD = ["", " ", "\t", "u\n", "a\x00b", "x\x7f", "\u2028", "é", "\U0001d11e", "u" * 256,
       "u" * 257, 0, 1, -1, 1.5, -0.0, 1e308, 10 ** 400, True, False, None, [], {}, ["a"],
       {"k": "v"}, {"k": 1}, "rate", "RATE", "purchase", "1"]


def answer(decode_fn, raw, key):
    try:
        record = decode_fn(raw, key)
    except InvalidRecord as exc:
        return ("invalid", exc.reason)
    return ("valid", tuple(getattr(record, f) for f in FIELDS))


def full(raw, key):
    return decode(BehaviorEvent, raw, key=key, max_bytes=64 * 1024)


def lane(raw, key):
    return behavior_decoder.decode_behavior(raw, key, max_bytes=64 * 1024)


def corpus():
    yield json.dumps(BASE).encode(), b"1"
    for field in (*FIELDS, "schema"):
        for odd in ODD:
            yield json.dumps({**BASE, field: odd}).encode(), b"1"
        without = {k: v for k, v in BASE.items() if k != field}
        yield json.dumps(without).encode(), b"1"
    for schema in ("behavior/0", "behavior/01", "behavior/2", "item/1", "behavior", 1):
        yield json.dumps({**BASE, "schema": schema}).encode(), b"1"
    for key in (None, b"", b"2", b"1\xff", "é".encode()):
        yield json.dumps(BASE).encode(), key
    yield json.dumps({**BASE, "user_id": "é"}).encode(), "é".encode()
    yield json.dumps({**BASE, "user_id": 1}).encode(), b"1"           # an int id is kept as str
    yield json.dumps({**BASE, "attrs": {f"k{i}": "v" for i in range(33)}}).encode(), b"1"
    yield json.dumps({**BASE, "attrs": {"k": "v" * 257}}).encode(), b"1"
    yield json.dumps({**BASE, "extra": {"deep": [[[1]]]}}).encode(), b"1"
    yield json.dumps({**BASE, "pad": "x" * 2000}).encode(), b"1"        # past the fast path's size
    yield json.dumps({**BASE, "ts": 4e9}).encode(), b"1"
    yield b'{"schema":"behavior/1","event_id":"e","user_id":"1","user_id":"2","item_id":"i",' \
          b'"action":"rate","ts":1}', b"2"                             # duplicate keys: the last
    yield b'{"event_id":"e","user_id":"\\ud800","item_id":"i","action":"rate","ts":1}', b"1"
    yield b'{"event_id":"e","user_id":"1","item_id":"i","action":"rate","ts":NaN}', b"1"
    yield b'{"event_id":"e","user_id":"1","item_id":"i","action":"rate","ts":1e999}', b"1"
    yield b'{"event_id":"e","user_id":"1","item_id":"i","action":"rate","ts":1} x', b"1"
    yield b' {"event_id":"e","user_id":"1","item_id":"i","action":"rate","ts":1}\n', b"1"
    yield b'{"event_id":"e","user_id":"1\xff","item_id":"i","action":"rate","ts":1}', b"1"
    yield b"[1, 2]", b"1"
    yield b"", b"1"
    yield None, b"1"
    yield b"[" * 3000 + b"]" * 3000, b"1"


@pytest.mark.parametrize("raw, key", list(corpus()))
def test_the_lane_answers_as_the_full_validator(raw, key):
    assert answer(lane, raw, key) == answer(full, raw, key)


def test_random_records_get_the_same_answers():
    rng = random.Random(7)
    for _ in range(2000):
        data = dict(BASE)
        for field in rng.sample((*FIELDS, "schema"), rng.randint(1, 3)):
            if rng.random() < 0.2:
                data.pop(field, None)
            else:
                data[field] = rng.choice(ODD)
        raw = json.dumps(data, ensure_ascii=rng.random() < 0.5).encode()
        key = rng.choice([b"1", b"u", b"", None])
        assert answer(lane, raw, key) == answer(full, raw, key), raw


def test_common_records_take_the_fast_path():
    raw = json.dumps(BASE).encode()
    assert isinstance(lane(raw, b"1"), behavior_decoder.FastBehavior)
    assert isinstance(lane(json.dumps({**BASE, "user_id": "u\t"}).encode(), b"u\t"),
                      BehaviorEvent)
