"""DIN (Deep Interest Network, Zhou et al. 2018) as a CTR backbone.

The candidate item attends over the user's history: a small MLP scores each history item
from [candidate, history item, difference, product, rating] (DIN's local activation unit, no
softmax, so the pooled vector keeps the strength of the interest), and the weighted sum of
history items and their ratings is the user's interest in this candidate. Candidate, pooled
history and, when given, the UIF user vector go through an MLP to one logit.

    model = DIN(n_items, item_genres, n_genres, user_vec_dim=32)
    logits = model(batch, user_vec)          # batch: see models/layers.py; -> [B]
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import RATING_SLOTS, ItemEmbedding, mlp


class DIN(nn.Module):
    """Args:
        n_items, item_genres, n_genres: the item vocabulary (see layers.ItemEmbedding).
        user_vec_dim: size of the dense user vector appended to the MLP input; 0 = none.
        embed_dim: item, genre and rating embedding size.
        attention_units: hidden widths of the local activation unit.
        mlp_units: hidden widths of the output MLP.
        activation: "dice" (DIN's), "prelu" or "relu" in the output MLP.
        dropout: dropout in the output MLP.
    """

    name = "din"

    def __init__(self, n_items: int, item_genres: torch.Tensor, n_genres: int, *,
                 user_vec_dim: int = 0, embed_dim: int = 16,
                 attention_units: tuple[int, ...] = (64, 32),
                 mlp_units: tuple[int, ...] = (128, 64), activation: str = "dice",
                 dropout: float = 0.1):
        super().__init__()
        d = embed_dim
        self.user_vec_dim = user_vec_dim
        self.item = ItemEmbedding(n_items, item_genres, n_genres, d)
        self.rating = nn.Embedding(RATING_SLOTS, d, padding_idx=0)
        self.attention = nn.Sequential(mlp(5 * d, tuple(attention_units), activation="relu"),
                                       nn.Linear(attention_units[-1] if attention_units else 5 * d, 1))
        in_dim = d + 2 * d + user_vec_dim
        self.mlp = mlp(in_dim, tuple(mlp_units), dropout, activation)
        self.out = nn.Linear(mlp_units[-1] if mlp_units else in_dim, 1)

    def forward(self, batch: dict, user_vec: torch.Tensor | None = None) -> torch.Tensor:
        query = self.item(batch["item"])                                  # [B, d]
        hist = batch["hist"]
        keys = self.item(hist)                                            # [B, L, d]
        ratings = self.rating(batch["hist_rating"])                       # [B, L, d]
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.attention(torch.cat([q, keys, q - keys, q * keys, ratings], -1))
        weights = scores.squeeze(-1) * (hist > 0)                         # padding weighs 0
        pooled = (weights.unsqueeze(-1) * torch.cat([keys, ratings], -1)).sum(1)
        parts = [query, pooled]
        if self.user_vec_dim:
            if user_vec is None:
                raise ValueError("this DIN was built with user_vec_dim > 0: pass user_vec")
            parts.append(user_vec)
        return self.out(self.mlp(torch.cat(parts, -1))).squeeze(-1)
