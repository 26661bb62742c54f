"""The trained UIF artifact and the two ways to use it online.

An artifact is a directory `<root>/<version>/` holding `manifest.json` (format, version, user
vector size, model config, item vocabulary, training record) and `weights.pt` (the CtrModel's
state dict: interest head + backbone). `<root>/LATEST` names the newest version, so `load`
takes either a version directory or the root.

    from models.artifact import InterestModel, CtrScorer, default_artifact_dir
    model = InterestModel.load(default_artifact_dir(settings))
    vectors = model.user_vectors([(["partition summary n", "partition summary n-1"],
                                   "cascaded summary n")])          # float32 [1, model.dim]
    scorer = CtrScorer.load(default_artifact_dir(settings))
    probs = scorer.score(vectors[0], ["1193", "661"], ["914", "3408", "2355"])

`models.training.train_tiny_artifact(settings, out_dir)` builds a small real artifact (a few MovieLens-100K
users, one epoch, summaries replaced by the partitions' own item text, so no LLM runs): for
tests of code that consumes artifacts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from models import uif
from models.layers import UNKNOWN_RATING
from models.text_encoder import MODEL_NAME, TextEncoder

FORMAT = "liber-uif/1"
MANIFEST, WEIGHTS, LATEST = "manifest.json", "weights.pt", "LATEST"


class ArtifactError(RuntimeError):
    """Missing, incomplete or incompatible artifact."""


def default_artifact_dir(settings) -> Path:
    """Root of the versioned artifacts: HOME/models/uif."""
    return Path(settings.home) / "models" / "uif"


def resolve(path: str | os.PathLike) -> Path:
    """A version directory (has manifest.json), or a root whose LATEST names one."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        version = path / latest.read_text().strip()
        if (version / MANIFEST).exists():
            return version
        raise ArtifactError(f"{latest} names {version.name}, which has no {MANIFEST}")
    raise ArtifactError(f"no UIF artifact at {path} (run `liber train`)")


def save(model: uif.CtrModel, config: dict, catalog, root: str | os.PathLike, *,
         history_len: int, metrics: dict, training: dict) -> Path:
    """Write a new version under `root` (atomically: a temp dir renamed) and point LATEST at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    version = f"uif-{config['backbone']}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-" \
              f"{digest.hexdigest()[:8]}"
    item_ids = [None] * (catalog.n_items + 1)
    for item_id, index in catalog.item_index.items():
        item_ids[index] = item_id
    empty = _empty_vector(model)
    manifest = {
        "format": FORMAT, "version": version, "created_at": time.time(),
        "dim": int(model.interest.out_dim) if model.interest else 0,
        "text_encoder": MODEL_NAME, "config": config, "dataset": catalog.dataset,
        "history_len": history_len, "item_ids": item_ids[1:], "genres": catalog.genres,
        "empty_vector": [float(x) for x in empty] if empty is not None else None,
        "metrics": metrics, "training": training,
    }
    tmp = root / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"state_dict": state, "item_genres": torch.from_numpy(catalog.item_genres)},
               tmp / WEIGHTS)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=float))
    final = root / version
    tmp.rename(final)
    latest_tmp = root / f".{LATEST}.{os.getpid()}"
    latest_tmp.write_text(version)
    os.replace(latest_tmp, root / LATEST)
    return final


def _empty_vector(model: uif.CtrModel) -> np.ndarray | None:
    """The user vector of someone with no summary yet (every slot masked)."""
    if model.interest is None:
        return None
    head = model.interest
    was = head.training
    head.eval()
    with torch.no_grad():
        z = torch.zeros(1, head.k, head.text_dim)
        vec = head(z, torch.zeros(1, head.k, dtype=torch.bool), z[:, 0],
                   torch.zeros(1, dtype=torch.bool))
    head.train(was)
    return vec[0].numpy().astype(np.float32)


def _load(path) -> tuple[Path, dict, uif.CtrModel]:
    path = resolve(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT}")
    blob = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    model = uif.build(manifest["config"], blob["item_genres"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return path, manifest, model


class InterestModel:
    """Text encoder + fusion + adaptor of one artifact: summaries -> user vectors."""

    def __init__(self, path: Path, manifest: dict, model: uif.CtrModel,
                 encoder: TextEncoder | None = None):
        if model.interest is None:
            raise ArtifactError(f"{path}: this artifact was trained without an interest head")
        self.path, self.manifest = path, manifest
        self.version: str = manifest["version"]
        self.dim: int = int(manifest["dim"])
        self.k: int = model.interest.k
        self.head = model.interest
        self.encoder = encoder or TextEncoder()

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: TextEncoder | None = None) -> "InterestModel":
        return cls(*_load(path), encoder=encoder)

    def empty_vector(self) -> np.ndarray:
        """The vector of a user with no summary."""
        return np.asarray(self.manifest["empty_vector"], dtype=np.float32)

    def user_vectors(self, items: Sequence[tuple[Sequence[str], str]]) -> np.ndarray:
        """[(latest partition summaries, newest first; cascaded summary)] -> float32 [n, dim].
        Only the newest `k` partition summaries count; empty texts count as missing."""
        n = len(items)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts: dict[str, int] = {}
        for parts, cascaded in items:
            if isinstance(parts, str):
                raise TypeError("partition summaries must be a list of strings, newest first")
            for text in [*list(parts)[: self.k], cascaded]:
                if text:
                    texts.setdefault(text, len(texts))
        matrix = self.encoder.encode(list(texts)) if texts else np.zeros((0, self.head.text_dim),
                                                                         dtype=np.float32)
        parts_v = np.zeros((n, self.k, self.head.text_dim), dtype=np.float32)
        parts_m = np.zeros((n, self.k), dtype=bool)
        casc_v = np.zeros((n, self.head.text_dim), dtype=np.float32)
        casc_m = np.zeros(n, dtype=bool)
        for i, (parts, cascaded) in enumerate(items):
            for j, text in enumerate(list(parts)[: self.k]):
                if text:
                    parts_v[i, j], parts_m[i, j] = matrix[texts[text]], True
            if cascaded:
                casc_v[i], casc_m[i] = matrix[texts[cascaded]], True
        with torch.no_grad():
            out = self.head(torch.from_numpy(parts_v), torch.from_numpy(parts_m),
                            torch.from_numpy(casc_v), torch.from_numpy(casc_m))
        return out.numpy().astype(np.float32)


class CtrScorer:
    """The artifact's CTR model: (user vector, history, candidates) -> click probabilities."""

    def __init__(self, path: Path, manifest: dict, model: uif.CtrModel):
        self.path, self.manifest = path, manifest
        self.version: str = manifest["version"]
        self.dim: int = int(manifest["dim"])
        self.history_len: int = int(manifest["history_len"])
        self.backbone = model.backbone
        self.item_index = {item_id: i for i, item_id in enumerate(manifest["item_ids"], 1)}
        empty = manifest.get("empty_vector")
        self._empty = np.asarray(empty, dtype=np.float32) if empty else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CtrScorer":
        return cls(*_load(path))

    def known(self, item_id: str) -> bool:
        return item_id in self.item_index

    def score(self, user_vector: np.ndarray | None, history_item_ids: Sequence[str],
              candidate_item_ids: Sequence[str],
              history_ratings: Sequence[float] | None = None) -> np.ndarray:
        """Probabilities (float32, one per candidate, in order). `user_vector` None: the
        vector of a user with no summary. History: oldest first; only the newest
        `history_len` count; ratings 1-5 when known (otherwise they count as unknown).
        Item ids the artifact's dataset lacks count as an unknown item."""
        n = len(candidate_item_ids)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        if history_ratings is not None and len(history_ratings) != len(history_item_ids):
            raise ValueError("history_ratings must match history_item_ids in length")
        hist = [self.item_index.get(i, 0) for i in history_item_ids][-self.history_len:] \
            if self.history_len else []
        if history_ratings is None:
            rates = [UNKNOWN_RATING] * len(hist)
        else:
            rates = [min(5, max(1, int(round(r)))) for r in history_ratings][-self.history_len:] \
                if self.history_len else []
        pad = self.history_len - len(hist)
        batch = {
            "item": torch.tensor([self.item_index.get(i, 0) for i in candidate_item_ids]),
            "hist": torch.tensor([[0] * pad + hist] * n, dtype=torch.long),
            "hist_rating": torch.tensor([[0] * pad + rates] * n, dtype=torch.long),
        }
        vec = None
        if self.dim:
            if user_vector is None:
                user_vector = self._empty
            user_vector = np.asarray(user_vector, dtype=np.float32).reshape(-1)
            if user_vector.shape[0] != self.dim:
                raise ValueError(f"user vector has {user_vector.shape[0]} values; this model "
                                 f"({self.version}) takes {self.dim}")
            vec = torch.from_numpy(np.ascontiguousarray(user_vector)).expand(n, -1)
        with torch.no_grad():
            return torch.sigmoid(self.backbone(batch, vec)).numpy().astype(np.float32)
