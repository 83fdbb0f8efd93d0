"""MinEnt: entropy of the student's target predictions, normalised by log C (CFContra's coarse stage, §3)."""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.losses import entropy_loss
from uda_ray.models import Segmenter
from uda_ray.train.context import StepContext


class EntropyTerm(nn.Module):
    name = "entropy"

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {self.name: self.weight * entropy_loss(ctx.out_tgt.logits.float())}


def build_entropy(cfg: Config, model: Segmenter) -> EntropyTerm | None:
    return EntropyTerm(weight=cfg.loss.entropy.weight) if cfg.loss.entropy.weight > 0 else None
