"""MIC: Masked Image Consistency (Hoyer et al., CVPR 2023; METHODS.md §12).

The plain target batch gets a fresh colour jitter and blur (ClassMix's strengths, new draws), then a block mask
(``uda_ray.adaptation.block_mask``) whose masked pixels take the colour that the input normalisation maps to 0 (MIC
masks the normalised image). The student's supervised loss on it (``seg_loss``: CE, or under HRDA the fused and
detail CE with a detail box of its own) is weighted by the teacher's pseudo-labels and weights of the unmasked,
un-augmented target, the same ones ClassMix uses (no extra teacher: MIC's ``mask_alpha``/``mask_pseudo_threshold``
``same``):

    L_MIC = λ · seg_loss(student(mask(aug(x_T))), ŷ_T, ω_T)

The masked batch is a student pass of its own (BatchNorm statistics as ``model.aux_pass_bn_update`` says). MIC
back-propagates it separately; one sum into the step's backward gives the same gradients.
"""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.adaptation import apply_mask, block_mask
from uda_ray.config import Config
from uda_ray.data.photometric import jitter_then_blur
from uda_ray.models import Segmenter, unwrap
from uda_ray.train.context import StepContext


class MICTerm(nn.Module):
    name = "mic"
    reads: frozenset[str] = frozenset()  # its own pass only

    def __init__(self, *, weight: float, mask_ratio: float, block_size: int, jitter_strength: float,
                 jitter_prob: float, blur_prob: float, blur_sigma: tuple[float, float]) -> None:
        super().__init__()
        self.weight, self.mask_ratio, self.block_size = weight, mask_ratio, block_size
        self.jitter_strength, self.jitter_prob = jitter_strength, jitter_prob
        self.blur_prob, self.blur_sigma = blur_prob, blur_sigma

    def masked_images(self, ctx: StepContext) -> Tensor:
        """The augmented, block-masked target batch (B, 3, H, W), from the run's generator."""
        x = jitter_then_blur(ctx.x_tgt, strength=self.jitter_strength, jitter_prob=self.jitter_prob,
                             blur_prob=self.blur_prob, blur_sigma=self.blur_sigma, generator=ctx.generator)
        b, _, h, w = x.shape
        mask = block_mask(b, h, w, block_size=self.block_size, mask_ratio=self.mask_ratio, generator=ctx.generator,
                          device=x.device)  # (B, 1, H, W)
        return apply_mask(x, mask, unwrap(ctx.student).mean_colour())

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        p = ctx.pseudo
        out = ctx.aux_forward(self.masked_images(ctx))
        parts = unwrap(ctx.student).seg_loss(out, p.labels, p.weights)
        return {f"{self.name}{part}": self.weight * loss for part, loss in parts.items()}


def build_mic(cfg: Config, model: Segmenter) -> MICTerm | None:
    c, m = cfg.loss.mic, cfg.mix
    if c.weight == 0:
        return None
    return MICTerm(weight=c.weight, mask_ratio=c.mask_ratio, block_size=c.block_size,
                   jitter_strength=m.jitter_strength, jitter_prob=m.jitter_prob, blur_prob=m.blur_prob,
                   blur_sigma=(m.blur_sigma_min, m.blur_sigma_max))
