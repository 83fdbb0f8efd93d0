"""Input checks shared by the per-class state updates (memory bank, class statistics)."""

from __future__ import annotations

import torch


def check_pixel_batch(who: str, feats: torch.Tensor, labels: torch.Tensor, dim: int) -> None:
    """feats must be (N, dim) and labels (N,); the error names the caller and both shapes."""
    if feats.dim() != 2 or feats.shape[1] != dim or labels.shape != feats.shape[:1]:
        raise ValueError(f"{who}: expected feats (N, {dim}) and labels (N,), got "
                         f"{tuple(feats.shape)} and {tuple(labels.shape)}")
