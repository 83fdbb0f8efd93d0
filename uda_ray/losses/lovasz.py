"""The Lovász-softmax loss: a convex surrogate of the Jaccard loss (1 − IoU) per class (SDCA's source-only stage)."""

from __future__ import annotations

import torch

from uda_ray.losses.precision import upcast


def lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """The Lovász extension's weights g_i = Δ_J(π_1..i) − Δ_J(π_1..i−1) for a foreground indicator (P,) sorted by
    decreasing error, where Δ_J(S) = 1 − |fg ∖ S| / |fg ∪ S| is the Jaccard loss when the pixels S are wrong."""
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)  # (P,): |fg ∖ π_1..i|
    union = total + (1.0 - fg_sorted).cumsum(0)  # (P,): |fg ∪ π_1..i|
    jaccard = 1.0 - intersection / union  # (P,): Δ_J(π_1..i)
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255) -> torch.Tensor:
    """Lovász-softmax over the classes present, all pixels of the batch pooled (Berman et al., CVPR 2018).

    For each class c present in the non-ignored labels, with errors m_i = |1[y_i = c] − p_i,c| over the valid pixels
    sorted decreasingly (permutation π), the Lovász extension of the Jaccard loss is
    ``L_c = Σ_i m_π(i) · (Δ_J(π_1..i) − Δ_J(π_1..i−1))`` (``lovasz_grad``), and ``L = mean_{c present} L_c``.
    This is SDCA's ``lovasz_softmax(probs, labels, classes='present', per_image=False, ignore=255)``
    (``core/utils/lovasz_loss.py``, from Berman's code); SDCA adds it to the source CE with weight 0.75. With no
    valid pixel the loss is 0 and still part of the graph (gradient 0): the official code returns an empty tensor
    there, which breaks the sum with the CE.

    Args:
        probs: (B, C, H, W) class probabilities (softmax of the logits).
        labels: (B, H, W) train ids in [0, C) or ``ignore_index``.
    """
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"lovasz_softmax: expected probs (B, C, H, W) and labels (B, H, W), got probs "
                         f"{tuple(probs.shape)} and labels {tuple(labels.shape)}")
    num_classes = probs.shape[1]
    p = upcast(probs).permute(0, 2, 3, 1).reshape(-1, num_classes)  # (B*H*W, C)
    y = labels.reshape(-1)  # (B*H*W,)
    valid = y != ignore_index  # (B*H*W,)
    p, y = p[valid], y[valid]  # (P, C), (P,)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"lovasz_softmax: labels must lie in [0, {num_classes}) or equal {ignore_index}, got values "
                         f"in [{int(y.min())}, {int(y.max())}]")
    losses = []
    for c in torch.unique(y).tolist():  # the classes present, in increasing order
        fg = (y == c).to(p.dtype)  # (P,)
        errors, order = (fg - p[:, c]).abs().sort(descending=True)  # (P,), (P,)
        losses.append(errors @ lovasz_grad(fg[order]))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()
