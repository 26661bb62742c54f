"""A token-level suffix index: stored token sequences plus a suffix array over them.

Every position of every stored sequence is an entry of one sorted array, ordered by the (up to
`max_ngram`) tokens that start there. The occurrences of an n-gram are then one contiguous
range, found by binary search. The context's suffixes are tried from short to long: when the
last n tokens never occur, no longer suffix can (it would contain them), so the search stops
and the longest suffix found with a continuation is the match. Walking the matched
occurrences forward together is a walk down a trie of continuations whose node counts are the
number of occurrences that agree so far; the draft is the heaviest branch (REST's datastore
lookup, on a small per-pool array instead of one big corpus).

Memory is about 12 bytes per stored token (4 for the token, 8 for its array entry), so many
small pools stay cheap. Bounded: `max_tokens` caps the stored tokens (the least recently written
sequences are evicted), and at most `max_occurrences` of the most recent occurrences of a
match are read.

A sequence can grow (`extend`: the per-request context index); a position joins the array once
the `max_ngram` tokens after it exist, so entries never change their sort key.

Pure Python, no torch: a vLLM proposer can use the same index.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from heapq import nlargest
from typing import Iterable, Sequence

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1


@dataclass
class Match:
    """Occurrences of the context's longest indexed suffix in one index."""
    length: int                         # n of the matched n-gram (0: none)
    places: list                        # [(tokens, position right after the n-gram)]


class SuffixIndex:
    def __init__(self, max_ngram: int = 8, min_ngram: int = 2, max_tokens: int = 200_000,
                 max_occurrences: int = 64):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if max_tokens < 1 or max_occurrences < 1:
            raise ValueError("max_tokens and max_occurrences must be >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_tokens, self.max_occurrences = max_tokens, max_occurrences
        self._seqs: OrderedDict[int, array] = OrderedDict()   # live sequences, oldest first
        self._all: dict[int, array] = {}      # live and removed-but-still-in-the-array ones
        self._dead_entries = 0                # array entries of removed sequences
        self._indexed: dict[int, int] = {}    # seq id -> positions below this are in the array
        self._open: set[int] = set()          # sequences that may still grow
        self._sa = array("q")                 # (seq id << 32 | position), sorted by key
        self._tokens = 0
        self._next_id = 0
        self.evicted = 0

    # --- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def keys(self) -> int:
        """Indexed positions of the live sequences."""
        return len(self._sa) - self._dead_entries

    def sequences(self) -> list[tuple[int, array]]:
        """(sequence id, tokens), oldest first."""
        return list(self._seqs.items())

    # --- writes -------------------------------------------------------------------------
    def add(self, tokens: Iterable[int], seq_id: int | None = None,
            growing: bool = False) -> tuple[int, list[int]]:
        """Index a sequence; returns (its id, ids of the sequences evicted to make room).
        `growing`: more tokens will follow through `extend`."""
        seq = array("i", tokens)
        if seq_id is None:
            seq_id = self._next_id
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already indexed")
        if not 0 <= seq_id <= _MASK >> 1:
            raise ValueError(f"sequence id {seq_id} out of range")
        self._next_id = max(self._next_id, seq_id + 1)
        if len(seq) > self.max_tokens:           # keep the tail: it is the most recent text
            seq = seq[len(seq) - self.max_tokens:]
        evicted = []
        while self._seqs and self._tokens + len(seq) > self.max_tokens:
            evicted.append(next(iter(self._seqs)))
            self.remove(evicted[-1])
        self.evicted += len(evicted)
        self._seqs[seq_id] = self._all[seq_id] = seq
        self._tokens += len(seq)
        self._indexed[seq_id] = 0
        if growing:
            self._open.add(seq_id)
        self._index_upto(seq_id)
        return seq_id, evicted

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to a growing sequence (no eviction: the caller bounds its length)."""
        if seq_id not in self._open:   # its last positions were sorted on their final keys
            raise ValueError(f"sequence {seq_id} was not added with growing=True (or is closed)")
        seq = self._seqs[seq_id]
        seq.extend(tokens)
        self._tokens += len(tokens)
        self._index_upto(seq_id)

    def close(self, seq_id: int) -> None:
        """No more tokens will follow: index the sequence's last positions too."""
        self._open.discard(seq_id)
        self._index_upto(seq_id)

    def remove(self, seq_id: int) -> None:
        """Forget a sequence. Its array entries are skipped from now on and dropped in one
        pass once removed entries reach a quarter of the array (amortised O(1) per token)."""
        seq = self._seqs.pop(seq_id)
        self._tokens -= len(seq)
        self._dead_entries += self._indexed.pop(seq_id, 0)
        self._open.discard(seq_id)
        if self._dead_entries * 4 > len(self._sa):
            live = self._seqs
            self._sa = array("q", (e for e in self._sa if (e >> _SHIFT) in live))
            self._all = dict(live)
            self._dead_entries = 0

    def _index_upto(self, seq_id: int) -> None:
        seq = self._seqs[seq_id]
        end = len(seq) - self.max_ngram + 1 if seq_id in self._open else len(seq)
        start = self._indexed[seq_id]
        if end <= start:
            return
        sa, every, width = self._sa, self._all, self.max_ngram
        for pos in range(start, end):
            k = seq[pos:pos + width]
            lo, hi = 0, len(sa)
            while lo < hi:                       # insert after equal keys (older first)
                mid = (lo + hi) // 2
                e = sa[mid]
                p = e & _MASK
                if k < every[e >> _SHIFT][p:p + width]:
                    hi = mid
                else:
                    lo = mid + 1
            sa.insert(lo, (seq_id << _SHIFT) | pos)
        self._indexed[seq_id] = end

    # --- reads --------------------------------------------------------------------------
    def _range(self, gram: array, n: int) -> tuple[int, int]:
        """The range of the array whose keys start with the n tokens of `gram`."""
        sa, seqs = self._sa, self._all
        a, b = 0, len(sa)
        while a < b:                             # first key[:n] >= gram
            mid = (a + b) // 2
            e = sa[mid]
            p = e & _MASK
            if seqs[e >> _SHIFT][p:p + n] < gram:
                a = mid + 1
            else:
                b = mid
        first = a
        b = len(sa)
        while a < b:                             # first key[:n] > gram
            mid = (a + b) // 2
            e = sa[mid]
            p = e & _MASK
            if seqs[e >> _SHIFT][p:p + n] <= gram:
                a = mid + 1
            else:
                b = mid
        return first, a

    def match(self, context: Sequence[int], max_n: int | None = None) -> Match:
        """Occurrences of the longest suffix of `context` (<= max_n tokens) that is indexed
        and followed by at least one token (the most recent `max_occurrences` of them)."""
        top = min(self.max_ngram, len(context), max_n or self.max_ngram)
        if top < self.min_ngram or not self._sa:
            return Match(0, [])
        tail = array("i", context[len(context) - top:])
        found = []
        for n in range(self.min_ngram, top + 1):
            lo, hi = self._range(tail[top - n:], n)
            if lo >= hi:       # an n-gram that never occurs has no longer occurring suffix
                break
            found.append((n, lo, hi))
        for n, lo, hi in reversed(found):
            places = self._places(lo, hi, n)
            if places:
                return Match(n, places)
        return Match(0, [])

    def _places(self, lo: int, hi: int, n: int) -> list:
        seqs = self._seqs
        live = [e for e in self._sa[lo:hi]
                if (e >> _SHIFT) in seqs and (e & _MASK) + n < len(seqs[e >> _SHIFT])]
        if len(live) > self.max_occurrences:
            live = nlargest(self.max_occurrences, live)   # highest ids: most recent
        live.sort()
        return [(seqs[e >> _SHIFT], (e & _MASK) + n) for e in live]

    def draft(self, context: Sequence[int], max_len: int, **kw) -> list[int]:
        """The heaviest continuation branch of the longest matched suffix."""
        m = self.match(context)
        return best_branch([m.places], max_len, **kw)[0] if m.length else []


def best_branch(groups: list[list], max_len: int, min_support: int = 1,
                min_share: float = 0.0) -> tuple[list[int], list[int]]:
    """Walk the continuation trie of several occurrence lists, greedily by count.

    `groups` holds one occurrence list per source (pool); counts add up across sources, ties
    go to the continuation seen first. Stops at `max_len`, when fewer than `min_support`
    occurrences agree, or when the chosen child holds less than `min_share` of its parent's
    occurrences. Returns (draft tokens, how many occurrences of each group support it all).
    """
    cands = [(g, seq, pos) for g, places in enumerate(groups) for seq, pos in places]
    draft: list[int] = []
    for step in range(max_len):
        counts: dict[int, int] = {}
        for _, seq, pos in cands:
            if pos + step < len(seq):
                tok = seq[pos + step]
                counts[tok] = counts.get(tok, 0) + 1
        if not counts:
            break
        total = sum(counts.values())
        tok, n = max(counts.items(), key=lambda kv: kv[1])
        if n < min_support or (step and n < min_share * total):
            break
        draft.append(tok)
        cands = [c for c in cands if c[2] + step < len(c[1]) and c[1][c[2] + step] == tok]
    support = [0] * len(groups)
    for g, _, _ in cands:
        support[g] += 1
    return draft, support
