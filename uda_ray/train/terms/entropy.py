"""MinEnt: entropy of the student's target predictions, normalised by log C (CFContra's coarse stage, §3; ADVENT's
MinEnt with ``aux_weight`` on DeepLabV2's layer3 prediction too, its multi-level variant)."""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.losses import entropy_loss
from uda_ray.models import Segmenter
from uda_ray.train.context import TGT, StepContext


class EntropyTerm(nn.Module):
    name = "entropy"
    reads = frozenset({TGT})

    def __init__(self, *, weight: float, aux_weight: float = 0.0) -> None:
        super().__init__()
        self.weight, self.aux_weight = weight, aux_weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        out = ctx.out_tgt
        losses = {self.name: self.weight * entropy_loss(out.logits.float())}
        if self.aux_weight > 0:
            if out.aux is None:
                raise RuntimeError("loss.entropy.aux_weight > 0 but the student gave no auxiliary prediction: "
                                   "build it with model.aux_weight > 0 and model.decoder: deeplabv2")
            losses[f"{self.name}_aux"] = self.aux_weight * entropy_loss(out.aux.float())
        return losses


def build_entropy(cfg: Config, model: Segmenter) -> EntropyTerm | None:
    e = cfg.loss.entropy
    return EntropyTerm(weight=e.weight, aux_weight=e.aux_weight) if e.weight > 0 or e.aux_weight > 0 else None
