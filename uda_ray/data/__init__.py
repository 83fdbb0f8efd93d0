"""Datasets (GTA5, Cityscapes, SYNTHIA, the synthetic pair), label maps, transforms and seeded loaders."""

from uda_ray.data.class_balanced import ClassBalancedSpec, build_class_balanced, class_balanced_list
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
from uda_ray.data.pil_photometric import Photometric
from uda_ray.data.rcs import (
    RareClassSampler,
    RareClassSpec,
    build_rcs,
    class_pixel_counts,
    class_probabilities,
    compute_class_stats,
    load_class_stats,
)
from uda_ray.data.readers import (
    DATASETS,
    LABEL_FORMATS,
    DatasetError,
    SegmentationDataset,
    build_dataset,
    check_pair_sizes,
    cityscapes_pairs,
    gta5_pairs,
    label_format_of,
    synthia_pairs,
)
from uda_ray.data.transforms import EvalTransform, TrainTransform, normalize, rescaled_size


def __getattr__(name: str) -> object:
    # Imported lazily so that `python -m uda_ray.data.synthetic` does not import the module twice.
    if name == "ensure_synthetic":
        from uda_ray.data.synthetic import ensure_synthetic

        return ensure_synthetic
    raise AttributeError(f"module 'uda_ray.data' has no attribute {name!r}")

__all__ = [
    "CITYSCAPES_ID_TO_TRAIN", "CLASS_COLOURS", "CLASSES", "DATASETS", "ClassBalancedSpec", "DatasetError",
    "EvalTransform", "IGNORE_INDEX", "InfiniteSampler", "LABEL_FORMATS", "NUM_CLASSES", "PROTOCOLS", "Photometric",
    "RareClassSampler", "RareClassSpec", "SYNTHIA_ID_TO_TRAIN", "SegmentationDataset", "TrainTransform",
    "build_class_balanced", "build_dataset", "build_rcs", "build_train_loader", "build_val_loader",
    "check_pair_sizes", "cityscapes_pairs", "class_balanced_list", "class_pixel_counts", "class_probabilities",
    "compute_class_stats", "encode_labels", "ensure_synthetic", "eval_class_ids", "gta5_pairs", "label_format_of",
    "load_class_stats", "make_lut", "normalize", "rescaled_size", "synthia_pairs",
]
