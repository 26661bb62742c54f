"""DARE's customised retrieval pools: many small suffix indexes, persisted in RocksDB.

Pool names say what a pool gathers: `cluster:<k>` (users of one k-means cluster), `genre:<g>`
(partitions whose items are mostly of one item group), `global` (everything; the ablation).
A generation is written to every pool its request names; a draft reads the request's pools
together (see `draft`). The store knows nothing of models or engines: the transformers decoder
and a vLLM proposer call the same `draft` with token lists.

Persistence (optional: `path=None` keeps pools in memory only). RocksDB, raw bytes:

    s/<pool>/<seq id, 16 hex digits>  ->  int32 little-endian tokens of one stored generation
    m/<key>                           ->  JSON (cluster centroids and other metadata)

Every add writes its sequence and deletes the ones it evicted in one WriteBatch, so the files
always hold exactly what the in-memory pools hold; `PoolStore(path)` rebuilds the indexes.
"""
from __future__ import annotations

import json
import sys
import threading
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from llm_workers.dare.suffix_index import SuffixIndex, best_branch

SEQ_PREFIX = b"s/"
META_PREFIX = b"m/"


@dataclass(frozen=True)
class PoolConfig:
    max_ngram: int = 8            # longest context suffix matched
    min_ngram: int = 2            # shortest one (one-token matches draft junk: <5% accepted)
    tokens_per_match: int = 4     # a draft is at most this many tokens per matched token
    max_tokens: int = 50_000      # per pool; least recently written generations evicted
    max_occurrences: int = 64     # most recent occurrences of a match that are read
    min_support: int = 1          # occurrences that must agree to extend a draft
    min_share: float = 0.0        # share of the parent's occurrences a draft token needs


@dataclass
class Draft:
    tokens: list[int]
    pool: str                     # the pool that supports the draft most ("" when empty)
    match_len: int = 0            # length of the matched context suffix
    support: dict = field(default_factory=dict)


def _db_key(pool: str, seq_id: int) -> bytes:
    return SEQ_PREFIX + pool.encode() + b"/" + b"%016x" % seq_id


class PoolStore:
    def __init__(self, path: str | None = None, config: PoolConfig = PoolConfig()):
        self.config = config
        self.path = path
        self._pools: dict[str, SuffixIndex] = {}
        self._lock = threading.Lock()
        self._db = None
        if path is not None:
            from rocksdict import Options, Rdict
            self._db = Rdict(str(path), options=Options(raw_mode=True))
            self._reload()

    # --- pools --------------------------------------------------------------------------
    def _new_index(self) -> SuffixIndex:
        c = self.config
        return SuffixIndex(max_ngram=c.max_ngram, min_ngram=c.min_ngram,
                           max_tokens=c.max_tokens, max_occurrences=c.max_occurrences)

    def pool(self, name: str) -> SuffixIndex:
        index = self._pools.get(name)
        if index is None:
            if "/" in name:
                raise ValueError(f"pool name {name!r} must not contain '/'")
            index = self._pools[name] = self._new_index()
        return index

    def names(self) -> list[str]:
        return sorted(self._pools)

    def stats(self) -> dict[str, dict]:
        return {name: {"sequences": len(p), "tokens": p.tokens, "keys": p.keys,
                       "evicted": p.evicted} for name, p in sorted(self._pools.items())}

    # --- writes -------------------------------------------------------------------------
    def add(self, pools: Iterable[str], tokens: Sequence[int]) -> None:
        """Store one generation (with its few leading prompt tokens) in each named pool."""
        tokens = array("i", tokens)
        with self._lock:
            batch = None
            if self._db is not None:
                from rocksdict import WriteBatch
                batch = WriteBatch(raw_mode=True)
            for name in dict.fromkeys(pools):
                seq_id, evicted = self.pool(name).add(tokens)
                if batch is not None:
                    batch.put(_db_key(name, seq_id), _to_bytes(tokens[-self.config.max_tokens:]))
                    for old in evicted:
                        batch.delete(_db_key(name, old))
            if batch is not None:
                self._db.write(batch)

    def put_meta(self, key: str, value) -> None:
        if self._db is not None:
            self._db[META_PREFIX + key.encode()] = json.dumps(value).encode()

    def get_meta(self, key: str, default=None):
        if self._db is None:
            return default
        raw = self._db.get(META_PREFIX + key.encode())
        return default if raw is None else json.loads(raw)

    def _reload(self) -> None:
        stale = []  # evicted on reload when the configured bound shrank since they were written
        for key, value in self._db.items(from_key=SEQ_PREFIX):
            if not key.startswith(SEQ_PREFIX):
                break
            name, _, hex_id = key[len(SEQ_PREFIX):].decode().rpartition("/")
            _, evicted = self.pool(name).add(_from_bytes(value), seq_id=int(hex_id, 16))
            stale.extend(_db_key(name, old) for old in evicted)
        for key in stale:
            self._db.delete(key)

    def clone(self) -> "PoolStore":
        """An in-memory copy (same sequences and ids, no files): for side-by-side runs."""
        copy = PoolStore(None, self.config)
        with self._lock:
            for name, index in self._pools.items():
                target = copy.pool(name)
                for seq_id, tokens in index.sequences():
                    target.add(tokens, seq_id=seq_id)
        return copy

    def flush(self) -> None:
        if self._db is not None:
            self._db.flush()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- reads --------------------------------------------------------------------------
    def draft(self, context: Sequence[int], pools: Sequence[str], max_len: int,
              extra: dict[str, SuffixIndex] | None = None) -> Draft:
        """Longest-suffix match of `context` across the named pools (plus `extra` indexes,
        e.g. the request's own context); occurrences of the pools that reach the longest
        match are merged and the heaviest continuation branch of up to `max_len` tokens is
        proposed, at most `tokens_per_match` tokens per matched context token (short matches
        are weak evidence). When that branch is empty the next shorter match is tried."""
        if max_len < 1:
            return Draft([], "")
        with self._lock:    # a feeding thread may be adding to these pools
            return self._draft(context, pools, max_len, extra)

    def _draft(self, context, pools, max_len, extra) -> Draft:
        sources = [(name, self._pools[name]) for name in pools if name in self._pools]
        if extra:
            sources.extend(extra.items())
        if not sources:
            return Draft([], "")
        context = context if isinstance(context, (list, array)) else list(context)
        limit = None
        while True:
            matches = [(name, index.match(context, limit)) for name, index in sources]
            best = max((m.length for _, m in matches), default=0)
            if best == 0:
                return Draft([], "")
            chosen = [(name, m) for name, m in matches if m.length == best]
            cap = min(max_len, self.config.tokens_per_match * best)
            tokens, support = best_branch([m.places for _, m in chosen], cap,
                                          self.config.min_support, self.config.min_share)
            if tokens:
                by_pool = {name: s for (name, _), s in zip(chosen, support)}
                top = max(by_pool, key=by_pool.get)
                return Draft(tokens, top, best, by_pool)
            limit = best - 1
            if limit < 1:
                return Draft([], "")


def _to_bytes(tokens: array) -> bytes:
    data = array("i", tokens)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def _from_bytes(raw: bytes) -> array:
    data = array("i")
    data.frombytes(raw)
    if sys.byteorder != "little":
        data.byteswap()
    return data
