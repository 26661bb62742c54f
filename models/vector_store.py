"""`BytesStore`: a bytes -> bytes mapping in SQLite, kept between runs.

Training's drift rule keeps its item vectors here (streams.drift.ItemVectors re-encodes an item
only when its text changed), so repeated runs do not encode the catalogue again.
"""
from __future__ import annotations

import sqlite3
from collections.abc import MutableMapping
from pathlib import Path


class BytesStore(MutableMapping):
    """bytes -> bytes in one SQLite table; every write is committed at once."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")

    def __getitem__(self, key):
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (bytes(key),)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def __setitem__(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (bytes(key), bytes(value)))
        self.db.commit()

    def __delitem__(self, key):
        self.db.execute("DELETE FROM kv WHERE k = ?", (bytes(key),))
        self.db.commit()

    def __iter__(self):
        return iter([row[0] for row in self.db.execute("SELECT k FROM kv")])

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]
