"""The example ranker: cached interest vectors (real broker, RocksDB) + the artifact's CTR model."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.worker import float32_values
from models.artifact import CtrScorer, InterestModel
from models.ranker import ExampleRanker
from state.interest_cache import InterestCache
from streams.producer import BehaviorProducer
from core.records import InterestVector
from core.topics import USER_INTERESTS, create_topics
from tests.uif_artifact import tiny_artifact

pytestmark = pytest.mark.kafka
HISTORY = ["50", "172", "181"]                 # ML-100K: Star Wars, Empire, Return of the Jedi
CANDIDATES = ["1", "98", "127", "313", "9999"]  # the last one is unknown to the model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.conftest import base_settings
    return tiny_artifact(tmp_path_factory, base_settings())


def publish(settings, user: str, version: int, vector: np.ndarray, model_version: str) -> None:
    record = InterestVector(user, version, float32_values(vector), len(vector), model_version,
                            1.7e9, 1.0e9)
    with BehaviorProducer(settings) as producer:
        producer.send_raw(USER_INTERESTS, user.encode(), record.encode())


def test_ranking_follows_the_users_vector(settings, artifact, tmp_path):
    create_topics(settings, log=lambda m: None)
    model, scorer = InterestModel.load(artifact), CtrScorer.load(artifact)
    ranker = ExampleRanker.open(settings, artifact, tmp_path / "cache")
    try:
        # no vector yet: the model's "no summary" vector, as in training
        before = ranker.rank("u1", HISTORY, CANDIDATES)
        assert before.version is None and not before.collective
        assert dict(before.items) == pytest.approx(
            dict(zip(CANDIDATES, scorer.score(None, HISTORY, CANDIDATES).tolist())))
        old, new = model.user_vectors([(["space opera battles"], "loves science fiction epics"),
                                       (["weepy costume dramas"], "prefers period romances")])
        publish(settings, "u1", 0, old, model.version)
        publish(settings, "u1", 1, new, model.version)
        publish(settings, "u1", 2, old, "some-other-model")  # not this scorer's: ignored
        ranker.cache.sync(timeout_s=30)
        after = ranker.rank("u1", HISTORY, CANDIDATES, top=3)
        assert after.version == 1 and len(after.items) == 3
        expected = scorer.score(new, HISTORY, CANDIDATES)
        best = np.argsort(-expected, kind="stable")[:3]
        assert [item for item, _ in after.items] == [CANDIDATES[i] for i in best]
        assert [s for _, s in after.items] == pytest.approx(expected[best].tolist(), abs=1e-6)
        assert not np.allclose(expected, scorer.score(old, HISTORY, CANDIDATES))
    finally:
        ranker.cache.close()


def test_ranker_refuses_a_cache_of_another_model(settings, artifact, tmp_path):
    create_topics(settings, log=lambda m: None)
    with InterestCache(settings, tmp_path / "cache", model_version="other") as cache:
        with pytest.raises(ValueError, match="other"):
            ExampleRanker(cache, CtrScorer.load(artifact))
