"""Which pools a request reads and feeds: its user's cluster and its partition's item groups.

User vectors here are normalised histograms over item groups (MovieLens genres) of the items a
user has interacted with; any fixed-size vector works (summary embeddings, say). Clusters come
from k-means (k-means++ start, Lloyd iterations, fixed seed) and are stored with the pools so a
restarted worker routes every user to the same pools.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

GLOBAL_POOL = "global"


def group_histogram(groups_per_item: Iterable[Sequence[str]], vocab: Sequence[str]) -> list[float]:
    """L2-normalised counts of each group over the items (an item counts for all its groups)."""
    slot = {g: i for i, g in enumerate(vocab)}
    vec = [0.0] * len(vocab)
    for groups in groups_per_item:
        for g in groups:
            if g in slot:
                vec[slot[g]] += 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm else vec


def top_groups(groups_per_item: Iterable[Sequence[str]], n: int) -> list[str]:
    """The n most frequent groups of a partition's items (ties: alphabetical)."""
    counts = Counter(g for groups in groups_per_item for g in groups)
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def kmeans(vectors: Sequence[Sequence[float]], k: int, iters: int = 25, seed: int = 0) -> list[list[float]]:
    """Centroids of k clusters (k-means++ start, Lloyd iterations), on torch for speed."""
    import torch
    x = torch.tensor(vectors, dtype=torch.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("kmeans needs a non-empty list of equal-length vectors")
    k = min(k, len(x))
    rng = random.Random(seed)
    centroids = [x[rng.randrange(len(x))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).min(dim=1).values ** 2
        total = float(d2.sum())
        if total == 0:
            centroids.append(x[rng.randrange(len(x))])
            continue
        r, acc = rng.random() * total, 0.0
        for i, w in enumerate(d2.tolist()):
            acc += w
            if acc >= r:
                break
        centroids.append(x[i])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = c.clone()
        for j in range(k):
            members = x[assign == j]
            if len(members):
                new[j] = members.mean(dim=0)
        if torch.allclose(new, c):
            break
        c = new
    return c.tolist()


@dataclass
class PoolRouter:
    """Maps a request to pool names: `cluster:<k>` plus `genre:<g>` for its top groups."""
    centroids: list[list[float]]
    groups_per_request: int = 2
    use_global: bool = False     # ablation: one pool for everything

    def cluster(self, vector: Sequence[float]) -> int:
        best, best_d = 0, math.inf
        for j, c in enumerate(self.centroids):
            d = sum((a - b) ** 2 for a, b in zip(vector, c))
            if d < best_d:
                best, best_d = j, d
        return best

    def pools(self, user_vector: Sequence[float], groups_per_item: Iterable[Sequence[str]]) -> list[str]:
        if self.use_global:
            return [GLOBAL_POOL]
        names = [f"cluster:{self.cluster(user_vector)}"] if self.centroids else []
        names += [f"genre:{g}" for g in top_groups(groups_per_item, self.groups_per_request)]
        return names

    def to_meta(self) -> dict:
        return {"centroids": self.centroids, "groups_per_request": self.groups_per_request}

    @classmethod
    def from_meta(cls, meta: dict) -> "PoolRouter":
        return cls(meta["centroids"], meta.get("groups_per_request", 2))
