"""SDCA's class-wise confidence thresholds for offline pseudo-labels (METHODS.md §14; ``core/utils/pseudo_label.py``).

SDCA's ``pseudo_label.py`` runs the adapted model over the whole target train split, collects every pixel's
confidence (max softmax) and predicted class, and sets each class's threshold to the middle of the confidences of
the pixels predicted as that class, capped at 0.9; pixels below their class's threshold become ignore in the label
files written for the self-training stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = 255


def middle_value(values: torch.Tensor) -> float:
    """``sorted(values)[round(n / 2)]`` (ascending, round half to even as numpy's ``np.round``), 0 when empty.

    SDCA's ``get_threshold_const``: ``x = np.sort(x); x[np.int(np.round(len(x) * 0.5))]``. The index is the upper
    middle for even n (n = 4 → 2) and, for odd n, whichever of the two neighbours of n/2 is even (n = 5 → 2,
    n = 7 → 4); it is always < n.
    """
    n = values.numel()
    if n == 0:
        return 0.0
    index = round(n / 2)  # Python's round is half to even, as np.round; n / 2 is exact
    return float(values.reshape(-1).kthvalue(index + 1).values)  # kthvalue counts from 1


def thresholds_from_groups(groups: Sequence[torch.Tensor], *, cap: float = 0.9) -> torch.Tensor:
    """(C,) ``min(middle_value(groups[c]), cap)`` for the confidences ``groups[c]`` of the pixels predicted as c."""
    return torch.tensor([min(middle_value(g), cap) for g in groups], dtype=torch.float32)


def class_thresholds(confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     cap: float = 0.9) -> torch.Tensor:
    """SDCA's class-wise thresholds: per class c, the middle (``middle_value``) of the confidences of the pixels
    predicted as c, 0 when none is, then capped at ``cap`` (``thres[thres > 0.9] = 0.9``).

    Pass every pixel of the whole split, as SDCA does (one threshold per class for the split, not per image).

    Args:
        confidence: (...) max softmax probability of each pixel.
        labels: (...) its argmax class in [0, num_classes).

    Returns:
        (C,) float32 thresholds.
    """
    if confidence.shape != labels.shape:
        raise ValueError(f"class_thresholds: confidence {tuple(confidence.shape)} and labels {tuple(labels.shape)} "
                         "must have one shape")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class_thresholds: labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    conf, y = confidence.reshape(-1), labels.reshape(-1)  # (N,), (N,)
    return thresholds_from_groups([conf[y == c] for c in range(num_classes)], cap=cap)


def threshold_labels(labels: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor, *,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """The labels with every pixel whose confidence is strictly below its class's threshold set to ``ignore_index``
    (SDCA: ``pred_label[(pred_max < thres[i]) * (pred_label == i)] = 255``).

    Args:
        labels: (...) predicted classes in [0, C); confidence: (...) their max softmax; thresholds: (C,).
    """
    if confidence.shape != labels.shape or thresholds.dim() != 1:
        raise ValueError(f"threshold_labels: expected labels and confidence of one shape and thresholds (C,), got "
                         f"{tuple(labels.shape)}, {tuple(confidence.shape)} and {tuple(thresholds.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= thresholds.numel()):
        raise ValueError(f"threshold_labels: labels must lie in [0, {thresholds.numel()}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    below = confidence < thresholds.to(confidence.device, confidence.dtype)[labels]  # (...)
    return labels.masked_fill(below, ignore_index)
