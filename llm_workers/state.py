"""RocksDB state of the LLM worker (rocksdict), under `settings.state_path / "llm-worker"`.

Keys (a 0x00 byte separates parts, so any user id is safe):

    u <user>              JSON {"seq": last done seq, "summary": cascaded summary, "cluster",
                                "partitions": partitions summarised, "events": events seen}
    s <user> <seq:012d>   the published Summary record bytes, last KEEP_SUMMARIES per user
                          (a redelivered partition republishes these exact bytes)
    p <user>              JSON {"seq", "prompt": system + user message} of the last call (debug)
    h <user>              JSON [[text, action, value], ...]: the whole history (naive mode only)
    c <cluster>           JSON collective state of a user cluster (see llm_workers.collective)
    o <summaries partition>  next offset of `summaries` already applied (restore checkpoint)

Every finished partition is one atomic WriteBatch, written before the summary is produced and
long before the input offset is committed: after a crash the partition comes back, is found
done, and the stored bytes are produced again (at-least-once, never a different summary).
"""
from __future__ import annotations

import json

from rocksdict import WriteBatch

from state.rocks import RocksStore, db_key

KEEP_SUMMARIES = 8


def _seq(seq: int) -> bytes:
    return b"%012d" % seq


class Store(RocksStore):
    # --- per user ---------------------------------------------------------------------------

    def summary_bytes(self, user_id: str, seq: int) -> bytes | None:
        return self._db.get(db_key(b"s", user_id, _seq(seq)))

    def history(self, user_id: str) -> list:
        return self._json(db_key(b"h", user_id)) or []

    def last_prompt(self, user_id: str) -> dict | None:
        return self._json(db_key(b"p", user_id))

    def finish(self, user_id: str, seq: int, user_state: dict, summary: bytes, *,
               prompt: dict | None = None, history: list | None = None,
               cluster: tuple[str, dict] | None = None) -> None:
        """One partition done: all its state changes in one atomic write."""
        batch = WriteBatch(raw_mode=True)
        batch.put(db_key(b"u", user_id), json.dumps(user_state).encode())
        batch.put(db_key(b"s", user_id, _seq(seq)), summary)
        old = seq - KEEP_SUMMARIES
        if old >= 0:
            batch.delete_range(db_key(b"s", user_id, _seq(0)),
                               db_key(b"s", user_id, _seq(old + 1)))
        if prompt is not None:
            batch.put(db_key(b"p", user_id), json.dumps(prompt).encode())
        if history is not None:
            batch.put(db_key(b"h", user_id), json.dumps(history).encode())
        if cluster is not None:
            batch.put(db_key(b"c", cluster[0]), json.dumps(cluster[1]).encode())
        self._db.write(batch)

    def restore(self, user_id: str, seq: int, summary: bytes, cascaded: str) -> bool:
        """Apply a summary read back from the `summaries` topic (another worker's, or ours);
        only a newer seq changes anything. Returns whether it did."""
        state = self.user(user_id)
        if state is not None and state["seq"] >= seq:
            return False
        state = dict(state or {"partitions": 0, "events": 0, "cluster": None})
        state.update(seq=seq, summary=cascaded, partitions=state.get("partitions", 0) + 1)
        self.finish(user_id, seq, state, summary)
        return True

    # --- clusters and offsets ------------------------------------------------------------------
    def cluster(self, name: str) -> dict | None:
        return self._json(db_key(b"c", name))

    def put_cluster(self, name: str, value: dict) -> None:
        self._db[db_key(b"c", name)] = json.dumps(value).encode()

    def restore_offset(self, partition: int) -> int:
        raw = self._db.get(db_key(b"o", str(partition)))
        return int(raw) if raw is not None else 0

    def put_restore_offsets(self, offsets: dict[int, int]) -> None:
        batch = WriteBatch(raw_mode=True)
        for partition, offset in offsets.items():
            batch.put(db_key(b"o", str(partition)), str(offset).encode())
        self._db.write(batch)
