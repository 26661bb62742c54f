"""AUC against pair counting (ties count half), and log loss."""
import itertools

import numpy as np
import pytest

from models.ctr_metrics import auc, logloss


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    assert auc(labels, scores) == pytest.approx(np.mean(pairs))
    assert np.isnan(auc(np.ones(3), np.arange(3.0)))
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
