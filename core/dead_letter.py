"""Dead letters: a record that cannot be processed keeps its bytes (bounded) and gains a reason.

A dead letter must always fit what the dead-letter topic and our producer accept, or the one
record that could not be processed would also stop the consumer that tries to set it aside.
So `letter()` keeps at most `MAX_VALUE` bytes of the original value and records the original's
length and sha256 in headers: nothing is dropped silently, and an operator finds the whole
record by its source topic, partition and offset.
"""
from __future__ import annotations

import hashlib

REASON = "liber.error.reason"
DETAIL = "liber.error.detail"
SOURCE_TOPIC = "liber.source.topic"
SOURCE_PARTITION = "liber.source.partition"
SOURCE_OFFSET = "liber.source.offset"
ORIGINAL_LENGTH = "liber.original.length"
ORIGINAL_SHA256 = "liber.original.sha256"
TRUNCATED = "liber.original.truncated"
MAX_DETAIL = 1000
# Far below every producer's max_request_size and every topic's max.message.bytes we set
# (1 MiB and more), with room for the key and headers.
MAX_VALUE = 64 * 1024


def headers(reason: str, detail: str, *, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (REASON, reason.encode()),
        (DETAIL, detail[:MAX_DETAIL].encode("utf-8", "replace")),
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
    ]


def letter(value: bytes | None, reason: str, detail: str, *, topic: str, partition: int,
           offset: int, limit: int = MAX_VALUE) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """(value to send, headers) for a dead letter of `value`: at most `limit` bytes of it,
    with its source coordinates, its original length and sha256, and whether it was cut."""
    original = b"" if value is None else bytes(value)
    kept = original[:limit] if value is not None else None
    return kept, headers(reason, detail, topic=topic, partition=partition, offset=offset) + [
        (ORIGINAL_LENGTH, str(len(original)).encode()),
        (ORIGINAL_SHA256, hashlib.sha256(original).hexdigest().encode()),
        (TRUNCATED, b"1" if value is not None and len(original) > limit else b"0"),
    ]


def header_dict(record_headers) -> dict[str, str]:
    """Headers of a consumed record (kafka-python list of pairs or faust dict) as str -> str."""
    items = record_headers.items() if isinstance(record_headers, dict) else record_headers or ()
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in items}


def reason_of(record_headers) -> str | None:
    """The reason header of a consumed dead-letter record (kafka-python or faust headers)."""
    return header_dict(record_headers).get(REASON)
