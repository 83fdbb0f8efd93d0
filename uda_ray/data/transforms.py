"""Geometric transforms of one (image, label) pair and ImageNet normalisation.

Images are resized bilinearly, labels always with nearest neighbour (no new label values). Randomness comes only
from the ``np.random.Generator`` passed in, so a sample's augmentation is fixed by its seed; without a generator
the train transform is deterministic (centre crop, no flip). Colour jitter and blur run batched on the mixed image
in the trainer (``uda_ray.data.photometric``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_pair(image: np.ndarray, label: np.ndarray | None,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize (H, W, 3) uint8 bilinearly and (H, W) uint8 with nearest neighbour to ``size`` = (height, width)."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    if label is not None and label.shape != (h, w):
        label = np.array(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return image, label


def _to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    return img, torch.from_numpy(np.ascontiguousarray(label)).long()


class TrainTransform:
    """Resize to ``resize``, random ``crop`` (both (height, width)), random horizontal flip with probability 0.5.

    With a generator the crop offset (top, then left) and the flip are drawn from it in that order; with
    ``rng=None`` the crop is centred and there is no flip.
    """

    def __init__(self, resize: tuple[int, int], crop: tuple[int, int], flip: bool) -> None:
        if crop[0] > resize[0] or crop[1] > resize[1]:
            raise ValueError(f"crop {tuple(crop)} is larger than resize {tuple(resize)}: expected crop <= resize")
        self.resize = (int(resize[0]), int(resize[1]))
        self.crop = (int(crop[0]), int(crop[1]))
        self.flip = flip

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = _resize_pair(image, label, self.resize)
        (h, w), (ch, cw) = self.resize, self.crop
        if rng is None:
            top, left, flip = (h - ch) // 2, (w - cw) // 2, False
        else:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            flip = self.flip and bool(rng.random() < 0.5)
        image = image[top:top + ch, left:left + cw]
        label = label[top:top + ch, left:left + cw]
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        return _to_tensors(image, label)


class EvalTransform:
    """Image resized to ``resize`` = (height, width); the label keeps its full resolution (logits are upsampled)."""

    def __init__(self, resize: tuple[int, int]) -> None:
        self.resize = (int(resize[0]), int(resize[1]))

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = _resize_pair(image, None, self.resize)
        return _to_tensors(image, label)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation ``(x - mean) / std`` per channel of (B, 3, H, W) or (3, H, W) images in [0, 1]."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W) images, got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    return (images - mean) / std
