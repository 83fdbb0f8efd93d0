"""Dataset readers for GTA5, Cityscapes and SYNTHIA RAND_CITYSCAPES in their published layouts (METHODS.md §7), with
either the datasets' own label ids or DAFormer's ``_labelTrainIds.png`` files.

Label formats. ``ids``: the published label files (GTA5 ``labels/NNNNN.png``, Cityscapes ``*_gtFine_labelIds.png``,
SYNTHIA ``GT/LABELS/NNNNNNN.png``), mapped to train ids when read. ``train_ids``: the files DAFormer's converters
(``tools/convert_datasets/{gta,cityscapes,synthia}.py``) write next to them — GTA5 ``labels/NNNNN_labelTrainIds.png``,
Cityscapes ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``, SYNTHIA ``GT/LABELS/NNNNNNN_labelTrainIds.png``
(the suffixes of DAFormer's ``GTADataset``, ``CityscapesDataset``, ``SynthiaDataset``): 8-bit train ids, 255 = ignore,
read as they are (any other value is an error). ``auto``: whichever of the two kinds exists in the label folder; both
kinds there (DAFormer's converters keep the originals) is an error that asks for an explicit format.

Checks. Pairing (which image goes with which label file), readable file headers and image/label sizes (from the
PNG headers only, in parallel; every bad pair is listed) are checked when a dataset is built by ``build_dataset``;
decoding errors (a truncated file, foreign ids, bad train ids) when an item is read. Every error is a
``DatasetError`` that names the path. GTA5 holds some pairs whose label size differs from the image:
``resize_labels=True`` resizes such labels to their image (nearest) when read instead of failing. SYNTHIA labels are
16-bit, 3-channel PNGs with the class id in the R channel: Pillow reduces such files to 8 bits, so they are read with
OpenCV (which returns BGR: R is the last channel).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image

from uda_ray.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABEL_IDS,
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAIN,
    SYNTHIA_LABEL_IDS,
    encode_labels,
    make_known,
    make_lut,
)
from uda_ray.data.transforms import resize_label

Pair = tuple[Path, Path]
SHOW = 20  # bad pairs named in an error message; the full list goes to a file


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the path and what was expected."""


class Transform(Protocol):
    """``(image, label, rng) -> (image, label)`` tensors; train transforms also take ``rcs_class=`` (see rcs.py)."""

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------------ pairing
def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found")
    return path


def _pair_up(images: list[Path], label_of: Callable[[str], Callable[[Path], Path]], fmt: str,
             where: str) -> list[Pair]:
    """``(image, label)`` pairs, the label named by ``label_of(fmt)``. When labels are missing and the other
    format's files are there instead, the error says which ``data.label_format`` reads them."""
    if not images:
        raise DatasetError(f"{where}: no images found (empty split)")
    pairs = [(img, label_of(fmt)(img)) for img in images]
    missing = [(img, lab) for img, lab in pairs if not lab.is_file()]
    if missing:
        img, lab = missing[0]
        other = "ids" if fmt == "train_ids" else "train_ids"
        present = label_of(other)(img)
        hint = (f"; {present.name} is there: these are {'label ids' if other == 'ids' else 'train ids'}, which "
                f"data.label_format={other} reads (or auto)" if present.is_file() else "")
        raise DatasetError(f"{img}: image has no label (expected {lab}, data.label_format={fmt}); {len(missing)} "
                           f"of {len(pairs)} images in {where} lack a label{hint}")
    return pairs


LABEL_FORMATS = ("ids", "train_ids", "auto")
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"  # DAFormer's converters: <label name>.png -> <label name>_labelTrainIds.png


def _resolve_format(label_format: str, label_dir: Path, pattern: str, is_ids: Callable[[str], bool]) -> str:
    """``ids`` / ``train_ids`` as given; ``auto`` → the one kind of label file found under ``label_dir``."""
    if label_format not in LABEL_FORMATS:
        raise DatasetError(f"{label_dir}: label_format {label_format!r} is unknown: expected one of {LABEL_FORMATS}")
    if label_format != "auto":
        return label_format
    found: set[str] = set()
    for p in label_dir.glob(pattern):
        found.add("train_ids" if p.name.endswith(TRAIN_IDS_SUFFIX) else "ids" if is_ids(p.name) else "other")
        if {"ids", "train_ids"} <= found:
            raise DatasetError(f"{label_dir}: label_format 'auto' found both label ids and DAFormer's "
                               f"*{TRAIN_IDS_SUFFIX} train-id labels: set label_format to 'ids' or 'train_ids'")
    found.discard("other")
    if not found:
        raise DatasetError(f"{label_dir}: label_format 'auto' found no label files ({pattern}) to detect the format")
    return found.pop()


def label_format_of(pairs: list[Pair]) -> str:
    """``train_ids`` when the pairs' label files are DAFormer's ``*_labelTrainIds.png``, else ``ids``."""
    return "train_ids" if pairs and pairs[0][1].name.endswith(TRAIN_IDS_SUFFIX) else "ids"


def gta5_pairs(root: str | Path, label_format: str = "ids") -> list[Pair]:
    """``root/images/NNNNN.png`` ↔ ``root/labels/NNNNN.png`` (8-bit Cityscapes label ids) or, ``train_ids``,
    ``root/labels/NNNNN_labelTrainIds.png``; sorted by name."""
    root = _existing_dir(Path(root).expanduser(), "GTA5 root")
    img_dir = _existing_dir(root / "images", "GTA5 images")
    lab_dir = root / "labels"
    fmt = _resolve_format(label_format, lab_dir, "*.png", lambda n: True)

    def label_of(kind: str) -> Callable[[Path], Path]:
        return lambda p: lab_dir / (p.stem + (TRAIN_IDS_SUFFIX if kind == "train_ids" else ".png"))

    return _pair_up(sorted(img_dir.glob("*.png")), label_of, fmt, str(img_dir / "*.png"))


def cityscapes_pairs(root: str | Path, split: str, label_format: str = "ids") -> list[Pair]:
    """``leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`` ↔ ``gtFine/{split}/<city>/<name>_gtFine_labelIds.png``
    or, ``train_ids``, ``..._gtFine_labelTrainIds.png``."""
    root = _existing_dir(Path(root).expanduser(), "Cityscapes root")
    img_dir = _existing_dir(root / "leftImg8bit" / split, f"Cityscapes split '{split}'")
    lab_dir = root / "gtFine" / split
    suffix = "_leftImg8bit.png"
    fmt = _resolve_format(label_format, lab_dir, "*/*_gtFine_*.png", lambda n: n.endswith("_gtFine_labelIds.png"))

    def label_of(kind: str) -> Callable[[Path], Path]:
        lab_suffix = "_gtFine" + (TRAIN_IDS_SUFFIX if kind == "train_ids" else "_labelIds.png")
        return lambda p: lab_dir / p.parent.name / (p.name[: -len(suffix)] + lab_suffix)

    return _pair_up(sorted(img_dir.glob(f"*/*{suffix}")), label_of, fmt, str(img_dir / f"<city>/*{suffix}"))


def synthia_pairs(root: str | Path, label_format: str = "ids") -> list[Pair]:
    """``root/RGB/NNNNNNN.png`` ↔ ``root/GT/LABELS/NNNNNNN.png`` (16-bit, class id in R) or, ``train_ids``,
    ``root/GT/LABELS/NNNNNNN_labelTrainIds.png``; sorted by name."""
    root = _existing_dir(Path(root).expanduser(), "SYNTHIA root")
    img_dir = _existing_dir(root / "RGB", "SYNTHIA RGB")
    lab_dir = root / "GT" / "LABELS"
    fmt = _resolve_format(label_format, lab_dir, "*.png", lambda n: True)

    def label_of(kind: str) -> Callable[[Path], Path]:
        return lambda p: lab_dir / (p.stem + (TRAIN_IDS_SUFFIX if kind == "train_ids" else ".png"))

    return _pair_up(sorted(img_dir.glob("*.png")), label_of, fmt, str(img_dir / "*.png"))


# ------------------------------------------------------------------------------------------------------ sizes
def _png_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the file's header (Pillow decodes nothing until asked), or the reason it is unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or foreign files
        return str(e)


def _write_list(lines: list[str], what: str) -> Path:
    with tempfile.NamedTemporaryFile("w", prefix=f"uda-ray-{what}-", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        return Path(f.name)


def check_pair_sizes(pairs: list[Pair], where: str, *, resize_labels: bool = False, workers: int = 8) -> int:
    """Compare every image's size with its label's from the PNG headers (``workers`` threads); returns the number of
    pairs whose sizes differ.

    Unreadable headers are an error, and so are size mismatches unless ``resize_labels`` (which warns once with the
    count; the labels are then resized to their image when read). Messages name the first ``SHOW`` bad files or
    pairs; the full list goes to a file the message names.
    """
    paths = [p for pair in pairs for p in pair]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        sizes = dict(zip(paths, pool.map(_png_size, paths)))
    bad = [f"{p}: unreadable ({sizes[p]})" for p in paths if isinstance(sizes[p], str)]
    if bad:
        listing = _write_list(bad, "unreadable")
        raise DatasetError(f"{where}: {len(bad)} image/label files are unreadable (full list in {listing}):\n  "
                           + "\n  ".join(bad[:SHOW]))
    odd = [f"{lab}: label {sizes[lab][0]}x{sizes[lab][1]} (WxH), image {img} {sizes[img][0]}x{sizes[img][1]}"
           for img, lab in pairs if sizes[img] != sizes[lab]]
    if odd:
        listing = _write_list(odd, "size-mismatches")
        msg = (f"{where}: {len(odd)} of {len(pairs)} labels differ in size from their image (full list in "
               f"{listing})")
        if not resize_labels:
            raise DatasetError(msg + "; set resize_labels to resize them to their image (nearest) when read:\n  "
                               + "\n  ".join(odd[:SHOW]))
        warnings.warn(msg + "; they are resized to their image (nearest) when read", UserWarning, stacklevel=2)
    return len(odd)


# ------------------------------------------------------------------------------------------------------ decoding
def read_image(path: Path) -> np.ndarray:
    """An image file → (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy needs one
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or foreign files
        raise DatasetError(f"{path}: unreadable image ({e})") from e


def _label_png(path: Path) -> tuple[str, np.ndarray]:
    """(PIL mode, pixel array) of a label PNG, undecoded values; unreadable files raise ``DatasetError``."""
    try:
        with Image.open(path) as im:
            return im.mode, np.array(im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing, truncated or foreign files
        raise DatasetError(f"{path}: unreadable label ({e})") from e


def read_label_ids(path: Path) -> np.ndarray:
    """A single-channel label PNG (8-bit grey, palette or 16-bit grey) → (H, W) integer ids (palette indices)."""
    mode, ids = _label_png(path)
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


_VALID_TRAIN_IDS = np.zeros(256, dtype=bool)
_VALID_TRAIN_IDS[[*range(NUM_CLASSES), IGNORE_INDEX]] = True


def read_train_ids(path: Path) -> np.ndarray:
    """A DAFormer ``*_labelTrainIds.png`` (8-bit train ids, 255 = ignore) → (H, W) uint8, values checked."""
    mode, ids = _label_png(path)
    if mode not in ("L", "P"):
        raise DatasetError(f"{path}: train-id label has mode {mode!r}: expected an 8-bit single-channel PNG "
                           "(mode L) as DAFormer's converters write")
    bad = ~_VALID_TRAIN_IDS[ids]
    if bad.any():
        raise DatasetError(f"{path}: train-id label holds values {np.unique(ids[bad]).tolist()}: expected train ids "
                           f"0..{NUM_CLASSES - 1} and {IGNORE_INDEX} (ignore)")
    return ids


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
    """(image, label) pairs read from files; ``dataset[i]``, ``dataset[(i, sample_seed)]`` or
    ``dataset[(i, sample_seed, rcs_class)]``.

    An int key gives the transform no generator (deterministic: see the transforms); a tuple key gives it
    ``np.random.default_rng(sample_seed)``, so the augmentation of a sample is fixed by its seed whatever the number
    of loader workers; a third element is the rare class the crop must contain (``transform(..., rcs_class=c)``,
    see ``uda_ray.data.rcs``). Items are ``{"image": (3, h, w) float32 in [0, 1] (not normalised), "label": (h', w')
    int64 train ids with 255 = ignore, "index": int}``. ``resize_labels``: a label whose size differs from its image is
    resized to it (nearest) instead of being an error.
    """

    def __init__(self, pairs: list[Pair], decode_label: Callable[[Path], np.ndarray], transform: Transform,
                 cache_in_memory: bool = False, resize_labels: bool = False) -> None:
        if not pairs:
            raise DatasetError("SegmentationDataset: no (image, label) pairs given")
        self.pairs = list(pairs)
        self.decode_label = decode_label
        self.transform = transform
        self.cache_in_memory = cache_in_memory
        self.resize_labels = resize_labels
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
            if not self.resize_labels:
                raise DatasetError(f"{lab_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from "
                                   f"its image {img_path} ({image.shape[1]}x{image.shape[0]})")
            label = resize_label(label, image.shape[:2])
        if self.cache_in_memory:
            self._cache[index] = (image, label)
        return image, label

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> dict[str, Any]:
        rcs_class: int | None = None
        if isinstance(key, tuple):
            if len(key) not in (2, 3):
                raise KeyError(f"dataset key {key!r}: expected index, (index, sample_seed) or "
                               "(index, sample_seed, rcs_class)")
            index, sample_seed = int(key[0]), int(key[1])
            rcs_class = int(key[2]) if len(key) == 3 else None
            rng: np.random.Generator | None = np.random.default_rng(sample_seed)
        else:
            index, rng = int(key), None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        image, label = self.load(index)
        if rcs_class is None:
            out = self.transform(image, label, rng)
        else:
            out = self.transform(image, label, rng, rcs_class=rcs_class)
        item = {"image": out[0], "label": out[1], "index": index}
        if len(out) > 2:  # TrainTransform with pseudo_margins: the crop's valid-pseudo-label mask
            item["valid"] = out[2]
        return item


# ------------------------------------------------------------------------------------------------------ registry
Decoder = Callable[[Path], np.ndarray]


def _decoder(pairs: list[Pair], ids_decoder: Decoder) -> Decoder:
    return read_train_ids if label_format_of(pairs) == "train_ids" else ids_decoder


def _gta5(root: Path, split: str, label_format: str) -> tuple[list[Pair], Decoder]:
    if split != "train":
        raise DatasetError(f"{root}: GTA5 has one split 'train', got split {split!r}")
    pairs = gta5_pairs(root, label_format)
    dec = LabelDecoder(read_label_ids, CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_LABEL_IDS, ("gta5", str(root), split))
    return pairs, _decoder(pairs, dec)


def _cityscapes(root: Path, split: str, label_format: str) -> tuple[list[Pair], Decoder]:
    pairs = cityscapes_pairs(root, split, label_format)
    dec = LabelDecoder(read_label_ids, CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_LABEL_IDS, ("cityscapes", str(root), split))
    return pairs, _decoder(pairs, dec)


def _synthia(root: Path, split: str, label_format: str) -> tuple[list[Pair], Decoder]:
    if split != "train":
        raise DatasetError(f"{root}: SYNTHIA has one split 'train', got split {split!r}")
    pairs = synthia_pairs(root, label_format)
    dec = LabelDecoder(read_synthia_label_ids, SYNTHIA_ID_TO_TRAIN, SYNTHIA_LABEL_IDS, ("synthia", str(root), split))
    return pairs, _decoder(pairs, dec)


DATASETS: dict[str, Callable[[Path, str, str], tuple[list[Pair], Decoder]]] = {
    "gta5": _gta5,
    "cityscapes": _cityscapes,
    "synthia": _synthia,
}


def build_dataset(name: str, root: str | Path, split: str, transform: Transform, cache_in_memory: bool = False, *,
                  label_format: str = "ids", resize_labels: bool = False, check_workers: int = 8
                  ) -> SegmentationDataset:
    """A ``SegmentationDataset`` over a dataset in its published layout (``name`` in ``DATASETS``).

    ``label_format``: ``ids``, ``train_ids`` (DAFormer's ``*_labelTrainIds.png``) or ``auto`` (see the module
    docstring). Image/label sizes are checked from the PNG headers with ``check_workers`` threads; mismatches are an
    error unless ``resize_labels``.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    root = Path(root).expanduser()
    pairs, decode = DATASETS[name](root, split, label_format)
    check_pair_sizes(pairs, f"{name} {split} split in {root}", resize_labels=resize_labels, workers=check_workers)
    return SegmentationDataset(pairs, decode, transform, cache_in_memory=cache_in_memory, resize_labels=resize_labels)
