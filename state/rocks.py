"""The RocksDB store base of the LLM and fusion workers (rocksdict, raw mode).

Keys are parts joined by a 0x00 byte (`db_key`), so any user id or cluster name is safe in
them; values are bytes, JSON where they are structured. Each worker's store adds its own key
kinds on top (llm_workers/state.py, fusion/state.py); `u <user>` holds both workers' JSON state
of a user.
"""
from __future__ import annotations

import json
from pathlib import Path

from rocksdict import Options, Rdict

SEP = b"\x00"


def db_key(kind: bytes, *parts: str | bytes) -> bytes:
    """`kind SEP part SEP part ...`, str parts UTF-8 encoded."""
    return SEP.join([kind, *(p.encode("utf-8") if isinstance(p, str) else p for p in parts)])


class RocksStore:
    """A rocksdict database in raw mode with JSON values under `u <user>`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self.path = path
        self._db = Rdict(str(path), options)

    def close(self) -> None:
        self._db.close()

    def _json(self, key: bytes):
        raw = self._db.get(key)
        return None if raw is None else json.loads(raw)

    def user(self, user_id: str) -> dict | None:
        return self._json(db_key(b"u", user_id))
