"""A cold user's cluster: the genre signature of their first closed partition.

Cluster = the two most frequent genres among the items the user rated high (4-5, or all items
when none is rated high), e.g. `Comedy|Drama`; ties break alphabetically; no genres ->
`unknown`. It is a fixed quantisation of the user's item-genre histogram (MovieLens has 18
genres, so at most 171 clusters): deterministic, needs no training, the same on every worker
(the LLM worker, which writes a cluster's collective summary, and the fusion worker, which
serves its vector), and readable on a dashboard.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from core.activity import Activity, split_genres

UNKNOWN = "unknown"


def cluster_of(activities: Sequence[Activity]) -> str:
    liked = [a for a in activities if a.value is None or a.value >= 4] or list(activities)
    counts = Counter(g for a in liked for g in split_genres(a.text)[1])
    if not counts:
        return UNKNOWN
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    return "|".join(sorted(g for g, _ in top))
