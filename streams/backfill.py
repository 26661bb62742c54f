"""Backfill: load lifelong histories in bulk into the UBSP state and partitions.

    liber backfill PATH.parquet [--force]
    liber backfill PATH.parquet --from-dataset ml-1m --until TS [--users N] [--write-only]

A deployment starts with years of history without sending each event through Kafka: the file
is cut into partitions in process by the very same `streams.ubsp.add_event` the worker
runs (each user's events sorted by `ts`, ties in file order), then

1. every closed partition goes to `partitions.closed` (records.ClosedPartition, keyed by user,
   item text joined from the `items` topic, read once; `item <id>` for unknown items);
2. each user's final state (the JSON dict the worker's `ubsp-state` table holds, plus
   `"backfill_until"`: the user's newest backfilled `ts`) goes to the table's changelog topic
   `<app_id>-ubsp-state-changelog`, keyed by the user id bytes, in the murmur2 partition the
   same key has in `behaviors`. A worker started afterwards recovers it exactly like its own;
3. with the drift rule on, the item vectors it used go to `<app_id>-item-vectors-changelog`
   (the worker's `item-vectors` global table), so the worker decides drift on the same bytes.

Streaming then continues: an event of a user with `ts <= state["backfill_until"]` is part of
the backfilled history and counts as a duplicate. So the file must hold, per user, *every*
event up to that user's newest one (a time prefix of the history, e.g. all events up to a cut).

Parquet schema (one row per behaviour event, columns by name, extra columns ignored):

    event_id  string    unique per user; the duplicate filter's key
    user_id   string    (integers are accepted and turned into strings)
    item_id   string    (integers accepted)
    action    string    one of records.ACTIONS (rate, click, view, play, purchase, like, skip)
    ts        float64   event time, epoch seconds (integers accepted)
    value     float64   nullable (e.g. the rating)

Rows that the worker would dead-letter (missing or empty ids, unknown action, negative or
far-future ts, non-finite numbers, control characters, over-long ids) go to `behaviors.dlq`
with the reason header, as JSON of the row; `source.topic` names the file, `source.offset` the row.

Safety: it refuses to run while the worker's consumer group (`app_id`) has committed offsets on
`behaviors` or live members: a worker's state would be overwritten. `--force` overrides.
Re-running the same file is harmless: partitions are idempotent on (user_id, seq) and the
states are rewritten with the same values.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.settings import Settings
from core import dead_letter
from core.kafka import aiokafka_security_options, iter_to_end, key_partition, make_admin
from streams import ubsp
from core.records import ACTIONS, MAX_ID_LEN, MAX_TEXT_LEN
from core.topics import BEHAVIORS, ITEMS, PARTITIONS_CLOSED, create_topics, dlq

log = logging.getLogger("liber.backfill")

STATE_TABLE = "ubsp-state"  # the worker's Faust table (streams/app.py)
BACKFILL_UNTIL = "backfill_until"
SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),
    pa.field("value", pa.float64()),
])
_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f]"


class BackfillRefused(RuntimeError):
    """Running would overwrite a worker's state, the input is unusable or Kafka unreachable;
    nothing was written."""


def changelog_topic(settings: Settings, table: str = STATE_TABLE) -> str:
    """Faust's changelog topic of a table: `<app_id>-<table>-changelog` (no topic prefix)."""
    return f"{settings.app_id}-{table}-changelog"


@dataclass
class BackfillResult:
    rows: int = 0
    users: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    partitions: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    open_events: int = 0
    states_written: int = 0
    items_with_text: int = 0
    vectors_encoded: int = 0
    drift: bool = False
    backfill_until: float | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# --- making a file -------------------------------------------------------------------------------
def write_parquet(dataset: str, path: str | Path, until_ts: float | None = None, *,
                  home: str | None = None, users: int | None = None) -> int:
    """Write a MovieLens dataset's ratings with ts <= until_ts (all if None) as a backfill file;
    event ids are `<dataset>:<line>`, exactly what `liber produce` sends, so a replay of the same
    dataset is recognised. `users`: only the first N users (by first rating). Returns the rows."""
    from streams import movielens
    from streams.replay import select

    home = home or Settings.load().home
    data_dir = movielens.fetch(home, datasets=(dataset,), log=lambda m: None)[dataset]
    ratings = select(movielens.load_ratings(data_dir, dataset), users=users)
    if until_ts is not None:
        ratings = [r for r in ratings if r.ts <= until_ts]
    table = pa.table({
        "event_id": pa.array([f"{dataset}:{r.line}" for r in ratings], pa.string()),
        "user_id": pa.array([r.user_id for r in ratings], pa.string()),
        "item_id": pa.array([r.item_id for r in ratings], pa.string()),
        "action": pa.array(["rate"] * len(ratings), pa.string()),
        "ts": pa.array([float(r.ts) for r in ratings], pa.float64()),
        "value": pa.array([r.rating for r in ratings], pa.float64()),
    }, schema=SCHEMA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return table.num_rows


# --- reading and validating -------------------------------------------------------------------------
def read_events(path: str | Path) -> pa.Table:
    """The file's six columns, cast to SCHEMA's types; raises BackfillRefused if unusable."""
    try:
        table = pq.read_table(path, columns=SCHEMA.names)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise BackfillRefused(f"{path}: cannot read the backfill columns {SCHEMA.names}: {exc}") from None
    columns = []
    for f in SCHEMA:
        column = table.column(f.name)
        if column.type != f.type:
            try:
                column = column.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise BackfillRefused(f"{path}: column {f.name} ({column.type}) is not "
                                      f"{f.type}: {exc}") from None
        columns.append(column)
    return pa.Table.from_arrays([c.combine_chunks() for c in columns], names=SCHEMA.names)


def reject_reasons(table: pa.Table, *, now: float, max_future_s: float) -> pa.Array:
    """Per row: None for a valid row, else the worker's dead-letter reason (first that applies)."""
    n = table.num_rows
    reason = pa.nulls(n, pa.string())

    def mark(mask, name: str) -> None:
        nonlocal reason
        mask = pc.fill_null(mask, False)
        reason = pc.if_else(pc.and_(pc.is_null(reason), mask), pa.scalar(name), reason)

    for name in ("event_id", "user_id", "item_id", "action"):
        column = table.column(name)
        mark(pc.is_null(column), "missing_field")
        mark(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0), "invalid_value")
        mark(pc.greater(pc.utf8_length(column), MAX_ID_LEN if name != "action" else 32), "oversize")
        mark(pc.match_substring_regex(column, _CONTROL), "invalid_value")
    mark(pc.invert(pc.is_in(table.column("action"), value_set=pa.array(sorted(ACTIONS)))),
         "unknown_action")
    ts = table.column("ts")
    mark(pc.is_null(ts), "missing_field")
    mark(pc.invert(pc.is_finite(ts)), "invalid_value")
    mark(pc.less(ts, 0.0), "negative_timestamp")
    mark(pc.greater(ts, now + max_future_s), "future_timestamp")
    value = table.column("value")
    mark(pc.and_(pc.is_valid(value), pc.invert(pc.is_finite(value))), "invalid_value")
    return reason


# --- the partitioning pass -------------------------------------------------------------------------
def _drift_kwargs(rule) -> dict:
    """`add_event(..., drift=rule)` once the partitioner has the drift rule (see its docstring)."""
    if rule is None:
        return {}
    if "drift" not in inspect.signature(ubsp.add_event).parameters:
        log.warning("drift_threshold is set but streams.ubsp.add_event has no drift rule "
                    "yet: backfilling without it, as the worker does")
        return {}
    return {"drift": rule}


def partition_histories(table: pa.Table, rules: ubsp.CloseRules, drift=None,
                        on_closed: Callable[[ubsp.Closed], None] | None = None,
                        result: BackfillResult | None = None) -> dict[str, dict]:
    """Run add_event over each user's events (by ts, ties in row order); returns
    {user_id: final state with backfill_until}; closed partitions go to `on_closed`."""
    result = result or BackfillResult()
    kwargs = _drift_kwargs(drift)
    order = pc.sort_indices(
        table.append_column("_row", pa.array(range(table.num_rows), pa.int64())),
        sort_keys=[("user_id", "ascending"), ("ts", "ascending"), ("_row", "ascending")])
    table = table.take(order)
    event_ids = table.column("event_id").to_pylist()
    user_ids = table.column("user_id").to_pylist()
    item_ids = table.column("item_id").to_pylist()
    actions = table.column("action").to_pylist()
    stamps = table.column("ts").to_pylist()
    values = table.column("value").to_pylist()
    states: dict[str, dict] = {}
    add_event, accepted, duplicate = ubsp.add_event, ubsp.ACCEPTED, ubsp.DUPLICATE
    by_rule = result.by_rule
    user, state, seen, until = None, None, None, None
    for i in range(len(event_ids)):
        if user_ids[i] != user:
            if state is not None and until is not None:
                state[BACKFILL_UNTIL] = until
                states[user] = state
            user, state, seen, until = user_ids[i], ubsp.new_state(), set(), None
        event_id = event_ids[i]
        # The whole file is one history: a repeated event id is a duplicate however far apart
        # (the worker's filter only remembers the last `dedup_window` ids).
        if event_id in seen:
            result.duplicates += 1
            continue
        seen.add(event_id)
        outcome, closed = add_event(state, user, event_id, item_ids[i], actions[i], stamps[i],
                                    values[i], rules, **kwargs)
        if outcome == accepted:
            result.accepted += 1
            until = stamps[i]
        elif outcome == duplicate:
            result.duplicates += 1
        else:  # cannot happen on time-sorted input; never drop silently
            raise RuntimeError(f"add_event returned {outcome!r} for {event_id} on sorted input")
        for part in closed:
            by_rule[part.reason] = by_rule.get(part.reason, 0) + 1
            result.partitions += 1
            if on_closed is not None:
                on_closed(part)
    if state is not None and until is not None:
        state[BACKFILL_UNTIL] = until
        states[user] = state
    result.users = len(states)
    result.open_events = sum(len(s["events"]) for s in states.values())
    return states


def partition_value(part: ubsp.Closed, text_of: Callable[[str], str], *,
                    max_bytes: int | None = None) -> bytes:
    """The `partitions.closed` value of a partition: the bytes of records.ClosedPartition.encode()
    (same keys, order and separators), built without dataclasses.asdict's deep copies. With
    `max_bytes` (the worker's max_payload_bytes), the bytes of `encode_within(max_bytes)`: what
    the worker would publish for the same partition."""
    events = [{"event_id": e.event_id, "item_id": e.item_id, "action": e.action, "ts": e.ts, "value": e.value,
               "text": text_of(e.item_id)} for e in part.events]
    record = {"schema": "partition/1", "user_id": part.user_id, "seq": part.seq, "events": events,
              "start_ts": part.start_ts, "end_ts": part.end_ts, "reason": part.reason}
    raw = json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                     allow_nan=False).encode("utf-8")
    if max_bytes is None or (len(raw) <= max_bytes and
                             all(len(e["text"]) <= MAX_TEXT_LEN for e in events)):
        return raw
    from core.records import ClosedPartition, PartitionEvent
    return ClosedPartition(part.user_id, part.seq, tuple(PartitionEvent(**e) for e in events),
                           part.start_ts, part.end_ts, part.reason).encode_within(max_bytes)


def state_value(state: dict) -> bytes:
    """A state as the table stores it (Faust's json serializer: a JSON object)."""
    return json.dumps(state, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --- Kafka side ----------------------------------------------------------------------------------
def _admin(settings: Settings):
    return make_admin(settings, client_id=f"{settings.app_id}-backfill")


def _retrying(call, timeout: float = 30.0):
    """Retry a call while Kafka answers with a retriable error (a fresh broker creates its
    offsets topic, and answers CoordinatorNotAvailable, on the first group request)."""
    from kafka.errors import KafkaError
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def check_group_idle(settings: Settings, admin) -> list[str]:
    """Why a backfill would overwrite a worker's state: committed offsets on `behaviors` or live
    members in the worker's consumer group. Empty when it is safe."""
    from kafka.errors import KafkaError
    problems = []
    behaviors = settings.topic(BEHAVIORS)
    try:
        offsets = _retrying(lambda: admin.list_group_offsets(settings.app_id)).get(settings.app_id, {})
    except KafkaError as exc:  # do not guess: an unknown answer is not a "no"
        return [f"cannot read committed offsets of group {settings.app_id}: {exc!r}"]
    committed = sorted((tp.partition, meta.offset) for tp, meta in offsets.items()
                       if tp.topic == behaviors and meta.offset >= 0)
    if committed:
        problems.append(f"consumer group {settings.app_id} has committed offsets on {behaviors} "
                        f"(partition, offset): {committed}")
    try:
        group = _retrying(lambda: admin.describe_groups([settings.app_id])).get(settings.app_id, {})
    except KafkaError as exc:
        return problems + [f"cannot describe group {settings.app_id}: {exc!r}"]
    if group.get("members"):
        problems.append(f"consumer group {settings.app_id} has {len(group['members'])} live "
                        f"member(s) (state {group.get('group_state')}): stop the workers first")
    return problems


def _partition_counts(admin, names: list[str]) -> dict[str, int]:
    out = {}
    for t in admin.describe_topics(names):
        if t.get("error_code", 0) == 0 and t.get("partitions"):
            out[t.get("name", t.get("topic"))] = len(t["partitions"])
    return out


def ensure_changelog(settings: Settings, admin, name: str, partitions: int) -> None:
    """Create a compacted changelog topic with `partitions` partitions, or check the existing one."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if name not in set(admin.list_topics()):
        try:
            admin.create_topics([NewTopic(name, partitions, settings.replication_factor,
                                          topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
        from core.topics import wait_for_leaders
        wait_for_leaders(admin, [name])
    have = _partition_counts(admin, [name]).get(name)
    if have != partitions:
        raise BackfillRefused(f"changelog topic {name} has {have} partitions, the input topic has "
                              f"{partitions}: a worker could not recover this state")


def read_compacted(settings: Settings, topic: str, timeout: float = 60.0) -> dict[bytes, bytes]:
    """key -> latest value of a topic, read once from the beginning to the current end."""
    out: dict[bytes, bytes] = {}
    records = iter_to_end(settings, topic, timeout=timeout, max_records=10_000,
                          client_id=f"{settings.app_id}-backfill-reader",
                          isolation_level="read_committed")
    try:
        for record in records:
            if record.key is None:
                continue
            if record.value is None:
                out.pop(record.key, None)
            else:
                out[record.key] = record.value
    except TimeoutError:
        raise BackfillRefused(f"reading {topic} took longer than {timeout}s") from None
    return out


def read_item_texts(settings: Settings) -> dict[str, str]:
    """item_id -> prompt text (records.Item.text()) from the `items` topic, as the worker's
    items agent would store it; invalid records are skipped (the worker dead-letters them)."""
    from core.records import InvalidRecord, Item, decode

    texts = {}
    for key, value in read_compacted(settings, settings.topic(ITEMS)).items():
        try:
            item = decode(Item, value, key=key, max_bytes=settings.max_payload_bytes)
        except InvalidRecord:
            continue
        texts[item.item_id] = item.text()
    return texts


async def _produce(settings: Settings, records) -> int:
    """Send (topic, partition or None, key, value, headers) tuples; waits for every ack.

    A dead letter (headers with a reason) that Kafka refuses is written again without key, with
    an empty value (its headers keep the row's coordinates, length and sha256). Any other record that
    fails is logged with its topic, partition and key, and the run raises after all were
    tried: re-running the file is harmless.

    aiokafka, not kafka-python: its C record builder checksums batches ~200x faster than
    kafka-python's pure-Python crc32c, which would dominate a million-event backfill."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                client_id=f"{settings.app_id}-backfill", acks="all",
                                enable_idempotence=True, linger_ms=20,
                                max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024,
                                **aiokafka_security_options(settings))
    await producer.start()
    try:
        futures = []
        for record in records:
            topic, partition, key, value, headers = record
            try:
                fut = await producer.send(topic, value, key=key, partition=partition,
                                          headers=headers)
            except Exception as exc:  # e.g. larger than max_request_size: raised at once
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(exc)
            futures.append((record, fut))
        await producer.flush()
        failed = []
        for record, fut in futures:
            try:
                await fut
            except Exception as exc:
                failed.append((record, exc))
        lost = 0
        for (topic, partition, key, value, headers), exc in failed:
            if dead_letter.REASON in dict(headers or ()):
                bare = [h for h in headers if h[0] != dead_letter.TRUNCATED]
                bare.append((dead_letter.TRUNCATED, b"1"))
                log.error("backfill dead letter to %s refused (%r): written without its value",
                          topic, exc)
                try:
                    await (await producer.send(topic, b"", partition=partition, headers=bare))
                    continue
                except Exception as again:
                    exc = again
            lost += 1
            log.error("backfill record to %s (partition %s, key %r) could not be written: %r",
                      topic, partition, (key or b"")[:100], exc)
        if lost:
            raise RuntimeError(f"{lost} of {len(futures)} backfill records could not be written "
                               "to Kafka (see the log); re-running the file is harmless")
        return len(futures)
    finally:
        await producer.stop()


# --- the command ---------------------------------------------------------------------------------
def run(settings: Settings, path: str | Path, *, force: bool = False, items: bool = True,
        log_fn: Callable[[str], object] = log.info) -> BackfillResult:
    """Backfill one Parquet file into partitions.closed and the state changelog."""
    start = time.monotonic()
    result = BackfillResult()
    timings = result.timings

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 3)
        return now

    table = read_events(path)  # a bad file is refused before anything touches Kafka
    from kafka.errors import KafkaError
    try:
        create_topics(settings, log=lambda m: None)
        admin = _admin(settings)
    except KafkaError as exc:
        raise BackfillRefused(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from None
    try:
        problems = check_group_idle(settings, admin)
        if problems and not force:
            raise BackfillRefused("refusing to backfill (state would be overwritten; --force "
                                  "overrides): " + "; ".join(problems))
        for problem in problems:
            log_fn(f"--force: going on despite: {problem}")
        behaviors = settings.topic(BEHAVIORS)
        n_partitions = _partition_counts(admin, [behaviors, settings.topic(ITEMS)])
        state_topic = changelog_topic(settings)
        ensure_changelog(settings, admin, state_topic, n_partitions[behaviors])
        drift_on = settings.drift_threshold > 0 and bool(_drift_kwargs(object()))
        if drift_on:  # the global table's changelog: as many partitions as `items`
            from streams.drift import ITEM_VECTORS_TABLE
            vectors_topic = changelog_topic(settings, ITEM_VECTORS_TABLE)
            ensure_changelog(settings, admin, vectors_topic, n_partitions[settings.topic(ITEMS)])
    finally:
        admin.close()
    t = lap("check", start)

    result.rows = table.num_rows
    reasons = reject_reasons(table, now=time.time(), max_future_s=settings.max_future_s)
    bad = pc.is_valid(reasons)
    rejected_rows = table.filter(bad).to_pylist() if pc.any(bad).as_py() else []
    bad_reasons = reasons.filter(bad).to_pylist()
    bad_index = pc.indices_nonzero(bad).to_pylist() if rejected_rows else []
    for reason in bad_reasons:
        result.rejected[reason] = result.rejected.get(reason, 0) + 1
    table = table.filter(pc.invert(bad))
    t = lap("read", t)

    texts = read_item_texts(settings) if items else {}
    result.items_with_text = len(texts)
    t = lap("items", t)

    rules = ubsp.CloseRules.from_settings(settings)
    drift_rule, vector_records = None, []
    if drift_on:
        from streams.drift import DriftRule, ItemVectors
        store = read_compacted(settings, vectors_topic)  # what the workers already have
        vectors = ItemVectors(store)
        used = pc.unique(table.column("item_id")).to_pylist()
        written = vectors.put_texts({i: texts[i] for i in used if i in texts})
        result.vectors_encoded = vectors.encoded
        items_partitions = n_partitions[settings.topic(ITEMS)]
        vector_records = [(vectors_topic, key_partition(i.encode(), items_partitions), i.encode(),
                           value, []) for i, value in written.items()]
        drift_rule = DriftRule.from_settings(settings, vectors)
        result.drift = True
        t = lap("vectors", t)

    closed_topic = settings.topic(PARTITIONS_CLOSED)
    out: list[tuple] = []

    def text_of(item_id: str) -> str:
        return texts.get(item_id) or f"item {item_id}"

    def on_closed(part: ubsp.Closed) -> None:
        out.append((closed_topic, None, part.user_id.encode("utf-8"),
                    partition_value(part, text_of, max_bytes=settings.max_payload_bytes), []))

    states = partition_histories(table, rules, drift_rule, on_closed, result)
    if states:
        result.backfill_until = max(s[BACKFILL_UNTIL] for s in states.values())
    t = lap("partition", t)

    source = f"parquet:{Path(path).resolve()}"
    dead = []
    for row, reason, index in zip(rejected_rows, bad_reasons, bad_index):
        value = json.dumps({"schema": "behavior/1", **row}, default=str).encode("utf-8")
        key = row["user_id"].encode("utf-8") if row.get("user_id") else None
        if key is not None and len(key) > 4 * MAX_ID_LEN:  # an oversize id: its row keeps it
            key = None
        value, headers = dead_letter.letter(value, reason, "backfill row rejected", topic=source,
                                            partition=-1, offset=index)
        dead.append((settings.topic(dlq(BEHAVIORS)), None, key, value, headers))
    n_state = n_partitions[behaviors]
    state_records = [(state_topic, key_partition(user.encode("utf-8"), n_state),
                      user.encode("utf-8"), state_value(state), [])
                     for user, state in states.items()]
    # Partitions first, states last: a crash in between leaves only idempotent re-sends to do.
    asyncio.run(_produce(settings, [*vector_records, *out, *dead]))
    t = lap("publish", t)
    result.states_written = asyncio.run(_produce(settings, state_records))
    lap("states", t)
    result.seconds = round(time.monotonic() - start, 3)
    log_fn(f"backfill {path}: {result.accepted} events of {result.users} users -> "
           f"{result.partitions} partitions, {result.states_written} states in {result.seconds}s")
    return result


def result_json(result: BackfillResult) -> str:
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in result.__dict__.items()})
