"""Dataset readers for GTA5, Cityscapes and SYNTHIA RAND_CITYSCAPES in their published layouts (METHODS.md §7).

Pairing (which image goes with which label file) is checked when a dataset is built; reading and decoding (an
unreadable file, a label whose size differs from its image) are checked when an item is read, and every error is a
``DatasetError`` that names the path. SYNTHIA labels are 16-bit, 3-channel PNGs with the class id in the R channel:
Pillow reduces such files to 8 bits, so they are read with OpenCV (which returns BGR: R is the last channel).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from uda_ray.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABEL_IDS,
    SYNTHIA_ID_TO_TRAIN,
    SYNTHIA_LABEL_IDS,
    encode_labels,
    make_known,
    make_lut,
)

Pair = tuple[Path, Path]


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the path and what was expected."""


class Transform(Protocol):
    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------------ pairing
def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found")
    return path


def _pair_up(images: list[Path], label_of: Callable[[Path], Path], where: str) -> list[Pair]:
    if not images:
        raise DatasetError(f"{where}: no images found (empty split)")
    pairs = [(img, label_of(img)) for img in images]
    missing = [(img, lab) for img, lab in pairs if not lab.is_file()]
    if missing:
        img, lab = missing[0]
        raise DatasetError(f"{img}: image has no label (expected {lab}); {len(missing)} of {len(pairs)} images "
                           f"in {where} lack a label")
    return pairs


def gta5_pairs(root: str | Path) -> list[Pair]:
    """``root/images/NNNNN.png`` ↔ ``root/labels/NNNNN.png`` (8-bit Cityscapes label ids), sorted by name."""
    root = _existing_dir(Path(root).expanduser(), "GTA5 root")
    img_dir = _existing_dir(root / "images", "GTA5 images")
    lab_dir = root / "labels"
    return _pair_up(sorted(img_dir.glob("*.png")), lambda p: lab_dir / p.name, str(img_dir / "*.png"))


def cityscapes_pairs(root: str | Path, split: str) -> list[Pair]:
    """``leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`` ↔ ``gtFine/{split}/<city>/<name>_gtFine_labelIds.png``."""
    root = _existing_dir(Path(root).expanduser(), "Cityscapes root")
    img_dir = _existing_dir(root / "leftImg8bit" / split, f"Cityscapes split '{split}'")
    lab_dir = root / "gtFine" / split
    suffix = "_leftImg8bit.png"

    def label_of(p: Path) -> Path:
        return lab_dir / p.parent.name / (p.name[: -len(suffix)] + "_gtFine_labelIds.png")

    return _pair_up(sorted(img_dir.glob(f"*/*{suffix}")), label_of, str(img_dir / f"<city>/*{suffix}"))


def synthia_pairs(root: str | Path) -> list[Pair]:
    """``root/RGB/NNNNNNN.png`` ↔ ``root/GT/LABELS/NNNNNNN.png`` (16-bit, class id in R), sorted by name."""
    root = _existing_dir(Path(root).expanduser(), "SYNTHIA root")
    img_dir = _existing_dir(root / "RGB", "SYNTHIA RGB")
    lab_dir = root / "GT" / "LABELS"
    return _pair_up(sorted(img_dir.glob("*.png")), lambda p: lab_dir / p.name, str(img_dir / "*.png"))


# ------------------------------------------------------------------------------------------------------ decoding
def read_image(path: Path) -> np.ndarray:
    """An image file → (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy needs one
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or foreign files
        raise DatasetError(f"{path}: unreadable image ({e})") from e


def read_label_ids(path: Path) -> np.ndarray:
    """A single-channel label PNG (8-bit grey, palette or 16-bit grey) → (H, W) integer ids (palette indices)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            ids = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or foreign files
        raise DatasetError(f"{path}: unreadable label ({e})") from e
    if mode not in ("L", "P", "I;16", "I"):
        raise DatasetError(f"{path}: label image has mode {mode!r}: expected single-channel label ids "
                           "(mode L, P or I;16); colour-coded labels are not label ids")
    if mode == "I" and ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise DatasetError(f"{path}: label ids in [{ids.min()}, {ids.max()}] do not fit 16 bits")
    return ids.astype(np.uint16) if mode == "I" else ids


def read_synthia_label_ids(path: Path) -> np.ndarray:
    """A SYNTHIA 16-bit multi-channel label PNG → (H, W) uint16 class ids from its R channel."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetError(f"{path}: unreadable label (OpenCV could not decode it)")
    if raw.ndim == 2:
        return raw
    if raw.ndim != 3 or raw.shape[2] not in (3, 4):
        raise DatasetError(f"{path}: label has shape {raw.shape}: expected (H, W, 3) or (H, W, 4)")
    return np.ascontiguousarray(raw[:, :, 2])  # BGR(A) order: R is channel 2


class LabelDecoder:
    """Callable ``path -> (H, W) uint8 train ids``: read ids, map them, warn once per dataset for foreign ids."""

    def __init__(self, read_ids: Callable[[Path], np.ndarray], mapping: dict[int, int], known_ids: tuple[int, ...],
                 warn_key: Hashable) -> None:
        self.read_ids = read_ids
        self.lut = make_lut(mapping)
        self.known = make_known(known_ids)
        self.warn_key = warn_key

    def __call__(self, path: Path) -> np.ndarray:
        return encode_labels(self.read_ids(path), self.lut, str(path), known=self.known, warn_key=self.warn_key)


# ------------------------------------------------------------------------------------------------------- dataset
class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label) pairs read from files; ``dataset[i]`` or ``dataset[(i, sample_seed)]``.

    An int key gives the transform no generator (deterministic: see the transforms); a tuple key gives it
    ``np.random.default_rng(sample_seed)``, so the augmentation of a sample is fixed by its seed whatever the number
    of loader workers. Items are ``{"image": (3, h, w) float32 in [0, 1] (not normalised), "label": (h', w') int64
    train ids with 255 = ignore, "index": int}``.
    """

    def __init__(self, pairs: list[Pair], decode_label: Callable[[Path], np.ndarray], transform: Transform,
                 cache_in_memory: bool = False) -> None:
        if not pairs:
            raise DatasetError("SegmentationDataset: no (image, label) pairs given")
        self.pairs = list(pairs)
        self.decode_label = decode_label
        self.transform = transform
        self.cache_in_memory = cache_in_memory
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (H, W, 3) uint8 image and (H, W) uint8 train ids of one pair, size-checked."""
        if index in self._cache:
            return self._cache[index]
        img_path, lab_path = self.pairs[index]
        image = read_image(img_path)
        label = self.decode_label(lab_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{lab_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from its "
                               f"image {img_path} ({image.shape[1]}x{image.shape[0]})")
        if self.cache_in_memory:
            self._cache[index] = (image, label)
        return image, label

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
            rng: np.random.Generator | None = np.random.default_rng(sample_seed)
        else:
            index, rng = int(key), None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        image, label = self.load(index)
        img_t, lab_t = self.transform(image, label, rng)
        return {"image": img_t, "label": lab_t, "index": index}


# ------------------------------------------------------------------------------------------------------ registry
def _gta5(root: Path, split: str) -> tuple[list[Pair], Callable[[Path], np.ndarray]]:
    if split != "train":
        raise DatasetError(f"{root}: GTA5 has one split 'train', got split {split!r}")
    dec = LabelDecoder(read_label_ids, CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_LABEL_IDS, ("gta5", str(root), split))
    return gta5_pairs(root), dec


def _cityscapes(root: Path, split: str) -> tuple[list[Pair], Callable[[Path], np.ndarray]]:
    dec = LabelDecoder(read_label_ids, CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_LABEL_IDS, ("cityscapes", str(root), split))
    return cityscapes_pairs(root, split), dec


def _synthia(root: Path, split: str) -> tuple[list[Pair], Callable[[Path], np.ndarray]]:
    if split != "train":
        raise DatasetError(f"{root}: SYNTHIA has one split 'train', got split {split!r}")
    dec = LabelDecoder(read_synthia_label_ids, SYNTHIA_ID_TO_TRAIN, SYNTHIA_LABEL_IDS, ("synthia", str(root), split))
    return synthia_pairs(root), dec


DATASETS: dict[str, Callable[[Path, str], tuple[list[Pair], Callable[[Path], np.ndarray]]]] = {
    "gta5": _gta5,
    "cityscapes": _cityscapes,
    "synthia": _synthia,
}


def build_dataset(name: str, root: str | Path, split: str, transform: Transform,
                  cache_in_memory: bool = False) -> SegmentationDataset:
    """A ``SegmentationDataset`` over a dataset in its published layout (``name`` in ``DATASETS``)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    pairs, decode = DATASETS[name](Path(root).expanduser(), split)
    return SegmentationDataset(pairs, decode, transform, cache_in_memory=cache_in_memory)
