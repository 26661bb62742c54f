"""KAR's hybrid-expert adaptor: knowledge vectors -> the dense vector a CTR model consumes.

Each kind of knowledge (here: the fused user-interest vector; item-side knowledge would be a
second kind) is mapped by a mixture of experts: experts *shared* by every kind plus experts
*specific* to that kind, mixed by a softmax gate computed from the same input. Shared experts
let kinds borrow strength from each other; specific ones keep what differs. The outputs of the
kinds are concatenated.

    adaptor = HybridExpertAdaptor(in_dim=64, out_dim=32, kinds=1)
    adaptor([fused [B, 64]])       # -> [B, 32]
"""
from __future__ import annotations

import torch
from torch import nn


def _expert(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, out_dim))


class HybridExpertAdaptor(nn.Module):
    """Shared plus specific experts with one softmax gate per knowledge kind.

    Args:
        in_dim: size of each knowledge vector (every kind has the same size).
        out_dim: size of the output per kind; the adaptor returns kinds * out_dim values.
        kinds: number of knowledge kinds (inputs).
        shared_experts: experts used by every kind.
        specific_experts: experts of each kind alone.
        hidden_dim: hidden width of each expert (a two-layer MLP).
        dropout: dropout inside the experts.
    """

    def __init__(self, in_dim: int = 64, out_dim: int = 32, kinds: int = 1,
                 shared_experts: int = 2, specific_experts: int = 2, hidden_dim: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        if kinds < 1 or shared_experts < 0 or specific_experts < 0 \
                or shared_experts + specific_experts < 1:
            raise ValueError("need kinds >= 1 and at least one expert per kind")
        self.in_dim, self.kinds = in_dim, kinds
        self.out_dim = out_dim * kinds
        self.shared = nn.ModuleList(_expert(in_dim, hidden_dim, out_dim, dropout)
                                    for _ in range(shared_experts))
        self.specific = nn.ModuleList(
            nn.ModuleList(_expert(in_dim, hidden_dim, out_dim, dropout)
                          for _ in range(specific_experts)) for _ in range(kinds))
        self.gates = nn.ModuleList(nn.Linear(in_dim, shared_experts + specific_experts)
                                   for _ in range(kinds))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.kinds:
            raise ValueError(f"{len(inputs)} knowledge inputs, the adaptor has {self.kinds} kinds")
        outputs = []
        for kind, x in enumerate(inputs):
            experts = [e(x) for e in self.shared] + [e(x) for e in self.specific[kind]]
            stacked = torch.stack(experts, dim=1)                     # [B, E, out]
            weights = torch.softmax(self.gates[kind](x), dim=-1)      # [B, E]
            outputs.append((weights.unsqueeze(-1) * stacked).sum(dim=1))
        return torch.cat(outputs, dim=-1)

    def gate_weights(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The softmax gate of each kind ([B, shared + specific]), for inspection."""
        return [torch.softmax(self.gates[k](x), dim=-1) for k, x in enumerate(inputs)]
