"""Memory bounds for the stream worker's RocksDB stores (one store per table partition).

Faust opens every partition's store with RocksDB's defaults as Faust sets them: a 64 MiB
write buffer (memtable), up to 3 of them, and a 2 GiB block cache, per store; the worker has
three tables of 4 partitions, 12 stores. The UBSP state table rewrites a user's whole state
(1-2 KB of JSON) on every batch that touches the user, and the memtable keeps every version
until it is flushed, so the worker's memory rose with every event until a 64 MiB memtable
would fill: hours at soak rates, 768 MiB per store at worst. Small memtables flush often and
keep that growth to a few MiB; the block cache holds the working set of a state that is small
per user (recent ids and an open cache of at most `max_events` events).
"""
from __future__ import annotations

WRITE_BUFFER_BYTES = 2 << 20  # per memtable; flushed to an SST file when full
WRITE_BUFFERS = 2  # one being written, one being flushed
BLOCK_CACHE_BYTES = 32 << 20  # per store


def table_options() -> dict:
    """Options for a Faust table's RocksDB store (a new dict each time: Faust's store pops keys
    from the dict it is given)."""
    return {"write_buffer_size": WRITE_BUFFER_BYTES, "max_write_buffer_number": WRITE_BUFFERS,
            "block_cache_size": BLOCK_CACHE_BYTES}

