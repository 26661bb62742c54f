"""Record contracts for every LIBER-Stream topic (DESIGN.md section 3).

Each record is JSON with a `schema` field `"<name>/<version>"`. `decode()` turns raw bytes
into a record or raises `InvalidRecord` with a short machine-readable `reason` (it becomes a
dead-letter header) and a human `detail`. Nothing here talks to Kafka.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import msgspec

ACTIONS = frozenset({"rate", "click", "view", "play", "purchase", "like", "skip"})
MAX_ID_LEN = 256
MAX_TEXT_LEN = 2048


class InvalidRecord(ValueError):
    """A record that must go to the dead-letter topic; `reason` is a short token."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- field checks -----------------------------------------------------------------------
def _str(data: dict, name: str, *, max_len: int = MAX_ID_LEN, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRecord("missing_field", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRecord("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    value = str(value)
    if required and not value.strip():
        raise InvalidRecord("invalid_value", f"{name} must not be empty")
    if len(value) > max_len:
        raise InvalidRecord("oversize", f"{name} longer than {max_len} characters")
    if any(ord(c) < 32 and c not in "\t\n" for c in value) or "\x7f" in value:
        raise InvalidRecord("invalid_value", f"{name} contains control characters")
    # a JSON "\ud800" escape decodes to a lone surrogate, which cannot be written as UTF-8
    if not value.isascii() and _has_lone_surrogate(value):
        raise InvalidRecord("invalid_value", f"{name} contains a lone surrogate")
    return value


def _has_lone_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _num(data: dict, name: str, *, required: bool = True, integer: bool = False) -> float | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRecord("missing_field", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord("wrong_type", f"{name} must be a number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise InvalidRecord("invalid_value", f"{name} must be finite")
    if integer and value != int(value):
        raise InvalidRecord("wrong_type", f"{name} must be an integer")
    return int(value) if integer else float(value)


def _dict(data: dict, name: str) -> dict:
    value = data.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRecord("wrong_type", f"{name} must be an object")
    return value


def _list(data: dict, name: str) -> list:
    value = data.get(name)
    if value is None:
        raise InvalidRecord("missing_field", f"{name} is required")
    if not isinstance(value, list):
        raise InvalidRecord("wrong_type", f"{name} must be a list")
    return value


# --- base ----------------------------------------------------------------------------------
class Record:
    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int]

    @classmethod
    def schema_id(cls) -> str:
        return f"{cls.SCHEMA}/{cls.VERSION}"

    def to_dict(self) -> dict:
        return {"schema": self.schema_id(), **asdict(self)}

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> "Record":  # pragma: no cover - overridden
        raise NotImplementedError


def parse_json(raw: bytes | None, *, max_bytes: int) -> dict:
    """Bytes -> JSON object, with the dead-letter reason on failure."""
    if raw is None or len(raw) == 0:
        raise InvalidRecord("empty_value", "record has no value")
    if len(raw) > max_bytes:
        raise InvalidRecord("oversize", f"{len(raw)} bytes > max_payload_bytes={max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("invalid_utf8", str(exc)) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except InvalidRecord:
        raise
    except ValueError as exc:  # also integers past Python's digit limit
        raise InvalidRecord("malformed_json", str(exc)) from None
    except RecursionError:
        raise InvalidRecord("malformed_json", "nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRecord("wrong_type", f"top level must be an object, got {type(data).__name__}")
    return data


def _reject_constant(name: str) -> None:
    raise InvalidRecord("invalid_value", f"{name} is not allowed")


def decode(cls: type[Record], raw: bytes | None, *, key: bytes | None = None,
           max_bytes: int = 64 * 1024) -> Record:
    """Parse and validate one record of type `cls`; raises InvalidRecord."""
    data = parse_json(raw, max_bytes=max_bytes)
    schema = data.get("schema", cls.schema_id())
    if not isinstance(schema, str) or "/" not in schema:
        raise InvalidRecord("schema", f"schema must be '{cls.SCHEMA}/<version>'")
    name, _, version = schema.partition("/")
    if name != cls.SCHEMA:
        raise InvalidRecord("schema", f"expected {cls.SCHEMA}, got {name}")
    if not (version.isascii() and version.isdigit()) or len(version) > 9 or \
            int(version) > cls.VERSION:
        raise InvalidRecord("schema_version",
                            f"version {version} not supported (newest {cls.VERSION})")
    record = cls.from_dict(data)
    key_field = getattr(cls, "KEY_FIELD", None)
    if key_field:
        if not key:
            raise InvalidRecord("missing_key", "record has no Kafka key")
        if key.decode("utf-8", "replace") != getattr(record, key_field):
            raise InvalidRecord("key_mismatch", f"key does not match {key_field}")
    return record


_encode_json = msgspec.json.Encoder().encode


def _dumps(data: dict) -> bytes:
    """A closed partition's JSON, at the stream's rate: msgspec writes the bytes of
    `json.dumps(ensure_ascii=False, separators=(",", ":"))` (a float's exponent may be
    shorter: 1e16 for 1e+16) about five times faster. It would write NaN as null, and a
    partition holds none: its events' times and values were checked finite on the way in."""
    return _encode_json(data)


def _json_cost(char: str) -> int:
    """Bytes a character takes inside a JSON string as `_dumps` writes it."""
    if char in '"\\' or ord(char) < 32:
        return len(json.dumps(char)) - 2
    return len(char.encode("utf-8", "surrogatepass"))


def _cut(text: str, max_len: int) -> str:
    return text if len(text) <= max_len else text[:max_len - 1] + "\u2026"


def _cut_bytes(text: str, costs: list[int], budget: int) -> str:
    """The longest prefix of `text` plus an ellipsis (3 bytes) within `budget` JSON bytes."""
    if budget < 3:
        return ""
    used, end = 3, 0
    for end, cost in enumerate(costs):
        if used + cost > budget:
            break
        used += cost
    else:
        return text
    return text[:end] + "\u2026"


# --- topic records --------------------------------------------------------------------------
@dataclass(frozen=True)
class BehaviorEvent(Record):
    """`behaviors`: one user action on one item. `ts` is event time in epoch seconds."""
    SCHEMA: ClassVar[str] = "behavior"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "user_id"

    event_id: str
    user_id: str
    item_id: str
    action: str
    ts: float
    value: float | None = None
    attrs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:  # hot path of replay: skip dataclasses.asdict's deep copy
        return {"schema": "behavior/1", "event_id": self.event_id, "user_id": self.user_id,
                "item_id": self.item_id, "action": self.action, "ts": self.ts,
                "value": self.value, "attrs": self.attrs}

    @classmethod
    def from_dict(cls, data: dict) -> "BehaviorEvent":
        action = _str(data, "action", max_len=32)
        if action not in ACTIONS:
            raise InvalidRecord("unknown_action", f"{action!r} not in {sorted(ACTIONS)}")
        ts = _num(data, "ts")
        if ts < 0:
            raise InvalidRecord("negative_timestamp", f"ts={ts}")
        attrs = _dict(data, "attrs")
        if len(attrs) > 32 or not all(isinstance(k, str) and isinstance(v, str) and
                                      len(v) <= MAX_ID_LEN for k, v in attrs.items()):
            raise InvalidRecord("invalid_value", "attrs must be at most 32 short string pairs")
        return cls(event_id=_str(data, "event_id"), user_id=_str(data, "user_id"),
                   item_id=_str(data, "item_id"), action=action, ts=ts,
                   value=_num(data, "value", required=False), attrs=attrs)

    def check_time(self, *, max_future_s: float, now: float | None = None) -> None:
        check_time(self.ts, max_future_s=max_future_s, now=time.time() if now is None else now)


def check_time(ts: float, *, max_future_s: float, now: float) -> None:
    """Reject far-future event times (clock bugs would break event-time rules)."""
    if ts > now + max_future_s:
        raise InvalidRecord("future_timestamp", f"ts={ts} is more than {max_future_s}s ahead")


@dataclass(frozen=True)
class Item(Record):
    """`items` (compacted, key item_id): catalogue text used in prompts."""
    SCHEMA: ClassVar[str] = "item"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "item_id"

    item_id: str
    title: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "Item":
        return cls(item_id=_str(data, "item_id"), title=_str(data, "title", max_len=MAX_TEXT_LEN),
                   attributes=_attributes(_dict(data, "attributes")))

    def text(self) -> str:
        """Prompt text: title plus attributes, e.g. `Heat (1995) [Action|Crime]`; at most
        MAX_TEXT_LEN characters (a long title is cut, the genres kept), the cap a closed
        partition puts on each event's text."""
        genres = self.attributes.get("genres")
        if not genres:
            return self.title
        tail = f" [{'|'.join(genres)}]"
        if len(self.title) + len(tail) <= MAX_TEXT_LEN:
            return self.title + tail
        room = MAX_TEXT_LEN - len(tail) - 1
        if room > 0:
            return self.title[:room] + "…" + tail
        return (self.title + tail)[:MAX_TEXT_LEN - 1] + "…"


MAX_GENRES = 32
_GENRE_SEPARATORS = frozenset("|[]")  # the prompt text's own syntax (see Item.text)


def _attributes(attributes: dict) -> dict:
    """Item attributes by type: `genres` a list of short strings (they are joined into the
    prompt text), every other value a JSON scalar or a list of scalars."""
    for name, value in attributes.items():
        if name == "genres":
            if value is None:
                continue
            if not isinstance(value, list):
                raise InvalidRecord("wrong_type", f"attributes.genres must be a list of strings, "
                                                  f"got {type(value).__name__}")
            if len(value) > MAX_GENRES:
                raise InvalidRecord("invalid_value", f"attributes.genres has more than "
                                                     f"{MAX_GENRES} entries")
            for genre in value:
                if not isinstance(genre, str):
                    raise InvalidRecord("wrong_type", f"attributes.genres must hold strings, "
                                                      f"got {type(genre).__name__}")
                _str({"genre": genre}, "genre", max_len=64)
                if _GENRE_SEPARATORS.intersection(genre):
                    raise InvalidRecord("invalid_value", "a genre must not contain | [ or ]")
        elif isinstance(value, list):
            if not all(_scalar(v) for v in value):
                raise InvalidRecord("wrong_type", f"attributes.{name} must hold JSON scalars")
        elif not _scalar(value):
            raise InvalidRecord("wrong_type", f"attributes.{name} must be a scalar or a list")
    return attributes


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


@dataclass(frozen=True)
class PartitionEvent:
    """One event inside a closed partition, with the item text joined in."""
    event_id: str
    item_id: str
    action: str
    ts: float
    value: float | None
    text: str


@dataclass(frozen=True)
class ClosedPartition(Record):
    """`partitions.closed`: an immutable UBSP partition; idempotent on (user_id, seq)."""
    SCHEMA: ClassVar[str] = "partition"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "user_id"

    user_id: str
    seq: int
    events: tuple[PartitionEvent, ...]
    start_ts: float
    end_ts: float
    reason: str

    def to_dict(self) -> dict:  # written per closed partition: avoid asdict's deep copies
        return {"schema": self.schema_id(), "user_id": self.user_id, "seq": self.seq,
                "events": [{"event_id": e.event_id, "item_id": e.item_id, "action": e.action,
                            "ts": e.ts, "value": e.value, "text": e.text} for e in self.events],
                "start_ts": self.start_ts, "end_ts": self.end_ts, "reason": self.reason}

    def encode_within(self, max_bytes: int) -> bytes:
        """`encode()`, with event texts cut so that the record fits `max_bytes` (the
        consumers' max_payload_bytes) and each text MAX_TEXT_LEN characters: a partition of
        max_events events with the longest titles must still reach the LLM worker. Each text
        gets an equal share of the room the rest of the record leaves; the cut is a pure
        function of the partition, so a re-published partition has the same bytes. Only when
        even empty texts do not fit (ids alone too large for max_events) is it left larger."""
        return self.dict_within(self.to_dict(), max_bytes)

    @staticmethod
    def dict_within(data: dict, max_bytes: int) -> bytes:
        """`encode_within` of a partition given as `to_dict()` writes it (the stream worker
        builds that dict straight from its rows)."""
        texts = [_cut(e["text"], MAX_TEXT_LEN) for e in data["events"]]
        for event, text in zip(data["events"], texts):
            event["text"] = text
        raw = _dumps(data)
        if len(raw) <= max_bytes:
            return raw
        costs = [[_json_cost(c) for c in text] for text in texts]
        room = max_bytes - (len(raw) - sum(sum(c) for c in costs))  # bytes left for all texts
        share = max(0, room) // max(1, len(texts))
        for event, text, cost in zip(data["events"], texts, costs):
            if sum(cost) > share:
                event["text"] = _cut_bytes(text, cost, share)
        return _dumps(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ClosedPartition":
        events = []
        for raw in _list(data, "events"):
            if not isinstance(raw, dict):
                raise InvalidRecord("wrong_type", "events must be objects")
            events.append(PartitionEvent(
                event_id=_str(raw, "event_id"), item_id=_str(raw, "item_id"),
                action=_str(raw, "action", max_len=32), ts=_num(raw, "ts"),
                value=_num(raw, "value", required=False),
                text=_str(raw, "text", max_len=MAX_TEXT_LEN, required=False) or ""))
        if not events:
            raise InvalidRecord("invalid_value", "a partition has at least one event")
        return cls(user_id=_str(data, "user_id"), seq=_num(data, "seq", integer=True),
                   events=tuple(events), start_ts=_num(data, "start_ts"),
                   end_ts=_num(data, "end_ts"), reason=_str(data, "reason", max_len=32))


@dataclass(frozen=True)
class Summary(Record):
    """`summaries`: one LLM result per closed partition.

    Optional (additive, still version 1): `mode` cascade|naive, `context` what the prompt used
    as the user's previous state (previous, collective:<cluster>, none, history), `template`
    the prompt template version, `prompt_sha256` a hash of the exact prompt, `end_ts` the
    partition's newest event time (the vector's event watermark), `closed_at` when the
    partition was published (Kafka timestamp of its `partitions.closed` record, epoch seconds;
    the start of the freshness clock). 0 means unknown (older records)."""
    SCHEMA: ClassVar[str] = "summary"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "user_id"

    user_id: str
    seq: int
    partition_summary: str
    shift: str
    cascaded_summary: str
    tokens_in: int
    tokens_out: int
    backend: str
    model: str
    latency_s: float
    mode: str = ""
    context: str = ""
    template: str = ""
    prompt_sha256: str = ""
    end_ts: float = 0.0
    closed_at: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "Summary":
        text = dict(max_len=16 * MAX_TEXT_LEN)
        return cls(user_id=_str(data, "user_id"), seq=_num(data, "seq", integer=True),
                   partition_summary=_str(data, "partition_summary", **text),
                   shift=_str(data, "shift", required=False, **text) or "",
                   cascaded_summary=_str(data, "cascaded_summary", **text),
                   tokens_in=_num(data, "tokens_in", integer=True),
                   tokens_out=_num(data, "tokens_out", integer=True),
                   backend=_str(data, "backend"), model=_str(data, "model"),
                   latency_s=_num(data, "latency_s"),
                   **{name: _str(data, name, required=False) or ""
                      for name in ("mode", "context", "template", "prompt_sha256")},
                   **{name: _num(data, name, required=False) or 0.0
                      for name in ("end_ts", "closed_at")})


@dataclass(frozen=True)
class InterestVector(Record):
    """`user-interests` (compacted): the dense vector rankers read; version = seq.

    `collective` marks a cold user's stand-in: the vector of their `cluster`'s collective
    summary, published with version -1 so the user's first own vector (version 0) replaces it."""
    SCHEMA: ClassVar[str] = "interest"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "user_id"

    user_id: str
    version: int
    vector: tuple[float, ...]
    dim: int
    model_version: str
    produced_at: float
    event_watermark: float
    collective: bool = False
    cluster: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "InterestVector":
        vector = _list(data, "vector")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in vector):
            raise InvalidRecord("invalid_value", "vector must hold finite numbers")
        dim = _num(data, "dim", integer=True)
        if dim != len(vector):
            raise InvalidRecord("invalid_value", f"dim={dim} but vector has {len(vector)} values")
        return cls(user_id=_str(data, "user_id"), version=_num(data, "version", integer=True),
                   vector=tuple(float(v) for v in vector), dim=dim,
                   model_version=_str(data, "model_version"),
                   produced_at=_num(data, "produced_at"),
                   event_watermark=_num(data, "event_watermark"),
                   collective=bool(data.get("collective", False)),
                   cluster=_str(data, "cluster", required=False) or "")


@dataclass(frozen=True)
class CollectiveSummary(Record):
    """`collective-summaries` (compacted, key cluster): a user cluster's collective profile
    (REKI-style, written by the LLM worker), the stand-in interests of the cluster's cold users."""
    SCHEMA: ClassVar[str] = "collective"
    VERSION: ClassVar[int] = 1
    KEY_FIELD: ClassVar[str] = "cluster"

    cluster: str
    summary: str
    users: int
    model: str
    produced_at: float

    @classmethod
    def from_dict(cls, data: dict) -> "CollectiveSummary":
        return cls(cluster=_str(data, "cluster"),
                   summary=_str(data, "summary", max_len=16 * MAX_TEXT_LEN),
                   users=_num(data, "users", integer=True), model=_str(data, "model"),
                   produced_at=_num(data, "produced_at"))


RECORD_TYPES: dict[str, type[Record]] = {
    "behaviors": BehaviorEvent, "items": Item, "partitions.closed": ClosedPartition,
    "summaries": Summary, "user-interests": InterestVector,
    "collective-summaries": CollectiveSummary,
}
