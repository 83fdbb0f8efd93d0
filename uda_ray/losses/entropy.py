"""Entropy minimisation on target predictions (MinEnt, CFContra's coarse stage, METHODS.md §3)."""

from __future__ import annotations

import math

import torch

from uda_ray.losses.precision import upcast


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L = −1/(B·H·W·log C) Σ_pixels Σ_c p_c log p_c`` with ``p = softmax(logits)``, in [0, 1].

    Reference: Vu et al., "ADVENT: Adversarial Entropy Minimization for Domain Adaptation in Semantic Segmentation".

    Args:
        logits: (B, C, H, W), C ≥ 2.
    """
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"entropy_loss: expected logits (B, C >= 2, H, W), got {tuple(logits.shape)}")
    log_p = torch.log_softmax(upcast(logits), dim=1)  # (B, C, H, W)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # (B, H, W)
    return entropy.mean() / math.log(logits.shape[1])
