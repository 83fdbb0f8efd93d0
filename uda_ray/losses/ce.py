"""Pixel-wise cross-entropy with optional per-pixel weights (DACS / DAFormer source and mixed CE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, *,
                  ignore_index: int = 255) -> torch.Tensor:
    """Weighted pixel cross-entropy averaged over the non-ignored pixels.

    ``L = Σ_{p: y_p ≠ ignore} w_p · (−log softmax(z_p)[y_p]) / |{p: y_p ≠ ignore}|``

    The denominator counts pixels, not weights: a per-image scalar weight ω (DAFormer) therefore scales that image's
    loss by ω, exactly as ``mean(ω · CE)`` does in the reference code. With no valid pixel the result is 0 and still
    part of the graph (its gradient is 0).

    Args:
        logits: (B, C, H, W) scores.
        labels: (B, H, W) class ids in [0, C) or ``ignore_index``.
        weights: None or (B, H, W) per-pixel weights (pass a per-image scalar broadcast to (B, H, W)).
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"cross_entropy: expected logits (B, C, H, W) and labels (B, H, W), got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"cross_entropy: weights must have the labels' shape {tuple(labels.shape)}, got "
                         f"{tuple(weights.shape)}")
    valid = labels != ignore_index  # (B, H, W)
    nll = F.cross_entropy(logits, labels.where(valid, 0), reduction="none")  # (B, H, W)
    if weights is not None:
        nll = nll * weights
    nll = torch.where(valid, nll, nll.new_zeros(()))
    return nll.sum() / valid.sum().clamp_min(1)
