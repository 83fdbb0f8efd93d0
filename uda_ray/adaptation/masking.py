"""MIC's block mask (Hoyer et al., CVPR 2023; METHODS.md §12): the image is cut into blocks of ``block_size`` pixels,
each block kept with probability 1 − ``mask_ratio``, and masked pixels are set to a fill colour."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def block_mask(batch: int, height: int, width: int, *, block_size: int, mask_ratio: float,
               generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """(B, 1, H, W) float mask, 1 = kept: one uniform draw per block on a grid of round(H / block_size) ×
    round(W / block_size) (at least 1 × 1), kept where the draw exceeds ``mask_ratio``, nearest-upsampled to H × W
    (as MIC's ``BlockMaskGenerator``). The draws come from the CPU ``generator``, so a seed fixes the mask on any
    device; one mask per image."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"block_mask: mask_ratio = {mask_ratio}: expected 0 <= mask_ratio < 1")
    if block_size < 1:
        raise ValueError(f"block_mask: block_size = {block_size}: expected >= 1")
    grid = (max(round(height / block_size), 1), max(round(width / block_size), 1))
    keep = (torch.rand((batch, 1) + grid, generator=generator) > mask_ratio).float()  # (B, 1, gh, gw)
    return F.interpolate(keep, size=(height, width), mode="nearest").to(device)  # (B, 1, H, W)


def apply_mask(images: Tensor, mask: Tensor, fill: Tensor) -> Tensor:
    """images (B, 3, H, W) with the pixels where ``mask`` (B, 1, H, W) is 0 set to ``fill`` (1, 3, 1, 1): with the
    colour that the network's input normalisation maps to 0, this is MIC's ``normalised image × mask``."""
    return images * mask + fill.to(images.dtype) * (1 - mask)
