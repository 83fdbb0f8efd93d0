"""Class-wise contrast against a memory bank of class prototypes (CFContra, METHODS.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uda_ray.losses.precision import upcast


def bank_class_means(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each class's filled, L2-normalised bank entries.

    An entry is *filled* when its norm is > 0: the memory bank (``uda_ray.adaptation.MemoryBank``) keeps unfilled
    slots as all-zero rows, and every filled entry is a unit vector, so emptiness needs no separate count.
    Because ``mean_k(f̂·m̂_ck) = f̂·mean_k(m̂_ck)``, class scores are one matrix product with these means.

    Args:
        bank: (C, K, D) entries.

    Returns:
        means (C, D) (zero rows for empty classes), filled (C,) bool: the class has at least one entry.
    """
    if bank.dim() != 3:
        raise ValueError(f"bank must be (C, K, D), got {tuple(bank.shape)}")
    entries = F.normalize(upcast(bank), dim=2)  # (C, K, D); zero rows stay zero
    counts = (bank.abs().amax(dim=2) > 0).sum(dim=1)  # (C,)
    means = entries.sum(dim=1) / counts.clamp_min(1)[:, None]  # (C, D)
    return means, counts > 0


def prototype_contrast(feats: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, *, temperature: float = 0.07,
                       ignore_index: int = 255) -> torch.Tensor:
    """NLL of each pixel's class under a softmax over class scores against a memory bank (CFContra).

    ``score_c(i) = 1/|K_c| Σ_{k ∈ K_c} f̂_i·m̂_ck / τ`` over class c's filled entries K_c (K = 1: the centroid);
    ``L = mean_{i ∈ V} [ −log softmax_{c: K_c ≠ ∅}(score(i))_{y_i} ]``. Classes without entries are removed from the
    softmax; V = pixels whose label is neither ``ignore_index`` nor a class without entries (their NLL is undefined).
    With V empty the loss is 0 (gradient 0). The bank receives no special treatment: pass a buffer (no gradient).
    Reference: Liu et al., "Coarse-to-Fine Feature Alignment with Contrastive Learning for UDA in Semantic
    Segmentation" (CFContra).

    Args:
        feats: (N, D) pixel features (normalised inside).
        labels: (N,) class ids in [0, C) or ``ignore_index``.
        bank: (C, K, D); all-zero rows are unfilled entries.
    """
    if feats.dim() != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(f"prototype_contrast: expected feats (N, D) and labels (N,), got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)}")
    if bank.dim() != 3 or bank.shape[2] != feats.shape[1]:
        raise ValueError(f"prototype_contrast: bank must be (C, K, D={feats.shape[1]}), got {tuple(bank.shape)}")
    if temperature <= 0:
        raise ValueError(f"prototype_contrast: temperature={temperature}, expected > 0")
    means, filled = bank_class_means(bank)  # (C, D), (C,)
    f = F.normalize(upcast(feats), dim=1)  # (N, D)
    scores = f @ means.to(device=f.device, dtype=f.dtype).T / temperature  # (N, C)
    # A finite fill value keeps every row's log-sum-exp finite (exp underflows to exactly 0), even a row of a pixel
    # that is excluded below, so no NaN reaches the gradient.
    scores = scores.masked_fill(~filled.to(f.device)[None, :], torch.finfo(scores.dtype).min)  # (N, C)
    valid = labels != ignore_index  # (N,)
    safe = labels.where(valid, 0)  # (N,)
    valid = valid & filled.to(f.device)[safe]  # (N,)
    nll = torch.logsumexp(scores, dim=1) - scores.gather(1, safe[:, None]).squeeze(1)  # (N,)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum() / valid.sum().clamp_min(1)
