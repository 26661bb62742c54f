"""UIF as one trainable module: summary vectors -> fusion -> adaptor -> user vector -> CTR logit.

`InterestHead` is the online part (what the fusion agent applies to `summaries`): attention
fusion of the latest K partition-summary vectors with the cascaded-summary vector, then KAR's
hybrid-expert adaptor. `CtrModel` puts it in front of a CTR backbone (DIN or DCNv2); both are
trained together offline, the text encoder stays frozen. `build(config, item_genres)` rebuilds
a model from the JSON config stored in an artifact.
"""
from __future__ import annotations

import torch
from torch import nn

from models.adaptor import HybridExpertAdaptor
from models.dcnv2 import DCNv2
from models.din import DIN
from models.fusion import AttentionFusion

BACKBONES = {"din": DIN, "dcnv2": DCNv2}


class InterestHead(nn.Module):
    """Fusion + adaptor. Args: text_dim, k, fusion (AttentionFusion kwargs), adaptor
    (HybridExpertAdaptor kwargs except in_dim and kinds). Output [B, out_dim]."""

    def __init__(self, text_dim: int = 384, k: int = 4, fusion: dict | None = None,
                 adaptor: dict | None = None):
        super().__init__()
        self.fusion = AttentionFusion(text_dim=text_dim, k=k, **(fusion or {}))
        self.adaptor = HybridExpertAdaptor(in_dim=self.fusion.out_dim, kinds=1, **(adaptor or {}))
        self.k, self.text_dim, self.out_dim = k, text_dim, self.adaptor.out_dim

    def forward(self, parts: torch.Tensor, part_mask: torch.Tensor, cascaded: torch.Tensor,
                cascaded_mask: torch.Tensor) -> torch.Tensor:
        return self.adaptor([self.fusion(parts, part_mask, cascaded, cascaded_mask)])


class CtrModel(nn.Module):
    """A backbone, with an InterestHead feeding it the user vector when `interest` is set.
    The batch carries `parts` [B, K, E], `part_mask` [B, K], `cascaded` [B, E] and
    `cascaded_mask` [B] for the head (models/ctr_data.py), besides the backbone's fields."""

    def __init__(self, backbone: nn.Module, interest: InterestHead | None = None):
        super().__init__()
        self.backbone, self.interest = backbone, interest

    def user_vector(self, batch: dict) -> torch.Tensor | None:
        if self.interest is None:
            return None
        return self.interest(batch["parts"], batch["part_mask"], batch["cascaded"],
                             batch["cascaded_mask"])

    def forward(self, batch: dict) -> torch.Tensor:
        return self.backbone(batch, self.user_vector(batch))


def build(config: dict, item_genres: torch.Tensor) -> CtrModel:
    """config: {"backbone": "din"|"dcnv2", "backbone_kwargs": {...}, "n_items": int,
    "n_genres": int, "interest": None | {"text_dim", "k", "fusion", "adaptor"}}."""
    interest = InterestHead(**config["interest"]) if config.get("interest") else None
    kwargs = dict(config.get("backbone_kwargs") or {})
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    backbone = BACKBONES[config["backbone"]](
        config["n_items"], item_genres, config["n_genres"],
        user_vec_dim=interest.out_dim if interest else 0, **kwargs)
    return CtrModel(backbone, interest)
