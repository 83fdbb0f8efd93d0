"""Pixel- and prototype-level contrast between a weak and a strong view of each target image (METHODS.md §4).

The weak view is the plain target crop, the strong view the same crop with colour jitter, grayscale and blur
(same geometry, so pixel i matches pixel i). Both are compared as class-probability maps on a grid of
``grid_size``² pixels per image: pixel contrast (positive = the same pixel of the other view, negatives = every
other pixel of both views) and prototype contrast over the per-class means under the teacher's pseudo-labels.
"""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.adaptation import strong_view
from uda_ray.config import Config
from uda_ray.losses import class_prototypes, cross_view_contrast, cross_view_prototype_contrast
from uda_ray.models import Segmenter
from uda_ray.train.context import TGT, StepContext, resize_labels, upsample


class CrossViewTerm(nn.Module):
    name = "cross_view"
    reads = frozenset({TGT})

    def __init__(self, *, num_classes: int, pixel_weight: float, proto_weight: float, pixel_temperature: float,
                 proto_temperature: float, grid_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pixel_weight, self.proto_weight = pixel_weight, proto_weight
        self.pixel_temperature, self.proto_temperature = pixel_temperature, proto_temperature
        self.grid = (grid_size, grid_size)

    def _rows(self, logits: Tensor) -> Tensor:
        p = upsample(logits.float(), self.grid).softmax(dim=1)  # (B, C, g, g)
        return p.flatten(2).transpose(1, 2)  # (B, g*g, C)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        x_strong = strong_view(ctx.x_tgt, generator=ctx.generator)
        out_strong = ctx.aux_forward(x_strong)
        weak, strong = self._rows(ctx.out_tgt.logits), self._rows(out_strong.logits)  # (B, g*g, C) each
        labels = resize_labels(ctx.pseudo.labels, self.grid).flatten(1)  # (B, g*g)
        pixel = proto = weak.new_zeros(())
        for a, b, y in zip(weak, strong, labels):
            if self.pixel_weight > 0:
                pixel = pixel + cross_view_contrast(a, b, temperature=self.pixel_temperature)
            if self.proto_weight > 0:
                pa, _ = class_prototypes(a, y, self.num_classes)  # (C', C)
                pb, _ = class_prototypes(b, y, self.num_classes)  # (C', C)
                proto = proto + cross_view_prototype_contrast(pa, pb, temperature=self.proto_temperature)
        n = weak.shape[0]
        return {"cross_view_pixel": self.pixel_weight * pixel / n, "cross_view_proto": self.proto_weight * proto / n}


def build_cross_view(cfg: Config, model: Segmenter) -> CrossViewTerm | None:
    num_classes = model.num_classes
    c = cfg.loss.cross_view
    if c.pixel_weight == 0 and c.proto_weight == 0:
        return None
    return CrossViewTerm(num_classes=num_classes, pixel_weight=c.pixel_weight, proto_weight=c.proto_weight,
                         pixel_temperature=c.pixel_temperature, proto_temperature=c.proto_temperature,
                         grid_size=c.grid_size)
