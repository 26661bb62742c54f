"""DARE retrieval pools without a model: suffix matching, drafts, eviction, RocksDB persistence,
routing. Token ids are small ints."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from llm_workers.dare.pools import PoolConfig, PoolStore
from llm_workers.dare.routing import GLOBAL_POOL, PoolRouter, group_histogram, kmeans, top_groups
from llm_workers.dare.suffix_index import SuffixIndex, best_branch


# --- suffix index ----------------------------------------------------------------------------
def test_longest_suffix_wins_over_shorter_ones():
    index = SuffixIndex(max_ngram=4)
    index.add([1, 2, 3, 4, 5, 6])
    index.add([9, 3, 4, 7, 8])
    # "3 4" occurs in both; "2 3 4" only in the first: the longer match decides the draft.
    m = index.match([0, 2, 3, 4])
    assert m.length == 3 and len(m.places) == 1
    assert index.draft([0, 2, 3, 4], 5) == [5, 6]
    m = index.match([0, 0, 3, 4])
    assert m.length == 2 and len(m.places) == 2


def test_match_is_capped_at_max_ngram_and_needs_a_continuation():
    index = SuffixIndex(max_ngram=2)
    index.add([1, 2, 3, 4])
    assert index.match([9, 1, 2, 3]).length == 2       # only the last 2 tokens are keyed
    assert index.match([3, 4]).length == 0              # "3 4" ends the sequence: nothing follows
    assert index.draft([5, 6], 3) == []


def test_best_branch_follows_the_heaviest_continuation():
    index = SuffixIndex(max_ngram=3)
    for tail in ([10, 11, 12], [10, 11, 13], [10, 11, 13], [20, 21, 22]):
        index.add([1, 2, *tail])
    # after "1 2": 10 (3x) beats 20 (1x); then 11; then 13 (2x) beats 12 (1x)
    assert index.draft([1, 2], 5) == [10, 11, 13]
    assert index.draft([1, 2], 2) == [10, 11]
    m = index.match([1, 2])
    draft, support = best_branch([m.places], 5)
    assert draft == [10, 11, 13] and support == [2]


def test_best_branch_stops_on_weak_agreement():
    index = SuffixIndex(max_ngram=2)
    index.add([1, 2, 3, 4])
    index.add([1, 2, 3, 5])
    index.add([1, 2, 3, 6])
    m = index.match([1, 2])
    assert best_branch([m.places], 5)[0] == [3, 4]               # a tie: first seen
    assert best_branch([m.places], 5, min_share=0.5)[0] == [3]   # 1 of 3 is too weak
    assert best_branch([m.places], 5, min_support=2)[0] == [3]


def test_a_growing_sequence_is_indexed_as_its_keys_complete():
    index = SuffixIndex(max_ngram=3)
    sid, _ = index.add([1, 2, 3], growing=True)
    assert index.keys == 1                     # only position 0 has its 3 tokens yet
    index.extend(sid, [1, 2])
    assert index.keys == 3
    assert index.draft([7, 1, 2], 4) == [3, 1, 2]
    index.close(sid)
    assert index.keys == 5
    with pytest.raises(ValueError):
        index.extend(sid, [4])                 # closed: its tail keys are final
    other, _ = index.add([5, 6])
    with pytest.raises(ValueError):
        index.extend(other, [7])


def test_a_growing_sequence_matches_like_brute_force_as_it_grows():
    rng = random.Random(5)
    tokens = [rng.randrange(4) for _ in range(120)]
    index = SuffixIndex(max_ngram=4, min_ngram=2, max_occurrences=1000)
    sid, _ = index.add(tokens[:10], growing=True)
    for end in range(10, 120, 3):
        if end > 10:
            index.extend(sid, tokens[end - 3:end])
        seq = tokens[:end]
        for n in range(4, 1, -1):   # brute force over the positions whose 4 tokens exist
            gram = seq[-n:]
            want = sorted(p + n for p in range(0, end - 4 + 1) if seq[p:p + n] == gram and p + n < end)
            if want:
                break
        m = index.match(seq)
        assert (m.length, sorted(p for _, p in m.places)) == ((n, want) if want else (0, []))


def test_longest_suffix_match_agrees_with_brute_force():
    rng = random.Random(11)
    index = SuffixIndex(max_ngram=5, min_ngram=2, max_occurrences=1000)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(5, 40))] for _ in range(30)]
    for seq in seqs:
        index.add(seq)

    def brute(context):
        for n in range(min(5, len(context)), 1, -1):
            gram = context[-n:]
            places = sorted((i, p + n) for i, seq in enumerate(seqs) for p in range(len(seq) - n)
                            if seq[p:p + n] == gram)
            if places:
                return n, places
        return 0, []

    for _ in range(300):
        context = [rng.randrange(6) for _ in range(rng.randrange(1, 9))]
        n, places = brute(context)
        m = index.match(context)
        assert m.length == n
        assert sorted((list(seq), p) for seq, p in m.places) == sorted((seqs[i], p) for i, p in places)


def test_eviction_keeps_the_token_bound_and_removes_the_oldest():
    index = SuffixIndex(max_ngram=3, min_ngram=1, max_tokens=50)
    rng = random.Random(0)
    for i in range(40):
        index.add([1000 + i] + [rng.randrange(20) for _ in range(9)])
        assert index.tokens <= 50
    assert len(index) == 5 and index.evicted == 35
    kept = {seq[0] for _, seq in index.sequences()}
    assert kept == {1035, 1036, 1037, 1038, 1039}
    assert index.match([1000]).length == 0                 # the evicted sequences' keys are gone
    assert index.match([1039]).length == 1
    # the suffix array holds exactly the live sequences' positions
    assert index.keys == index.tokens == 50


def test_occurrence_lists_are_capped():
    index = SuffixIndex(max_ngram=1, min_ngram=1, max_occurrences=4)
    for i in range(10):
        index.add([100, i])
    m = index.match([100])
    assert [seq[p] for seq, p in m.places] == [6, 7, 8, 9]  # the most recent four


def test_index_arguments_are_checked():
    with pytest.raises(ValueError):
        SuffixIndex(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError):
        SuffixIndex(max_tokens=0)


# --- pools ---------------------------------------------------------------------------------
def test_draft_merges_the_pools_with_the_longest_match():
    store = PoolStore(config=PoolConfig(max_ngram=4))
    store.add(["cluster:0"], [1, 2, 3, 40, 41])
    store.add(["genre:Drama"], [1, 2, 3, 50, 51])
    store.add(["genre:Drama"], [1, 2, 3, 50, 52])
    store.add(["genre:Comedy"], [9, 2, 3, 60])
    d = store.draft([0, 1, 2, 3], ["cluster:0", "genre:Drama", "genre:Comedy"], 4)
    # cluster:0 and genre:Drama reach length 3; Drama's 50 has 2 votes against 40's 1
    assert d.tokens == [50, 51] and d.pool == "genre:Drama" and d.match_len == 3
    assert store.draft([0, 1, 2, 3], ["cluster:0"], 4).tokens == [40, 41]
    assert store.draft([0, 1, 2, 3], ["genre:Comedy"], 4).tokens == [60]   # shorter match
    assert store.draft([0, 1, 2, 3], ["nope"], 4).tokens == []
    assert store.draft([0, 1, 2, 3], ["cluster:0"], 0).tokens == []


def test_draft_falls_back_to_a_shorter_match_with_a_continuation():
    store = PoolStore(config=PoolConfig(max_ngram=4))
    store.add(["a"], [5, 6, 7])            # "5 6 7" matches fully but nothing follows
    store.add(["b"], [6, 7, 8, 9])
    d = store.draft([5, 6, 7], ["a", "b"], 3)
    assert d.tokens == [8, 9] and d.pool == "b" and d.match_len == 2


def test_extra_indexes_join_the_draft():
    store = PoolStore()
    own = SuffixIndex()
    own.add([1, 2, 3, 4, 1, 2])
    d = store.draft([1, 2], ["none"], 3, extra={"context": own})
    assert d.tokens == [3, 4, 1] and d.pool == "context"


def test_pool_names_must_not_contain_a_slash():
    with pytest.raises(ValueError):
        PoolStore().add(["a/b"], [1, 2])


def test_pools_persist_in_rocksdb_and_reload(tmp_path: Path):
    path = tmp_path / "pools"
    config = PoolConfig(max_ngram=4, max_tokens=40)
    store = PoolStore(str(path), config)
    rng = random.Random(1)
    seqs = [[rng.randrange(30) for _ in range(12)] for _ in range(6)]
    for i, seq in enumerate(seqs):
        store.add(["cluster:1", f"genre:{'Drama' if i % 2 else 'Comedy'}", GLOBAL_POOL], seq)
    store.put_meta("router", {"centroids": [[1.0, 0.0]], "groups_per_request": 2})
    before = store.stats()
    contexts = [seq[:k] for seq in seqs for k in (2, 5, 8)]
    drafts = [store.draft(c, ["cluster:1", "genre:Drama", "genre:Comedy"], 6).tokens for c in contexts]
    assert before["global"]["tokens"] <= 40 and before["global"]["evicted"] == 3
    store.close()
    assert (path / "CURRENT").exists()                 # real RocksDB files on disk

    again = PoolStore(str(path), config)
    stats = again.stats()
    assert {k: (v["sequences"], v["tokens"], v["keys"]) for k, v in stats.items()} == \
        {k: (v["sequences"], v["tokens"], v["keys"]) for k, v in before.items()}
    assert [again.draft(c, ["cluster:1", "genre:Drama", "genre:Comedy"], 6).tokens
            for c in contexts] == drafts
    assert again.get_meta("router")["centroids"] == [[1.0, 0.0]]
    # new sequences get fresh ids after the reloaded ones, and the order of age is kept
    again.add([GLOBAL_POOL], [99] * 12)
    ids = [sid for sid, _ in again.pool(GLOBAL_POOL).sequences()]
    assert ids == sorted(ids) and again.pool(GLOBAL_POOL).sequences()[-1][1].tolist() == [99] * 12
    again.close()
    # a smaller bound on reopen evicts on load, and the files follow
    small = PoolStore(str(path), PoolConfig(max_ngram=4, max_tokens=12))
    assert small.stats()[GLOBAL_POOL]["sequences"] == 1
    small.close()
    assert PoolStore(str(path), PoolConfig(max_ngram=4, max_tokens=1000)).stats()[GLOBAL_POOL]["sequences"] == 1


def test_clone_is_an_independent_in_memory_copy(tmp_path: Path):
    store = PoolStore(str(tmp_path / "p"))
    store.add(["x"], [1, 2, 3])
    copy = store.clone()
    copy.add(["x"], [1, 2, 4])
    assert copy.path is None and len(copy.pool("x")) == 2 and len(store.pool("x")) == 1
    store.close()


# --- routing -------------------------------------------------------------------------------
def test_kmeans_separates_obvious_groups_and_is_seeded():
    rng = random.Random(3)
    a = [[1 + rng.random() * 0.1, rng.random() * 0.1] for _ in range(30)]
    b = [[rng.random() * 0.1, 1 + rng.random() * 0.1] for _ in range(30)]
    c1 = kmeans(a + b, 2, seed=5)
    assert c1 == kmeans(a + b, 2, seed=5)
    router = PoolRouter(c1)
    assert {router.cluster(v) for v in a} != {router.cluster(v) for v in b}
    assert len({router.cluster(v) for v in a}) == 1


def test_router_names_cluster_and_top_genre_pools():
    vocab = ["Action", "Comedy", "Drama"]
    vec = group_histogram([("Action",), ("Action", "Drama"), ("Comedy",)], vocab)
    assert abs(sum(v * v for v in vec) - 1) < 1e-9
    assert top_groups([("Drama",), ("Action", "Drama"), ("Action",), ("Comedy",)], 2) == ["Action", "Drama"]
    router = PoolRouter([[1, 0, 0], [0, 0, 1]], groups_per_request=1)
    assert router.pools([0.1, 0, 0.9], [("Comedy",), ("Comedy", "Drama")]) == ["cluster:1", "genre:Comedy"]
    assert PoolRouter.from_meta(router.to_meta()).pools([1, 0, 0], [("Drama",)]) == ["cluster:0", "genre:Drama"]
    router.use_global = True
    assert router.pools([1, 0, 0], [("Drama",)]) == [GLOBAL_POOL]
