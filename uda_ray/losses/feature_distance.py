"""Thing-class ImageNet Feature Distance (DAFormer, METHODS.md §9) and its label downscaling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uda_ray.losses.precision import upcast


def downscale_label_ratio(labels: torch.Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = 255) -> torch.Tensor:
    """Majority label of each ``scale × scale`` cell, or ``ignore_index`` where the majority is not clear.

    Per cell: the share of every class and of the ignore label (an extra channel placed *after* the classes), the
    largest share and its class; the cell gets ``ignore_index`` when that share is below ``min_ratio`` or the majority
    is the ignore label. Equal to DAFormer's ``mmseg/utils/utils.py:downscale_label_ratio`` (one-hot, ``avg_pool2d``
    with kernel = stride = scale, ``torch.max`` over channels) on the same inputs, written with a ``bincount`` so that
    no (B, C + 1, H, W) one-hot map is allocated. Its details, kept here:

    - ties go to the lowest channel (``torch.max`` returns the first maximum), so a class beats the ignore label;
    - the share is ``count / scale²`` in float32 (what ``avg_pool2d`` computes), compared with ``min_ratio`` as
      DAFormer does;
    - H or W not divisible by ``scale``: the trailing ``H % scale`` rows and ``W % scale`` columns are dropped
      (``avg_pool2d`` floors), output (B, H // scale, W // scale);
    - DAFormer asserts ``scale > 1``; here ``scale = 1`` is allowed (each cell is one pixel: the labels unchanged).
    Labels other than 0 … num_classes − 1 and ``ignore_index`` raise (DAFormer's ``one_hot`` would fail on them).

    Args:
        labels: (B, H, W) integer labels.
    Returns:
        (B, H // scale, W // scale) int64.
    """
    if labels.dim() != 3:
        raise ValueError(f"downscale_label_ratio: expected labels (B, H, W), got {tuple(labels.shape)}")
    b, h_full, w_full = labels.shape
    if scale < 1 or scale > h_full or scale > w_full:
        raise ValueError(f"downscale_label_ratio: scale={scale} must be in 1 … min(H, W) for labels {h_full}×{w_full}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"downscale_label_ratio: ignore_index={ignore_index} must not be a class id "
                         f"(num_classes={num_classes})")
    h, w = h_full // scale, w_full // scale
    y = labels[:, : h * scale, : w * scale].long()  # (B, h·s, w·s)
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bad.any():
        raise ValueError(f"downscale_label_ratio: labels must be in 0 … {num_classes - 1} or {ignore_index}, "
                         f"got {y[bad][0].item()}")
    k = num_classes + 1  # the ignore label counts as channel num_classes, after every class
    y = torch.where(y == ignore_index, torch.full_like(y, num_classes), y)
    rows = torch.arange(h * scale, device=y.device) // scale  # (h·s,)
    cols = torch.arange(w * scale, device=y.device) // scale  # (w·s,)
    cell = rows[:, None] * w + cols[None, :]  # (h·s, w·s)
    cell = torch.arange(b, device=y.device)[:, None, None] * (h * w) + cell[None]  # (B, h·s, w·s)
    counts = torch.bincount((cell * k + y).flatten(), minlength=b * h * w * k).view(b, h, w, k)  # (B, h, w, C + 1)
    top, out = counts.max(dim=-1)  # (B, h, w) each; first maximum on ties
    share = top.float() / float(scale * scale)  # (B, h, w), as avg_pool2d's float32 mean
    out = out.masked_fill(out == num_classes, ignore_index)
    return out.masked_fill(share < min_ratio, ignore_index)


def feature_distance(student: torch.Tensor, imagenet: torch.Tensor, labels: torch.Tensor, *, classes: Sequence[int],
                     scale_min_ratio: float, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Mean L2 distance to the frozen ImageNet features over the cells of the given (thing) classes.

    ``L = 1/|M| Σ_{(b, u, v) ∈ M} ‖F_S[b, :, u, v] − F_I[b, :, u, v]‖₂`` with M = the cells, over the whole batch,
    whose label downscaled by ``downscale_label_ratio(labels, H // h, scale_min_ratio, num_classes)`` is in
    ``classes``. The norm is not squared and the loss is unweighted (the caller multiplies by λ = 0.005).
    ``imagenet`` is a constant (detached); gradients reach ``student`` only. Computed in at least float32.

    Same value as DAFormer's ``calc_feat_dist`` / ``masked_feat_dist`` (``mmseg/models/uda/dacs.py``: one mean over
    the masked cells of all images). Differences: with no qualifying cell DAFormer returns ``mean([]) = NaN`` (with
    zero gradients, as HRDA's comment says); here the loss is exactly 0, a zero with a graph to ``student`` and zero
    gradients, so logs stay finite and DDP sees the same parameters used on every rank. DAFormer takes the scale from
    the widths (``W // w``), here from the heights; both must give a downscaled map of exactly (h, w), else this
    raises. Reference: Hoyer et al., "DAFormer: Improving Network Architectures and Training Strategies for
    Domain-Adaptive Semantic Segmentation", CVPR 2022.

    Args:
        student: (B, C, h, w) features of the trained encoder (last stage).
        imagenet: (B, C, h, w) features of the frozen ImageNet-initialised encoder on the same image.
        labels: (B, H, W) labels of the image (255 = ignore).
    """
    if student.dim() != 4 or imagenet.shape != student.shape:
        raise ValueError(f"feature_distance: expected student and imagenet (B, C, h, w) of one shape, got "
                         f"{tuple(student.shape)} and {tuple(imagenet.shape)}")
    if labels.dim() != 3 or labels.shape[0] != student.shape[0]:
        raise ValueError(f"feature_distance: expected labels (B, H, W) with B = {student.shape[0]}, got "
                         f"{tuple(labels.shape)}")
    h, w = student.shape[-2:]
    h_full, w_full = labels.shape[-2:]
    scale = h_full // h
    if scale < 1 or (h_full // scale, w_full // scale) != (h, w):
        raise ValueError(f"feature_distance: labels {h_full}×{w_full} do not downscale to the features' {h}×{w} by an "
                         f"integer factor (H // h = {scale})")
    down = downscale_label_ratio(labels, scale, scale_min_ratio, num_classes, ignore_index)  # (B, h, w)
    mask = torch.isin(down, torch.as_tensor(list(classes), dtype=down.dtype, device=down.device))  # (B, h, w)
    with torch.autocast(device_type=student.device.type, enabled=False):
        diff = upcast(student) - upcast(imagenet).detach()  # (B, C, h, w)
        dist = torch.linalg.vector_norm(diff, dim=1)  # (B, h, w)
        # where (not a product) keeps non-finite distances of unmasked cells out of the value and the gradient
        total = torch.where(mask, dist, torch.zeros_like(dist)).sum()
        return total / mask.sum().clamp_min(1)
