"""Invariants of a LIBER-Stream run, checked from the topics themselves.

Read after the workers have drained (or stopped cleanly), everything up to each topic's end:

- every behaviour event read from `behaviors` (identity: its `event_id`; a record that cannot
  be decoded is its own identity, `partition:offset`) is in exactly one place: one closed
  partition, the user's open cache (the last value of the stream worker's `ubsp-state`
  changelog), or `behaviors.dlq`. Duplicate event ids are counted once (the documented dedup
  rule). Missing = `lost`; in two places = `double_accounted`;
- a closed partition republished after a crash is byte-identical on (user_id, seq);
- exactly one summary per (user_id, seq): a redelivery may republish the stored bytes, but two
  different summaries of one partition are `duplicate_summaries`; every closed partition has a
  summary or is in `partitions.closed.dlq` (`unsummarised`), and no summary lacks a partition;
- versions never go backwards: per user, seq n+1's first summary comes after seq n's, and on
  `user-interests` (when a fusion worker writes it) a user's vector version never decreases
  along the log; one vector per (user_id, version): a republished version carries the same
  vector (`duplicate_vectors`); with a fusion worker, each user's newest vector is at the
  user's newest summary (`vectors_behind`);
- every record in every `*.dlq` topic has a reason header.

`check()` returns a `Report` whose `ok` says whether all of that holds.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from core.kafka import read_to_end
from core.settings import Settings
from core import dead_letter
from core.records import (BehaviorEvent, ClosedPartition, InterestVector, InvalidRecord,
                             Summary, decode)
from core.topics import (BEHAVIORS, INPUT_TOPICS, PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS,
                            dlq)


def state_changelog(settings: Settings) -> str:
    """Faust names a table's changelog `<app_id>-<table>-changelog` (no topic prefix)."""
    return f"{settings.app_id}-ubsp-state-changelog"


def read_all(settings: Settings, topic: str, timeout: float = 120.0) -> list:
    """Every record of `topic` (a full name) from the beginning up to its current end offsets.
    A topic that does not exist reads as empty."""
    return read_to_end(settings, topic, timeout=timeout, isolation_level="read_committed",
                       fetch_max_bytes=64 * 1024 * 1024)


@dataclass
class Report:
    events_in: int = 0            # distinct behaviour events read from `behaviors`
    records_in: int = 0           # behaviour records (duplicates and bad ones included)
    events_accounted: int = 0     # in exactly one of: closed partition, open cache, DLQ
    in_closed: int = 0
    in_open_caches: int = 0
    in_dlq: int = 0
    lost: int = 0
    double_accounted: int = 0
    unknown_events: int = 0       # in a partition or cache but never read from `behaviors`
    partitions: int = 0           # distinct (user_id, seq) on partitions.closed
    partitions_republished: int = 0
    conflicting_partitions: int = 0
    summaries: int = 0            # distinct (user_id, seq) with a summary
    summaries_republished: int = 0
    duplicate_summaries: int = 0
    unsummarised: int = 0         # closed, but neither summarised nor dead-lettered
    llm_dead_lettered: int = 0
    orphan_summaries: int = 0
    version_regressions: int = 0
    vectors: int = 0
    duplicate_vectors: int = 0
    vectors_behind: int = 0       # a user's newest vector is older than its newest summary
    dlq_records: int = 0
    dlq_without_reason: int = 0
    dlq_reasons: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # a few offending keys per violation

    VIOLATIONS = ("lost", "double_accounted", "unknown_events", "conflicting_partitions",
                  "duplicate_summaries", "unsummarised", "duplicate_vectors", "vectors_behind", "orphan_summaries", "version_regressions",
                  "dlq_without_reason")

    @property
    def ok(self) -> bool:
        return all(getattr(self, name) == 0 for name in self.VIOLATIONS)

    def note(self, violation: str, example) -> None:
        examples = self.examples.setdefault(violation, [])
        if len(examples) < 5:
            examples.append(example)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def open_caches(settings: Settings) -> dict[str, list[str]]:
    """user_id -> event ids in its open cache, from the last changelog value of each user."""
    last: dict[bytes, bytes | None] = {}
    for rec in read_all(settings, state_changelog(settings)):
        last[rec.key] = rec.value
    caches = {}
    for key, value in last.items():
        if not value:
            continue
        state = json.loads(value)
        if state.get("events"):
            caches[key.decode()] = [e[0] for e in state["events"]]  # rows as stored: JSON lists
    return caches


def check(settings: Settings, *, require_summaries: bool = True,
          require_vectors: bool = False) -> Report:
    """All invariants over the run's topics. `require_summaries=False` skips the check that
    every closed partition was summarised (runs without an LLM worker); `require_vectors`
    adds that each user's newest vector is at its newest summary (runs with a fusion worker)."""
    r = Report()
    t = settings.topic

    # --- where each behaviour event ended up -------------------------------------------------
    dead_sources: set[tuple[int, int]] = set()
    dead_partitions: set[tuple[str, int]] = set()
    for name in INPUT_TOPICS:
        for rec in read_all(settings, t(dlq(name))):
            r.dlq_records += 1
            reason = dead_letter.reason_of(rec.headers)
            if not reason:
                r.dlq_without_reason += 1
                r.note("dlq_without_reason", f"{rec.topic}@{rec.partition}:{rec.offset}")
                continue
            r.dlq_reasons[f"{name}:{reason}"] = r.dlq_reasons.get(f"{name}:{reason}", 0) + 1
            headers = dict(rec.headers)
            if name == BEHAVIORS:
                dead_sources.add((int(headers[dead_letter.SOURCE_PARTITION]),
                                  int(headers[dead_letter.SOURCE_OFFSET])))
            elif name == PARTITIONS_CLOSED:
                try:
                    part = decode(ClosedPartition, rec.value, key=rec.key, max_bytes=1 << 30)
                except InvalidRecord:
                    continue
                r.llm_dead_lettered += 1
                dead_partitions.add((part.user_id, part.seq))

    places: dict[str, Counter] = {}  # event identity -> where it is (kind -> count)
    for rec in read_all(settings, t(BEHAVIORS)):
        r.records_in += 1
        try:
            identity = decode(BehaviorEvent, rec.value, key=rec.key, max_bytes=1 << 30).event_id
        except (InvalidRecord, RecursionError, OverflowError, UnicodeError):
            identity = f"@{rec.partition}:{rec.offset}"
        where = places.setdefault(identity, Counter())
        where["records"] += 1
        if (rec.partition, rec.offset) in dead_sources:
            where["dlq"] += 1  # a resent copy may be dead-lettered (e.g. late) as well
    r.events_in = len(places)

    def locate(event_id: str, kind: str, owner) -> None:
        if event_id not in places:
            r.unknown_events += 1
            r.note("unknown_events", (kind, owner, event_id))
            return
        places[event_id][kind] += 1

    closed: dict[tuple[str, int], bytes] = {}
    for rec in read_all(settings, t(PARTITIONS_CLOSED)):
        part = decode(ClosedPartition, rec.value, key=rec.key, max_bytes=1 << 30)
        key = (part.user_id, part.seq)
        if key in closed:
            r.partitions_republished += 1
            if closed[key] != rec.value:
                r.conflicting_partitions += 1
                r.note("conflicting_partitions", key)
            continue
        closed[key] = rec.value
        for e in part.events:
            locate(e.event_id, "closed", key)
    r.partitions = len(closed)
    for user, ids in open_caches(settings).items():
        for event_id in ids:
            locate(event_id, "open", user)
    for identity, where in places.items():
        accepted = where["closed"] + where["open"]
        if accepted == 0 and where["dlq"] == 0:
            r.lost += 1
            r.note("lost", identity)
        elif accepted > 1 or (accepted == 1 and where["dlq"] >= where["records"]):
            # in two partitions, or its only record(s) both applied and dead-lettered
            r.double_accounted += 1
            r.note("double_accounted", (identity, dict(where)))
        else:
            r.events_accounted += 1
            if where["closed"]:
                r.in_closed += 1
            elif where["open"]:
                r.in_open_caches += 1
            else:
                r.in_dlq += 1

    # --- summaries ----------------------------------------------------------------------------
    first_summary: dict[tuple[str, int], bytes] = {}
    first_order: dict[str, list[int]] = defaultdict(list)
    for rec in read_all(settings, t(SUMMARIES)):
        s = decode(Summary, rec.value, key=rec.key, max_bytes=1 << 30)
        key = (s.user_id, s.seq)
        if key in first_summary:
            r.summaries_republished += 1
            if first_summary[key] != rec.value:
                r.duplicate_summaries += 1
                r.note("duplicate_summaries", key)
            continue
        first_summary[key] = rec.value
        first_order[s.user_id].append(s.seq)
    r.summaries = len(first_summary)
    for user, seqs in first_order.items():
        for earlier, later in zip(seqs, seqs[1:]):
            if later < earlier:
                r.version_regressions += 1
                r.note("version_regressions", ("summaries", user, earlier, later))
    for key in first_summary:
        if key not in closed:
            r.orphan_summaries += 1
            r.note("orphan_summaries", key)
    if require_summaries:
        for key in closed:
            if key not in first_summary and key not in dead_partitions:
                r.unsummarised += 1
                r.note("unsummarised", key)

    # --- interest vectors (written by the fusion worker, when there is one) -------------------
    latest: dict[str, int] = {}
    vectors: dict[tuple[str, int], tuple] = {}
    for rec in read_all(settings, t(USER_INTERESTS)):
        if rec.value is None:
            continue
        v = decode(InterestVector, rec.value, key=rec.key, max_bytes=1 << 30)
        r.vectors += 1
        if vectors.setdefault((v.user_id, v.version), v.vector) != v.vector:
            r.duplicate_vectors += 1  # two different vectors for one (user_id, version)
            r.note("duplicate_vectors", (v.user_id, v.version))
        if v.version < latest.get(v.user_id, v.version):
            r.version_regressions += 1
            r.note("version_regressions", ("user-interests", v.user_id, latest[v.user_id],
                                           v.version))
            continue
        latest[v.user_id] = v.version
    if require_vectors:
        newest_seq: dict[str, int] = {}
        for user, seq in first_summary:
            newest_seq[user] = max(seq, newest_seq.get(user, -1))
        for user, seq in newest_seq.items():
            if latest.get(user, -2) < seq:
                r.vectors_behind += 1
                r.note("vectors_behind", (user, latest.get(user), seq))
    return r
