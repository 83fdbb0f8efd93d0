"""SDCA's infinite-pair upper bound of the semantic-distribution-aware contrast (METHODS.md §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uda_ray.losses.precision import upcast


def sdca_loss(feats: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *,
              tau: float = 100.0, ignore_index: int = 255) -> torch.Tensor:
    """``logits_k = ( f̂·μ̂_k + ½ (f̂⊙f̂)·Σ̂_k / τ ) / τ``, ``L = CE(logits, y) + ½ mean_i( (f̂_i⊙f̂_i)·Σ̂_{y_i} / τ ) / τ``.

    f̂, μ̂_k and Σ̂_k are the L2-normalised pixel feature, class mean and class diagonal variance (normalised as
    vectors; a class never seen has zero statistics, hence μ̂ = Σ̂ = 0 and logit 0). Both means run over the pixels
    whose label is not ``ignore_index``; with none the loss is 0 (gradient 0). The statistics are constants here
    (``ClassStatistics`` buffers). τ follows the code's convention (default 100). Reference: Li et al.,
    "Semantic Distribution-aware Contrastive Adaptation for Semantic Segmentation" (SDCA).

    Args:
        feats: (N, D) pixel features; labels: (N,); mean, var: (C, D) class statistics.
    """
    if feats.dim() != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(f"sdca_loss: expected feats (N, D) and labels (N,), got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)}")
    if mean.dim() != 2 or mean.shape != var.shape or mean.shape[1] != feats.shape[1]:
        raise ValueError(f"sdca_loss: mean {tuple(mean.shape)} and var {tuple(var.shape)} must both be "
                         f"(C, D={feats.shape[1]})")
    if tau <= 0:
        raise ValueError(f"sdca_loss: tau={tau}, expected > 0")
    f = F.normalize(upcast(feats), dim=1)  # (N, D)
    mu = F.normalize(mean.to(device=f.device, dtype=f.dtype), dim=1)  # (C, D)
    sigma = F.normalize(var.to(device=f.device, dtype=f.dtype), dim=1)  # (C, D)
    spread = (f * f) @ sigma.T / tau  # (N, C): (f̂⊙f̂)·Σ̂_k / τ
    logits = (f @ mu.T + 0.5 * spread) / tau  # (N, C)
    valid = labels != ignore_index  # (N,)
    safe = labels.where(valid, 0)  # (N,)
    per_pixel = F.cross_entropy(logits, safe, reduction="none") + 0.5 * spread.gather(1, safe[:, None]).squeeze(1) / tau
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / valid.sum().clamp_min(1)
