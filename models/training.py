"""Offline training of UIF with a CTR backbone: the loop, and the artifact it saves.

`fit(...)` trains with Adam and early stopping on validation AUC (the best epoch's weights are
kept). `train_artifact(...)` prepares the data (models/prepare.py), fits, tests and saves a
versioned artifact (models/artifact.py); `liber train` calls it. `train_tiny_artifact(...)`
makes a small real one in seconds (tests, the demo).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models import artifact, uif
from models.ctr_data import Catalog
from models.ctr_metrics import auc, logloss
from models.prepare import prepare
from models.split_tensors import SplitTensors
from models.text_encoder import DIM

SOURCES = ("cascade", "naive", "item_text")


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
