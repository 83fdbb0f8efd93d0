"""CLUDA: supervised pixel contrast on the decoder's fused multi-level map (METHODS.md §2), and under HRDA its
learned-weighted multi-resolution form (``multires``, METHODS.md §11).

Multi-resolution maps, per image type (source with its labels, mixed image with its labels and pseudo weights):
the context pass's fused map upsampled to the detail logits' grid (input / 4), the detail pass's fused map pasted
into a zero canvas of that grid at its box, the learned weights (the feature weighter's sigmoid) upsampled likewise
and the inside-the-box mask; all resized to fm_size × fm_size (bilinear; labels, pseudo weights and the mask
nearest) and flattened batch-major into ``uda_ray.losses.multires_pixel_contrast``. ``official_resizing`` uses
CLUDA's resizes instead: align_corners True for the context map's ×2 and every fm_size resize, and the pseudo weights
bilinear. Differences from CLUDA's code that stay: the loss's own documented choices (one flattening order, 255
ignored, the explicit box mask instead of ``label != 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uda_ray.config import Config
from uda_ray.losses import multires_pixel_contrast, pixel_contrast
from uda_ray.models import Segmenter, SegOutput
from uda_ray.models.hrda import OUTPUT_STRIDE, paste_boxes, scale_box
from uda_ray.train.context import MIX, SRC, StepContext, resize_labels, upsample


class CludaTerm(nn.Module):
    """Pixel contrast on the source image (GT labels) and on the ClassMix image (mixed labels and weights).

    The mixed image's pass, labels and weights are left in ``ctx.extra`` by the step under ``mix_out``,
    ``mix_labels`` and ``mix_weights``.
    """

    name = "cluda"
    reads = frozenset({SRC, MIX})

    def __init__(self, *, weight: float, temperature: float, fm_size: int, on_source: bool, on_mix: bool,
                 chunk_size: int, multires: bool = False, official_resizing: bool = False) -> None:
        super().__init__()
        self.weight, self.temperature, self.fm_size = weight, temperature, fm_size
        self.on_source, self.on_mix = on_source, on_mix
        self.chunk_size = chunk_size or None
        self.multires, self.official_resizing = multires, official_resizing

    def _multires(self, out: SegOutput, labels: Tensor, weights: Tensor | None) -> Tensor:
        d = out.detail
        if d is None or d.boxes is None or d.fused is None or d.weight is None:
            raise RuntimeError("loss.cluda.multires needs an HRDA training pass with the feature weighter "
                               "(model.hrda.enabled and loss.cluda.multires when the model is built)")
        fine = out.logits.shape[-2:]  # the detail logits' grid: input / 4
        boxes = [scale_box(box, 1 / OUTPUT_STRIDE) for box in d.boxes]
        hr = paste_boxes(d.fused, boxes, fine)  # (B, E, H/4, W/4)
        inside = paste_boxes(torch.ones_like(d.fused[:, :1]), boxes, fine)[:, 0] > 0  # (B, H/4, W/4)
        size = (self.fm_size, self.fm_size)

        def flat(x: Tensor) -> Tensor:  # (B, C, s, s) → (B·s·s, C), batch-major like the labels
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

        corners = self.official_resizing  # CLUDA: align_corners=True for the ×2 of the context map and the fm resizes
        lr = flat(upsample(upsample(out.fused.float(), fine, corners), size, corners))  # (N, E)
        hr = flat(upsample(hr.float(), size, corners))  # (N, E)
        att = flat(upsample(upsample(d.weight.float(), fine), size, corners))[:, 0]  # (N,)
        y = resize_labels(labels, size).reshape(-1)  # (N,)
        inside = resize_labels(inside, size).reshape(-1)  # (N,)
        if weights is None:
            w = None
        elif corners:  # CLUDA resizes the pseudo weights bilinearly
            w = upsample(weights[:, None].float(), size, True).reshape(-1)  # (N,)
        else:
            w = resize_labels(weights, size).reshape(-1)  # (N,)
        return multires_pixel_contrast(lr, hr, y, att=att, inside=inside, weights=w, temperature=self.temperature,
                                       chunk_size=self.chunk_size)

    def _contrast(self, fused: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
        size = (self.fm_size, self.fm_size)
        f = upsample(fused.float(), size)  # (B, E, s, s)
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*s*s, E), batch-major like the labels
        y = resize_labels(labels, size).reshape(-1)  # (B*s*s,)
        w = None if weights is None else resize_labels(weights, size).reshape(-1)  # (B*s*s,)
        return pixel_contrast(f, y, w, temperature=self.temperature, chunk_size=self.chunk_size)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        loss = ctx.x_src.new_zeros(())
        if self.multires:
            if self.on_source:
                loss = loss + self._multires(ctx.out_src, ctx.y_src, None)
            if self.on_mix and "mix_out" in ctx.extra:
                loss = loss + self._multires(ctx.extra["mix_out"], ctx.extra["mix_labels"], ctx.extra["mix_weights"])
            return {self.name: self.weight * loss}
        if self.on_source:
            loss = loss + self._contrast(ctx.out_src.fused, ctx.y_src, None)
        if self.on_mix and "mix_out" in ctx.extra:
            loss = loss + self._contrast(ctx.extra["mix_out"].fused, ctx.extra["mix_labels"],
                                         ctx.extra["mix_weights"])
        return {self.name: self.weight * loss}


def build_cluda(cfg: Config, model: Segmenter) -> CludaTerm | None:
    c = cfg.loss.cluda
    if c.weight == 0 or not (c.on_source or c.on_mix):
        return None
    return CludaTerm(weight=c.weight, temperature=c.temperature, fm_size=c.fm_size, on_source=c.on_source,
                     on_mix=c.on_mix, chunk_size=c.chunk_size, multires=c.multires,
                     official_resizing=c.official_resizing)
