"""Offline target labels: label PNGs that a pseudo_labels stage wrote for the target train split, read in place of
the split's own labels for self-training (``data.target_pseudo_labels``).

Layout: ``<folder>/labels/<image path relative to the dataset root, suffix .png>``: 8-bit train ids, 255 = ignore, at
the image's own size (``uda_ray.stages.kinds.pseudo_labels`` writes them so).
"""

from __future__ import annotations

from pathlib import Path

from uda_ray.data.readers import DatasetError, SegmentationDataset, read_train_ids

LABELS_DIR = "labels"


def offline_label_path(folder: Path, root: Path, image: Path) -> Path:
    """Where the offline label of ``image`` (under dataset ``root``) lies in ``folder``."""
    return Path(folder) / LABELS_DIR / Path(image).relative_to(root).with_suffix(".png")


def use_offline_labels(dataset: SegmentationDataset, root: Path, folder: Path) -> SegmentationDataset:
    """``dataset`` with every image paired with its offline label from ``folder`` instead of its own label; an image
    without one is an error that names the first missing file and the count."""
    folder, root = Path(folder), Path(root)
    if not (folder / LABELS_DIR).is_dir():
        raise DatasetError(f"data.target_pseudo_labels = {str(folder)!r}: no '{LABELS_DIR}' folder there (expected "
                           "the output of a pseudo_labels stage)")
    pairs = []
    for image, _ in dataset.pairs:
        try:
            pairs.append((image, offline_label_path(folder, root, image)))
        except ValueError as e:
            raise DatasetError(f"{image}: not under the target root {root} ({e})") from None
    missing = [lab for _, lab in pairs if not lab.is_file()]
    if missing:
        raise DatasetError(f"data.target_pseudo_labels = {str(folder)!r}: {len(missing)} of {len(pairs)} target "
                           f"train images have no offline label (first: {missing[0]}); were the labels made for "
                           f"this dataset ({root})?")
    dataset.pairs = pairs
    dataset.decode_label = read_train_ids
    return dataset
