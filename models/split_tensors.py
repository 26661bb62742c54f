"""`SplitTensors`: one split's samples as tensors, batched for training and prediction."""
from __future__ import annotations

import numpy as np
import torch

from models import ctr_data
from models.ctr_data import Samples


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
