"""HRDA: multi-resolution training with a learned scale attention (Hoyer et al., ECCV 2022; METHODS.md §10).

One backbone and one decode head see the input twice: the *context* pass on the whole input resized by
``context_scale`` (0.5) and the *detail* pass at full resolution on a ``detail_crop`` × ``detail_crop`` window.
A second DAFormer-style head with a 1×1 fusion (``scale_attention``) reads the context features and gives, after a
sigmoid, the attention ``a`` (one map per class, or one map). With ``y_LR`` the context logits, ``y_HR`` the detail
logits pasted into a zero canvas at their place and ``up`` the bilinear ×(1 / context_scale) upsampling:

    y = up((1 − a) ⊙ y_LR) + up(a) ⊙ y_HR                         (B, K, H/4, W/4)

(``fuse_upsampled``: ``(1 − up(a)) ⊙ up(y_LR) + up(a) ⊙ y_HR``, the order of CLUDA's copy of the head.)

Training (``self.training``): the detail window is drawn at random inside the input (``draw_box``: one box for the
batch, corners on multiples of 8, from the generator the loop hands over, so a seed fixes it), or with
``forward(x, detail="entropy")`` chosen per image by the context prediction's entropy (CLUDA's crop of the mixed
image, ``entropy_boxes``), and ``a`` is zeroed outside it. The supervised loss is
``(1 − w)·CE(y) + w·CE(y_HR, labels inside the box)`` with w = ``detail_loss_weight`` (``seg_loss``; pixel weights
are cut like the labels).

Inference (eval mode; the teacher's pseudo-labels and every evaluation): the detail logits come from windows of
``detail_crop`` every ``detail_stride`` over the whole input, passed as one batch, averaged over overlaps at the
logits' resolution (H/4), and ``a`` is not masked.

``SegOutput.fused``, ``features`` and ``proj`` are the context pass's (what FD, CLUDA's single-resolution contrast,
CFContra and SDCA read); ``logits`` are the fused logits; ``detail`` holds the detail pass, its box, the attention
and, with ``feature_weighter``, CLUDA's learned pixel weights (METHODS.md §11) from a third head of the same kind
(one channel, sigmoid), which only CLUDA's multi-resolution contrast trains.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from uda_ray.losses import cross_entropy
from uda_ray.models.heads.daformer import DAFormerHead
from uda_ray.models.infer import slide_logits, window_boxes
from uda_ray.models.segmenter import Segmenter, SegOutput, upsample

BOX_DIVISIBLE = 8  # HRDA's crop_coord_divisible: detail boxes start on multiples of 8 pixels
OUTPUT_STRIDE = 4  # the decode head's logits are at 1/4 of its input
CONTEXT_SCALES = (0.5,)
DETAIL_CHOICES = ("random", "entropy")


class DetailOutput(NamedTuple):
    """HRDA's parts of a pass (``SegOutput.detail``).

    logits:   (n, K, h/4, w/4) detail logits: of the training box (n = B), or in inference the windows' logits
              averaged on the whole input's (B, K, H/4, W/4) canvas.
    fused:    (B, E, hd/4, wd/4) the head's fused map of the detail pass (training), or None (inference).
    boxes:    per image, (y1, y2, x1, x2) of its detail window in input pixels (training; HRDA's random draw gives
              every image the same box, the entropy-guided crop one each), or None (inference).
    context_logits: (B, K, Hc/4, Wc/4) logits of the context pass.
    attention: (B, K or 1, Hc/4, Wc/4) scale attention a (masked to the box in training).
    weight:   (B, 1, Hc/4, Wc/4) CLUDA's learned pixel weights, or None without a feature weighter.
    """

    logits: Tensor
    fused: Tensor | None
    boxes: list[tuple[int, int, int, int]] | None
    context_logits: Tensor
    attention: Tensor
    weight: Tensor | None = None


def draw_box(height: int, width: int, crop: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A random ``crop`` × ``crop`` window inside (height, width), as HRDA's ``get_crop_bbox``: each offset is
    ``randint(0, (margin + 1) // 8) · 8`` (uniform over 0, 8, …; for a 512 window in a 1024 crop 0 … 504, so the
    last 8 rows and columns are never the window's far edge), the offset 0 when the margin is under 7.
    One box for the whole batch, drawn afresh at every training pass."""
    if crop > height or crop > width:
        raise ValueError(f"HRDA: detail crop {crop} is larger than the input {height}×{width}")
    offsets = []
    for size in (height, width):
        steps = max((size - crop + 1) // BOX_DIVISIBLE, 1)
        offsets.append(int(torch.randint(0, steps, (1,), generator=generator)) * BOX_DIVISIBLE)
    y1, x1 = offsets
    return y1, y1 + crop, x1, x1 + crop


def scale_box(box: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    """A box in input pixels at another resolution (``factor`` 1/4: the detail logits' grid; ``context_scale`` / 4:
    the context logits'); exact for HRDA's boxes, whose corners are multiples of 8."""
    y1, y2, x1, x2 = (round(c * factor) for c in box)
    return y1, y2, x1, x2


def paste_boxes(values: Tensor, boxes: list[tuple[int, int, int, int]], size: tuple[int, int] | torch.Size
                ) -> Tensor:
    """(B, C, h, w) → (B, C, *size): image i's values at ``boxes[i]`` (in the canvas's coordinates), 0 elsewhere."""
    canvas = values.new_zeros(values.shape[:2] + tuple(size))
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        canvas[i, :, y1:y2, x1:x2] = values[i]
    return canvas


def cut_boxes(maps: Tensor, boxes: list[tuple[int, int, int, int]]) -> Tensor:
    """(B, …, H, W) → (B, …, h, w): image i cut to ``boxes[i]`` (boxes of one size)."""
    if len(set(boxes)) == 1:
        y1, y2, x1, x2 = boxes[0]
        return maps[..., y1:y2, x1:x2]
    return torch.stack([maps[i, ..., y1:y2, x1:x2] for i, (y1, y2, x1, x2) in enumerate(boxes)])


def check_hrda_settings(decoder: str, *, detail_crop: int, detail_stride: int, context_scale: float = 0.5,
                        detail_loss_weight: float = 0.1) -> None:
    """The checks of HRDA's settings that need no weights, by their config keys: run when a config is loaded and when
    the model is built."""
    if decoder == "deeplabv2":
        raise ValueError("key 'model.hrda.enabled' = true needs a multi-level decode head: model.decoder = "
                         "'daformer' (HRDA) or 'mlp', not 'deeplabv2' (the scale attention reads every backbone level)")
    if context_scale not in CONTEXT_SCALES:
        raise ValueError(f"key 'model.hrda.context_scale' = {context_scale}: expected one of {CONTEXT_SCALES}")
    if detail_crop % BOX_DIVISIBLE or detail_crop < BOX_DIVISIBLE:
        raise ValueError(f"key 'model.hrda.detail_crop' = {detail_crop}: expected a multiple of {BOX_DIVISIBLE} "
                         f"(at least {BOX_DIVISIBLE})")
    if detail_stride % BOX_DIVISIBLE or not 0 < detail_stride <= detail_crop:
        raise ValueError(f"key 'model.hrda.detail_window_stride' = {detail_stride}: expected a multiple of "
                         f"{BOX_DIVISIBLE} of at most model.hrda.detail_crop = {detail_crop}")
    if not 0.0 <= detail_loss_weight < 1.0:
        raise ValueError(f"key 'model.hrda.detail_loss_weight' = {detail_loss_weight}: expected 0 <= w < 1")


class HRDASegmenter(Segmenter):
    """A ``Segmenter`` (backbone, decode head, projection head) run as HRDA's context and detail passes."""

    def __init__(self, backbone: str, num_classes: int = 19, *, context_scale: float = 0.5, detail_crop: int = 512,
                 detail_stride: int = 256, attention_classwise: bool = True, detail_loss_weight: float = 0.1,
                 feature_weighter: bool = False, weighter_lr_mult: float = 10.0, fuse_upsampled: bool = False,
                 **kwargs: Any):
        check_hrda_settings(kwargs.get("decoder", "mlp"), detail_crop=detail_crop, detail_stride=detail_stride,
                            context_scale=context_scale, detail_loss_weight=detail_loss_weight)
        super().__init__(backbone, num_classes, **kwargs)
        if self.feature_reductions[0] != OUTPUT_STRIDE:
            raise ValueError(f"HRDA needs the decode head's logits at 1/{OUTPUT_STRIDE} of the input: the finest "
                             f"backbone level of {backbone!r} has stride {self.feature_reductions[0]} "
                             "(model.out_indices)")
        self.context_scale, self.detail_crop, self.detail_stride = context_scale, detail_crop, detail_stride
        self.detail_loss_weight = detail_loss_weight
        # HRDA's attention_embed_dim (256) = the decode head's fused width (model.fuse_channels or embed_dim)
        embed_dim = kwargs.get("fuse_channels") or kwargs.get("embed_dim", 256)
        dropout, norm = kwargs.get("dropout", 0.1), kwargs.get("decoder_norm", "batch")
        self.scale_attention = DAFormerHead(self.feature_channels, num_classes if attention_classwise else 1,
                                            embed_dim=embed_dim, dropout=dropout, fusion="conv1", norm=norm)
        self.feature_weighter = DAFormerHead(self.feature_channels, 1, embed_dim=embed_dim, dropout=dropout,
                                             fusion="conv1", norm=norm) if feature_weighter else None
        self.weighter_lr_mult, self.fuse_upsampled = weighter_lr_mult, fuse_upsampled

    # ------------------------------------------------------------------------------------------------ passes
    def _pass(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        features = list(self.backbone(self.normalize(x)))  # L × (n, C_l, h_l, w_l)
        logits, fused = self.decoder(features)  # (n, K, h/4, w/4), (n, E, h/4, w/4)
        return features, logits, fused

    def context_input(self, x: Tensor) -> Tensor:
        """The context pass's input, whose features are ``SegOutput.features``: x (B, 3, H, W) resized by
        ``context_scale`` (bilinear, align_corners False)."""
        size = (round(x.shape[-2] * self.context_scale), round(x.shape[-1] * self.context_scale))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor, detail: str = "random") -> SegOutput:
        """One pass; ``detail`` (training only) picks the detail window: ``random`` (HRDA's ``draw_box``) or
        ``entropy`` (CLUDA: per image, the window of the inference grid with the highest mean entropy of the
        context prediction, ``entropy_boxes``)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"HRDASegmenter.forward: input of shape {tuple(x.shape)}: expected (B, 3, H, W) in [0, 1]")
        if detail not in DETAIL_CHOICES:
            raise ValueError(f"HRDASegmenter.forward: detail = {detail!r}: expected one of {DETAIL_CHOICES}")
        b, _, height, width = x.shape
        if height % BOX_DIVISIBLE or width % BOX_DIVISIBLE:
            raise ValueError(f"HRDASegmenter.forward: input {height}×{width}: HRDA needs sides divisible by "
                             f"{BOX_DIVISIBLE} (crop and resize sizes)")
        features, lr_logits, lr_fused = self._pass(self.context_input(x))
        att = torch.sigmoid(self.scale_attention(features)[0])  # (B, K|1, h_c, w_c)
        weight = torch.sigmoid(self.feature_weighter(features)[0]) \
            if self.feature_weighter is not None and self.training else None  # (B, 1, h_c, w_c)
        out_size = (height // OUTPUT_STRIDE, width // OUTPUT_STRIDE)
        if self.training:
            if detail == "entropy":
                boxes = self.entropy_boxes(lr_logits.detach(), height, width)
            else:
                boxes = [draw_box(height, width, self.detail_crop, self.generator)] * b
            if len(set(boxes)) == 1:
                y1, y2, x1, x2 = boxes[0]
                crops = x[:, :, y1:y2, x1:x2]
            else:
                crops = torch.stack([x[i, :, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in enumerate(boxes)])
            _, hr_logits, hr_fused = self._pass(crops)  # (B, K, crop/4, crop/4)
            # the attention is kept inside the boxes at the context logits' resolution (input pixels × scale / 4)
            f = self.context_scale / OUTPUT_STRIDE
            side = round(self.detail_crop * f)
            mask = paste_boxes(att.new_ones(b, 1, side, side), [scale_box(bx, f) for bx in boxes], att.shape[-2:])
            hr = paste_boxes(hr_logits, [scale_box(bx, 1 / OUTPUT_STRIDE) for bx in boxes], out_size)  # (B, K, H/4, …)
            att = att * mask  # (B, K|1, h_c, w_c)
            detail_out = DetailOutput(hr_logits, hr_fused, boxes, lr_logits, att, weight)
        else:
            hr = self._detail_slide(x)  # (B, K, H/4, W/4)
            detail_out = DetailOutput(hr, None, None, lr_logits, att, weight)
        up_att = upsample(att, out_size)  # (B, K|1, H/4, W/4)
        if self.fuse_upsampled:  # CLUDA's head: (1 − a) after upsampling
            logits = (1 - up_att) * upsample(lr_logits, out_size) + up_att * hr  # (B, K, H/4, W/4)
        else:  # HRDA: (1 − a) at the context resolution, then upsampled
            logits = upsample((1 - att) * lr_logits, out_size) + up_att * hr  # (B, K, H/4, W/4)
        proj = self.proj(features[-1]) if self.proj is not None else None
        return SegOutput(logits=logits, fused=lr_fused, features=features, proj=proj, detail=detail_out)

    def entropy_boxes(self, context_logits: Tensor, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Per image, the window of ``detail_crop`` every ``detail_stride`` (the inference grid) whose mean
        softmax entropy of the context prediction is highest, the first on ties (CLUDA's crop of the mixed image).

        CLUDA upsamples the entropy map (nearest) to the input and averages it over each window; the windows start
        on multiples of 8 input pixels, which is one cell of the context logits, so the mean over the window's cells
        is the same number. (CLUDA's code also writes into its entropy map while scanning, which alters the scores
        of windows that overlap the first one; that is not reproduced.)"""
        p = torch.softmax(context_logits.float(), dim=1)  # (B, K, h_c, w_c)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)  # (B, h_c, w_c)
        f = self.context_scale / OUTPUT_STRIDE
        windows = window_boxes(height, width, (self.detail_crop,) * 2, (self.detail_stride,) * 2)
        cells = [scale_box(w, f) for w in windows]
        scores = torch.stack([entropy[:, y1:y2, x1:x2].mean(dim=(1, 2)) for y1, y2, x1, x2 in cells],
                             dim=1)  # (B, n_windows)
        return [windows[int(k)] for k in scores.argmax(dim=1)]

    def _detail_slide(self, x: Tensor) -> Tensor:
        """Detail logits of windows of ``detail_crop`` every ``detail_stride`` (shrunk to the input when it is
        smaller), one batch of all windows, averaged over overlaps at 1/4 resolution: (B, K, H/4, W/4)."""
        height, width = x.shape[-2:]
        crop = (min(self.detail_crop, height), min(self.detail_crop, width))
        stride = (min(self.detail_stride, crop[0]), min(self.detail_stride, crop[1]))
        return slide_logits(lambda windows: self._pass(windows)[1], x, num_classes=self.num_classes, crop=crop,
                            stride=stride, output_stride=OUTPUT_STRIDE)

    # -------------------------------------------------------------------------------------------------- loss
    def seg_loss(self, out: SegOutput, labels: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
        """``""`` = (1 − w)·CE(fused logits), ``"_detail"`` = w·CE(detail logits, labels and weights cut to each
        image's detail box), with w = ``detail_loss_weight``; a pass without boxes (inference) gives the fused CE
        alone."""
        size = labels.shape[-2:]
        w = self.detail_loss_weight
        detail = out.detail
        if detail is None or detail.boxes is None or w == 0:
            return {"": cross_entropy(upsample(out.logits.float(), size), labels, weights)}
        if tuple(size) != (out.logits.shape[-2] * OUTPUT_STRIDE, out.logits.shape[-1] * OUTPUT_STRIDE):
            raise ValueError(f"HRDA seg_loss: labels {tuple(size)} are not the training input's size "
                             f"{tuple(s * OUTPUT_STRIDE for s in out.logits.shape[-2:])}")
        cut_labels = cut_boxes(labels, detail.boxes)
        cut_weights = None if weights is None else cut_boxes(weights, detail.boxes)
        return {"": (1 - w) * cross_entropy(upsample(out.logits.float(), size), labels, weights),
                "_detail": w * cross_entropy(upsample(detail.logits.float(), cut_labels.shape[-2:]), cut_labels,
                                             cut_weights)}

    # -------------------------------------------------------------------------------------------- parameters
    def head_modules(self) -> list[torch.nn.Module]:
        """The decode head, the scale-attention head (DAFormer: a ``decode_head`` part, lr × 10) and the projection
        head; CLUDA's feature weighter has its own group (``param_parts``)."""
        return super().head_modules() + [self.scale_attention]

    def param_parts(self, head_lr_mult: float) -> list[tuple[str, list[torch.nn.Module], float]]:
        """``Segmenter.param_parts`` plus ``weighter``: CLUDA's feature weighter at lr × ``weighter_lr_mult``."""
        parts = super().param_parts(head_lr_mult)
        if self.feature_weighter is not None:
            parts.append(("weighter", [self.feature_weighter], self.weighter_lr_mult))
        return parts
