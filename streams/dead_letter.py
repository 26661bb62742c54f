"""Dead-letter headers: a record that cannot be processed keeps its bytes and gains a reason."""
from __future__ import annotations

REASON = "liber.error.reason"
DETAIL = "liber.error.detail"
SOURCE_TOPIC = "liber.source.topic"
SOURCE_PARTITION = "liber.source.partition"
SOURCE_OFFSET = "liber.source.offset"
MAX_DETAIL = 1000


def headers(reason: str, detail: str, *, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (REASON, reason.encode()),
        (DETAIL, detail[:MAX_DETAIL].encode("utf-8", "replace")),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
    ]


def reason_of(record_headers) -> str | None:
    """The reason header of a consumed dead-letter record (kafka-python or faust headers)."""
    items = record_headers.items() if isinstance(record_headers, dict) else record_headers or ()
    for key, value in items:
        if key == REASON:
            return value.decode() if isinstance(value, bytes) else value
    return None
