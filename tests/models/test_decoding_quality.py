"""The reference-vs-candidate AUC harness on real MovieLens-100K data and real training; the
summaries are the partitions' own item text (no LLM), so the two sides are set up by hand."""
import copy

import numpy as np
import pytest

from models import decoding_quality, training
from tests.conftest import base_settings

SOURCE = "item_text"


@pytest.fixture(scope="module")
def data():
    return training.prepare(base_settings(drift_threshold=0.0), dataset="ml-100k", n_users=40,
                            depth=2, k=2, history_len=20, data_seed=3, sources=(SOURCE,))


def _compare(a, b):
    return decoding_quality.compare(a, b, backbones=("din",), seeds=(0,), epochs=2,
                                    bootstrap=50, source=SOURCE)["din"]


def test_identical_summaries_give_identical_auc(data):
    result = _compare(data, copy.deepcopy(data))
    assert result["swapped"]["auc_diff_per_seed"] == [0.0]
    assert result["retrained"]["auc_diff_per_seed"] == [0.0]
    assert result["auc_reference"] == result["swapped"]["auc_candidate"] > 0.5


def test_the_candidate_side_is_scored_with_its_own_vectors(data):
    other = copy.deepcopy(data)
    matrix = other.matrices[SOURCE]
    rows = np.random.default_rng(0).permutation(np.arange(1, len(matrix)))  # row 0: padding
    other.matrices[SOURCE] = np.concatenate([matrix[:1], matrix[rows]])
    result = _compare(data, other)
    assert result["swapped"]["auc_diff_per_seed"][0] != 0.0
    assert result["swapped"]["auc_candidate"] != result["auc_reference"]


def test_data_from_other_users_is_refused(data):
    other = copy.deepcopy(data)
    other.users = {**other.users, "test": other.users["test"][:-1]}
    with pytest.raises(ValueError, match="same users"):
        _compare(data, other)
