"""DARE inside vLLM: a speculative proposer (`speculative_config` method `custom_class`) that
drafts from the same retrieval pools as our decoder (`pools.PoolStore`).

    LLM(model, speculative_config={"method": "custom_class", "model": PROPOSER_CLASS,
                                   "num_speculative_tokens": 8},
        additional_config={CONFIG_KEY: {"store_key": register_store(store), ...}})

vLLM calls `propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)`
once per step with the whole batch as token arrays, without request ids. So the pools are
chosen from what the prompt carries: the UIL prompts list the partition's items as
`"Title" [Genre|Genre]`, or its genres in one line (`prompt_genres`); the prompt part of a row
(up to the chat template's assistant turn) is decoded once, its genres give the `genre:<g>`
pools (top `genre_pools` groups) and, when the store holds a fitted router and its genre
vocabulary (metadata `router` and `vocab`), the genre histogram of the partition picks the
`cluster:<k>` pool. Without one, the router fits itself on the first `router_fit_after`
partitions it routes and stores the result. A row is recognised across steps by a hash of its
prompt tokens; its own text is indexed as it grows (the context pool).

Acceptance per pool: vLLM counts drafts and accepted tokens itself (its spec-decode metrics);
the proposer also infers them at the next step from the tokens that were appended after its
draft, and counts them per pool in `DareStats` (`liber_dare_*`, mode `vllm-<mode>`).

Pools are shared in process through a registry (`register_store` -> key): the in-process vLLM
backend feeds each finished generation with `feed(key, ...)`; a proposer in another process
(a `vllm serve` with `--speculative-config`) opens `pool_dir` itself.

Tested against vLLM 0.32.0 (`PINNED_VLLM`); tests/llm_workers/test_vllm_dare.py fails when an
upgrade changes the hook's call.
"""
from __future__ import annotations

import hashlib
import re
import threading
import uuid
from array import array
from collections import OrderedDict
from typing import Sequence

from llm_workers.dare.metrics import DareStats
from llm_workers.dare.pools import PoolConfig, PoolStore
from llm_workers.dare.routing import GLOBAL_POOL, PoolRouter, group_histogram, kmeans, top_groups
from llm_workers.dare.suffix_index import SuffixIndex

PINNED_VLLM = "0.32.0"
PROPOSER_CLASS = "llm_workers.dare.vllm_proposer.DareProposer"
CONFIG_KEY = "liber_dare"
CONTEXT_POOL = "context"
ROUTER_META, VOCAB_META = "router", "vocab"
PREFIX_TOKENS = 8                       # prompt tokens stored ahead of a generation (decoder's)
_ITEM = re.compile(r'"[^"\n]*"\s*\[([^\[\]\n]+)\]')
_GENRE_LINE = re.compile(r"(?:Liked|Disliked) genres: ([^.\n]+)\.")


def prompt_genres(text: str) -> list[list[str]]:
    """The genres a UIL prompt carries, one list per item: the `[Genre|Genre]` of each item
    (uil-kar-v2, uil-compact-v3), or, where titles are bare (uil-compact-v4, v5), the genre line's
    lists, most frequent first without counts: the rank stands in for the count (the first of
    n genres counts n times, the last once)."""
    groups = [[g.strip() for g in m.group(1).split("|") if g.strip()]
              for m in _ITEM.finditer(text)]
    if groups:
        return groups
    for m in _GENRE_LINE.finditer(text):
        ranked = [g.strip() for g in m.group(1).split(",") if g.strip()]
        groups += [[g] for rank, g in enumerate(ranked) for _ in range(len(ranked) - rank)]
    return groups


class Shared:
    """What the proposer and the backend share in one process: the store and its routing."""

    def __init__(self, store: PoolStore, config: dict):
        self.store = store
        self.config = config
        self.stats = DareStats()
        self.router: PromptRouter | None = None
        self.lock = threading.Lock()

    def router_for(self, tokenizer) -> "PromptRouter":
        with self.lock:
            if self.router is None:
                self.router = PromptRouter(tokenizer, self.store,
                                           int(self.config.get("genre_pools", 2)),
                                           bool(self.config.get("global_pool", False)),
                                           int(self.config.get("clusters", 0)),
                                           int(self.config.get("router_fit_after", 0)))
            return self.router


_SHARED: dict[str, Shared] = {}
_SHARED_LOCK = threading.Lock()


def register_store(store: PoolStore | None = None, pool_dir: str | None = None,
                   config: dict | None = None) -> str:
    """Make a pool store reachable by key in this process (opening `pool_dir`, or a memory-only
    store, when none is given)."""
    config = dict(config or {})
    if store is None:
        store = PoolStore(pool_dir, PoolConfig(
            max_ngram=int(config.get("max_ngram", 8)),
            max_tokens=int(config.get("max_tokens", 50_000)))) if pool_dir else PoolStore()
    key = uuid.uuid4().hex
    with _SHARED_LOCK:
        _SHARED[key] = Shared(store, config)
    return key


def shared(key: str) -> Shared:
    return _SHARED[key]


def store_for(key: str) -> PoolStore:
    return _SHARED[key].store


def feed(key: str, prompt_ids: Sequence[int], output_ids: Sequence[int], tokenizer=None) -> list[str]:
    """Store a finished generation in the pools its prompt routes to; returns their names."""
    entry = _SHARED.get(key)
    if entry is None or entry.router is None and tokenizer is None:
        return []
    router = entry.router_for(tokenizer)
    names = router.pools(prompt_ids)
    if names and output_ids:
        head = list(prompt_ids[-PREFIX_TOKENS:])
        entry.store.add(names, head + list(output_ids))
        for name in names:
            entry.stats.pool_size(name, entry.store.pool(name).tokens)
    return names


class PromptRouter:
    """Pool names from a prompt's token ids (see the module doc), cached per prompt."""

    def __init__(self, tokenizer, store: PoolStore, genre_pools: int = 2, use_global: bool = False,
                 clusters: int = 0, fit_after: int = 0):
        self.tokenizer = tokenizer
        self.store = store
        self.genre_pools = genre_pools
        self.use_global = use_global
        meta, vocab = store.get_meta(ROUTER_META), store.get_meta(VOCAB_META)
        self.router = PoolRouter.from_meta(meta) if meta and vocab else None
        self.vocab = vocab
        # With no stored router, the first `fit_after` partitions routed are kept and the
        # user clusters are fitted on them (k-means over their genre histograms), then stored.
        self.clusters, self.fit_after = clusters, fit_after
        self._seen: list[list[list[str]]] = []
        self._fit_lock = threading.Lock()
        marker = tokenizer.encode("<|im_start|>assistant", add_special_tokens=False) \
            if getattr(tokenizer, "chat_template", None) else []
        self.marker = marker
        self._cache: OrderedDict[bytes, list[str]] = OrderedDict()

    def prompt_end(self, tokens: Sequence[int]) -> int:
        """Where the prompt's assistant turn starts (the answer and its prefix follow)."""
        m = self.marker
        if m:
            for i in range(len(tokens) - len(m), -1, -1):
                if tokens[i] == m[0] and list(tokens[i:i + len(m)]) == m:
                    return i
        return len(tokens)

    def pools(self, prompt_ids: Sequence[int]) -> list[str]:
        end = self.prompt_end(prompt_ids)
        key = fingerprint(prompt_ids[:end])
        names = self._cache.get(key)
        if names is None:
            names = self._route(self.tokenizer.decode(list(prompt_ids[:end])))
            self._cache[key] = names
            if len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return names

    def _route(self, text: str) -> list[str]:
        if self.use_global:
            return [GLOBAL_POOL]
        groups = prompt_genres(text)
        names = []
        if self.router is None and groups:
            self._learn(groups)
        if self.router is not None and groups:
            names.append(f"cluster:{self.router.cluster(group_histogram(groups, self.vocab))}")
        names += [f"genre:{g}" for g in top_groups(groups, self.genre_pools)]
        return names

    def _learn(self, groups: list[list[str]]) -> None:
        if self.clusters < 1 or self.fit_after < 1:
            return
        with self._fit_lock:
            if self.router is not None:
                return
            self._seen.append(groups)
            if len(self._seen) < self.fit_after:
                return
            vocab = sorted({g for part in self._seen for item in part for g in item})
            vectors = [group_histogram(part, vocab) for part in self._seen]
            router = PoolRouter(kmeans(vectors, self.clusters, seed=0), self.genre_pools)
            self.store.put_meta(VOCAB_META, vocab)
            self.store.put_meta(ROUTER_META, router.to_meta())
            self.vocab, self.router, self._seen = vocab, router, []


def fingerprint(tokens: Sequence[int]) -> bytes:
    """A request's identity across steps: a hash of its prompt tokens as int32 bytes (the same
    for a list and for a row of vLLM's int32 token array)."""
    if hasattr(tokens, "dtype"):
        import numpy as np
        raw = np.ascontiguousarray(tokens, dtype=np.int32).tobytes()
    else:
        raw = array("i", (int(t) for t in tokens)).tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()


class _Row:
    """One request as the proposer follows it across steps."""
    __slots__ = ("pools", "own", "own_id", "indexed", "draft", "pool", "length")

    def __init__(self, pools):
        self.pools = pools
        self.own = None
        self.own_id = 0
        self.indexed = 0          # tokens of the row in its own context index
        self.draft: list[int] = []
        self.pool = ""
        self.length = 0           # row length when the draft was proposed


class DareProposer:
    """vLLM's custom proposer: drafts from DARE's pools for each row of the batch."""

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        config = dict((vllm_config.additional_config or {}).get(CONFIG_KEY) or {})
        key = config.get("store_key")
        if key not in _SHARED:           # another process (a server): open the pools here
            key = register_store(None, config.get("pool_dir"), config)
        self.shared = _SHARED[key]
        self.key = key
        self.mode = "vllm-" + ("relaxed" if (vllm_config.additional_config or {}).get(
            "liber_dare_relaxed") else "strict")
        self.context_pool = bool(config.get("context_pool", True))
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.router = self.shared.router_for(tokenizer)
        store_config = self.shared.store.config
        self._ngram = store_config.max_ngram
        self._index_args = dict(max_ngram=store_config.max_ngram, min_ngram=store_config.min_ngram,
                                max_tokens=1 << 30)
        self._rows: OrderedDict[bytes, _Row] = OrderedDict()
        self._max_rows = 4 * int(vllm_config.scheduler_config.max_num_seqs)
        self.calls = 0                    # propose() calls (tests read it)
        self.proposed = 0                 # non-empty drafts

    def load_model(self, *args, **kwargs) -> None:
        """No draft model: the pools are the drafter."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **kwargs) -> list[list[int]]:
        self.calls += 1
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            room = min(self.k, self.max_model_len - n - 1)
            if not sampled or room < 1:
                drafts.append([])
                continue
            drafts.append(self._propose_row(token_ids_cpu[i, :n], room))
        return drafts

    def _propose_row(self, tokens, room: int) -> list[int]:
        router = self.router
        end = router.prompt_end(tokens)
        key = fingerprint(tokens[:end])
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(router.pools(tokens[:end]))
            if len(self._rows) > self._max_rows:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(key)
        n = len(tokens)
        if row.draft and n > row.length:  # what the verifier kept of the previous draft
            new = tokens[row.length:n].tolist()
            same = 0
            for a, b in zip(new, row.draft):
                if a != b:
                    break
                same += 1
            self.shared.stats.draft(row.pool, self.mode, len(row.draft), min(same, len(new) - 1))
            row.draft = []
        extra = None
        if self.context_pool:
            if row.own is None:
                row.own = SuffixIndex(**self._index_args)
                row.own_id, _ = row.own.add(tokens.tolist(), growing=True)
                row.indexed = n
            elif n > row.indexed:
                row.own.extend(row.own_id, tokens[row.indexed:n].tolist())
                row.indexed = n
            extra = {CONTEXT_POOL: row.own}
        tail = tokens[max(0, n - self._ngram):n].tolist()
        draft = self.shared.store.draft(tail, row.pools, room, extra)
        row.draft, row.pool, row.length = draft.tokens, draft.pool, n
        if draft.tokens:
            self.proposed += 1
        return list(draft.tokens)
