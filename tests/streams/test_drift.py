"""The UBSP drift rule with real all-MiniLM-L6-v2 vectors of MovieLens-1M titles and genres."""
import numpy as np
import pytest

from core.settings import Settings
from streams import drift, movielens
from streams import ubsp
from streams.drift import (DIM, VALUE_BYTES, DriftRule, ItemVectors, decode_vector,
                           drift_distance, encode_vector, should_close_for_drift)
from streams.replay import movie_item
from tests.conftest import base_settings

ANIMATED = ["Toy Story (1995)", "Aladdin (1992)", "Lion King, The (1994)",
            "Little Mermaid, The (1989)", "Beauty and the Beast (1991)"]
MORE_ANIMATED = ["Toy Story 2 (1999)", "Bug's Life, A (1998)", "Mulan (1998)"]
HORROR = ["Halloween (1978)", "Nightmare on Elm Street, A (1984)", "Exorcist, The (1973)"]
THRESHOLD = Settings.__dataclass_fields__["drift_threshold"].default
MIN_EVENTS = Settings.__dataclass_fields__["drift_min_events"].default


@pytest.fixture(scope="module")
def movies():
    home = base_settings().home
    data_dir = movielens.fetch(home, datasets=("ml-1m",), log=lambda m: None)["ml-1m"]
    by_title = {m.title: m for m in movielens.load_items(data_dir, "ml-1m")}
    return {t: by_title[t] for t in ANIMATED + MORE_ANIMATED + HORROR}


@pytest.fixture(scope="module")
def vectors(movies):
    v = ItemVectors()
    v.put_texts({m.item_id: movie_item(m).text() for m in movies.values()})
    return v


def ids(movies, titles):
    return [movies[t].item_id for t in titles]


# --- pure math ----------------------------------------------------------------------------------
def test_distance_is_one_minus_cosine_to_the_normalised_centroid():
    e = np.eye(DIM, dtype=np.float32)
    assert drift_distance(e[[0, 0]], e[0]) == pytest.approx(0.0, abs=1e-6)
    assert drift_distance(e[[0]], e[1]) == pytest.approx(1.0)
    assert drift_distance(e[[0]], -e[0]) == pytest.approx(2.0)
    # centroid of e0, e1 is (e0 + e1)/sqrt(2): cos to e0 = 1/sqrt(2), whatever the scale
    assert drift_distance(e[[0, 1]] * 7.0, e[0] * 0.5) == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    assert drift_distance(np.empty((0, DIM)), e[0]) == 0.0


def test_stored_value_is_compact_float16_plus_text_digest():
    rng = np.random.default_rng(1)
    vec = rng.normal(size=DIM).astype(np.float32)
    vec /= np.linalg.norm(vec)
    value = encode_vector(vec, "Heat (1995) [Action|Crime]")
    assert isinstance(value, bytes) and len(value) == VALUE_BYTES == DIM * 2 + 8
    back = decode_vector(value)
    assert back.dtype == np.float32 and np.abs(back - vec).max() < 1e-3
    with pytest.raises(ValueError):
        decode_vector(value[:-1])
    with pytest.raises(ValueError):
        encode_vector(vec[:10])


# --- real vectors -----------------------------------------------------------------------------------
def test_animated_cache_then_horror_drifts_and_another_animated_film_does_not(movies, vectors):
    cache = ids(movies, ANIMATED)
    for title in HORROR:
        d = vectors.distance(cache, movies[title].item_id)
        assert d > THRESHOLD, (title, d)
        assert should_close_for_drift(cache, movies[title].item_id, vectors, THRESHOLD, MIN_EVENTS)
    for title in MORE_ANIMATED:
        d = vectors.distance(cache, movies[title].item_id)
        assert d < THRESHOLD - 0.1, (title, d)
        assert not should_close_for_drift(cache, movies[title].item_id, vectors, THRESHOLD,
                                          MIN_EVENTS)


def test_min_events_disabled_rule_and_unknown_items(movies, vectors):
    horror = movies[HORROR[0]].item_id
    cache = ids(movies, ANIMATED)
    assert not should_close_for_drift(cache[:MIN_EVENTS - 1], horror, vectors, THRESHOLD, MIN_EVENTS)
    assert not should_close_for_drift(cache, horror, vectors, 0.0, MIN_EVENTS)
    assert not should_close_for_drift(cache, "no-such-item", vectors, THRESHOLD, MIN_EVENTS)
    # unknown cache items weigh nothing: same answer as without them
    assert vectors.distance(cache + ["no-such-item"], horror) == pytest.approx(
        vectors.distance(cache, horror))
    assert vectors.distance(["no-such-item"], horror) is None


def test_fast_distance_equals_the_reference_function(movies, vectors):
    cache = ids(movies, ANIMATED + HORROR[:1])
    for title in MORE_ANIMATED + HORROR:
        new = movies[title].item_id
        assert vectors.distance(cache, new) == pytest.approx(
            drift_distance(vectors.matrix(cache), vectors.get(new)), abs=1e-6)


class NoEncoder:
    def encode(self, texts, batch_size=64):
        raise AssertionError(f"must not encode {texts}")


def test_vectors_live_in_a_bytes_store_and_only_changed_texts_are_encoded(movies, vectors):
    store = {}
    first = ItemVectors(store, encoder=vectors.encoder)
    texts = {m.item_id: movie_item(m).text() for m in movies.values()}
    assert len(first.put_texts(texts)) == len(texts) and first.encoded == len(texts)
    assert all(isinstance(k, bytes) and len(v) == VALUE_BYTES for k, v in store.items())
    # Another process over the same store (a RocksDB / GlobalTable): no encoding at all.
    second = ItemVectors(store, encoder=NoEncoder())
    assert second.put_texts(texts) == {}
    toy = movies["Toy Story (1995)"].item_id
    np.testing.assert_array_equal(second.get(toy), first.get(toy))
    np.testing.assert_allclose(second.get(toy), vectors.get(toy), atol=1e-6)
    # A changed title is re-encoded, and only that one.
    texts[toy] = "Toy Story (1995) [Horror]"
    third = ItemVectors(store, encoder=vectors.encoder)
    assert list(third.put_texts(texts)) == [toy] and third.encoded == 1
    assert not np.array_equal(third.get(toy), first.get(toy))


def test_encoding_off_the_event_loop_stores_the_same_vectors_and_lets_the_loop_run(movies,
                                                                                  vectors):
    import asyncio
    texts = {m.item_id: movie_item(m).text() for m in movies.values()}
    toy = movies["Toy Story (1995)"].item_id
    off_loop = ItemVectors({}, encoder=vectors.encoder)
    ticks = []

    async def main():
        async def ticker():  # runs while the encoder works in a thread
            while True:
                ticks.append(1)
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(ticker())
        off_loop.put_vector(toy, vectors.get(toy), texts[toy])  # stored meanwhile: kept
        written = await off_loop.put_texts_off_loop(texts, batch_size=4)
        ticking.cancel()
        return written

    written = asyncio.run(main())
    assert set(written) == set(texts) - {toy} and ticks
    for item_id in texts:
        np.testing.assert_allclose(off_loop.get(item_id), vectors.get(item_id), atol=1e-3)


def test_drift_rule_encodes_unseen_items_from_catalogue_text(movies):
    catalogue = {m.item_id: movie_item(m).text() for m in movies.values()}
    rule = DriftRule(ItemVectors(), THRESHOLD, MIN_EVENTS, text_of=catalogue.get)
    cache = ids(movies, ANIMATED)
    assert rule(cache, movies["Halloween (1978)"].item_id)
    assert not rule(cache, movies["Mulan (1998)"].item_id)
    assert not rule(cache, "not-in-catalogue")
    assert len(rule.vectors) == len(ANIMATED) + 2
    disabled = base_settings(drift_threshold=0.0)
    assert DriftRule.from_settings(disabled, ItemVectors()) is None


def test_drift_in_a_partition_stream(movies, vectors):
    """The rule in the proposed add_event order: a drift close happens before the new event."""
    rules = ubsp.CloseRules(max_events=20, max_gap_s=1e9, max_span_s=1e9)
    rule = DriftRule(vectors, THRESHOLD, MIN_EVENTS)
    titles = ANIMATED + MORE_ANIMATED[:1] + HORROR + MORE_ANIMATED[1:]
    state, closed = ubsp.new_state(), []
    for n, title in enumerate(titles):
        item = movies[title].item_id
        if rule([e.item_id for e in state["events"]], item):
            closed.append(ubsp._close("u", state, "drift"))
        closed += ubsp.add_event(state, "u", f"e{n}", item, "rate", float(n), 4.0, rules)[1]
    assert [(p.reason, [e.event_id for e in p.events]) for p in closed] == [
        ("drift", [f"e{n}" for n in range(6)])]  # horror starts the next cache
    assert [e.event_id for e in state["events"]] == [f"e{n}" for n in range(6, len(titles))]


def test_default_threshold_closes_a_modest_share_on_movielens_100k():
    result = drift.measure("ml-100k", home=base_settings().home, thresholds=(THRESHOLD,),
                           log=lambda m: None)
    p = result["percentiles"]
    assert p["50"] < THRESHOLD < p["99.9"]
    share = result["thresholds"][0]["drift_share"]
    assert 0.05 <= share <= 0.35, result
