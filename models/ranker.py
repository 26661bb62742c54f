"""An example ranker: the trained CTR model scores candidates with the user's cached vector.

    ranker = ExampleRanker.open(settings)          # newest artifact + the interest cache
    ranker.cache.start()                           # follow user-interests in the background
    ranking = ranker.rank("42", history_item_ids=["1193", "661"],
                          candidate_item_ids=["914", "3408", "2355"], top=2)
    ranking.items                                  # [("3408", 0.71), ("914", 0.64)]

The cache only keeps vectors of the scorer's own model version (vectors of another model mean
nothing to it). A user without a cached vector is scored with the model's "no summary" vector,
as in training; `Ranking.version` is then None.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from models.artifact import CtrScorer, default_artifact_dir
from state.interest_cache import InterestCache


class Ranking(NamedTuple):
    user_id: str
    version: int | None        # the interest vector's version (seq); None: no vector yet
    collective: bool           # the vector is the user's cluster's stand-in
    items: list[tuple[str, float]]  # (item id, click probability), best first


class ExampleRanker:
    def __init__(self, cache: InterestCache, scorer: CtrScorer):
        if cache.model_version not in (None, scorer.version):
            raise ValueError(f"cache keeps vectors of {cache.model_version}, the scorer is "
                             f"{scorer.version}")
        self.cache, self.scorer = cache, scorer

    @classmethod
    def open(cls, settings, artifact=None, cache_path=None) -> "ExampleRanker":
        scorer = CtrScorer.load(artifact or default_artifact_dir(settings))
        return cls(InterestCache(settings, cache_path, model_version=scorer.version), scorer)

    def rank(self, user_id: str, history_item_ids: Sequence[str],
             candidate_item_ids: Sequence[str], *, history_ratings: Sequence[float] | None = None,
             top: int | None = None) -> Ranking:
        entry = self.cache.entry(user_id)
        vector = None if entry is None else entry.vector
        scores = self.scorer.score(vector, history_item_ids, candidate_item_ids,
                                   history_ratings=history_ratings)
        order = np.argsort(-scores, kind="stable")[:top]
        return Ranking(user_id, None if entry is None else entry.version,
                       bool(entry and entry.collective),
                       [(candidate_item_ids[i], float(scores[i])) for i in order])
