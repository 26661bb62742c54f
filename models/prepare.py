"""Data preparation: the protocol of models/ctr_data.py end to end, for training and evaluation.

`prepare(...)`: MovieLens -> UBSP partitions -> user split -> summaries (batch UIL, cached; or
the partitions' own item text) -> encoder vectors -> samples, in a `Prepared`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from models import ctr_data
from models.ctr_data import Catalog, Samples, VectorTable
from models.summaries_batch import BatchSummariser, SummaryText
from models.text_encoder import DIM, TextEncoder
from models.vector_store import BytesStore
from streams import movielens, ubsp


@dataclass
class Prepared:
    catalog: Catalog
    splits: dict[str, Samples]
    users: dict[str, list[str]]
    depth: int
    k: int
    history_len: int
    partitions: dict[str, list]                     # user -> BatchPartitions summarised
    summaries: dict[str, dict[str, list]]           # source -> user -> [SummaryText | None]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)   # source -> [T+1, 384]
    lookups: dict[str, dict[str, tuple]] = field(default_factory=dict)  # source -> split -> idx
    stats: dict = field(default_factory=dict)


def item_text_summaries(parts) -> list[SummaryText]:
    """Summaries without an LLM: the partition's own item text, and as 'profile' the titles
    liked so far (capped). For plumbing tests and as a diagnostic of the LLM's contribution."""
    out, liked = [], []
    for part in parts:
        liked += [a.text for a in part.activities if a.value is not None and a.value >= 4]
        profile = "Liked: " + "; ".join(reversed(liked))
        out.append(SummaryText(ctr_data.partition_text(part), profile[:600]))
    return out


def prepare(settings, *, dataset: str = "ml-1m", n_users: int = 60, depth: int = 3, k: int = 3,
            history_len: int = 50, data_seed: int = 0, sources=("cascade",),
            max_new_tokens: int = 64, batch_size: int = 16, summariser: BatchSummariser | None = None,
            encoder: TextEncoder | None = None, log: Callable[[str], object] = lambda m: None
            ) -> Prepared:
    started = time.monotonic()
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    catalog = ctr_data.load_catalog(data_dir, dataset)
    histories = ctr_data.group_ratings(movielens.load_ratings(data_dir, dataset))
    rules = ubsp.CloseRules.from_settings(settings)
    # Draw in a seeded order, cutting each drawn user's partitions, until n_users have more
    # than `depth` closed partitions; the drift rule only needs the vectors of their items.
    order = ctr_data.shuffled_users(histories, data_seed)
    pool = order[: max(3 * n_users, n_users + 20)]
    drift = drift_rule(settings, catalog, [histories[u] for u in pool]) \
        if settings.drift_threshold > 0 else None
    eligible = []
    for u in pool:
        ctr_data.partition_user(histories[u], rules, drift=drift, dataset=dataset)
        if len(histories[u].partitions) > depth:
            eligible.append(u)
            if len(eligible) == n_users:
                break
    users = ctr_data.split_users(eligible)
    log(f"{dataset}: {len(histories)} users; {len(eligible)} drawn with > {depth} partitions "
        f"(train {len(users['train'])}, val {len(users['val'])}, test {len(users['test'])})")
    chosen = [u for split in users.values() for u in split]
    parts = {u: ctr_data.batch_partitions(histories[u], catalog, depth) for u in chosen}
    splits = {name: ctr_data.build_samples([histories[u] for u in ids], catalog, depth,
                                           history_len) for name, ids in users.items()}
    summaries: dict[str, dict[str, list]] = {}
    stats: dict = {"summaries": {}}
    for source in sources:
        if source == "item_text":
            summaries[source] = {u: item_text_summaries(p) for u, p in parts.items()}
            continue
        if summariser is None:
            summariser = BatchSummariser(settings, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, log=log)
        t = time.monotonic()
        summaries[source], batch_stats = summariser.run(parts, source)
        stats["summaries"][source] = {**batch_stats.as_dict(),
                                      "wall_s": round(time.monotonic() - t, 1)}
    if summariser is not None:
        stats["summariser"] = summariser.describe()
    prepared = Prepared(catalog, splits, users, depth, k, history_len, parts, summaries,
                        stats=stats)
    encoder = encoder or TextEncoder()
    for source, by_user in summaries.items():
        table = VectorTable(k)
        for u in chosen:
            table.add_user(u, by_user[u], depth)
        prepared.matrices[source] = table.matrix(encoder.encode, DIM)
        prepared.lookups[source] = {name: table.lookup(s) for name, s in splits.items()}
    stats["prepare_s"] = round(time.monotonic() - started, 1)
    stats["drift"] = drift is not None
    return prepared


def drift_rule(settings, catalog: Catalog, histories):
    """The drift rule of `settings` over the items of `histories` (their vectors cached on disk)."""
    from streams.drift import DriftRule, ItemVectors
    vectors = ItemVectors(BytesStore(Path(settings.home) / "cache" / "item-vectors.sqlite"))
    used = {i for h in histories for i in h.item_ids}
    vectors.put_texts({i: catalog.text[i] for i in used if i in catalog.text})
    return DriftRule.from_settings(settings, vectors)
