"""Target→source mix-up: confident target pixels pasted onto the source image, with their own CE weight (§4)."""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.adaptation import target_to_source_mix
from uda_ray.config import Config
from uda_ray.losses import cross_entropy
from uda_ray.models import Segmenter
from uda_ray.train.context import StepContext, upsample


class TargetMixTerm(nn.Module):
    name = "t2s"
    reads: frozenset[str] = frozenset()  # its own pass only

    def __init__(self, *, t_max: float, weight: float) -> None:
        super().__init__()
        self.t_max, self.weight = t_max, weight

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        p = ctx.pseudo
        x, y, _ = target_to_source_mix(ctx.x_src, ctx.y_src, ctx.x_tgt, p.labels, p.confidence, t_max=self.t_max)
        logits = ctx.aux_forward(x).logits
        return {self.name: self.weight * cross_entropy(upsample(logits.float(), y.shape[-2:]), y)}


def build_target_mix(cfg: Config, model: Segmenter) -> TargetMixTerm | None:
    c = cfg.mix.target_to_source
    if not c.enabled or c.weight == 0:
        return None
    return TargetMixTerm(t_max=c.t_max, weight=c.weight)
