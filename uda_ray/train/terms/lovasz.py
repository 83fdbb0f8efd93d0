"""Lovász-softmax on the source image beside its CE (SDCA's source-only and contrastive stages, weight 0.75)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.losses import lovasz_softmax
from uda_ray.models import Segmenter
from uda_ray.models.segmenter import upsample
from uda_ray.train.context import SRC, StepContext


class LovaszTerm(nn.Module):
    """``weight · lovasz_softmax(softmax(up(z_src)), y_src)``, with the source logits upsampled to the label bilinearly
    with align_corners=True, as SDCA does (``train_src.py``: its classifier resizes to the label size;
    ``train_sdca.py``: to the input size, which is the label's)."""

    name = "lovasz"
    reads = frozenset({SRC})

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        logits = upsample(ctx.out_src.logits.float(), ctx.y_src.shape[-2:], align_corners=True)  # (B, C, H, W)
        return {self.name: self.weight * lovasz_softmax(torch.softmax(logits, dim=1), ctx.y_src)}


def build_lovasz(cfg: Config, model: Segmenter) -> LovaszTerm | None:
    w = cfg.loss.lovasz.weight
    return LovaszTerm(weight=w) if w > 0 else None
