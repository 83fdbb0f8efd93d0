"""ClassMix source → target (DACS, METHODS.md §1): paste half of the source classes onto the target image."""

from __future__ import annotations

import math

import torch


def num_mixed_classes(num_present: int, ratio: float) -> int:
    """``ceil(ratio · n)``, robust to float round-off (0.3 · 10 is 3, not 4)."""
    return min(num_present, math.ceil(round(ratio * num_present, 9)))


def classmix_masks(src_labels: torch.Tensor, *, ratio: float, prob: float, generator: torch.Generator,
                   ignore_index: int = 255) -> torch.Tensor:
    """Per-image ClassMix masks: True where the source pixel is pasted.

    For each image, with probability ``prob``: the classes present in its source label (``ignore_index`` excluded,
    so ignore pixels are never pasted — the original DACS code wrongly counts 255 as a class) are shuffled and the
    first ``ceil(ratio · n)`` are chosen; the mask is the pixels of those classes. With probability ``1 − prob`` the
    mask is all False. Random draws come from ``generator`` only (one uniform per image, then one permutation for
    each mixed image), so the masks are reproducible from its state.

    Args:
        src_labels: (B, H, W) source labels.

    Returns:
        (B, H, W) bool mask on ``src_labels``' device.
    """
    if src_labels.dim() != 3:
        raise ValueError(f"classmix_masks: expected src_labels (B, H, W), got {tuple(src_labels.shape)}")
    if not 0.0 <= ratio <= 1.0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"classmix_masks: ratio={ratio}, prob={prob}: both must lie in [0, 1]")
    masks = torch.zeros_like(src_labels, dtype=torch.bool)  # (B, H, W)
    for b in range(src_labels.shape[0]):
        if torch.rand((), generator=generator, device=generator.device).item() >= prob:
            continue
        classes = torch.unique(src_labels[b])  # (n,)
        classes = classes[classes != ignore_index]  # (n,)
        order = torch.randperm(classes.numel(), generator=generator, device=generator.device)
        chosen = classes[order[:num_mixed_classes(classes.numel(), ratio)].to(classes.device)]  # (k,)
        masks[b] = torch.isin(src_labels[b], chosen)
    return masks


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` else ``b``.

    ``mask`` (B, H, W); ``a`` and ``b`` either (B, H, W) (labels, weights) or (B, K, H, W) (images: the mask applies
    to every channel). Mixed weight (METHODS.md §1): ``mix(mask, ones_like(w), w)``.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mix: expected a bool mask (B, H, W), got {mask.dtype} {tuple(mask.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"mix: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if a.dim() == 4:
        mask = mask[:, None]  # (B, 1, H, W)
    if a.dim() != mask.dim() or a.shape[0] != mask.shape[0] or a.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mix: tensors {tuple(a.shape)} do not match the mask {tuple(mask.shape)}: expected "
                         f"(B, H, W) or (B, K, H, W)")
    return torch.where(mask, a, b)
