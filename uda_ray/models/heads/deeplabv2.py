"""DeepLabV2's ASPP classifier (the official "Classifier_Module"), on layer4 and optionally on layer3.

Four parallel 3×3 convolutions with dilation = padding = 6, 12, 18, 24, each with a bias, no norm, no activation,
applied to one map and summed (Chen et al., DeepLab v2, TPAMI 2018; ADVENT ``advent/model/deeplabv2.py``):

    y = Σ_{d ∈ (6, 12, 18, 24)} (W_d ⋆_d f + b_d)        f: (B, C, h, w) → y: (B, K, h, w)

Weights ~ N(0, 0.01), biases keep PyTorch's default init, as in the official code. (AdaptSegNet's
``model/deeplab*.py``, and PixMatch's and EHTDI's copies of it, have the ``return`` inside the loop and so sum only
the dilation-6 and -12 branches; the other two never train. This module follows ADVENT, CFContra and SDCA, which sum
all four, so a checkpoint trained with that code does not give its own predictions here.)

ADVENT's multi-level variant adds a second ASPP on layer3 (``layer5``, 1024 channels) next to the one on layer4
(``layer6``); its loss weight is 0.1 (cfg.TRAIN.LAMBDA_SEG_AUX). Here they are ``aux_classifier`` and ``classifier``:
the official keys map by renaming the first component (``layer6.conv2d_list.0.weight`` ↔
``classifier.conv2d_list.0.weight``, ``layer5.…`` ↔ ``aux_classifier.…``; see ``load_deeplabv2_checkpoint``).

``forward`` keeps the head interface of the fusion decoder, (logits, fused), where "fused" is layer4's map itself:
the feature space the contrastive terms use for this network (CFContra's projection input, SDCA's feature level).
The aux prediction has its own method, ``aux_logits``, so that callers without the multi-level loss never pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ASPP_DILATIONS = (6, 12, 18, 24)


class ASPPClassifier(nn.Module):
    """Sum of dilated 3×3 convolutions (dilation = padding), (B, C, h, w) → (B, K, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or len(dilations) == 0 or any(d < 1 for d in dilations):
            raise ValueError(f"ASPPClassifier: in_channels = {in_channels}, num_classes = {num_classes}, dilations = "
                             f"{tuple(dilations)}: expected positive channel counts and at least one dilation >= 1")
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2Head(nn.Module):
    """ASPP classifier on the deepest level (``classifier``), and with ``aux=True`` one on the level before it."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, dilations: Sequence[int] = ASPP_DILATIONS,
                 aux: bool = False):
        super().__init__()
        if len(in_channels) < (2 if aux else 1):
            raise ValueError(f"DeepLabV2Head: in_channels = {list(in_channels)}: expected at least "
                             f"{2 if aux else 1} levels (aux = {aux})")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = num_classes
        self.dilations = tuple(int(d) for d in dilations)
        self.classifier = ASPPClassifier(self.in_channels[-1], num_classes, self.dilations)
        self.aux_classifier = ASPPClassifier(self.in_channels[-2], num_classes, self.dilations) if aux else None

    def _check(self, features: Sequence[torch.Tensor], who: str) -> None:
        if len(features) != len(self.in_channels) or any(f.shape[1] != c for f, c in zip(features, self.in_channels)):
            raise ValueError(f"DeepLabV2Head.{who}: got maps with channels {[f.shape[1] for f in features]}, expected "
                             f"{list(self.in_channels)}")

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: backbone levels, finest first → (logits (B, K, h, w) from features[-1], fused = features[-1])."""
        self._check(features, "forward")
        return self.classifier(features[-1]), features[-1]

    def aux_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K, h, w) from features[-2] (layer3): ADVENT's multi-level prediction."""
        if self.aux_classifier is None:
            raise ValueError("DeepLabV2Head.aux_logits: the head was built with aux=False: build it with aux=True")
        self._check(features, "aux_logits")
        return self.aux_classifier(features[-2])
