"""DCNv2 (Deep & Cross Network v2, Wang et al. 2021) as a CTR backbone.

Inputs are embedded into one vector x0: candidate item (id + genres), the mean of the
history items, the mean of the history items the user rated high (4-5), the mean rating
embedding of the history, and, when given, the UIF user vector. Cross layers model explicit
feature crosses, x_{l+1} = x0 * (W_l x_l + b_l) + x_l (W_l full rank, or U V^T with
`low_rank`), next to (parallel) or before (stacked) a deep MLP; one linear layer gives the logit.

    model = DCNv2(n_items, item_genres, n_genres, user_vec_dim=32)
    logits = model(batch, user_vec)          # batch: see models/layers.py; -> [B]
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import RATING_SLOTS, ItemEmbedding, mlp


class CrossLayer(nn.Module):
    def __init__(self, dim: int, low_rank: int = 0):
        super().__init__()
        if low_rank:
            self.weight = nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))
        else:
            self.weight = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.weight(x) + x


class DCNv2(nn.Module):
    """Args:
        n_items, item_genres, n_genres: the item vocabulary (see layers.ItemEmbedding).
        user_vec_dim: size of the dense user vector appended to x0; 0 = none.
        embed_dim: item, genre and rating embedding size.
        cross_layers: number of cross layers.
        low_rank: rank of each cross layer's weight; 0 = full rank.
        mlp_units: hidden widths of the deep part.
        structure: "parallel" (cross and deep side by side) or "stacked" (deep after cross).
        dropout: dropout in the deep part.
    """

    name = "dcnv2"

    def __init__(self, n_items: int, item_genres: torch.Tensor, n_genres: int, *,
                 user_vec_dim: int = 0, embed_dim: int = 16, cross_layers: int = 3,
                 low_rank: int = 0, mlp_units: tuple[int, ...] = (128, 64),
                 structure: str = "parallel", dropout: float = 0.1):
        super().__init__()
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"structure must be parallel or stacked, not {structure!r}")
        d = embed_dim
        self.user_vec_dim, self.structure = user_vec_dim, structure
        self.item = ItemEmbedding(n_items, item_genres, n_genres, d)
        self.rating = nn.Embedding(RATING_SLOTS, d, padding_idx=0)
        x_dim = 4 * d + user_vec_dim
        self.cross = nn.ModuleList(CrossLayer(x_dim, low_rank) for _ in range(cross_layers))
        self.deep = mlp(x_dim, tuple(mlp_units), dropout, "relu")
        deep_out = mlp_units[-1] if mlp_units else x_dim
        self.out = nn.Linear(x_dim + deep_out if structure == "parallel" else deep_out, 1)

    def forward(self, batch: dict, user_vec: torch.Tensor | None = None) -> torch.Tensor:
        hist, hist_rating = batch["hist"], batch["hist_rating"]
        present = (hist > 0).unsqueeze(-1).float()
        liked = ((hist_rating >= 4) & (hist_rating <= 5) & (hist > 0)).unsqueeze(-1).float()
        keys = self.item(hist)
        parts = [self.item(batch["item"]),
                 (keys * present).sum(1) / present.sum(1).clamp(min=1),
                 (keys * liked).sum(1) / liked.sum(1).clamp(min=1),
                 (self.rating(hist_rating) * present).sum(1) / present.sum(1).clamp(min=1)]
        if self.user_vec_dim:
            if user_vec is None:
                raise ValueError("this DCNv2 was built with user_vec_dim > 0: pass user_vec")
            parts.append(user_vec)
        x0 = torch.cat(parts, -1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "parallel":
            h = torch.cat([x, self.deep(x0)], -1)
        else:
            h = self.deep(x)
        return self.out(h).squeeze(-1)
