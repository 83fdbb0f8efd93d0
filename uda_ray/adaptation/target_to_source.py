"""Target → source mix-up with high-confidence target pixels (METHODS.md §4)."""

from __future__ import annotations

import torch


def target_to_source_mix(src_img: torch.Tensor, src_lbl: torch.Tensor, tgt_img: torch.Tensor,
                         pseudo_lbl: torch.Tensor, confidence: torch.Tensor, *,
                         t_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the target pixels the teacher is sure of onto the source image.

    ``M = 1[p > T_max]``, ``x = x_src·(1 − M) + x_tgt·M``, ``y = ŷ_tgt`` inside M and ``y_src`` outside. The mixed
    image carries target-domain object boundaries with (nearly) correct labels; the trainer gives its CE its own
    weight (``mix.target_to_source.weight``, 0.1 in the paper).

    Args:
        src_img, tgt_img: (B, 3, H, W) images; src_lbl, pseudo_lbl: (B, H, W); confidence: (B, H, W) teacher max prob.

    Returns:
        mixed image (B, 3, H, W), mixed label (B, H, W), mask M (B, H, W) bool.
    """
    if src_img.shape != tgt_img.shape or src_img.dim() != 4:
        raise ValueError(f"target_to_source_mix: src_img {tuple(src_img.shape)} and tgt_img {tuple(tgt_img.shape)} "
                         f"must both be (B, 3, H, W)")
    expected = (src_img.shape[0], *src_img.shape[2:])
    for name, t in (("src_lbl", src_lbl), ("pseudo_lbl", pseudo_lbl), ("confidence", confidence)):
        if tuple(t.shape) != expected:
            raise ValueError(f"target_to_source_mix: {name} has shape {tuple(t.shape)}, expected {expected}")
    mask = confidence > t_max  # (B, H, W)
    image = torch.where(mask[:, None], tgt_img, src_img)  # (B, 3, H, W)
    label = torch.where(mask, pseudo_lbl.to(src_lbl.dtype), src_lbl)
    return image, label, mask
