"""Per-class mean features of one view (prototypes for the cross-view prototype contrast, METHODS.md §4)."""

from __future__ import annotations

import torch


def class_prototypes(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """``p_c = mean{f_i : y_i = c}`` for every class present.

    Args:
        feats: (N, D); labels: (N,) in [0, num_classes) or ``ignore_index`` (skipped).

    Returns:
        prototypes (C', D) and their class ids (C',) in increasing order, for the C' classes present.
    """
    if feats.dim() != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(f"class_prototypes: expected feats (N, D) and labels (N,), got {tuple(feats.shape)} and "
                         f"{tuple(labels.shape)}")
    valid = labels != ignore_index  # (N,)
    y = labels[valid]  # (n,)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class_prototypes: labels outside [0, {num_classes}) and != {ignore_index}: "
                         f"{sorted(set(y.tolist()) - set(range(num_classes)))[:5]}")
    sums = feats.new_zeros(num_classes, feats.shape[1]).index_add(0, y, feats[valid])  # (C, D)
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    ids = (counts > 0).nonzero().squeeze(1)  # (C',)
    return sums[ids] / counts[ids, None].to(sums.dtype), ids
