"""RocksDB state of the fusion worker (rocksdict), under `settings.state_path / "fusion-worker"`.

Keys (a 0x00 byte separates parts, so any user id or cluster name is safe):

    u <user>                JSON {"seq": newest summary applied (-1: none), "partitions": the
                            latest K partition summaries, newest first, "cascaded": the cascaded
                            summary, "end_ts", "closed_at": of that summary, "cluster": the user's
                            cold-start cluster (from their first partition), "version": the
                            version last published (None: nothing yet)}
    v <user>                the InterestVector bytes last published (a redelivery republishes
                            these exact bytes)
    m <cluster> <user>      cold member: a user of the cluster with no own vector yet; JSON
                            {"end_ts", "closed_at"} of their first partition
    c <cluster>             JSON: the CollectiveSummary fields last applied for the cluster
    k <cluster>             the cluster's collective vector (float32 bytes) under that summary
    o <topic> <partition>   next input offset already applied (restore checkpoint)

All changes of one micro-batch go in one WriteBatch, written before the batch's vectors are
produced and long before its input offsets are committed.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
from rocksdict import WriteBatch

from state.rocks import SEP, RocksStore, db_key


def new_user() -> dict:
    return {"seq": -1, "partitions": [], "cascaded": "", "end_ts": 0.0, "closed_at": 0.0,
            "cluster": None, "version": None}


class FusionStore(RocksStore):
    # --- reads ------------------------------------------------------------------------------
    def vector_bytes(self, user_id: str) -> bytes | None:
        return self._db.get(db_key(b"v", user_id))

    def collective(self, cluster: str) -> dict | None:
        return self._json(db_key(b"c", cluster))

    def collective_vector(self, cluster: str) -> np.ndarray | None:
        raw = self._db.get(db_key(b"k", cluster))
        return None if raw is None else np.frombuffer(raw, dtype=np.float32)

    def members(self, cluster: str) -> Iterator[tuple[str, dict]]:
        """Cold members of a cluster (users with no own vector yet) and their first partition."""
        prefix = db_key(b"m", cluster) + SEP
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            yield key[len(prefix):].decode("utf-8"), json.loads(value)

    def offset(self, topic: str, partition: int) -> int | None:
        raw = self._db.get(db_key(b"o", topic, str(partition)))
        return None if raw is None else int(raw)

    # --- writes: everything of a micro-batch in one atomic batch ------------------------------
    def batch(self) -> "Changes":
        return Changes()

    def write(self, changes: "Changes") -> None:
        if changes.batch.len():
            self._db.write(changes.batch)


class Changes:
    """The state changes of one micro-batch; `FusionStore.write` applies them atomically.
    Reads inside the batch see earlier puts through `users` (a write-through cache)."""

    def __init__(self):
        self.batch = WriteBatch(raw_mode=True)
        self.users: dict[str, dict] = {}
        self.collective: dict[str, np.ndarray] = {}

    def put_user(self, user_id: str, state: dict) -> None:
        self.users[user_id] = state
        self.batch.put(db_key(b"u", user_id), json.dumps(state).encode())

    def put_vector(self, user_id: str, value: bytes) -> None:
        self.batch.put(db_key(b"v", user_id), value)

    def add_member(self, cluster: str, user_id: str, info: dict) -> None:
        self.batch.put(db_key(b"m", cluster, user_id), json.dumps(info).encode())

    def drop_member(self, cluster: str, user_id: str) -> None:
        self.batch.delete(db_key(b"m", cluster, user_id))

    def put_collective(self, cluster: str, summary: dict, vector: np.ndarray) -> None:
        self.batch.put(db_key(b"c", cluster), json.dumps(summary).encode())
        self.batch.put(db_key(b"k", cluster), np.asarray(vector, dtype=np.float32).tobytes())
        self.collective[cluster] = vector

    def put_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self.batch.put(db_key(b"o", topic, str(partition)), str(next_offset).encode())
