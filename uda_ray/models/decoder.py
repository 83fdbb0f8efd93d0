"""Heads on top of the backbone: the multi-level fusion decoder and the contrastive projection MLP.

The decoder follows DAFormer's all-MLP fusion head (Hoyer et al., CVPR 2022; METHODS.md §2), which CLUDA uses as its
contrast space: every backbone level l with C_l channels is embedded to E channels by a 1×1 convolution, upsampled
bilinearly to the finest level's grid, the L maps are concatenated and fused by a
1×1 convolution + BN + ReLU (GroupNorm with ``norm="group"``).
A dropout and a 1×1 classifier give the logits.

    e_l = Up(W_l f_l + b_l)                    (B, E, h, w)
    z   = ReLU(BN(W_f [e_1; …; e_L]))          (B, E, h, w)     ← "fused", CLUDA's feature map
    y   = W_c Dropout(z) + b_c                 (B, K, h, w)

The projection head is CFContra's MLP on the deepest encoder level (METHODS.md §3):
``g = W_2 ReLU(BN(W_1 f_L))`` with 1×1 convolutions, hidden width = C_L, output width = proj_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = {
    "batch": lambda c: nn.BatchNorm2d(c),
    # per-sample: results do not depend on how a batch is split over workers (no SyncBatchNorm needed)
    "group": lambda c: nn.GroupNorm(min(32, c), c),
}


def make_norm(name: str, channels: int) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"norm {name!r}: expected one of {', '.join(NORMS)}")
    return NORMS[name](channels)


class MultiLevelHead(nn.Module):
    """The forward pass shared by the fusion heads (this module's ``FusionDecoder`` and DAFormer's head): each level
    through its ``embed[l]``, upsampled to the finest level, concatenated, ``fuse``, ``dropout``, ``classifier``.
    Subclasses build those modules and ``in_channels``."""

    in_channels: tuple[int, ...]
    embed: nn.ModuleList
    fuse: nn.Module
    dropout: nn.Module
    classifier: nn.Module

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: L maps (B, C_l, h_l, w_l), finest first → (logits (B, K, h_1, w_1), fused (B, E, h_1, w_1))."""
        if len(features) != len(self.embed):
            raise ValueError(f"{type(self).__name__}: got {len(features)} feature maps, expected {len(self.embed)} "
                             f"(channels {list(self.in_channels)})")
        size = features[0].shape[-2:]
        embedded = []
        for f, embed in zip(features, self.embed):
            e = embed(f)  # (B, E, h_l, w_l)
            if e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)  # (B, E, h_1, w_1)
            embedded.append(e)
        fused = self.fuse(torch.cat(embedded, dim=1))  # (B, L·E, h_1, w_1) → (B, E, h_1, w_1)
        logits = self.classifier(self.dropout(fused))  # (B, K, h_1, w_1)
        return logits, fused


class FusionDecoder(MultiLevelHead):
    """DAFormer-style fusion of L backbone levels into one map at the finest level's resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, embed_dim: int = 256, dropout: float = 0.1,
                 norm: str = "batch"):
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("FusionDecoder: in_channels is empty: expected the channel count of at least one level")
        if num_classes < 1 or embed_dim < 1:
            raise ValueError(f"FusionDecoder: num_classes = {num_classes}, embed_dim = {embed_dim}: expected >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FusionDecoder: dropout = {dropout}: expected 0 <= dropout < 1")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(self.in_channels) * embed_dim, embed_dim, kernel_size=1, bias=False),
            make_norm(norm, embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)



class ProjectionHead(nn.Module):
    """CFContra's projection MLP on one feature map: 1×1 conv, BN, ReLU, 1×1 conv; (B, C, h, w) → (B, P, h, w)."""

    def __init__(self, in_channels: int, proj_dim: int, *, hidden_dim: int = 0, norm: str = "batch"):
        super().__init__()
        if in_channels < 1 or proj_dim < 1 or hidden_dim < 0:
            raise ValueError(f"ProjectionHead: in_channels = {in_channels}, proj_dim = {proj_dim}, hidden_dim = "
                             f"{hidden_dim}: expected in_channels, proj_dim >= 1 and hidden_dim >= 0 (0 = in_channels)")
        hidden = hidden_dim or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            make_norm(norm, hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, proj_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
