"""CLUDA: supervised pixel contrast on the decoder's fused multi-level map (METHODS.md §2)."""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.losses import pixel_contrast
from uda_ray.models import Segmenter
from uda_ray.train.context import StepContext, resize_labels, upsample


class CludaTerm(nn.Module):
    """Pixel contrast on the source image (GT labels) and on the ClassMix image (mixed labels and weights).

    The mixed image's fused map, labels and weights are left in ``ctx.extra`` by the step under ``mix_fused``,
    ``mix_labels`` and ``mix_weights``.
    """

    name = "cluda"

    def __init__(self, *, weight: float, temperature: float, fm_size: int, on_source: bool, on_mix: bool,
                 chunk_size: int) -> None:
        super().__init__()
        self.weight, self.temperature, self.fm_size = weight, temperature, fm_size
        self.on_source, self.on_mix = on_source, on_mix
        self.chunk_size = chunk_size or None

    def _contrast(self, fused: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
        size = (self.fm_size, self.fm_size)
        f = upsample(fused.float(), size)  # (B, E, s, s)
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*s*s, E), batch-major like the labels
        y = resize_labels(labels, size).reshape(-1)  # (B*s*s,)
        w = None if weights is None else resize_labels(weights, size).reshape(-1)  # (B*s*s,)
        return pixel_contrast(f, y, w, temperature=self.temperature, chunk_size=self.chunk_size)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        loss = ctx.x_src.new_zeros(())
        if self.on_source:
            loss = loss + self._contrast(ctx.out_src.fused, ctx.y_src, None)
        if self.on_mix and "mix_fused" in ctx.extra:
            loss = loss + self._contrast(ctx.extra["mix_fused"], ctx.extra["mix_labels"], ctx.extra["mix_weights"])
        return {self.name: self.weight * loss}


def build_cluda(cfg: Config, model: Segmenter) -> CludaTerm | None:
    c = cfg.loss.cluda
    if c.weight == 0 or not (c.on_source or c.on_mix):
        return None
    return CludaTerm(weight=c.weight, temperature=c.temperature, fm_size=c.fm_size, on_source=c.on_source,
                     on_mix=c.on_mix, chunk_size=c.chunk_size)
