"""Self-training on offline target labels (SDCA's last stage; METHODS.md §14): the model's supervised loss on the
target batch against the labels a pseudo_labels stage wrote (``data.target_pseudo_labels``; 255 = ignore):

    L_ST = λ · seg_loss(student(x_T), ŷ_T^offline)

``seg_loss`` is the model's own (CE, plus DeepLabV2's auxiliary CE or HRDA's fused and detail CE). The student's
pass over the plain target batch is the one the other terms share (``StepContext.out_tgt``).
"""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.models import Segmenter, unwrap
from uda_ray.train.context import TGT, StepContext


class SelfTrainingTerm(nn.Module):
    name = "self_training"
    reads = frozenset({TGT})

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        if ctx.y_tgt is None:
            raise RuntimeError("loss.self_training needs the offline target labels of data.target_pseudo_labels in "
                               "the target batch")
        parts = unwrap(ctx.student).seg_loss(ctx.out_tgt, ctx.y_tgt)
        return {f"{self.name}{part}": self.weight * loss for part, loss in parts.items()}


def build_self_training(cfg: Config, model: Segmenter) -> SelfTrainingTerm | None:
    w = cfg.loss.self_training.weight
    return SelfTrainingTerm(weight=w) if w > 0 else None
