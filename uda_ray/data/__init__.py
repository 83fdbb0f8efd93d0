"""Datasets (GTA5, Cityscapes, SYNTHIA, the synthetic pair), label maps, transforms and seeded loaders."""

from uda_ray.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CLASS_COLOURS,
    CLASSES,
    IGNORE_INDEX,
    NUM_CLASSES,
    PROTOCOLS,
    SYNTHIA_ID_TO_TRAIN,
    encode_labels,
    eval_class_ids,
    make_lut,
)
from uda_ray.data.loaders import InfiniteSampler, build_train_loader, build_val_loader
from uda_ray.data.readers import (
    DATASETS,
    DatasetError,
    SegmentationDataset,
    build_dataset,
    cityscapes_pairs,
    gta5_pairs,
    synthia_pairs,
)
from uda_ray.data.transforms import EvalTransform, TrainTransform, normalize


def __getattr__(name: str) -> object:
    # Imported lazily so that `python -m uda_ray.data.synthetic` does not import the module twice.
    if name == "ensure_synthetic":
        from uda_ray.data.synthetic import ensure_synthetic

        return ensure_synthetic
    raise AttributeError(f"module 'uda_ray.data' has no attribute {name!r}")

__all__ = [
    "CITYSCAPES_ID_TO_TRAIN", "CLASS_COLOURS", "CLASSES", "DATASETS", "DatasetError", "EvalTransform", "IGNORE_INDEX",
    "InfiniteSampler", "NUM_CLASSES", "PROTOCOLS", "SYNTHIA_ID_TO_TRAIN", "SegmentationDataset", "TrainTransform",
    "build_dataset", "build_train_loader", "build_val_loader", "cityscapes_pairs", "encode_labels", "ensure_synthetic",
    "eval_class_ids", "gta5_pairs", "make_lut", "normalize", "synthia_pairs",
]
