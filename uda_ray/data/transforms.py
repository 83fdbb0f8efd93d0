"""Geometric transforms of one (image, label) pair and ImageNet normalisation, as mmseg's pipeline does them.

Resize (mmseg ``Resize`` through mmcv's ``imresize``/``imrescale``, cv2 backend): images with ``cv2.INTER_LINEAR``,
labels with ``cv2.INTER_NEAREST`` (no new label values), on both the fixed-size and the aspect-keeping path (earlier
versions used PIL's bilinear filter, which antialiases when shrinking and so differs from mmseg). ``keep_ratio``
scales by ``s = min(long / long_edge, short / short_edge)`` to ``(int(w·s + 0.5), int(h·s + 0.5))``, mmcv's
``rescale_size`` (GTA5 1914×1052 within (720, 1280) → 1280×704; Cityscapes 2048×1024 within (512, 1024) → 1024×512).

Random crop (mmseg ``RandomCrop``): offset top then left, each uniform in [0, max(size − crop, 0)]. With
``cat_max_ratio < 1`` the crop is re-drawn up to 10 times while it does not hold at least two non-ignore classes with
the largest below ``cat_max_ratio`` of the non-ignore pixels; the 11th draw is kept unchecked. A rare-class requirement
(``rcs_class``, see ``uda_ray.data.rcs``) re-runs crop + flip (DAFormer re-runs the source pipeline) up to 10 more
times until the crop holds more than ``rcs_min_crop_pixels`` pixels of that class, again keeping the last draw.
Flip (mmseg ``RandomFlip``), then padding (mmseg ``Pad``) to the crop size at the bottom and right when the resized
image is smaller than the crop: labels with 255, images with the ImageNet mean — mmseg pads with 0 after
normalisation, which is the mean colour before it.

Random rescale before the crop (``scale`` = (lo, hi), SDCA's ``RandomScale``): the image (and label, nearest) is
resized once, from the image as loaded, to ``(int(h·s), int(w·s))`` with (h, w) the resize size and s uniform in
[lo, hi) (``lo + (hi − lo)·u``, SDCA's draw); then cropped, flipped and padded as above. SDCA scales the image as
loaded, so its self-training stage (0.5–1.5 of the whole 2048×1024 Cityscapes image, a 1024×512 crop) is
``resize`` = the full size; SDCA resizes with PIL's bicubic (image) and nearest (label) filters where uda-ray uses
cv2's linear and nearest, and its ``RandomCrop(pad_if_needed)`` pads left and right (top and bottom) by the deficit
with black / 255 and crops at random within, where uda-ray pads at the bottom and right with the mean colour (never
reached by SDCA's settings: 0.5 · 1024×2048 is the crop). Per-image photometric ops (``photometric``, SDCA's and
PixMatch's jitter, grayscale and blur: ``uda_ray.data.pil_photometric``) run after the flip, on the uint8 image only.

Randomness comes only from the ``np.random.Generator`` passed in, so a sample's augmentation is fixed by its seed;
without a generator the train transform is deterministic (centre crop, no flip, no re-draws, no scale, no
photometric ops). Colour jitter and blur of the mixed image run batched in the trainer (``uda_ray.data.photometric``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from uda_ray.data.pil_photometric import Photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255
CROP_REDRAWS = 10  # mmseg RandomCrop (cat_max_ratio) and DAFormer's RCS loop: 10 re-draws after the first draw


def rescaled_size(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of ``size`` (height, width) scaled to fit ``bound`` keeping its aspect ratio.

    mmcv's ``rescale_size``: only the long and the short side of ``bound`` matter (so (720, 1280) = (1280, 720)).
    """
    h, w = size
    scale = min(max(bound) / max(h, w), min(bound) / min(h, w))
    return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (h, w, 3) uint8 with ``cv2.INTER_LINEAR`` (mmcv ``imresize``, 'bilinear')."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 → (h, w) uint8 with ``cv2.INTER_NEAREST`` (mmcv ``imresize``, 'nearest')."""
    if label.shape == tuple(size):
        return label
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def _target_size(shape: tuple[int, ...], resize: tuple[int, int], keep_ratio: bool) -> tuple[int, int]:
    return rescaled_size((shape[0], shape[1]), resize) if keep_ratio else resize


def _to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    return img, torch.from_numpy(np.ascontiguousarray(label)).long()


def _pad(img: torch.Tensor, lab: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (3, h, w) / (h, w) at the bottom and right to ``size`` with the ImageNet mean / 255."""
    h, w = lab.shape
    if (h, w) == size:
        return img, lab
    out_img = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(3, 1, 1).repeat(1, *size)  # (3, ch, cw)
    out_img[:, :h, :w] = img
    out_lab = torch.full(size, IGNORE, dtype=lab.dtype)  # (ch, cw)
    out_lab[:h, :w] = lab
    return out_img, out_lab


def cat_ratio_ok(crop: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's acceptance test: >= 2 non-ignore classes and the largest covers < ``cat_max_ratio`` of them."""
    cnt = np.bincount(crop.ravel(), minlength=256)
    cnt[IGNORE] = 0
    cnt = cnt[cnt > 0]
    return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


class TrainTransform:
    """Resize, random crop (with mmseg's ``cat_max_ratio`` and DAFormer's rare-class re-draws), flip, pad.

    ``resize`` and ``crop`` are (height, width). ``keep_ratio``: scale to fit ``resize`` keeping the aspect ratio
    (mmseg's default) instead of resizing to it exactly. ``cat_max_ratio`` 1.0 turns the class-ratio re-draws off
    (DAFormer: 0.75 on the source). ``rcs_min_crop_pixels``: with an ``rcs_class`` in the call, the crop must hold more
    than this many pixels of it (DAFormer: min_pixels · min_crop_ratio); None turns the RCS re-draws off.

    ``pseudo_margins`` = (top, bottom, left, right) > 0 adds a third element to the result: an (h, w) bool mask of the
    crop, False where the pixel lay within the margins of the image as loaded (HRDA's ``crop_pseudo_margins``, its
    ``valid_pseudo_mask``: made before the resize and carried through resize, crop, flip and padding with the label).

    ``scale`` = (lo, hi): the random rescale before the crop (module docstring); (1, 1) = off. ``photometric``: the
    per-image photometric ops after the flip (``Photometric``); None or one that changes nothing = off.

    Draw order from the generator: the scale (only when on); per attempt: crop top, crop left (repeated for each
    cat_max_ratio re-draw), flip; then the photometric draws (only when on).
    """

    def __init__(self, resize: tuple[int, int], crop: tuple[int, int], flip: bool, *, keep_ratio: bool = False,
                 cat_max_ratio: float = 1.0, rcs_min_crop_pixels: float | None = None,
                 pseudo_margins: tuple[int, int, int, int] = (0, 0, 0, 0), scale: tuple[float, float] = (1.0, 1.0),
                 photometric: Photometric | None = None) -> None:
        if min(resize) < 1 or min(crop) < 1:
            raise ValueError(f"resize {tuple(resize)} / crop {tuple(crop)}: expected positive (height, width)")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio {cat_max_ratio}: expected a value in (0, 1] (1.0 = off)")
        if rcs_min_crop_pixels is not None and rcs_min_crop_pixels < 0:
            raise ValueError(f"rcs_min_crop_pixels {rcs_min_crop_pixels}: expected >= 0 or None (off)")
        self.resize = (int(resize[0]), int(resize[1]))
        self.crop = (int(crop[0]), int(crop[1]))
        self.flip = flip
        self.keep_ratio = keep_ratio
        self.cat_max_ratio = float(cat_max_ratio)
        self.rcs_min_crop_pixels = rcs_min_crop_pixels
        if len(pseudo_margins) != 4 or min(pseudo_margins) < 0:
            raise ValueError(f"pseudo_margins {tuple(pseudo_margins)}: expected (top, bottom, left, right) >= 0")
        self.pseudo_margins = tuple(int(m) for m in pseudo_margins)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"scale {tuple(scale)}: expected a ratio range (lo, hi) with 0 < lo <= hi ((1, 1) = off)")
        self.scale = (float(scale[0]), float(scale[1]))
        self.photometric = photometric if photometric is not None and photometric.enabled else None

    def _draw_box(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        top = int(rng.integers(0, max(shape[0] - self.crop[0], 0) + 1))
        left = int(rng.integers(0, max(shape[1] - self.crop[1], 0) + 1))
        return top, left

    def _cut(self, a: np.ndarray, box: tuple[int, int]) -> np.ndarray:
        return a[box[0]:box[0] + self.crop[0], box[1]:box[1] + self.crop[1]]

    def _random_box(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        box = self._draw_box(label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(CROP_REDRAWS):
                if cat_ratio_ok(self._cut(label, box), self.cat_max_ratio):
                    break
                box = self._draw_box(label.shape, rng)
        return box

    def _valid(self, shape: tuple[int, ...]) -> np.ndarray:
        top, bottom, left, right = self.pseudo_margins
        h, w = shape[:2]
        if top + bottom >= h or left + right >= w:
            raise ValueError(f"data.target_pseudo_margins {list(self.pseudo_margins)} leave nothing of an image of "
                             f"{h}x{w} (HxW)")
        valid = np.zeros((h, w), dtype=np.uint8)
        valid[top:h - bottom, left:w - right] = 1
        return valid

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None,
                 rcs_class: int | None = None) -> tuple[torch.Tensor, ...]:
        valid = self._valid(image.shape) if any(self.pseudo_margins) else None
        size = _target_size(image.shape, self.resize, self.keep_ratio)
        if rng is not None and self.scale != (1.0, 1.0):
            s = self.scale[0] + (self.scale[1] - self.scale[0]) * rng.random()  # SDCA's RandomScale
            size = (max(1, int(size[0] * s)), max(1, int(size[1] * s)))
        image, label = resize_image(image, size), resize_label(label, size)
        if valid is not None:
            valid = resize_label(valid, size)
        (h, w), (ch, cw) = size, self.crop
        if rng is None:
            box, flip = (max(h - ch, 0) // 2, max(w - cw, 0) // 2), False
        else:
            need = self.rcs_min_crop_pixels if rcs_class is not None else None
            attempts = 1 + CROP_REDRAWS if need is not None else 1
            for attempt in range(attempts):  # DAFormer: draws 1..10 are checked, the 11th is kept as it is
                box = self._random_box(label, rng)
                flip = self.flip and bool(rng.random() < 0.5)
                if need is None or attempt == attempts - 1:
                    break
                if np.count_nonzero(self._cut(label, box) == rcs_class) > need:
                    break
        image, label = self._cut(image, box), self._cut(label, box)
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if rng is not None and self.photometric is not None:
            image = self.photometric(image, rng)
        img_t, lab_t = _pad(*_to_tensors(image, label), self.crop)
        if valid is None:
            return img_t, lab_t
        valid = self._cut(valid, box)
        if flip:
            valid = valid[:, ::-1]
        valid_t = torch.zeros(self.crop, dtype=torch.bool)  # padding is not valid
        valid_t[:valid.shape[0], :valid.shape[1]] = torch.from_numpy(np.ascontiguousarray(valid)).bool()
        return img_t, lab_t, valid_t


class EvalTransform:
    """Image resized to ``resize`` = (height, width) (or to fit it, ``keep_ratio``); the label keeps its full
    resolution (logits are upsampled to it)."""

    def __init__(self, resize: tuple[int, int], *, keep_ratio: bool = False) -> None:
        self.resize = (int(resize[0]), int(resize[1]))
        self.keep_ratio = keep_ratio

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image = resize_image(image, _target_size(image.shape, self.resize, self.keep_ratio))
        return _to_tensors(image, label)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation ``(x - mean) / std`` per channel of (B, 3, H, W) or (3, H, W) images in [0, 1]."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W) images, got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    return (images - mean) / std
