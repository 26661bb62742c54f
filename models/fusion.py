"""UIF attention fusion: the latest K partition-summary vectors plus the cascaded-summary vector.

The cascaded summary is the user's whole profile; the partition summaries say what the most
recent partitions were about. The cascaded vector is the query of a multi-head attention over
K+1 slots (itself and the partition vectors, newest first, each with a learned recency
embedding), so the layer learns how much of the recent detail to mix into the profile. A user
with no summary at all (every slot masked) gets a learned "empty" vector instead.

    fusion = AttentionFusion(text_dim=384, k=4)
    fused = fusion(partitions [B, K, 384], partition_mask [B, K], cascaded [B, 384],
                   cascaded_mask [B])                                  # -> [B, out_dim]
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionFusion(nn.Module):
    """Attention over [cascaded, partition_1 (newest), ..., partition_K].

    Args:
        text_dim: size of the text-encoder vectors (all-MiniLM-L6-v2: 384).
        k: how many of the latest partition summaries are fused (older ones are ignored).
        hidden_dim: width of the attention (inputs are projected to it).
        heads: attention heads (must divide hidden_dim).
        dropout: dropout on the attention weights and the output.
    Output: [B, hidden_dim] (attribute `out_dim`).
    """

    def __init__(self, text_dim: int = 384, k: int = 4, hidden_dim: int = 64, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by heads={heads}")
        self.text_dim, self.k, self.out_dim = text_dim, k, hidden_dim
        self.project = nn.Linear(text_dim, hidden_dim)
        # slot 0: the cascaded summary; slots 1..k: partition summaries by recency
        self.slot = nn.Parameter(torch.zeros(k + 1, hidden_dim))
        nn.init.normal_(self.slot, std=0.02)
        self.attention = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.empty = nn.Parameter(torch.zeros(hidden_dim))

    def forward(self, partitions: torch.Tensor, partition_mask: torch.Tensor,
                cascaded: torch.Tensor, cascaded_mask: torch.Tensor) -> torch.Tensor:
        b, k, _ = partitions.shape
        if k > self.k:
            raise ValueError(f"{k} partition slots given, the layer fuses at most {self.k}")
        tokens = torch.cat([cascaded.unsqueeze(1), partitions], dim=1)        # [B, 1+k, D]
        tokens = self.project(tokens) + self.slot[: k + 1]
        present = torch.cat([cascaded_mask.unsqueeze(1), partition_mask], dim=1).bool()
        anything = present.any(dim=1)                                        # [B]
        # Rows with nothing present would make softmax NaN: let them see slot 0, then
        # replace their output by the learned empty vector.
        safe = present.clone()
        safe[~anything, 0] = True
        query = tokens[:, :1]
        # Without a cascaded summary (its generation failed) the query is slot 0's learned
        # embedding alone, which still attends over the partitions present.
        attended, _ = self.attention(query, tokens, tokens, key_padding_mask=~safe,
                                     need_weights=False)
        fused = self.norm(query.squeeze(1) + self.dropout(attended.squeeze(1)))
        return torch.where(anything.unsqueeze(1), fused, self.empty.expand(b, -1))
