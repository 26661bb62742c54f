"""Offline training of UIF with a CTR backbone: data preparation, the loop, metrics.

`prepare(...)` runs the protocol of models/ctr_data.py end to end: MovieLens -> UBSP
partitions -> user split -> summaries (batch UIL, cached; or the partitions' own item text) ->
encoder vectors -> samples. `fit(...)` trains with Adam and early stopping on validation AUC
(the best epoch's weights are kept). `train_artifact(...)` does both and saves a versioned
artifact (models/artifact.py); `liber train` calls it.
"""
from __future__ import annotations

import copy
import math
import os
import sqlite3
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models import artifact, ctr_data, uif
from models.ctr_data import Catalog, Samples, VectorTable
from models.summaries_batch import BatchSummariser, SummaryText
from models.text_encoder import DIM, TextEncoder
from streams import movielens, ubsp

SOURCES = ("cascade", "naive", "item_text")


# --- metrics ----------------------------------------------------------------------------------
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with tied scores counted half (Mann-Whitney U); NaN with one class only."""
    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True,
                                   return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]    # average 1-based rank of each tie group
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --- data -------------------------------------------------------------------------------------
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
    drift = _drift_rule(settings, catalog, [histories[u] for u in pool]) \
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


class _BytesStore(MutableMapping):
    """bytes -> bytes in SQLite: the drift rule's item vectors, kept between runs (the
    ItemVectors store re-encodes an item only when its text changed)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB)")

    def __getitem__(self, key):
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (bytes(key),)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def __setitem__(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (bytes(key), bytes(value)))
        self.db.commit()

    def __delitem__(self, key):
        self.db.execute("DELETE FROM kv WHERE k = ?", (bytes(key),))
        self.db.commit()

    def __iter__(self):
        return iter([row[0] for row in self.db.execute("SELECT k FROM kv")])

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]


def _drift_rule(settings, catalog: Catalog, histories):
    from streams.drift import DriftRule, ItemVectors
    vectors = ItemVectors(_BytesStore(Path(settings.home) / "cache" / "item-vectors.sqlite"))
    used = {i for h in histories for i in h.item_ids}
    vectors.put_texts({i: catalog.text[i] for i in used if i in catalog.text})
    return DriftRule.from_settings(settings, vectors)


# --- tensors and batches ----------------------------------------------------------------------
class SplitTensors:
    """One split as tensors, with the summary-vector indices of one source (or none)."""

    def __init__(self, samples: Samples, lookup: tuple | None, matrix: np.ndarray | None):
        self.n = len(samples)
        self.item = torch.from_numpy(samples.item)
        self.hist = torch.from_numpy(samples.hist)
        self.hist_rating_np = samples.hist_rating
        self.label = torch.from_numpy(samples.label)
        self.user = samples.user
        self.parts = torch.from_numpy(lookup[0]) if lookup is not None else None
        self.cascaded = torch.from_numpy(lookup[1]) if lookup is not None else None
        self.matrix = torch.from_numpy(matrix) if matrix is not None else None

    def batch(self, idx: np.ndarray, rating_dropout: float = 0.0,
              rng: np.random.Generator | None = None) -> dict:
        ratings = self.hist_rating_np[idx]
        if rating_dropout and rng is not None:
            ratings = ctr_data.unknown_ratings(ratings, rating_dropout, rng)
        t = torch.from_numpy(idx)
        out = {"item": self.item[t], "hist": self.hist[t],
               "hist_rating": torch.from_numpy(np.ascontiguousarray(ratings)),
               "label": self.label[t]}
        if self.parts is not None:
            parts, cascaded = self.parts[t], self.cascaded[t]
            out.update(parts=self.matrix[parts], part_mask=parts > 0,
                       cascaded=self.matrix[cascaded], cascaded_mask=cascaded > 0)
        return out


@dataclass
class TrainConfig:
    """epochs: at most this many passes; patience: epochs without a better validation AUC
    before stopping; rating_dropout: share of history ratings hidden in training."""
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 2
    rating_dropout: float = 0.1
    seed: int = 0


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_val_auc: float
    val_auc_by_epoch: list[float]
    seconds: float


def predict(model: torch.nn.Module, data: SplitTensors, batch_size: int = 2048) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, data.n, batch_size):
            idx = np.arange(start, min(data.n, start + batch_size))
            out.append(torch.sigmoid(model(data.batch(idx))).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def fit(model: torch.nn.Module, train: SplitTensors, val: SplitTensors, cfg: TrainConfig,
        log: Callable[[str], object] = lambda m: None) -> FitResult:
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, best_state, best_epoch, history = -math.inf, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(train.n)
        for start in range(0, train.n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # batch norm (Dice) needs two rows
                continue
            batch = train.batch(idx, cfg.rating_dropout, rng)
            loss = loss_fn(model(batch), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = auc(val.label.numpy(), predict(model, val))
        history.append(round(score, 5))
        log(f"epoch {epoch}: val AUC {score:.4f}")
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, len(history), best, history, round(time.monotonic() - started, 1))


# --- configs ----------------------------------------------------------------------------------
def model_config(backbone: str, catalog: Catalog, *, interest: bool, k: int = 3,
                 backbone_kwargs: dict | None = None, fusion: dict | None = None,
                 adaptor: dict | None = None) -> dict:
    return {"backbone": backbone, "backbone_kwargs": backbone_kwargs or {},
            "n_items": catalog.n_items, "n_genres": catalog.n_genres,
            "interest": {"text_dim": DIM, "k": k, "fusion": fusion or {},
                         "adaptor": adaptor or {}} if interest else None}


def build_model(config: dict, catalog: Catalog, seed: int) -> uif.CtrModel:
    torch.manual_seed(seed)
    return uif.build(config, torch.from_numpy(catalog.item_genres))


# --- artifact ---------------------------------------------------------------------------------
def train_artifact(settings, out_dir: str | Path | None = None, *, dataset: str = "ml-1m",
                   n_users: int = 60, depth: int = 3, k: int = 3, source: str = "cascade",
                   backbone: str = "din", history_len: int = 50, cfg: TrainConfig | None = None,
                   max_new_tokens: int = 64, batch_size: int = 16, data_seed: int = 0,
                   log: Callable[[str], object] = lambda m: None) -> Path:
    """Prepare, train (with the interest head), test, save; returns the version directory."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    cfg = cfg or TrainConfig()
    data = prepare(settings, dataset=dataset, n_users=n_users, depth=depth, k=k,
                   history_len=history_len, data_seed=data_seed, sources=(source,),
                   max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    tensors = {name: SplitTensors(s, data.lookups[source][name], data.matrices[source])
               for name, s in data.splits.items()}
    config = model_config(backbone, data.catalog, interest=True, k=k)
    model = build_model(config, data.catalog, cfg.seed)
    result = fit(model, tensors["train"], tensors["val"], cfg, log)
    test = tensors["test"]
    probs = predict(model, test)
    metrics = {"val_auc": result.best_val_auc, "test_auc": auc(test.label.numpy(), probs),
               "test_logloss": logloss(test.label.numpy(), probs),
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    training = {"dataset": dataset, "source": source, "users": {k_: len(v) for k_, v in
                                                                data.users.items()},
                "samples": {k_: len(v) for k_, v in data.splits.items()}, "depth": depth,
                "data_seed": data_seed, "train_config": cfg.__dict__, "stats": data.stats}
    out = Path(out_dir) if out_dir else artifact.default_artifact_dir(settings)
    path = artifact.save(model, config, data.catalog, out, history_len=history_len,
                         metrics=metrics, training=training)
    log(f"artifact {path.name}: test AUC {metrics['test_auc']:.4f}")
    return path


def train_tiny_artifact(settings, out_dir: str | os.PathLike, *, dataset: str = "ml-100k",
                        users: int = 16, depth: int = 2, backbone: str = "din",
                        seed: int = 0) -> Path:
    """A small but real artifact in seconds: `users` MovieLens users, one epoch, partition item
    text instead of LLM summaries (no LLM runs). Returns the version directory."""
    return train_artifact(settings.replace(drift_threshold=0.0), out_dir, dataset=dataset,
                          n_users=users, depth=depth, k=2, source="item_text",
                          backbone=backbone, history_len=20,
                          cfg=TrainConfig(epochs=1, seed=seed), data_seed=seed)
