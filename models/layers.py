"""Building blocks shared by the CTR backbones: item embeddings and an MLP.

A CTR batch is a dict of tensors (models/ctr_data.py makes them):
    item         [B]     candidate item index (0 = unknown item)
    hist         [B, L]  history item indices, oldest first, 0 = padding
    hist_rating  [B, L]  their ratings 1..5, 0 = padding, UNKNOWN_RATING when not known
and the backbone's forward also takes `user_vec` [B, U] (the UIF vector) or None.
"""
from __future__ import annotations

import torch
from torch import nn

UNKNOWN_RATING = 6
RATING_SLOTS = 7  # 0 pad, 1..5, 6 unknown


class ItemEmbedding(nn.Module):
    """Item id embedding plus the mean of its genres' embeddings.

    Args:
        n_items: item indices run 1..n_items (0 is padding / unknown).
        item_genres: LongTensor [n_items + 1, G] of genre indices per item, 0 = none.
        n_genres: genre indices run 1..n_genres.
        dim: embedding size.
    """

    def __init__(self, n_items: int, item_genres: torch.Tensor, n_genres: int, dim: int = 16):
        super().__init__()
        if item_genres.shape[0] != n_items + 1:
            raise ValueError(f"item_genres has {item_genres.shape[0]} rows, want {n_items + 1}")
        self.dim = dim
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.genres = nn.Embedding(n_genres + 1, dim, padding_idx=0)
        self.register_buffer("item_genres", item_genres.long(), persistent=True)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.normal_(self.genres.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[0].zero_()
            self.genres.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        genres = self.item_genres[items]                                  # [..., G]
        count = (genres > 0).sum(-1, keepdim=True).clamp(min=1)
        return self.items(items) + self.genres(genres).sum(-2) / count


class Dice(nn.Module):
    """DIN's data-adaptive activation: a PReLU whose switch point follows the batch statistics."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        p = torch.sigmoid(self.norm(flat)).reshape(shape)
        return p * x + (1 - p) * self.alpha * x


def mlp(in_dim: int, units: tuple[int, ...], dropout: float = 0.0,
        activation: str = "relu") -> nn.Sequential:
    """Linear -> activation -> dropout, per entry of `units` (activation: relu, prelu, dice)."""
    layers: list[nn.Module] = []
    for width in units:
        layers.append(nn.Linear(in_dim, width))
        if activation == "dice":
            layers.append(Dice(width))
        elif activation == "prelu":
            layers.append(nn.PReLU(width))
        elif activation == "relu":
            layers.append(nn.ReLU())
        else:
            raise ValueError(f"unknown activation {activation!r}: relu, prelu or dice")
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)
