"""DAFormer's context-aware fusion decode head (Hoyer et al., CVPR 2022; METHODS.md §9).

Every backbone level l is embedded to E channels by a linear layer (a 1×1 convolution with bias, no norm or
activation), upsampled bilinearly (align_corners False) to the finest level's grid and concatenated; the L·E
channels are fused into E channels, followed by Dropout2d and a 1×1 classifier:

    e_l = Up(W_l f_l + b_l)                                   (B, E, h, w)
    z   = Fuse([e_1; …; e_L])                                 (B, E, h, w)   ← "fused", CLUDA's feature map
    y   = W_c Dropout(z) + b_c                                (B, K, h, w)

``channels`` (default E) is the width of the fused map and of the ASPP branches when it differs from the embedding
width (mmseg's ``channels`` beside ``embed_dims``; CLUDA's head embeds to 512 and fuses to 256).

``fusion="aspp"`` (DAFormer, ``daformer_sepaspp_mitb5``): a depthwise-separable ASPP without image pooling, one
branch per dilation d, each E channels,

    d = 1:  ReLU(BN(Conv1×1(x)))
    d > 1:  ReLU(BN(Conv1×1(ReLU(BN(DWConv3×3,dilation d,padding d(x))))))

then Fuse(x) = ReLU(BN(Conv3×3([branch_1(x); …; branch_D(x)]))) (padding 1).
``fusion="conv1"`` (``daformer_conv1_mitb5``, SegFormer's fusion with E = 256; HRDA's scale-attention head and
CLUDA's weight head): Fuse(x) = ReLU(BN(Conv1×1(x))).

As in mmcv's ConvModule, a convolution followed by a norm has no bias. Initialisation as in DAFormer: those
convolutions Kaiming-normal (fan_out, ReLU), norms (1, 0), the classifier normal(σ = 0.01) with bias 0, the embedding
layers PyTorch's default for a Linear. Parameter names contain no "head" (``embed``, ``fuse``, ``classifier``):
the model puts the whole module under an attribute whose name gives DAFormer's "lr × 10 for every parameter
whose name contains head".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from uda_ray.models.decoder import MultiLevelHead, make_norm

FUSIONS = ("aspp", "conv1")


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, *, norm: str, dilation: int = 1,
                   groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → norm → ReLU: mmcv's ConvModule with a norm and ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                     dilation=dilation, groups=groups, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, make_norm(norm, out_channels), nn.ReLU(inplace=True))


class SeparableASPP(nn.Module):
    """Depthwise-separable ASPP (no image pooling) + 3×3 bottleneck; (B, C_in, h, w) → (B, C_out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int], *, norm: str):
        super().__init__()
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(conv_norm_relu(in_channels, out_channels, 1, norm=norm))
            else:
                branches.append(nn.Sequential(
                    conv_norm_relu(in_channels, in_channels, 3, dilation=d, groups=in_channels, norm=norm),
                    conv_norm_relu(in_channels, out_channels, 1, norm=norm),
                ))
        self.branches = nn.ModuleList(branches)
        self.bottleneck = conv_norm_relu(len(branches) * out_channels, out_channels, 3, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, D·C_out, h, w)
        return self.bottleneck(outs)


class DAFormerHead(MultiLevelHead):
    """Embed, upsample, concatenate and fuse L backbone levels; same contract as ``FusionDecoder``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, embed_dim: int = 256, dropout: float = 0.1,
                 fusion: str = "aspp", dilations: tuple[int, ...] = (1, 6, 12, 18), norm: str = "batch",
                 channels: int | None = None):
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("DAFormerHead: in_channels is empty: expected the channel count of at least one level")
        channels = embed_dim if channels is None else channels
        if num_classes < 1 or embed_dim < 1 or channels < 1:
            raise ValueError(f"DAFormerHead: num_classes = {num_classes}, embed_dim = {embed_dim}, channels = "
                             f"{channels}: expected >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DAFormerHead: dropout = {dropout}: expected 0 <= dropout < 1")
        if fusion not in FUSIONS:
            raise ValueError(f"DAFormerHead: fusion = {fusion!r}: expected one of {', '.join(FUSIONS)}")
        if fusion == "aspp" and (len(dilations) == 0 or any(d < 1 for d in dilations)):
            raise ValueError(f"DAFormerHead: dilations = {tuple(dilations)}: expected at least one dilation, each >= 1")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.fusion = fusion
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.in_channels)
        concat = len(self.in_channels) * embed_dim
        if fusion == "aspp":
            self.fuse: nn.Module = SeparableASPP(concat, channels, dilations, norm=norm)
        else:
            self.fuse = conv_norm_relu(concat, channels, 1, norm=norm)
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
