"""Supervised pixel contrast on a fused feature map (CLUDA, METHODS.md §2), direct or in anchor blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uda_ray.losses.pixel_contrast_chunked import chunked_pixel_contrast_sum
from uda_ray.losses.precision import upcast


def _block_loss(f: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, start: int, stop: int,
                inv_temperature: float) -> torch.Tensor:
    """Σ_{i ∈ [start, stop)} 1/|P(i)| Σ_{j ∈ P(i)} π_ij · softplus(lse_{k ∈ N(i)} s_ik − s_ij).

    ``softplus(lse_N − s_ij) = log(exp(s_ij) + Σ_N exp(s_ik)) − s_ij``, the negated bracket of the CLUDA loss; it is
    exactly 0 for an anchor without negatives. The log-sum-exp subtracts the row's largest negative, and every masked
    entry goes through ``where`` (never ``0 · inf``), so no value or gradient turns into NaN for any temperature.
    f: (n, D) unit rows, labels: (n,), weights: None or (n,) — all pixels valid.
    """
    sim = f[start:stop] @ f.T * inv_temperature  # (b, n)
    anchor_labels = labels[start:stop]  # (b,)
    same = anchor_labels[:, None] == labels[None, :]  # (b, n)
    cols = torch.arange(f.shape[0], device=f.device)  # (n,)
    rows = torch.arange(start, stop, device=f.device)  # (b,)
    positive = same & (cols[None, :] != rows[:, None])  # (b, n)
    negative = ~same  # (b, n)
    has_negative = negative.any(dim=1)  # (b,)
    neg_sim = sim.masked_fill(~negative, float("-inf"))  # (b, n)
    shift = neg_sim.amax(dim=1, keepdim=True).detach()  # (b, 1)
    shift = torch.where(has_negative[:, None], shift, torch.zeros_like(shift))
    neg_sum = torch.exp(neg_sim - shift).sum(dim=1, keepdim=True)  # (b, 1)
    neg_lse = shift + torch.log(torch.where(has_negative[:, None], neg_sum, torch.ones_like(neg_sum)))  # (b, 1)
    pair = F.softplus(neg_lse - sim)  # (b, n)
    if weights is not None:
        pair = pair * (weights[start:stop, None] * weights[None, :])  # (b, n)
    pair = torch.where(positive & has_negative[:, None], pair, torch.zeros_like(pair))
    per_anchor = pair.sum(dim=1) / positive.sum(dim=1).clamp_min(1)  # (b,)
    return per_anchor.sum()


def pixel_contrast(feats: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, *,
                   temperature: float = 1.0, ignore_index: int = 255, chunk_size: int | None = None) -> torch.Tensor:
    """CLUDA's supervised pixel contrast.

    ``L = −1/|A| Σ_{i∈A} 1/|P(i)| Σ_{j∈P(i)} π_ij [ s_ij − log( exp(s_ij) + Σ_{k∈N(i)} exp(s_ik) ) ]``,
    ``s_ij = f̂_i·f̂_j / τ``, ``π_ij = w_i·w_j`` (1 without weights). A = every pixel whose label is not
    ``ignore_index``; P(i) = other pixels of A with i's label (i itself excluded); N(i) = pixels of A with another
    label. Ignore pixels are neither anchors, positives nor negatives. An anchor without positives (a class with one
    pixel) or without negatives adds 0 but still counts in |A|. With no valid pixel the loss is 0 (gradient 0).

    The direct form builds (|A|, |A|) matrices and lets autograd differentiate them. With ``chunk_size`` the anchors
    are processed in blocks of that many rows by ``ChunkedPixelContrast``: forward keeps one value per anchor, backward
    recomputes each block's (chunk_size, |A|) similarities and applies the analytic gradient, so peak memory grows
    with chunk_size·|A| instead of |A|², for the same value and gradients (up to float summation order). ``None`` or
    0 selects the direct form. Computed in at least float32 with autocast off, whatever the input dtype.
    Reference: Vayyat et al., "CLUDA: Contrastive Learning in Unsupervised Domain Adaptation for Semantic
    Segmentation", 2022.

    Args:
        feats: (N, D) pixel features (normalised inside).
        labels: (N,) class ids or ``ignore_index``.
        weights: None or (N,) per-pixel weights (pseudo-label confidence on mixed images).
    """
    if feats.dim() != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(f"pixel_contrast: expected feats (N, D) and labels (N,), got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"pixel_contrast: weights must be (N,) = {tuple(labels.shape)}, got {tuple(weights.shape)}")
    if temperature <= 0:
        raise ValueError(f"pixel_contrast: temperature={temperature}, expected > 0")
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"pixel_contrast: chunk_size={chunk_size}, expected None, 0 (direct) or a positive size")
    with torch.autocast(device_type=feats.device.type, enabled=False):
        valid = labels != ignore_index  # (N,)
        f = F.normalize(upcast(feats)[valid], dim=1)  # (n, D)
        y = labels[valid]  # (n,)
        w = None if weights is None else upcast(weights)[valid]  # (n,)
        n = f.shape[0]
        if n == 0:
            return upcast(feats).sum() * 0.0
        inv_t = 1.0 / temperature
        if not chunk_size:
            total = _block_loss(f, y, w, 0, n, inv_t)
        else:
            total = chunked_pixel_contrast_sum(f, y, w, chunk_size, inv_t)
        return total / n
