"""Topic names, their Kafka configs, and creation through the admin API."""
from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from core.kafka import make_admin
from core.settings import Settings

BEHAVIORS = "behaviors"
ITEMS = "items"
PARTITIONS_CLOSED = "partitions.closed"
SUMMARIES = "summaries"
USER_INTERESTS = "user-interests"
COLLECTIVE_SUMMARIES = "collective-summaries"  # key cluster; the fusion worker's cold-start input
INPUT_TOPICS = (BEHAVIORS, ITEMS, PARTITIONS_CLOSED, SUMMARIES)
COMPACTED = frozenset({ITEMS, USER_INTERESTS, COLLECTIVE_SUMMARIES})
DLQ_SUFFIX = ".dlq"


def dlq(name: str) -> str:
    """Dead-letter topic of a logical topic: original key and bytes, reason in headers."""
    return name + DLQ_SUFFIX


def all_topics() -> list[str]:
    return [BEHAVIORS, ITEMS, PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS, COLLECTIVE_SUMMARIES,
            *(dlq(t) for t in INPUT_TOPICS)]


def topic_config(name: str) -> dict[str, str]:
    if name in COMPACTED:
        return {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}
    return {}


def wait_for_leaders(admin: KafkaAdminClient, names: list[str], timeout: float = 30.0) -> None:
    """New topics take a moment to elect leaders; producing before that gets retries."""
    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        described = admin.describe_topics(names)
        if all(t.get("error_code", 0) == 0 and t["partitions"] and
               all(p.get("error_code", 0) == 0 and p["leader_id"] >= 0
                   for p in t["partitions"]) for t in described):
            return
        time.sleep(0.2)


def create_topics(settings: Settings, names: list[str] | None = None, log=print) -> list[str]:
    """Create the logical topics (prefixed) that do not exist yet; returns the ones created."""
    admin = make_admin(settings, client_id=f"{settings.app_id}-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [n for n in (names or all_topics()) if settings.topic(n) not in existing]
        new = [NewTopic(settings.topic(n), settings.topic_partitions, settings.replication_factor,
                        topic_configs=topic_config(n)) for n in wanted]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:  # a concurrent creator won the race: fine
                pass
        wait_for_leaders(admin, [settings.topic(n) for n in wanted])
        for n in wanted:
            log(f"topic {settings.topic(n)}: created ({settings.topic_partitions} partitions"
                f"{', compacted' if n in COMPACTED else ''})")
        return [settings.topic(n) for n in wanted]
    finally:
        admin.close()
