"""Label conventions: the 19 Cityscapes train classes, the GTA5/Cityscapes and SYNTHIA id maps, the 19/16/13-class
evaluation protocols and ignore 255 (METHODS.md §7).

Datasets store their own label ids; ``encode_labels`` turns them into train ids through a 65536-entry lookup table
(so 16-bit SYNTHIA ids work). Ids that the dataset defines but the benchmark does not train on (Cityscapes
'unlabeled', 'ego vehicle', 'parking', ...) map to 255 silently; ids the dataset does not define at all map to 255
with one warning per dataset naming the file and the ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable

import numpy as np

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255
# The Cityscapes colour of each train class, for label previews and plots (ignore is drawn black).
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Cityscapes labelId -> trainId; GTA5 labels use the same ids.
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# SYNTHIA RAND_CITYSCAPES class id (R channel of GT/LABELS) -> trainId; terrain, truck and train do not exist there.
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}
# Every id each dataset defines (mapped or void). Cityscapes stores 'license plate' (id -1) as 255 in 8-bit files.
CITYSCAPES_LABEL_IDS: tuple[int, ...] = (*range(34), 255)
SYNTHIA_LABEL_IDS: tuple[int, ...] = tuple(range(23))

_P16 = (*range(0, 9), *range(10, 14), 15, 17, 18)
PROTOCOLS: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: _P16,
    13: tuple(c for c in _P16 if c not in (3, 4, 5)),
}

_LUT_SIZE = 65536
_WARNED: set[Hashable] = set()


def eval_class_ids(protocol: int) -> tuple[int, ...]:
    """The train ids scored under the 19-, 16- or 13-class protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is unknown: expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """(65536,) uint8 table with ``lut[label_id] = train_id`` and 255 for every id not in ``mapping``."""
    lut = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in mapping.items():
        if not 0 <= label_id < _LUT_SIZE or not 0 <= train_id <= IGNORE_INDEX:
            raise ValueError(f"label map entry {label_id} -> {train_id}: expected an id in [0, {_LUT_SIZE}) "
                             f"and a train id in [0, {IGNORE_INDEX}]")
        lut[label_id] = train_id
    return lut


def make_known(ids: Iterable[int]) -> np.ndarray:
    """(65536,) bool table, True for the ids a dataset defines (used to tell void ids from foreign ones)."""
    known = np.zeros(_LUT_SIZE, dtype=bool)
    known[np.asarray(list(ids), dtype=np.int64)] = True
    return known


def encode_labels(ids: np.ndarray, lut: np.ndarray, path: str, *, known: np.ndarray | None = None,
                  warn_key: Hashable | None = None) -> np.ndarray:
    """Dataset label ids (H, W) of any unsigned integer type → uint8 train ids (H, W), 255 = ignore.

    Ids outside the map become 255. When some of them are not dataset ids at all (``known`` False; without ``known``
    every unmapped id counts), a ``UserWarning`` naming ``path`` and those ids is issued once per ``warn_key``
    (default: the table itself), not once per image.
    """
    if ids.dtype.kind not in "ui" or ids.ndim != 2:
        raise ValueError(f"{path}: label ids must be a 2-D integer array, got {ids.dtype} with shape {ids.shape}")
    if ids.dtype.kind == "i" and ids.size and (ids.min() < 0 or ids.max() >= _LUT_SIZE):
        raise ValueError(f"{path}: label ids must lie in [0, {_LUT_SIZE}), got [{ids.min()}, {ids.max()}]")
    out = lut[ids]
    foreign = ~known[ids] if known is not None else out == IGNORE_INDEX
    if foreign.any():
        key = warn_key if warn_key is not None else hash(lut.tobytes())
        if key not in _WARNED:
            _WARNED.add(key)
            bad = np.unique(ids[foreign]).tolist()
            warnings.warn(f"{path}: label ids {bad} are not in the label map; they are mapped to ignore "
                          f"({IGNORE_INDEX}). Further files of this dataset are not reported.", UserWarning,
                          stacklevel=2)
    return out
